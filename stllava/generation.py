"""Batched generation shared by evaluation (``eval.model_vqa``) and self-training
(``selftrain.questions``, ``selftrain.answers``): prompts + images → decoded strings.

:func:`generate` takes rendered prompts (strings holding ``<image>``), PIL images (one per
``<image>``) and :class:`GenerationSettings`; it tokenizes with ``tokenizer_image_token``, pads on
the LEFT with pad = unk and an attention mask, preprocesses the images exactly as training does
(:func:`stllava.mm_utils.process_images` with the model config's ``image_aspect_ratio``: ``pad`` =
pad to a square with the processor's mean colour), runs ``model.generate`` once for the whole
batch (KV cache), stops each row at ``</s>`` and returns the stripped texts in prompt order.

**Batch-size invariance.** An item's output must not depend on which other items share its batch:

* *Greedy* (``temperature == 0``): left padding is masked and position ids come from the mask, so
  a row computes the same logits alone or in a batch (up to float rounding; tested identical
  between batch sizes 1 and 8 on CPU fp32).
* *Sampling* (``temperature > 0``): transformers draws every row's token from the one global RNG
  (``torch.multinomial`` over the batch), so a row's sample depends on the batch it is in and on
  its position there. We keep ``model.generate`` (KV cache, stopping, finished-row padding) but
  run it in greedy mode with :class:`PerRowSampler` as the last logits processor: it applies
  transformers' own temperature → top-k → top-p warpers (the order of HF sampling), then draws
  each row's token with that row's own ``torch.Generator`` seeded from the item's seed, and hands
  back scores that are 0 at the drawn token and −inf elsewhere, so the greedy argmax picks the
  draw. A row's random stream is thus a function of its seed only: sampled outputs are identical
  between batch sizes 1 and 8 (and any order), and still generated batched.

The three generating CLIs share their flags and loop through :mod:`stllava.tooling`.
"""
from __future__ import annotations

import collections
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch
from PIL import Image
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from stllava.constants import DEFAULT_IMAGE_TOKEN
from stllava.errors import StllavaError
from stllava.mm_utils import process_images, tokenizer_image_token

logger = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")
STOP_STR = "</s>"


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings. ``temperature == 0`` means greedy (``top_k``/``top_p`` then unused).

    ``top_k`` 0/None and ``top_p`` None/1.0 switch those filters off. ``min_new_tokens`` forbids
    ``</s>`` before that many tokens (benchmarks and tests of random-init models use it).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_new_tokens: int = 0
    num_beams: int = 1

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.num_beams < 1 or (self.num_beams > 1 and self.do_sample):
            raise ValueError("num_beams > 1 is for greedy decoding only (temperature 0)")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def to_dict(self) -> dict:
        return asdict(self)


def derive_seed(*parts) -> int:
    """A seed in [0, 2**63) from ``parts`` (e.g. base seed, image path, question index).

    Stable across processes, Python versions and machines (sha256 of the parts' ``repr``s, not
    Python's salted ``hash``), so a given item always gets the same seed."""
    blob = "\x1f".join(repr(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    """Yield lists of ``n`` consecutive items (the last may be shorter). Refuses n < 1."""
    if n < 1:
        raise ValueError(f"batch size must be ≥ 1, got {n}")
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class PerRowSampler(LogitsProcessor):
    """Sample each row with its own ``torch.Generator``; return one-hot scores (0 / −inf).

    Used as the LAST logits processor of a *greedy* ``generate`` call, so the argmax takes the
    sampled token. Rows past their ``</s>`` keep drawing from their own generators; that never
    touches the other rows' streams.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_k: int | None = None,
                 top_p: float | None = None, device: torch.device | str = "cpu"):
        if temperature <= 0:
            raise ValueError("PerRowSampler needs temperature > 0 (use greedy decoding for 0)")
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        warpers = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"PerRowSampler has {len(self.generators)} seeds but the batch has "
                             f"{scores.shape[0]} rows")
        probs = torch.softmax(self.warpers(input_ids, scores).float(), dim=-1)
        picks = torch.stack([torch.multinomial(probs[i], 1, generator=g)
                             for i, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picks.to(out.device), 0.0)


def _images_per_prompt(prompts: Sequence[str], images: Sequence) -> list[Image.Image]:
    """Flatten ``images`` (per prompt: an image, a list of images, or None) in ``<image>`` order,
    refusing a count that does not match the prompt's ``<image>`` tokens."""
    if len(images) != len(prompts):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(images)} image entries; "
                         "give one entry (an image, a list, or None) per prompt")
    flat: list[Image.Image] = []
    for i, (prompt, entry) in enumerate(zip(prompts, images)):
        entry = [] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]
        n_tokens = prompt.count(DEFAULT_IMAGE_TOKEN)
        if n_tokens != len(entry):
            raise ValueError(f"generate: prompt {i} holds {n_tokens} {DEFAULT_IMAGE_TOKEN} token(s) but "
                             f"{len(entry)} image(s) were given for it")
        flat.extend(entry)
    return flat


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(input_ids, attention_mask)``, both ``[B, max_len]`` long tensors, padded on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def clean_output(text: str) -> str:
    """Strip whitespace and a trailing literal ``</s>`` (LLaVA's post-processing of an answer)."""
    text = text.strip()
    if text.endswith(STOP_STR):
        text = text[: -len(STOP_STR)]
    return text.strip()


@dataclass
class PreparedBatch:
    """Model inputs of one batch: left-padded ``input_ids`` and ``attention_mask`` ``[B, T]``,
    ``pixel_values`` ``[N_images, 3, H, W]`` (or None) — CPU tensors, made by :func:`prepare_batch`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def prepare_batch(tokenizer, image_processor, model_config, prompts: Sequence[str],
                  images: Sequence) -> PreparedBatch:
    """Tokenize and left-pad ``prompts`` (pad = the tokenizer's pad, else unk) and preprocess
    ``images`` as training does (:func:`process_images` with ``model_config.image_aspect_ratio``).

    ``images``: per prompt, a PIL image, a list of them (one per ``<image>``, in order) or None.
    CPU only and model-free, so it can run in a background thread (see :func:`prefetch`).
    Refuses (ValueError) an empty batch, image counts that disagree with the prompts' ``<image>``
    tokens, images without an image processor, and ``mm_use_im_start_end`` models.
    """
    if not prompts:
        raise ValueError("generate: no prompts given")
    if getattr(model_config, "mm_use_im_start_end", False):
        # Training refuses this option too (stllava.train.arguments); no released STLLaVA-Med
        # checkpoint uses it.
        raise ValueError("generate: models with mm_use_im_start_end=True are not supported")
    flat_images = _images_per_prompt(prompts, images)
    ids, mask = left_pad([tokenizer_image_token(p, tokenizer) for p in prompts], _pad_id(tokenizer))
    pixels = None
    if flat_images:
        if image_processor is None:
            raise ValueError("generate: images were given but the model has no image processor "
                             "(its config has no mm_vision_tower)")
        # The same image object given for several prompts (n questions about one image, two
        # answers to one question) is preprocessed once.
        unique: dict[int, int] = {}
        for im in flat_images:
            unique.setdefault(id(im), len(unique))
        distinct = list({id(im): im for im in flat_images}.values())
        pixels = process_images(distinct, image_processor, model_config)
        if len(distinct) != len(flat_images):
            pixels = pixels[torch.tensor([unique[id(im)] for im in flat_images])]
    return PreparedBatch(ids, mask, pixels)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id


def generate_prepared(model, tokenizer, batch: PreparedBatch, settings: GenerationSettings,
                      seeds: Sequence[int] | None = None, stopping_criteria=None) -> list[str]:
    """Run one batched ``model.generate`` on a :class:`PreparedBatch`; return the decoded new
    tokens per row (special tokens removed, stripped, a trailing ``</s>`` removed).

    ``seeds``: one per row, required when sampling (``settings.temperature > 0``), ignored for
    greedy decoding (ValueError when missing or of the wrong length). ``stopping_criteria``: extra
    per-row criteria, added to ``</s>`` and the length limit (the server ends rows early with them)."""
    if settings.do_sample and (seeds is None or len(seeds) != len(batch)):
        raise ValueError(f"generate: sampling needs one seed per prompt ({len(batch)} prompts, "
                         f"{'no' if seeds is None else len(seeds)} seeds); derive them with derive_seed")
    device = model.device
    pixels = batch.pixel_values
    if pixels is not None:
        pixels = pixels.to(device=device, dtype=model.dtype)
    kwargs = dict(max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens or None,
                  do_sample=False, num_beams=settings.num_beams, use_cache=True,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=_pad_id(tokenizer),
                  bos_token_id=tokenizer.bos_token_id)
    if stopping_criteria is not None:
        kwargs["stopping_criteria"] = stopping_criteria
    if settings.do_sample:
        kwargs["logits_processor"] = LogitsProcessorList([PerRowSampler(
            seeds, settings.temperature, settings.top_k, settings.top_p, device=device)])
    out = model.generate(batch.input_ids.to(device), images=pixels,
                         attention_mask=batch.attention_mask.to(device), **kwargs)
    return [clean_output(t) for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def generate(model, tokenizer, image_processor, prompts: Sequence[str], images: Sequence,
             settings: GenerationSettings, seeds: Sequence[int] | None = None) -> list[str]:
    """Generate one completion per prompt, all in one batched ``model.generate`` call.

    ``prompts``: rendered conversation prompts; ``images``: per prompt, a PIL image, a list of
    them (one per ``<image>``, in order) or None; ``seeds``: one per prompt when sampling.
    Returns the cleaned completions in prompt order. Same refusals as :func:`prepare_batch`
    and :func:`generate_prepared`.
    """
    if settings.do_sample and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError(f"generate: sampling needs one seed per prompt ({len(prompts)} prompts, "
                         f"{'no' if seeds is None else len(seeds)} seeds); derive them with derive_seed")
    batch = prepare_batch(tokenizer, image_processor, model.config, prompts, images)
    return generate_prepared(model, tokenizer, batch, settings, seeds)


def prefetch(jobs: Iterable[T], prepare: Callable[[T], U], depth: int = 2) -> Iterator[tuple[T, U]]:
    """Yield ``(job, prepare(job))`` in order, preparing up to ``depth`` jobs ahead in one
    background thread (image decoding and resizing release the GIL), so the CPU work of the
    next batch overlaps the generation of the current one where a core is idle (on a saturated
    CPU nothing overlaps; a DataLoader with worker processes measured no better than this
    thread on the 2-core build machine). An exception in ``prepare`` is raised here, at that
    job's turn."""
    if depth < 1:
        for job in jobs:
            yield job, prepare(job)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stllava-prefetch") as pool:
        pending: collections.deque = collections.deque()
        it = iter(jobs)
        for job in it:
            pending.append((job, pool.submit(prepare, job)))
            if len(pending) > depth:
                done_job, fut = pending.popleft()
                yield done_job, fut.result()
        while pending:
            done_job, fut = pending.popleft()
            yield done_job, fut.result()


def render_prompt(conv_mode: str, messages: Sequence[tuple[str, str | None]]) -> str:
    """Render ``messages`` (role index or role name, text; text None = the generation slot)
    with template ``conv_mode``. Roles may be given as indices into the template's roles
    (0 = USER, 1 = ASSISTANT, 2 = VUSER for v1_sq)."""
    from stllava.conversation import get_conv_template

    conv = get_conv_template(conv_mode)
    for role, text in messages:
        conv.append_message(conv.roles[role] if isinstance(role, int) else role, text)
    return conv.get_prompt()


def image_prompt_text(question: str) -> str:
    """The first user turn for an image question: ``"<image>\\n" + question``, any ``<image>``
    already in the question removed (LLaVA's ``model_vqa`` rule)."""
    return DEFAULT_IMAGE_TOKEN + "\n" + question.replace(DEFAULT_IMAGE_TOKEN, "").strip()


def load_rgb(path: str, need=None) -> Image.Image:
    """Return the image at ``path`` decoded completely, as RGB; a JPEG at the reduced size
    ``need`` (a :class:`stllava.data.images.DecodeSize`, from :func:`stllava.mm_utils.decode_size`)
    allows, as training decodes it. Raises :class:`ImageError` naming the file and what is wrong
    (missing, empty, unreadable, truncated) — never a partial image."""
    from stllava.data.images import ImageLoadError, load_image

    try:
        return load_image(str(path), need=need)
    except ImageLoadError as e:
        raise ImageError(e.path, e.kind, e.detail) from None


class ImageError(StllavaError, ValueError):
    """An image that cannot be used; ``path``, ``kind`` (e.g. "missing image") and ``detail``."""

    def __init__(self, path: str, kind: str, detail: str = ""):
        self.path, self.kind, self.detail = str(path), kind, detail
        super().__init__(f"{kind}: {path}" + (f" ({detail})" if detail else ""))

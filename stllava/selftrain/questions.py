"""Stage 2(a–b): the stage-1 model describes each image, then asks questions about it (SPEC §5).

    python -m stllava.selftrain.questions --model-path CKPT [--model-base BASE] \\
        --image-folder IMAGES --out questions.jsonl [--n-questions 5] [--seed 0] \\
        [--batch-size 8] [--offset 0] [--limit N] [--dedup]

**Images**: every file under ``--image-folder`` (recursively) whose extension is .jpg .jpeg .png
.bmp .tif .tiff (any case), sorted by relative path (``/``-separated); ``--offset``/``--limit``
select a slice of that list.

**Per image** (the published ``visual_sq.py``, batched and seeded):

1. greedy description of ``"<image>\\nCan you describe the image in detail?"`` — template
   ``--conv-mode`` (``v1_sq``) ``[USER: prompt, ASSISTANT: <slot>]``, ≤ ``--max-desc-tokens`` 1024;
2. ``--n-questions`` (5) sampled questions from ``[USER: prompt, ASSISTANT: description,
   VUSER: <slot>]`` with T = ``--temperature`` 1.2, ``--top-k`` 300, ``--top-p`` 0.95,
   ≤ ``--max-question-tokens`` 300; ``</s>`` stripped. Question k of image ``rel`` is sampled with
   seed ``derive_seed(--seed, rel, k)``: the same seed gives the same questions, at any batch size,
   offset or resume point. Empty questions are dropped and counted; ``--dedup`` drops repeats of
   an identical question (counted).

**Output**: one JSON line per image, appended and flushed as each batch of images finishes::

    {"image": "sub/img1.jpg", "description": "...", "questions": ["...", ...],
     "question_ids": ["sub/img1.jpg#q0", ...], "question_seeds": [...],
     "dropped": {"empty": 0, "duplicate": 0}, "seed": 0, "model": "ckpt-name",
     "settings": {...decoding settings...}}

``question_ids`` keep the sample index k (so ids stay stable when a question is dropped).
**Resume**: rerunning the same command skips images already in ``--out``; a last line cut short
by a kill is reported, removed and regenerated. Mixing settings in one file is refused.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from stllava.constants import DEFAULT_IMAGE_TOKEN
from stllava.errors import StllavaError
from stllava.generation import (
    GenerationSettings,
    ImageError,
    add_model_args,
    batched,
    derive_seed,
    generate,
    load_rgb,
    prefetch,
    render_prompt,
)
from stllava.jsonl import JsonlError, JsonlWriter, iter_jsonl

logger = logging.getLogger("stllava.selftrain.questions")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
DESCRIBE_PROMPT = "Can you describe the image in detail?"


class SelfTrainError(StllavaError, ValueError):
    """Bad input or a resume conflict; the message names the file, the record and the fix."""


# --- images ---------------------------------------------------------------------------------
def list_images(folder: str | os.PathLike, offset: int = 0, limit: int | None = None) -> list[str]:
    """Relative ``/``-paths of every image file under ``folder`` (recursive, extensions
    :data:`IMAGE_EXTENSIONS` in any case), sorted, then sliced ``[offset : offset + limit]``.
    Refuses a folder that does not exist and a negative offset/limit."""
    root = Path(folder)
    if not root.is_dir():
        raise SelfTrainError(f"{folder}: no such folder; fix: --image-folder")
    if offset < 0 or (limit is not None and limit < 0):
        raise SelfTrainError(f"--offset and --limit must be ≥ 0 (got {offset}, {limit})")
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return found[offset:None if limit is None else offset + limit]


# --- resume ---------------------------------------------------------------------------------
def read_done(path: str | os.PathLike, key: str, expect: dict) -> set[str]:
    """Values of ``key`` in the records of an existing output file (empty set when absent).

    A cut-short last line (what a kill leaves) is reported and ignored — its item is redone and
    the line rewritten. Refuses (SelfTrainError) a malformed line elsewhere, and a record whose
    fields differ from ``expect`` (e.g. ``{"settings": ..., "model": ...}``): one file holds one
    run's settings, so the error names what differs."""
    if not os.path.exists(path):
        return set()
    done: set[str] = set()
    try:
        for line, rec in iter_jsonl(path, allow_truncated_tail=True):
            for field, want in expect.items():
                have = rec.get(field)
                if have == want:
                    continue
                if isinstance(want, dict) and isinstance(have, dict):
                    keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                    have = {k: have.get(k) for k in keys}
                    want = {k: want.get(k) for k in keys}
                raise SelfTrainError(
                    f"{path}, line {line}: written with {field} {have!r}, this run has {want!r}; fix: rerun "
                    "with the file's settings to resume it, or write to another --out")
            done.add(str(rec.get(key)))
    except JsonlError as e:
        raise SelfTrainError(f"{e} (cannot resume: fix the line or choose another --out)") from None
    return done


def model_name(args) -> str:
    """The name recorded as ``model`` (LLaVA's rule: the checkpoint folder's name)."""
    from stllava.mm_utils import get_model_name_from_path

    return get_model_name_from_path(os.path.expanduser(args.model_path))


def load_model(args):
    """(tokenizer, model, image_processor) for ``--model-path``/``--model-base``."""
    from stllava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(
        os.path.expanduser(args.model_path), args.model_base, model_name(args), device=args.device)
    return tokenizer, model, processor


# --- generation -----------------------------------------------------------------------------
def describe_prompt(conv_mode: str, prompt: str = DESCRIBE_PROMPT) -> str:
    return render_prompt(conv_mode, [(0, "<image>\n" + prompt), (1, None)])


def question_prompt(conv_mode: str, description: str, prompt: str = DESCRIBE_PROMPT) -> str:
    """``[USER: "<image>\\n" + prompt, ASSISTANT: description, VUSER: <slot>]``; refuses a
    template without a third (VUSER) role. A literal ``<image>`` the model wrote into its
    description is removed (it would stand for a second image)."""
    from stllava.conversation import get_conv_template

    roles = get_conv_template(conv_mode).roles
    if len(roles) < 3:
        raise SelfTrainError(f"--conv-mode {conv_mode!r} has no VUSER role (roles {list(roles)}); use v1_sq")
    description = description.replace(DEFAULT_IMAGE_TOKEN, "").strip()
    return render_prompt(conv_mode, [(0, "<image>\n" + prompt), (1, description), (2, None)])


def finish_questions(questions: list[str], ids: list[str], seeds: list[int], dedup: bool):
    """Drop empty questions and, with ``dedup``, repeats of an identical (stripped) question.
    Returns ``(questions, ids, seeds, dropped)`` with ``dropped = {"empty": n, "duplicate": m}``."""
    kept, kept_ids, kept_seeds, seen = [], [], [], set()
    dropped = {"empty": 0, "duplicate": 0}
    for q, qid, seed in zip(questions, ids, seeds):
        if not q:
            dropped["empty"] += 1
            continue
        if dedup and q in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(q)
        kept.append(q)
        kept_ids.append(qid)
        kept_seeds.append(seed)
    return kept, kept_ids, kept_seeds, dropped


def settings_of(args) -> dict:
    """What determines the output: stored in every record and compared on resume."""
    return {"conv_mode": args.conv_mode, "describe_prompt": args.describe_prompt,
            "max_desc_tokens": args.max_desc_tokens, "n_questions": args.n_questions,
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "max_question_tokens": args.max_question_tokens, "min_new_tokens": args.min_new_tokens,
            "dedup": args.dedup, "seed": args.seed}


def run(args: argparse.Namespace, loaded: tuple | None = None) -> dict:
    """Write questions for the selected images; returns the summary dict.

    ``loaded`` = (tokenizer, model, image_processor) skips loading ``--model-path``."""
    if args.n_questions < 1 or args.batch_size < 1:
        raise SelfTrainError("--n-questions and --batch-size must be ≥ 1")
    try:
        desc_settings = GenerationSettings(max_new_tokens=args.max_desc_tokens)
        q_settings = GenerationSettings(max_new_tokens=args.max_question_tokens, temperature=args.temperature,
                                        top_k=args.top_k, top_p=args.top_p, min_new_tokens=args.min_new_tokens)
    except ValueError as e:
        raise SelfTrainError(f"invalid decoding flags: {e}") from None
    question_prompt(args.conv_mode, "")  # refuses a template without VUSER before loading the model
    settings = settings_of(args)
    model_id = model_name(args)
    images = list_images(args.image_folder, args.offset, args.limit)
    done = read_done(args.out, "image", {"settings": settings, "model": model_id})
    pending = [im for im in images if im not in done]
    summary = {"images": len(images), "already_done": len(images) - len(pending), "written": 0,
               "questions": 0, "dropped_empty": 0, "dropped_duplicate": 0, "skipped_images": [],
               "seconds": 0.0}
    logger.info("%d images selected under %s: %d already in %s, %d to do", len(images), args.image_folder,
                summary["already_done"], args.out, len(pending))
    if not pending:
        return summary
    tokenizer, model, processor = loaded if loaded is not None else load_model(args)

    def prepare(block: list[str]):
        ok = []
        for rel in block:
            try:
                ok.append((rel, load_rgb(os.path.join(args.image_folder, rel))))
            except ImageError as e:
                if not args.skip_bad_images:
                    raise SelfTrainError(f"{e}; fix or remove the file, or pass --skip-bad-images to skip "
                                         "and count it") from None
                logger.warning("skipping %s", e)
                summary["skipped_images"].append({"image": rel, "reason": e.kind})
        return ok

    t0 = time.perf_counter()
    with JsonlWriter(args.out) as out, tqdm(total=len(pending), desc="questions", unit="img",
                                            disable=args.no_progress) as bar:
        for block, loaded_images in prefetch(batched(pending, args.batch_size), prepare):
            if loaded_images:
                rels = [rel for rel, _ in loaded_images]
                pics = [im for _, im in loaded_images]
                prompt = describe_prompt(args.conv_mode, args.describe_prompt)
                descriptions = generate(model, tokenizer, processor, [prompt] * len(pics), pics, desc_settings)
                items = [(i, k) for i in range(len(pics)) for k in range(args.n_questions)]
                seeds = {(i, k): derive_seed(args.seed, rels[i], k) for i, k in items}
                sampled = {}
                for part in batched(items, args.batch_size):
                    prompts = [question_prompt(args.conv_mode, descriptions[i], args.describe_prompt)
                               for i, _ in part]
                    texts = generate(model, tokenizer, processor, prompts, [pics[i] for i, _ in part],
                                     q_settings, [seeds[it] for it in part])
                    sampled.update(zip(part, texts))
                for i, rel in enumerate(rels):
                    ks = range(args.n_questions)
                    qs, ids, qseeds, dropped = finish_questions(
                        [sampled[(i, k)] for k in ks], [f"{rel}#q{k}" for k in ks],
                        [seeds[(i, k)] for k in ks], args.dedup)
                    out.write({"image": rel, "description": descriptions[i], "questions": qs,
                               "question_ids": ids, "question_seeds": qseeds, "dropped": dropped,
                               "seed": args.seed, "model": model_id, "settings": settings})
                    summary["written"] += 1
                    summary["questions"] += len(qs)
                    summary["dropped_empty"] += dropped["empty"]
                    summary["dropped_duplicate"] += dropped["duplicate"]
            bar.update(len(block))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, model_help="stage-1 checkpoint folder")
    p.add_argument("--image-folder", required=True, help="folder of unlabelled images (searched recursively)")
    p.add_argument("--out", required=True, help="questions JSONL (appended to: resumable)")
    p.add_argument("--offset", type=int, default=0, help="skip this many images of the sorted list")
    p.add_argument("--limit", type=int, default=None, help="take at most this many images")
    p.add_argument("--n-questions", type=int, default=5, help="questions sampled per image")
    p.add_argument("--conv-mode", default="v1_sq", help="template with a VUSER role")
    p.add_argument("--describe-prompt", default=DESCRIBE_PROMPT, help="the first (description) request")
    p.add_argument("--max-desc-tokens", type=int, default=1024, help="description length limit (greedy)")
    p.add_argument("--temperature", type=float, default=1.2, help="question sampling temperature")
    p.add_argument("--top-k", type=int, default=300, help="question sampling top-k (0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="question sampling top-p (1 = off)")
    p.add_argument("--max-question-tokens", type=int, default=300, help="question length limit")
    p.add_argument("--min-new-tokens", type=int, default=0,
                   help="forbid </s> before this many question tokens (smoke tests of random-init models)")
    p.add_argument("--seed", type=int, default=0, help="base seed; question k of image I uses derive_seed(seed, I, k)")
    p.add_argument("--dedup", action="store_true", help="drop repeats of an identical question (counted)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per generate call (images per block)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip and count unreadable images instead of failing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        s = run(args)
    except SelfTrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{s['written']} images written ({s['questions']} questions; dropped {s['dropped_empty']} empty, "
          f"{s['dropped_duplicate']} duplicate) in {s['seconds']:.1f} s; {s['already_done']} already done; "
          f"{len(s['skipped_images'])} unreadable images skipped → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage-1 (self-questioning SFT) data: a lazy dataset over LLaVA-Med-format JSON.

A record is ``{"id", "image"?, "conversations": [{"from": "human"|"gpt"|"vuser", "value"}, ...]}``.
Nothing is tokenized or loaded until ``__getitem__``; then the image is read from ``image_folder``
and preprocessed (``pad`` aspect ratio, CLIP processor), and the conversation rendered and masked
by :func:`stllava.data.preprocess.preprocess`.

**Reproducible VUSER draws.** With ``--version v1_sq`` each human turn after the first becomes a
VUSER turn with probability ``sq_r``. The draw uses :func:`~stllava.data.preprocess.make_sq_rng`
seeded from (seed, epoch, record index), so it is the same whatever the number of dataloader
workers. How the epoch reaches the workers: the training samplers (``stllava.train.sampler``)
yield ``(epoch, index)`` pairs, and the sampler runs in the main process, where the Trainer calls
its ``set_epoch`` at every epoch. Workers therefore never rely on their (stale) copy of the
dataset's ``epoch`` attribute, even with ``persistent_workers``. A plain integer index (evaluation,
or any other sampler) uses the dataset's own ``epoch``, set by :meth:`set_epoch`.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from stllava.data.images import blank_image, image_path, load_image
from stllava.data.preprocess import make_sq_rng, preprocess
from stllava.data.verify import record_name
from stllava.mm_utils import process_images

logger = logging.getLogger(__name__)

# LLaVA's length estimate for grouping: words of the conversation, plus 128 for an image.
IMAGE_LENGTH_ESTIMATE = 128


class LazySupervisedDataset(Dataset):
    """Records → ``{"input_ids", "labels", "image"?}``, lazily.

    ``indices`` are the records' positions in the original file (after bad records were skipped);
    they name records in errors and seed the VUSER draws, so skipping a record does not change
    the draws of the others. ``image_processor`` None means a text-only model (no ``image`` key).
    """

    def __init__(self, records: Sequence[dict], tokenizer, image_processor=None, *, image_folder: str | None = None,
                 version: str = "v1_sq", sq_r: float = 0.0, seed: int = 42, image_aspect_ratio: str = "pad",
                 indices: Sequence[int] | None = None):
        self.records = list(records)
        self.indices = list(indices) if indices is not None else list(range(len(self.records)))
        if len(self.indices) != len(self.records):
            raise ValueError(f"{len(self.indices)} indices for {len(self.records)} records")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_folder = image_folder
        self.version = version
        self.sq_r = sq_r
        self.seed = seed
        self.image_aspect_ratio = image_aspect_ratio
        self.epoch = 0
        self.mismatches = 0  # tokenization mismatches seen by this process (preprocess warns for each)
        if image_processor is None and any("image" in r for r in self.records):
            raise ValueError("the data has records with images but no image processor was given "
                             "(is --vision_tower set / does the model have a vision tower?)")
        self._blank = blank_image(image_processor) if image_processor is not None else None

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for integer indices (the training samplers pass it with each index instead)."""
        self.epoch = int(epoch)

    @property
    def lengths(self) -> list[int]:
        """LLaVA's length estimate per record: words + 128 for an image."""
        return [sum(len(t["value"].split()) for t in r["conversations"])
                + (IMAGE_LENGTH_ESTIMATE if "image" in r else 0) for r in self.records]

    @property
    def modality_lengths(self) -> list[int]:
        """Word counts, negative for text-only records (LLaVA's ``modality_lengths``). A record with
        no words at all counts 1 so its sign still says its modality."""
        out = []
        for r in self.records:
            n = max(1, sum(len(t["value"].split()) for t in r["conversations"]))
            out.append(n if "image" in r else -n)
        return out

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        rec, orig = self.records[i], self.indices[i]
        name = record_name(rec, orig)
        has_image = "image" in rec
        rng = make_sq_rng(self.seed, epoch, orig)
        out = preprocess([rec["conversations"]], self.tokenizer, has_image=has_image, version=self.version,
                         sq_r=self.sq_r, rng=rng, record_ids=[rec.get("id", orig)])
        self.mismatches += out["mismatches"]
        item = {"input_ids": out["input_ids"][0], "labels": out["labels"][0]}
        if has_image:
            pil = load_image(image_path(self.image_folder, rec["image"]), record=name)
            item["image"] = process_images([pil], self.image_processor,
                                           {"image_aspect_ratio": self.image_aspect_ratio})[0]
        elif self._blank is not None:
            item["image"] = self._blank.clone()
        return item


def build_sft_dataset(data_path: str, tokenizer, image_processor, *, image_folder: str | None, version: str,
                      sq_r: float, seed: int, image_aspect_ratio: str, on_bad_sample: str = "stop",
                      model_max_length: int | None = None, image_tokens: int = 576, verify_workers: int = 8,
                      ) -> LazySupervisedDataset:
    """Load ``data_path``, check it (:func:`stllava.data.verify.verify_records`) and apply
    ``on_bad_sample``; returns the dataset of the records to train on.

    Raises :class:`stllava.data.verify.BadDataError` with the full report when records are bad
    and ``on_bad_sample`` is ``stop``. Under torch.distributed the check runs on rank 0 only and
    its report is broadcast, so every rank trains on the same records.
    """
    from stllava.data.verify import apply_bad_sample_policy, load_records, verify_records

    records = load_records(data_path)
    report = None
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not distributed or dist.get_rank() == 0:
        report = verify_records(records, image_folder, data_path=data_path, version=version, tokenizer=tokenizer,
                                model_max_length=model_max_length, image_tokens=image_tokens,
                                workers=verify_workers)
        logger.info("data check: %s", report.summary())
    if distributed:
        box = [report]
        dist.broadcast_object_list(box, src=0)
        report = box[0]
    keep = apply_bad_sample_policy(records, report, on_bad_sample)
    return LazySupervisedDataset([records[i] for i in keep], tokenizer, image_processor, image_folder=image_folder,
                                 version=version, sq_r=sq_r, seed=seed, image_aspect_ratio=image_aspect_ratio,
                                 indices=keep)


# ---------------------------------------------------------------------------------------------
# A tiny learnable task (tests, benchmarks, smoke runs): the answer depends on the image.

TOY_COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}


def write_colour_dataset(out_dir: str, n: int = 16, n_text: int = 0, seed: int = 0,
                         image_size: tuple[int, int] = (40, 28)) -> tuple[str, str]:
    """Write ``n`` image records (a red or blue picture, non-square so ``pad`` matters;
    "What colour is the image?" → the colour; a second turn for VUSER conversion) and ``n_text``
    text-only records to ``out_dir``. Returns ``(data_path, image_folder)``."""
    import json
    import os
    import random

    from PIL import Image

    rng = random.Random(seed)
    folder = os.path.join(out_dir, "images")
    os.makedirs(folder, exist_ok=True)
    records = []
    names = sorted(TOY_COLOURS)
    for i in range(n):
        colour = names[i % len(names)]
        base = TOY_COLOURS[colour]
        im = Image.new("RGB", image_size, tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in base))
        fname = f"toy_{i:04d}.png"
        im.save(os.path.join(folder, fname))
        records.append({"id": f"toy-{i}", "image": fname, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the image?"},
            {"from": "gpt", "value": colour},
            {"from": "human", "value": "Is the image red?"},
            {"from": "gpt", "value": "Yes" if colour == "red" else "No"},
        ]})
    for j in range(n_text):
        records.append({"id": f"text-{j}", "conversations": [
            {"from": "human", "value": f"How many kidneys does a person have? ({j})"},
            {"from": "gpt", "value": "two"},
        ]})
    data_path = os.path.join(out_dir, "toy_sft.json")
    with open(data_path, "w") as f:
        json.dump(records, f, indent=1)
    return data_path, folder

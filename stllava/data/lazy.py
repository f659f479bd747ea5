"""What the SFT and DPO datasets share (``stllava.data.sft``, ``stllava.data.preference``).

:class:`LazyLlavaDataset` holds the records and the image settings, names records by their
position in the original file, gives the length estimates of the length-grouped samplers and
loads a record's image (or the blank image of a text-only record) as training preprocesses it.
:func:`load_checked_records` loads a data file, checks it once (rank 0 under torch.distributed)
and applies ``--on_bad_sample``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from stllava.data.images import blank_image, image_path, load_image
from stllava.data.verify import DataFileError, VerifyReport, apply_bad_sample_policy, load_records, record_name
from stllava.mm_utils import decode_size, process_images

logger = logging.getLogger(__name__)

# LLaVA's length estimate for grouping: words of the conversation, plus 128 for an image.
IMAGE_LENGTH_ESTIMATE = 128


class LazyLlavaDataset(Dataset):
    """Base of the lazy datasets: records in, nothing tokenized or loaded before ``__getitem__``.

    ``indices`` are the records' positions in the original file (after bad records were skipped);
    they name records in errors. ``image_processor`` None means a text-only model (its samples get
    no ``image``); refuses (ValueError) records with images then, and ``indices`` of another length.
    Subclasses give :meth:`words` and ``__getitem__``.
    """

    def __init__(self, records: Sequence[dict], tokenizer, image_processor=None, *, image_folder: str | None,
                 version: str, image_aspect_ratio: str = "pad", indices: Sequence[int] | None = None):
        self.records = list(records)
        self.indices = list(indices) if indices is not None else list(range(len(self.records)))
        if len(self.indices) != len(self.records):
            raise ValueError(f"{len(self.indices)} indices for {len(self.records)} records")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_folder = image_folder
        self.version = version
        self.image_aspect_ratio = image_aspect_ratio
        self.epoch = 0
        self.mismatches = 0  # tokenization mismatches seen by this process (preprocess warns for each)
        if image_processor is None and any("image" in r for r in self.records):
            raise ValueError("the data has records with images but no image processor was given "
                             "(is --vision_tower set / does the model have a vision tower?)")
        self._blank = blank_image(image_processor) if image_processor is not None else None
        # JPEGs decoded at the reduced size preprocessing allows, as inference decodes them.
        self._decode = decode_size(image_processor, {"image_aspect_ratio": image_aspect_ratio})

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for integer indices (the training samplers pass it with each index instead);
        datasets without random draws (preference pairs) ignore it."""
        self.epoch = int(epoch)

    def words(self, record: dict) -> int:
        """The record's word count, the base of the length estimates."""
        raise NotImplementedError

    @property
    def lengths(self) -> list[int]:
        """LLaVA's length estimate per record: :meth:`words` + 128 for an image."""
        return [self.words(r) + (IMAGE_LENGTH_ESTIMATE if "image" in r else 0) for r in self.records]

    @property
    def modality_lengths(self) -> list[int]:
        """:meth:`words`, negative for text-only records (LLaVA's ``modality_lengths``). A record with
        no words at all counts 1 so its sign still says its modality."""
        return [max(1, self.words(r)) * (1 if "image" in r else -1) for r in self.records]

    def record_image(self, record: dict, orig: int) -> torch.Tensor | None:
        """The record's image preprocessed as training does (``image_aspect_ratio``, the CLIP
        processor), ``[3, H, W]``; the blank image for a text-only record of a multimodal model;
        None for a text-only model. Raises :class:`stllava.data.images.ImageLoadError` naming the
        record (``orig``: its position in the file) for a missing, unreadable, too large or too thin
        image, or one outside the image folder."""
        if "image" in record:
            name = record_name(record, orig)
            pil = load_image(image_path(self.image_folder, record["image"], record=name), record=name,
                             need=self._decode)
            return process_images([pil], self.image_processor, {"image_aspect_ratio": self.image_aspect_ratio})[0]
        return self._blank.clone() if self._blank is not None else None


def load_checked_records(data_path: str, check: Callable[[list], VerifyReport],
                         on_bad_sample: str) -> tuple[list[Any], list[int]]:
    """Load ``data_path`` (JSON list or JSONL), check the records with ``check`` and apply
    ``on_bad_sample``; returns ``(records, keep)``, ``keep`` the indices of the records to train on.

    Raises :class:`stllava.data.verify.BadDataError` with the full report when records are bad
    and ``on_bad_sample`` is ``stop``; :class:`~stllava.data.verify.DataFileError` (one line)
    when nothing is left to train on. Under
    torch.distributed the check runs on rank 0 only and its report is broadcast, so every rank
    trains on the same records.
    """
    records = load_records(data_path)
    report = None
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not distributed or dist.get_rank() == 0:
        report = check(records)
        logger.info("data check: %s", report.summary())
    if distributed:
        box = [report]
        dist.broadcast_object_list(box, src=0)
        report = box[0]
    keep = apply_bad_sample_policy(records, report, on_bad_sample)
    if not keep:
        raise DataFileError(f"{data_path}: no usable records ({len(records)} in the file, {len(records) - len(keep)} "
                         "skipped as bad); nothing to train on. For DPO data, check the judge summary and "
                         "build_pairs stats (ties / identical answers / min-margin) that produced it.")
    return records, keep

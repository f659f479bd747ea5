"""Stage-3 (DPO) data: a lazy dataset of preference pairs and its collator (docs/Method.md#pairs, #dpo).

A record is the schema of the released ``ZachSun/STLLaVA-Med-DPO`` data, as
``stllava.selftrain.build_pairs`` writes it::

    {"id", "image"?, "chosen_conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": A+}],
                     "reject_conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": A-}],
     ...provenance fields (scores, judge, rationale, ...): ignored}

Both conversations are rendered, tokenized and masked exactly as SFT does
(:func:`stllava.data.preprocess.preprocess`: only the answers and their ``</s>`` are trained), the
image is loaded and preprocessed as in SFT (``pad`` aspect ratio, CLIP processor), and bad records
are found before training by :func:`stllava.data.verify.verify_preference_records`: the SFT check
run on each side of the pair plus one DPO rule, the two sides must ask the same question(s). The
``--on_bad_sample`` policy is SFT's (``stop`` with the report, or ``skip``).

:class:`DataCollatorForPreferenceDataset` pads chosen and rejected samples to ONE common width, so
the trainer can stack them into one batch of ``2B`` rows (chosen first) without re-padding; each
batch also carries ``index`` (the record's position in the file), the key of precomputed
reference log-probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from stllava.constants import IGNORE_INDEX
from stllava.data.collate import attention_mask_from_lengths, pad_right, stack_images, truncate_to_fit
from stllava.data.lazy import LazyLlavaDataset, load_checked_records
from stllava.data.preprocess import preprocess
from stllava.data.verify import CHOSEN, REJECT, verify_preference_records


def _words(conversation: Sequence[dict]) -> int:
    return sum(len(str(t.get("value", "")).split()) for t in conversation if isinstance(t, dict))


class LazyPreferenceDataset(LazyLlavaDataset):
    """Preference records → ``{"index", "chosen_input_ids", "chosen_labels", "reject_input_ids",
    "reject_labels", "image"?}``, lazily.

    ``indices`` are the records' positions in the original file (after bad records were skipped):
    they name records in errors and key the precomputed reference log-probs. Accepts the
    ``(epoch, index)`` keys of the training samplers (``stllava.train.sampler``) and plain indices.
    ``image_processor`` None means a text-only model (no ``image`` key).
    """

    def __init__(self, records: Sequence[dict], tokenizer, image_processor=None, *, image_folder: str | None = None,
                 version: str = "v1", image_aspect_ratio: str = "pad", indices: Sequence[int] | None = None):
        super().__init__(records, tokenizer, image_processor, image_folder=image_folder, version=version,
                         image_aspect_ratio=image_aspect_ratio, indices=indices)

    def words(self, record: dict) -> int:
        """Words of the longer side (the base of ``lengths`` and ``modality_lengths``)."""
        return max(_words(record[CHOSEN]), _words(record[REJECT]))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i = key[1] if isinstance(key, tuple) else key
        rec, orig = self.records[i], self.indices[i]
        has_image = "image" in rec
        out = preprocess([rec[CHOSEN], rec[REJECT]], self.tokenizer, has_image=has_image, version=self.version,
                         record_ids=[f"{rec.get('id', orig)} (chosen)", f"{rec.get('id', orig)} (rejected)"])
        self.mismatches += out["mismatches"]
        item = {"index": orig,
                "chosen_input_ids": out["input_ids"][0], "chosen_labels": out["labels"][0],
                "reject_input_ids": out["input_ids"][1], "reject_labels": out["labels"][1]}
        image = self.record_image(rec, orig)
        if image is not None:
            item["image"] = image
        return item


def build_preference_dataset(data_path: str, tokenizer, image_processor, *, image_folder: str | None,
                             version: str = "v1", image_aspect_ratio: str = "pad", on_bad_sample: str = "stop",
                             model_max_length: int | None = None, image_tokens: int = 576,
                             verify_workers: int = 8) -> LazyPreferenceDataset:
    """Load ``data_path`` (JSON list or JSONL), check it (:func:`verify_preference_records`) and apply
    ``on_bad_sample``; returns the dataset of the pairs to train on.

    Raises :class:`stllava.data.verify.BadDataError` with the full report when records are bad and
    ``on_bad_sample`` is ``stop``. Under torch.distributed the check runs on rank 0 only and its
    report is broadcast, so every rank trains on the same records.
    """
    records, keep = load_checked_records(
        data_path, lambda recs: verify_preference_records(recs, image_folder, data_path=data_path, version=version,
                                                          tokenizer=tokenizer, model_max_length=model_max_length,
                                                          image_tokens=image_tokens, workers=verify_workers),
        on_bad_sample)
    return LazyPreferenceDataset([records[i] for i in keep], tokenizer, image_processor, image_folder=image_folder,
                                 version=version, image_aspect_ratio=image_aspect_ratio, indices=keep)


@dataclass
class DataCollatorForPreferenceDataset:
    """Collate preference samples into one batch whose chosen and rejected halves share one width.

    Returns ``chosen_input_ids``, ``reject_input_ids`` ([B, W], padded with ``pad_token_id``, W the
    longest of both sides), ``chosen_labels``/``reject_labels`` (IGNORE_INDEX padding),
    ``chosen_attention_mask``/``reject_attention_mask``, ``index`` [B] and, when samples carry
    images, ``images`` [B, 3, H, W] (one per pair: the trainer uses it for both halves). Each sample
    is first cut to ``model_max_length`` model positions (an ``<image>`` counting ``image_tokens``).
    """

    pad_token_id: int
    model_max_length: int | None = None
    image_tokens: int = 1

    def __call__(self, instances: Sequence[dict]) -> dict[str, torch.Tensor]:
        sides = {}
        for side in ("chosen", "reject"):
            ids, labels = [], []
            for inst in instances:
                i, lab = truncate_to_fit(inst[f"{side}_input_ids"], inst[f"{side}_labels"], self.model_max_length,
                                         self.image_tokens)
                ids.append(i)
                labels.append(lab)
            sides[side] = (ids, labels)
        width = max(len(i) for ids, _ in sides.values() for i in ids)
        batch: dict[str, torch.Tensor] = {}
        for side, (ids, labels) in sides.items():
            # One extra dummy row of the common width makes pad_sequence pad every side to it.
            dummy = torch.zeros(width, dtype=torch.long)
            batch[f"{side}_input_ids"] = pad_right([*ids, dummy], self.pad_token_id)[:-1]
            batch[f"{side}_labels"] = pad_right([*labels, dummy], IGNORE_INDEX)[:-1]
            batch[f"{side}_attention_mask"] = attention_mask_from_lengths([len(i) for i in ids], width)
        batch["index"] = torch.tensor([int(inst["index"]) for inst in instances], dtype=torch.long)
        images = stack_images(instances)
        if images is not None:
            batch["images"] = images
        return batch

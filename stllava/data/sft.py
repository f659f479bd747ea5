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

from typing import Any, Sequence

from stllava.data.lazy import LazyLlavaDataset, load_checked_records
from stllava.data.preprocess import MaskCache, make_sq_rng, preprocess
from stllava.data.verify import verify_records


class LazySupervisedDataset(LazyLlavaDataset):
    """Records → ``{"input_ids", "labels", "image"?}``, lazily.

    ``indices`` are the records' positions in the original file (after bad records were skipped);
    they name records in errors and seed the VUSER draws, so skipping a record does not change
    the draws of the others. ``image_processor`` None means a text-only model (no ``image`` key).
    """

    def __init__(self, records: Sequence[dict], tokenizer, image_processor=None, *, image_folder: str | None = None,
                 version: str = "v1_sq", sq_r: float = 0.0, seed: int = 42, image_aspect_ratio: str = "pad",
                 indices: Sequence[int] | None = None, data_vuser_turns: str = "train"):
        super().__init__(records, tokenizer, image_processor, image_folder=image_folder, version=version,
                         image_aspect_ratio=image_aspect_ratio, indices=indices)
        self.sq_r = sq_r
        self.seed = seed
        self.data_vuser_turns = data_vuser_turns
        self.mask_cache = MaskCache()

    def words(self, record: dict) -> int:
        """Words of the conversation."""
        return sum(len(t["value"].split()) for t in record["conversations"])

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        rec, orig = self.records[i], self.indices[i]
        rng = make_sq_rng(self.seed, epoch, orig)
        out = preprocess([rec["conversations"]], self.tokenizer, has_image="image" in rec, version=self.version,
                         sq_r=self.sq_r, rng=rng, record_ids=[rec.get("id", orig)],
                         data_vuser_turns=self.data_vuser_turns, cache=self.mask_cache)
        self.mismatches += out["mismatches"]
        item = {"input_ids": out["input_ids"][0], "labels": out["labels"][0]}
        image = self.record_image(rec, orig)
        if image is not None:
            item["image"] = image
        return item


def build_sft_dataset(data_path: str, tokenizer, image_processor, *, image_folder: str | None, version: str,
                      sq_r: float, seed: int, image_aspect_ratio: str, on_bad_sample: str = "stop",
                      model_max_length: int | None = None, image_tokens: int = 576, verify_workers: int = 8,
                      data_vuser_turns: str = "train") -> LazySupervisedDataset:
    """Load ``data_path``, check it (:func:`stllava.data.verify.verify_records`) and apply
    ``on_bad_sample``; returns the dataset of the records to train on.

    Raises :class:`stllava.data.verify.BadDataError` with the full report when records are bad
    and ``on_bad_sample`` is ``stop``. Under torch.distributed the check runs on rank 0 only and
    its report is broadcast, so every rank trains on the same records. ``image_tokens``: what an
    image counts towards ``model_max_length`` in the length check; ``data_vuser_turns``: see
    :func:`stllava.data.preprocess.render_turns`.
    """
    records, keep = load_checked_records(
        data_path, lambda recs: verify_records(recs, image_folder, data_path=data_path, version=version,
                                               tokenizer=tokenizer, model_max_length=model_max_length,
                                               image_tokens=image_tokens, workers=verify_workers),
        on_bad_sample)
    return LazySupervisedDataset([records[i] for i in keep], tokenizer, image_processor, image_folder=image_folder,
                                 version=version, sq_r=sq_r, seed=seed, image_aspect_ratio=image_aspect_ratio,
                                 indices=keep, data_vuser_turns=data_vuser_turns)

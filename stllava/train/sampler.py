"""Training samplers whose order is a pure function of (seed, epoch), shared by SFT and DPO.

Both yield ``(epoch, index)`` pairs: the dataset (``stllava.data.sft``) seeds its per-sample random
draws from them, so the epoch reaches dataloader workers with every index instead of through a
copy of the dataset. The Trainer (via accelerate) calls ``set_epoch`` before each epoch; a resumed
run therefore sees the same order as an uninterrupted one, and every rank the same global order
(accelerate then gives each rank its share of the batches).

``LengthGroupedSampler`` is LLaVA's: with ``group_by_modality`` (``--group_by_modality_length``)
image and text-only samples go to separate megabatches (one megabatch = the samples of one
optimizer step on all ranks, ``batch_size × world_size`` with LLaVA's
``world_size = ranks × gradient_accumulation_steps``); only the last, left-over megabatch mixes
them. Within a megabatch samples are sorted by length and dealt into ``world_size`` batches of
similar total length. Unlike LLaVA, every random draw uses the (seed, epoch) generator.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def _generator(seed: int, epoch: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed) * 100_003 + int(epoch))  # distinct streams for nearby seeds and epochs
    return g


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Deal ``indices`` into ``num_chunks`` lists of equal count, each index to the list with the
    smallest total length so far (LLaVA's rule). Falls back to striding when the count does not divide."""
    if len(indices) % num_chunks != 0:
        return [list(indices[i::num_chunks]) for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        k = totals.index(min(totals))
        chunks[k].append(index)
        totals[k] += lengths[index]
        if len(chunks[k]) == per_chunk:
            totals[k] = float("inf")
    return chunks


def get_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                               generator: torch.Generator) -> list[int]:
    """Shuffle, cut into megabatches of ``batch_size × world_size``, sort each by length (longest
    first) and deal it into ``world_size`` even chunks. Returns the flat index order."""
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    mb = world_size * batch_size
    megabatches = [sorted(indices[i:i + mb], key=lambda j: lengths[j], reverse=True)
                   for i in range(0, len(lengths), mb)]
    return [i for m in megabatches for chunk in split_to_even_chunks(m, lengths, world_size) for i in chunk]


def get_modality_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                                        generator: torch.Generator) -> list[int]:
    """LLaVA's modality grouping: ``lengths`` > 0 are image samples, < 0 text-only (0 is refused).
    Megabatches hold one modality each, in random order; the two left-over partial megabatches are
    joined into a last, mixed one. One modality only: plain length grouping."""
    if any(n == 0 for n in lengths):
        raise ValueError("modality lengths must be non-zero (positive: image sample, negative: text-only)")
    if all(n > 0 for n in lengths) or all(n < 0 for n in lengths):
        return get_length_grouped_indices([abs(n) for n in lengths], batch_size, world_size, generator)
    mm = [(i, n) for i, n in enumerate(lengths) if n > 0]
    lang = [(i, -n) for i, n in enumerate(lengths) if n < 0]
    mb = world_size * batch_size

    def grouped(pairs):
        idx, lens = zip(*pairs)
        order = [idx[k] for k in get_length_grouped_indices(lens, batch_size, world_size, generator)]
        return [order[i:i + mb] for i in range(0, len(order), mb)]

    mm_mb, lang_mb = grouped(mm), grouped(lang)
    additional = mm_mb[-1] + lang_mb[-1]
    megabatches = mm_mb[:-1] + lang_mb[:-1]
    perm = torch.randperm(len(megabatches), generator=generator).tolist()
    megabatches = [megabatches[k] for k in perm]
    if additional:
        megabatches.append(sorted(additional))
    return [i for m in megabatches for i in m]


class EpochSampler(Sampler):
    """Base: ``set_epoch`` + ``(epoch, index)`` output; subclasses give ``order(generator)``."""

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def order(self, generator: torch.Generator) -> list[int]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for i in self.order(_generator(self.seed, epoch)):
            yield (epoch, i)


class RandomEpochSampler(EpochSampler):
    """A random permutation per (seed, epoch)."""

    def order(self, generator):
        return torch.randperm(self.num_samples, generator=generator).tolist()


class LengthGroupedSampler(EpochSampler):
    """LLaVA's length-grouped sampler (see the module docstring); ``lengths`` are the dataset's
    ``modality_lengths`` when ``group_by_modality`` else its ``lengths``."""

    def __init__(self, batch_size: int, world_size: int, lengths: Sequence[int], seed: int = 0,
                 group_by_modality: bool = False):
        super().__init__(len(lengths), seed)
        self.batch_size = batch_size
        self.world_size = world_size
        self.lengths = list(lengths)
        self.group_by_modality = group_by_modality

    def order(self, generator):
        fn = get_modality_length_grouped_indices if self.group_by_modality else get_length_grouped_indices
        return fn(self.lengths, self.batch_size, self.world_size, generator)


def build_train_sampler(dataset, args) -> EpochSampler:
    """The sampler for ``dataset`` under HF ``TrainingArguments`` ``args``: LLaVA's modality-grouped
    sampler with ``group_by_modality_length``, its plain length grouping with
    ``train_sampling_strategy == "group_by_length"``, else a seeded random permutation.
    Seeded with ``args.data_seed`` or ``args.seed``."""
    seed = args.data_seed if getattr(args, "data_seed", None) is not None else args.seed
    by_modality = bool(getattr(args, "group_by_modality_length", False))
    if by_modality or getattr(args, "train_sampling_strategy", None) == "group_by_length":
        lengths = dataset.modality_lengths if by_modality else dataset.lengths
        return LengthGroupedSampler(args.train_batch_size, args.world_size * args.gradient_accumulation_steps,
                                    lengths, seed=seed, group_by_modality=by_modality)
    return RandomEpochSampler(len(dataset), seed=seed)

"""Batching for the LLaVA model, shared by SFT and DPO.

- :func:`truncate_to_fit` cuts a sample to ``model_max_length`` counted in model positions (an
  ``<image>`` token takes ``image_tokens`` of them once spliced: :func:`stllava.splice.splice_layout`,
  the model's own layout) and never cuts through an image.
- :func:`pad_right` pads on the right (LLaVA pads with ``unk`` and trains right-padded).
- :func:`stack_images` gives one image per sample (text-only samples carry the blank image the
  dataset put there), the convention ``LlavaLlamaForCausalLM.forward`` expects.
- :class:`DataCollatorForSupervisedDataset` puts those together for SFT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from stllava.constants import IGNORE_INDEX
from stllava.splice import splice_layout


def truncate_to_fit(input_ids: torch.Tensor, labels: torch.Tensor | None, max_len: int | None,
                    image_tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(input_ids, labels)`` cut so the spliced sequence has at most ``max_len`` positions,
    each ``IMAGE_TOKEN_INDEX`` counting ``image_tokens``.

    The cut is never inside or before an image token: a sample whose images alone do not fit keeps
    everything up to its last image (and is longer than ``max_len``; ``stllava.data.verify``
    reports such records as too long before training). ``max_len`` None returns the input unchanged.
    """
    if max_len is None:
        return input_ids, labels
    is_img, width, start, _ = splice_layout(input_ids, image_tokens)
    ends = start + width  # spliced end position of each token, as the model lays the row out
    keep = int((ends <= max_len).sum())  # ends is increasing, so this is a prefix length
    if bool(is_img.any()):
        keep = max(keep, int(is_img.nonzero().max()) + 1)
    if keep >= input_ids.shape[0]:
        return input_ids, labels
    return input_ids[:keep], (labels[:keep] if labels is not None else None)


def pad_right(seqs: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """Stack 1-D tensors into [B, max_len], right-padded with ``value``."""
    return torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=value)


def attention_mask_from_lengths(lengths: Sequence[int], width: int) -> torch.Tensor:
    """[B, width] long mask, 1 on the first ``lengths[b]`` positions of row b. (Built from lengths,
    not from ``ids != pad``: the pad id is ``unk``, which may also occur in real text.)"""
    return (torch.arange(width)[None, :] < torch.tensor(list(lengths))[:, None]).long()


def stack_images(instances: Sequence[dict], key: str = "image") -> torch.Tensor | list | None:
    """``[B, 3, H, W]`` from each instance's ``key``, None when no instance has one, or a list
    when the shapes differ (the model stacks it and refuses mismatches with a clear error)."""
    images = [inst.get(key) for inst in instances]
    if all(im is None for im in images):
        return None
    if any(im is None for im in images):
        raise ValueError("some samples of the batch have an image tensor and some have none; a multimodal "
                         "dataset must give text-only samples a blank image (stllava.data.images.blank_image)")
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(images)
    return images


@dataclass
class DataCollatorForSupervisedDataset:
    """Collate ``{"input_ids", "labels", "image"?}`` samples into a training batch.

    Returns ``input_ids`` (padded with ``pad_token_id``), ``labels`` (padded with IGNORE_INDEX),
    ``attention_mask`` and, when samples carry images, ``images`` [B, 3, H, W].
    """

    pad_token_id: int
    model_max_length: int | None = None
    image_tokens: int = 1

    def __call__(self, instances: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids, labels = [], []
        for inst in instances:
            i, lab = truncate_to_fit(inst["input_ids"], inst["labels"], self.model_max_length, self.image_tokens)
            ids.append(i)
            labels.append(lab)
        input_ids = pad_right(ids, self.pad_token_id)
        batch = {
            "input_ids": input_ids,
            "labels": pad_right(labels, IGNORE_INDEX),
            "attention_mask": attention_mask_from_lengths([len(i) for i in ids], input_ids.shape[1]),
        }
        images = stack_images(instances)
        if images is not None:
            batch["images"] = images
        return batch

"""Where image features go in the model's sequence: the one splice layout (docs/Method.md#splice).

Each ``IMAGE_TOKEN_INDEX`` of a row of input ids becomes the ``image_tokens`` projected features
of its image, every other token one position. :func:`splice_layout` computes, for every input
token, its first output position; the model's splice
(``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal``), the collators' truncation
(``stllava.data.collate.truncate_to_fit``) and everything that counts model positions use it, so
they cannot disagree. It lives at the package top because both ``data`` (upstream) and ``model``
need it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from stllava.constants import IMAGE_TOKEN_INDEX


class SpliceLayout(NamedTuple):
    """The layout of a batch of input ids [B, T] once images are spliced in.

    ``is_image`` [B, T]: the ``IMAGE_TOKEN_INDEX`` positions; ``width`` [B, T]: output positions
    each input token takes (``image_tokens`` or 1); ``start`` [B, T]: first output position of each
    input token (left-aligned rows); ``lengths`` [B]: output positions of each row."""

    is_image: torch.Tensor
    width: torch.Tensor
    start: torch.Tensor
    lengths: torch.Tensor


def splice_layout(input_ids: torch.Tensor, image_tokens: int) -> SpliceLayout:
    """The :class:`SpliceLayout` of ``input_ids`` ([B, T], or [T] for one row, then every field
    loses its batch axis) when each image takes ``image_tokens`` output positions.
    Refuses ``image_tokens`` < 1 (ValueError)."""
    if image_tokens < 1:
        raise ValueError(f"an image takes at least one output position, got image_tokens={image_tokens}")
    is_image = input_ids == IMAGE_TOKEN_INDEX
    width = torch.where(is_image, image_tokens, 1)
    ends = torch.cumsum(width, -1)
    return SpliceLayout(is_image, width, ends - width, width.sum(-1))

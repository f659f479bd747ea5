"""Safe reading of weight files: safetensors, or ``torch.load(weights_only=True)`` for ``.bin``."""
from __future__ import annotations

import os
import pickle

import torch

from stllava.errors import StllavaError


class UnsafeCheckpointError(StllavaError, ValueError):
    """A ``.bin`` file holds something other than plain tensors (possibly code)."""


def load_state_dict_file(path: str, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """Return the tensors of ``path``; refuses (never executes) pickles that are not plain tensors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device=map_location)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path} is not a plain tensor checkpoint and was refused (weights_only=True): {e}. "
            "Only load it if you trust its origin, and re-save it as safetensors."
        ) from None

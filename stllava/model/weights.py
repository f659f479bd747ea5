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


def load_projector_weights(path: str) -> dict[str, torch.Tensor]:
    """The projector's state dict from ``path`` (``mm_projector.bin``, a ``non_lora_trainables.bin``,
    any file whose keys hold ``mm_projector.``): each ``*mm_projector.<name>`` key becomes ``<name>``.
    Refuses a file without such keys (:class:`ProjectorWeightsError`, naming the flag that takes it)."""
    sd = load_state_dict_file(path)
    sd = {k.split("mm_projector.", 1)[1]: v for k, v in sd.items() if "mm_projector." in k}
    if not sd:
        raise ProjectorWeightsError(f"--pretrain_mm_mlp_adapter {path} holds no '*mm_projector.*' weights; give "
                                    "an mm_projector.bin or a non_lora_trainables.bin")
    return sd


class ProjectorWeightsError(StllavaError, ValueError):
    """A projector weight file holds no projector weights."""

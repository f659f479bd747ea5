"""Safe reading of weight files: safetensors, or ``torch.load(weights_only=True)`` for ``.bin``.

Every failure names the file: a pickle holding anything but tensors is refused
(:class:`UnsafeCheckpointError`, never executed), and a file cut short or corrupt
(:class:`CorruptCheckpointError`) says so instead of the library's own message (a zip "central
directory", "[Errno 22] Invalid argument", "incomplete metadata") that does not say which file.
"""
from __future__ import annotations

import os
import pickle

import torch

from stllava.errors import StllavaError


class UnsafeCheckpointError(StllavaError, ValueError):
    """A ``.bin`` file holds something other than plain tensors (possibly code)."""


class CorruptCheckpointError(StllavaError, ValueError):
    """A checkpoint file cannot be read: cut short (an interrupted copy or download) or corrupt."""


def corrupt(path: str, exc: BaseException | str, what: str = "weight file",
            fix: str = "copy or download it again (compare its size with the source)") -> CorruptCheckpointError:
    """The :class:`CorruptCheckpointError` for ``path``: what it is, why (the library's reason,
    on one line) and the fix."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if len(reason) > 160:  # torch and safetensors explain at length: keep the first sentence
        reason = reason.split(". ")[0][:160]
    return CorruptCheckpointError(f"{path}: this {what} cannot be read ({reason}); fix: {fix}")


def _unsafe(path: str, exc: pickle.UnpicklingError) -> UnsafeCheckpointError:
    # torch's message is a paragraph; its line naming the refused global is the useful part.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    culprit = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
    return UnsafeCheckpointError(
        f"{path} is not a plain tensor checkpoint and was refused (weights_only=True): {culprit} "
        "Only load it if you trust its origin, and re-save it as safetensors.")


def check_weight_file(path: str) -> None:
    """Check that ``path`` (``.safetensors`` or a torch ``.bin``) can be read safely, without
    loading its tensors (safetensors: the header; ``.bin``: memory-mapped, ``weights_only``).
    Raises :class:`UnsafeCheckpointError` or :class:`CorruptCheckpointError` naming the file."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
        except Exception as e:  # SafetensorError (not exported as a class), OSError
            raise corrupt(path, e) from None
        return
    load_state_dict_file(path, mmap=True)


def load_state_dict_file(path: str, map_location: str = "cpu", mmap: bool = False) -> dict[str, torch.Tensor]:
    """Return the tensors of ``path``; refuses (never executes) pickles that are not plain tensors
    (:class:`UnsafeCheckpointError`) and files cut short or corrupt (:class:`CorruptCheckpointError`),
    naming the file. ``mmap`` maps a zip-format ``.bin`` instead of reading it (a legacy pickle is
    then read normally)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device=map_location)
        except Exception as e:  # SafetensorError (not exported as a class), OSError
            raise corrupt(path, e) from None
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not (mmap and "mmap" in str(e)):  # a legacy (non-zip) pickle cannot be mapped: read it
                raise
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise _unsafe(path, e) from None
        raise corrupt(path, e) from None  # e.g. "pickle data was truncated"
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise corrupt(path, e) from None


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

"""A manifest of file hashes in every training checkpoint, checked before a DeepSpeed resume.

Why: DeepSpeed's own resume (``--resume_from_checkpoint`` under ``--deepspeed``) reads
``global_stepN/*_model_states.pt`` and ``*_optim_states.pt`` with ``torch.load(weights_only=False)``
inside DeepSpeed, so a planted or swapped file there runs its pickled payload. Nothing in DeepSpeed
can make that load safe, so the run refuses to resume from a checkpoint it cannot recognise:

- :class:`ManifestCallback` writes ``stllava_manifest.json`` (SHA-256 and size of every file of the
  checkpoint folder, recursively) after each save, once every process has written its shards;
- :func:`verify_resume_checkpoint` (called before ``Trainer.train``) compares the folder with its
  manifest and raises :class:`UntrustedCheckpointError` naming the first file that changed, is
  unknown (not in the manifest) or is missing — or the manifest itself when there is none.
  ``--trust_resume_checkpoint True`` skips the check (a checkpoint you made yourself with an older
  version, or moved between machines and edited on purpose).

The manifest proves a checkpoint is the one this code saved, not that the folder it sits in is
safe: whoever can rewrite the checkpoint can rewrite the manifest too. It stops accidents and
files dropped into a shared folder; a checkpoint from someone else must be trusted as code.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import torch
from transformers import TrainerCallback

from stllava.errors import StllavaError

logger = logging.getLogger(__name__)

MANIFEST = "stllava_manifest.json"
_CHUNK = 1 << 22


class UntrustedCheckpointError(StllavaError, ValueError):
    """A checkpoint to resume does not match the manifest written when it was saved."""


def file_sha256(path: str) -> str:
    """Hex SHA-256 of the file at ``path`` (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def checkpoint_files(ckpt_dir: str) -> list[str]:
    """Every regular file under ``ckpt_dir`` (recursively) except the manifest, as sorted
    ``/``-separated paths relative to ``ckpt_dir``. Symbolic links are listed as files (their
    target is what a loader reads)."""
    out = []
    for root, _, files in os.walk(ckpt_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), ckpt_dir).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(ckpt_dir: str) -> str:
    """Write ``ckpt_dir/stllava_manifest.json`` (``{"files": {path: {"sha256", "size"}}}``) and
    return its path."""
    files = {rel: {"sha256": file_sha256(os.path.join(ckpt_dir, rel)),
                   "size": os.path.getsize(os.path.join(ckpt_dir, rel))} for rel in checkpoint_files(ckpt_dir)}
    path = os.path.join(ckpt_dir, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": 1, "files": files}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # a run killed while writing leaves no half manifest
    return path


def check_manifest(ckpt_dir: str) -> str | None:
    """None when every file of ``ckpt_dir`` matches its manifest; otherwise one line naming the
    manifest (absent or unreadable) or the first file that is unknown, changed or missing."""
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(path):
        return (f"{path} does not exist (this checkpoint was not saved by this version of stllava, or was copied "
                "without it)")
    try:
        with open(path) as f:
            listed = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path} is not a readable manifest ({e})"
    present = checkpoint_files(ckpt_dir)
    for rel in present:
        if rel not in listed:
            return f"{os.path.join(ckpt_dir, rel)} is not in the checkpoint's manifest (a file added after the save)"
    for rel in present:
        entry = listed[rel]
        full = os.path.join(ckpt_dir, rel)
        if os.path.getsize(full) != entry.get("size") or file_sha256(full) != entry.get("sha256"):
            return f"{full} changed since the checkpoint was saved (its SHA-256 differs from the manifest's)"
    missing = sorted(set(listed) - set(present))
    if missing:
        return f"{os.path.join(ckpt_dir, missing[0])} is listed in the manifest but missing"
    return None


def verify_resume_checkpoint(ckpt_dir: str, trust: bool = False) -> None:
    """Refuse (:class:`UntrustedCheckpointError`, one line naming the file and the override) to
    resume from ``ckpt_dir`` unless it matches its manifest; ``trust`` skips the check with a
    warning. Under torch.distributed the main process checks and every process raises the same
    error. Returns None."""
    if trust:
        logger.warning("--trust_resume_checkpoint: resuming from %s without checking its manifest; DeepSpeed "
                       "unpickles its files and runs whatever code they hold", ckpt_dir)
        return
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    problem = [check_manifest(ckpt_dir) if not distributed or dist.get_rank() == 0 else None]
    if distributed:
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise UntrustedCheckpointError(
            f"refusing to resume from {ckpt_dir}: {problem[0]}. DeepSpeed unpickles checkpoint files, which runs "
            "any code they hold; resume only from a checkpoint you trust, and if you do, pass "
            "--trust_resume_checkpoint True")
    logger.info("resume checkpoint %s matches its manifest", ckpt_dir)


class ManifestCallback(TrainerCallback):
    """Writes the manifest of each ``checkpoint-N/`` once all its files are written (``on_save``
    comes after the Trainer saved model, optimizer, RNG and trainer state; every process waits
    for the others first, so the main process sees every rank's shards)."""

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if args.should_save and os.path.isdir(ckpt):
            write_manifest(ckpt)
        return control

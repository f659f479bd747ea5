"""A manifest of file hashes in every training checkpoint, checked before a DeepSpeed resume; and
which checkpoint a resume may start from at all (its files complete).

Why: DeepSpeed's own resume (``--resume_from_checkpoint`` under ``--deepspeed``) reads
``global_stepN/*_model_states.pt`` and ``*_optim_states.pt`` with ``torch.load(weights_only=False)``
inside DeepSpeed, so a planted or swapped file there runs its pickled payload. Nothing in DeepSpeed
can make that load safe, so the run refuses to resume from a checkpoint it cannot recognise:

- :func:`write_manifest` writes ``stllava_manifest.json`` (SHA-256 and size of every file of the
  checkpoint folder, recursively) at each save, once every process has written its shards and
  before the folder is renamed into place (``stllava.train.saving``);
- :func:`verify_resume_checkpoint` (called before ``Trainer.train``) compares the folder with its
  manifest and raises :class:`UntrustedCheckpointError` naming the first file that changed, is
  unknown (not in the manifest) or is missing — or the manifest itself when there is none.
  ``--trust_resume_checkpoint True`` skips the check (a checkpoint you made yourself with an older
  version, or moved between machines and edited on purpose).

The manifest proves a checkpoint is the one this code saved, not that the folder it sits in is
safe: whoever can rewrite the checkpoint can rewrite the manifest too. It stops accidents and
files dropped into a shared folder; a checkpoint from someone else must be trusted as code.

Complete or not is another question, asked with or without ``--trust_resume_checkpoint``
(:func:`checkpoint_problem`, :func:`choose_resume_checkpoint`): a file cut short (a crash, a full
disk, an interrupted copy), a file the manifest lists that is gone, or no ``trainer_state.json``
(the Trainer writes it last). ``--resume_from_checkpoint True`` skips such a newest checkpoint with
a warning naming the file and resumes from the last complete one; an explicitly named one is refused
(:class:`IncompleteCheckpointError`), never left to a torch traceback.
"""
from __future__ import annotations

import json
import logging
import os
import re
import zipfile

import torch

from stllava.artifacts import file_sha256  # noqa: F401 (also this module's name for it)
from stllava.errors import StllavaError

logger = logging.getLogger(__name__)

MANIFEST = "stllava_manifest.json"


class UntrustedCheckpointError(StllavaError, ValueError):
    """A checkpoint to resume does not match the manifest written when it was saved."""


class IncompleteCheckpointError(StllavaError, ValueError):
    """No checkpoint to resume from has all its files complete (the message names the file)."""


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


# ---------------------------------------------------------------------------------------------
# Complete checkpoints

TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last in every checkpoint
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # transformers.trainer_utils' own pattern
_ZIP_MAGIC = b"PK\x03\x04"


def _cut_short(path: str) -> str | None:
    """Why the file ``path`` is cut short, from its own format, or None: a safetensors file whose
    header or data is incomplete, a torch (zip) file without its end record, a JSON file that does
    not parse. Other files (and torch files in the legacy pickle format) are not judged here."""
    name = os.path.basename(path)
    if name.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
        except Exception as e:  # SafetensorError is not exported as a class
            return " ".join(str(e).split())[:120]
        return None
    if name.endswith((".bin", ".pt", ".pth")):
        with open(path, "rb") as f:
            starts_as_zip = f.read(4) == _ZIP_MAGIC
        if starts_as_zip and not zipfile.is_zipfile(path):
            return "a torch file without its end record"
        return None
    if name.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            return f"not valid JSON: {e}"
    return None


def checkpoint_problem(ckpt_dir: str) -> str | None:
    """None when every file of ``ckpt_dir`` a resume reads is complete; otherwise one line naming
    the file: cut short (:func:`_cut_short`), listed in the manifest but missing, or no
    ``trainer_state.json``. Whether the files are the ones saved is :func:`check_manifest`'s question."""
    state = os.path.join(ckpt_dir, TRAINER_STATE)
    if not os.path.isfile(state):
        return f"{state} is missing (the save did not finish)"
    for rel in checkpoint_files(ckpt_dir):
        why = _cut_short(os.path.join(ckpt_dir, rel))
        if why is not None:
            return f"{os.path.join(ckpt_dir, rel)} is cut short ({why})"
    try:
        with open(os.path.join(ckpt_dir, MANIFEST)) as f:
            listed = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no manifest to compare with: an older checkpoint, judged by its files alone
    missing = sorted(rel for rel in listed if not os.path.isfile(os.path.join(ckpt_dir, rel)))
    if missing:
        return f"{os.path.join(ckpt_dir, missing[0])} is listed in the checkpoint's manifest but missing"
    return None


def checkpoint_step(ckpt_dir: str) -> int:
    """N of a ``checkpoint-N`` folder."""
    return int(_CHECKPOINT.match(os.path.basename(os.path.normpath(ckpt_dir))).group(1))


def checkpoints_newest_first(output_dir: str) -> list[str]:
    """The ``checkpoint-N`` folders of ``output_dir``, highest N first (folders being written are
    elsewhere: ``stllava.train.saving``)."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if _CHECKPOINT.match(n) and os.path.isdir(os.path.join(output_dir, n))]
    return [os.path.join(output_dir, n) for n in sorted(names, key=lambda n: -checkpoint_step(n))]


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` of ``output_dir`` whose files are complete, or None."""
    return next((c for c in checkpoints_newest_first(output_dir) if checkpoint_problem(c) is None), None)


def _choose(resume: str | bool, output_dir: str) -> tuple[str | None, str | None, str | None]:
    """``(checkpoint, None, None)`` or ``(None, error kind, message)``; see :func:`choose_resume_checkpoint`."""
    if resume is not True:
        problem = checkpoint_problem(resume)
        if problem is None:
            return resume, None, None
        other = next((c for c in checkpoints_newest_first(os.path.dirname(os.path.normpath(resume)))
                      if os.path.realpath(c) != os.path.realpath(resume) and checkpoint_problem(c) is None), None)
        fix = (f"resume from {other} (the last complete checkpoint)" if other else
               "start without --resume_from_checkpoint (no other complete checkpoint is there)")
        return None, "incomplete", f"cannot resume from {resume}: {problem}; fix: {fix}"
    candidates = checkpoints_newest_first(output_dir)
    if not candidates:
        return None, "flag", f"--resume_from_checkpoint True but {output_dir} holds no checkpoint-N folder"
    problems = []
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            for skipped in problems:
                logger.warning("skipping an incomplete checkpoint: %s; resuming from %s", skipped, ckpt)
            return ckpt, None, None
        problems.append(problem)
    return None, "incomplete", (f"--resume_from_checkpoint True: no complete checkpoint in {output_dir}: "
                                f"{problems[0]}; fix: start without --resume_from_checkpoint, or copy the checkpoint "
                                "again if it was copied")


def choose_resume_checkpoint(resume: str | bool, output_dir: str) -> str:
    """The checkpoint folder to resume from: ``resume`` itself when it is a folder whose files are
    complete; for True the newest complete ``checkpoint-N`` of ``output_dir``, each newer incomplete
    one skipped with a warning naming its file. Raises :class:`IncompleteCheckpointError` (naming
    the file, and for a named folder the last complete one) when there is none, FlagError when
    ``output_dir`` holds no checkpoint at all. The main process decides; every process gets its
    answer (or raises the same error)."""
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    box = [_choose(resume, output_dir) if not distributed or dist.get_rank() == 0 else None]
    if distributed:
        dist.broadcast_object_list(box, src=0)
    chosen, kind, message = box[0]
    if kind == "flag":
        from stllava.train.arguments import FlagError

        raise FlagError(message)
    if kind is not None:
        raise IncompleteCheckpointError(message)
    return chosen

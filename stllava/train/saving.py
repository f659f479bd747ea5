"""Saving without losing weights: checkpoints written aside and renamed when complete, the final
save checked for free space and moved into place, a full disk reported in one line, and the output
folder checked before anything loads (docs/BadInputs.md, issue 21).

- Every ``checkpoint-N/`` is written into ``<output_dir>/.stllava-staging/checkpoint-N``, gets its
  manifest (``stllava.train.manifest``) and is then renamed into place
  (:meth:`stllava.train.trainer.LlavaTrainerMixin._save_checkpoint`; transformers 5 writes straight
  into ``checkpoint-N``). A run killed or a disk filled mid-save therefore leaves no
  ``checkpoint-N`` at all: resume (and the Trainer's rotation of old checkpoints) only ever sees
  complete ones. The staging folder is hidden from the Trainer, which looks for ``checkpoint-*``.
- :func:`save_final` writes the final checkpoint the same way, into ``.stllava-staging/<name of
  the output folder>``,
  then moves its files into ``--output_dir``: a failed save never leaves half-written files there
  (nor destroys the files of an earlier final save). It first compares the free space with the
  bytes of the weights to write (:func:`stllava.train.checkpoint.save_bytes`).
- A full disk (``ENOSPC``, a quota, or torch's zip writer failing on a disk left with no space) is
  :class:`DiskFullError`: one line saying what is saved where and how to redo only what was lost
  (the same command with ``--resume_from_checkpoint True``), exit code 1, no traceback.
- An ``--output_dir`` that is a file, lies under a file or cannot be written is refused at start, with
  the other flag checks (``stllava.train.arguments.check_output_dir``).
"""
from __future__ import annotations

import errno
import logging
import os
import shutil

import torch

from stllava.errors import EXIT_FAILED, StllavaError

logger = logging.getLogger(__name__)

STAGING = ".stllava-staging"
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_NEARLY_FULL = 64 << 20  # after torch's writer failed, a disk with less free space than this is full
_MARGIN = 8 << 20  # config, tokenizer (a LLaMA tokenizer.json: 1.8 MB) and image processor files


class DiskFullError(StllavaError, OSError):
    """The disk filled while saving (or would have): the message says what is saved where and how to
    redo only the save. An environment failure, not a bad input: exit code 1."""

    exit_code = EXIT_FAILED


# ---------------------------------------------------------------------------------------------
# Disk full

def is_disk_full(exc: BaseException, folder: str) -> bool:
    """Whether ``exc``, raised while writing into ``folder``, means the disk (or a quota) is full:
    an OSError with ``ENOSPC``/``EDQUOT``/``EFBIG``, safetensors' message for one, or torch's zip
    writer failing ("unexpected pos", which names no cause) on a disk that now has under 64 MiB free."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    text = str(exc)
    if any(t in text for t in _DISK_FULL_TEXT):
        return True
    if isinstance(exc, RuntimeError) and ("unexpected pos" in text or "write failed" in text):
        try:
            return shutil.disk_usage(folder).free < _NEARLY_FULL
        except OSError:
            return False
    return False


def human_bytes(n: float) -> str:
    """``900`` → ``"900 B"``, ``1000`` → ``"1.0 kB"``, ``3.2e9`` → ``"3.2 GB"`` (SI units)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def saved_account(output_dir: str, max_steps: int) -> tuple[str, str]:
    """``(what is saved where, how to redo the rest)`` from the last complete ``checkpoint-N`` of
    ``output_dir`` (``stllava.train.manifest.last_complete_checkpoint``)."""
    from stllava.train.manifest import checkpoint_step, last_complete_checkpoint

    ckpt = last_complete_checkpoint(output_dir)
    if ckpt is None:
        return (f"no complete checkpoint is saved in {output_dir}",
                "then run the training again (add --save_strategy steps to keep checkpoints)")
    step = checkpoint_step(ckpt)
    redo = "then run the same command with --resume_from_checkpoint True"
    if step >= max_steps:
        return (f"the trained weights are safe in {ckpt} (step {step}, the last)",
                f"{redo}: it trains nothing and redoes only the save")
    return (f"the last complete checkpoint is {ckpt} (step {step} of {max_steps})",
            f"{redo}: it resumes at step {step} and trains the steps after it again")


def _from_main(value):
    """``value`` as the main process has it, on every process (no-op without torch.distributed)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------
# Folders written aside, then moved into place

def _drop_staging_if_empty(path: str) -> None:
    parent = os.path.dirname(path)
    if os.path.basename(parent) == STAGING:
        try:
            os.rmdir(parent)
        except OSError:  # other saves are staged there, or it is gone
            pass


def remove_folder(path: str) -> None:
    """Remove ``path`` (a folder) if it exists, and its parent when that is the now empty
    staging folder."""
    shutil.rmtree(path, ignore_errors=True)
    _drop_staging_if_empty(path)


def publish_folder(staged: str, final: str) -> None:
    """Rename the complete folder ``staged`` to ``final``. An existing ``final`` (a checkpoint of
    the same step from an earlier run) is replaced only now, after the new one is complete."""
    if os.path.lexists(final):
        old = staged + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old)
    else:
        os.rename(staged, final)
    _drop_staging_if_empty(staged)


def move_entries(staged: str, target: str) -> list[str]:
    """Move every entry of folder ``staged`` into ``target`` (replacing entries of the same name;
    a folder is replaced only once the new one is in place) and remove ``staged``. Returns the
    names moved."""
    names = sorted(os.listdir(staged))
    for name in names:
        src, dst = os.path.join(staged, name), os.path.join(target, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            publish_folder(src, dst)
        else:
            os.replace(src, dst)
    remove_folder(staged)
    return names


def final_staging(output_dir: str) -> str:
    """Where :func:`save_final` writes the final checkpoint before moving it into ``output_dir``:
    ``output_dir/.stllava-staging/<output_dir's own name>`` (a save writes what it would write
    to ``output_dir``, under the same name)."""
    return os.path.join(output_dir, STAGING, os.path.basename(os.path.normpath(os.path.abspath(output_dir))))


def save_final(trainer) -> None:
    """The final save of a run into ``--output_dir``: the trainer state and the checkpoint layout
    (``trainer.save_model``). Every process must call it.

    Raises :class:`DiskFullError` (on every process) before writing anything when the disk has
    less free space than the weights to write, and when the disk fills during the save (its
    partial files are removed; nothing in ``--output_dir`` is changed). Returns None."""
    from stllava.train.checkpoint import save_bytes

    args = trainer.args
    out = args.output_dir
    projector_only = bool(getattr(args, "tune_mm_mlp_adapter", False))
    need = save_bytes(trainer.model, projector_only=projector_only) + _MARGIN
    short = None
    if args.should_save:
        os.makedirs(out, exist_ok=True)
        free = shutil.disk_usage(out).free
        short = (need, free) if free < need else None
    short = _from_main(short)
    if short is not None:
        saved, redo = saved_account(out, trainer.state.max_steps)
        raise DiskFullError(f"not enough free space for the final checkpoint in {out}: about {human_bytes(short[0])} "
                            f"to write, {human_bytes(short[1])} free; nothing was written; {saved}; fix: free space "
                            f"on the disk of {out}, {redo}")
    staged = final_staging(out)
    if args.should_save:
        shutil.rmtree(staged, ignore_errors=True)  # what a killed final save left
    _barrier()
    try:
        trainer.save_model(staged)
        trainer.save_state()
    except Exception as e:
        if not (args.should_save and is_disk_full(e, out)):
            raise
        remove_folder(staged)
        saved, redo = saved_account(out, trainer.state.max_steps)
        reason = " ".join(str(e).split())[:160]
        raise DiskFullError(f"no space left on the disk while saving the final checkpoint to {out} ({reason}); the "
                            f"partial files were removed; {saved}; fix: free space on the disk of {out} (the "
                            f"weights take about {human_bytes(need)}), {redo}") from None
    if args.should_save:
        moved = move_entries(staged, out)
        logger.info("final checkpoint written aside and moved into %s: %s", out, ", ".join(moved))
    _barrier()

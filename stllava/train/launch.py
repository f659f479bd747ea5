"""Start-up shared by the training entry points (``stllava.train.train_sft``, ``train_dpo``).

:func:`run_entry_point` runs an entry point under ``stllava.errors.run_cli`` (a bad input prints
one line, from rank 0 only under a launcher, and exits 2).
:func:`prepare_run` turns command-line flags into parsed arguments and a process ready to load a
model: CPU fallback, a one-process world for ``--deepspeed`` without a launcher, logging, the
checks of unsupported flags, the gloo process group on CPU, the seed.
:func:`resume_from_checkpoint` reads ``--resume_from_checkpoint`` for ``Trainer.train``.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Callable, Sequence

import torch
import transformers

from stllava import logs
from stllava.errors import StllavaError, run_cli


def launcher_rank() -> int:
    """This process's rank as the launcher set it (``RANK``; 0 without a launcher)."""
    return int(os.environ.get("RANK", "0") or 0)


def run_entry_point(run: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Run ``run(argv)`` (default ``sys.argv[1:]``) under :func:`stllava.errors.run_cli` and return
    the exit code: 0, or 2 with one ``error: ...`` line for a :class:`~stllava.errors.StllavaError`.
    Under a launcher every rank raises the same error (the data check's report is broadcast), so
    only rank 0 prints it; the others exit 2 silently."""
    def main(args: Sequence[str] | None) -> int:
        try:
            run(list(sys.argv[1:] if args is None else args))
        except StllavaError as e:
            if launcher_rank() != 0:
                raise SystemExit(e.exit_code) from None
            raise
        return 0

    return run_cli(main, argv)


def _prepare_argv(argv: list[str]) -> list[str]:
    """Add ``--use_cpu True`` when CUDA is unavailable (the published scripts assume GPUs)."""
    argv = list(argv)
    if not torch.cuda.is_available() and not any(a.split("=")[0] == "--use_cpu" for a in argv):
        argv += ["--use_cpu", "True"]
    return argv


def _single_process_env(argv: list[str]) -> None:
    """``--deepspeed`` without a launcher: describe a world of one process (else DeepSpeed looks
    for MPI). Leaves the environment alone when a launcher set it."""
    if not any(a.split("=")[0] == "--deepspeed" for a in argv) or "RANK" in os.environ or "LOCAL_RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _setup_logging(training_args) -> None:
    """stllava's logs and the Trainer's run summary at ``--log_level`` on the main process (INFO for
    transformers' default ``passive``) and at ``--log_level_replica`` (default warning) elsewhere.
    These are TrainingArguments' own flags (``--log-level`` is their dashed spelling), reused rather
    than a second flag. Other libraries log warnings only. A root handler (:func:`stllava.logs.setup`)
    is added only when the caller has none (an in-process caller keeps its own)."""
    levels = transformers.utils.logging.get_log_levels_dict()
    main_level = logging.INFO if training_args.log_level == "passive" else levels[training_args.log_level]
    replica_level = (logging.WARNING if training_args.log_level_replica == "passive"
                     else levels[training_args.log_level_replica])
    level = main_level if training_args.should_log else replica_level
    logs.setup(logging.WARNING)
    logging.getLogger("stllava").setLevel(level)
    # transformers at INFO prints every config it loads; keep its Trainer's run summary only.
    transformers.utils.logging.set_verbosity_warning()
    logging.getLogger("transformers.trainer").setLevel(level)


def prepare_run(argv: list[str], parse: Callable[[list[str]], tuple], check: Callable[..., None] | None = None):
    """Start a training run from command-line flags ``argv``; returns ``parse``'s
    ``(model_args, data_args, training_args)``.

    In order: adds ``--use_cpu True`` without CUDA, describes a one-process world for
    ``--deepspeed`` without a launcher, parses, sets up logging, refuses unsupported flag values
    (:func:`stllava.train.arguments.check_supported`, then ``check(model_args, data_args,
    training_args)``: the entry point's own checks, run before any process group starts), starts
    DeepSpeed's gloo process group on a machine without CUDA and seeds everything with ``--seed``.
    Raises :class:`~stllava.train.arguments.FlagError` for unsupported flag values; ``parse``
    exits 2 (argparse) for unknown flags.
    """
    from stllava.train.arguments import check_supported

    argv = _prepare_argv(argv)
    _single_process_env(argv)
    model_args, data_args, training_args = parse(argv)
    # DeepSpeed 0.19 calls torch.distributed functions torch 2.13 deprecates, at every step.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    _setup_logging(training_args)
    check_supported(model_args, data_args, training_args)
    if check is not None:
        check(model_args, data_args, training_args)
    if training_args.deepspeed and not torch.cuda.is_available():
        import deepspeed

        # Before from_pretrained: with 2 CPU processes under HF Trainer, a process group started
        # later fails DeepSpeed's batch-size check (train_batch_size != micro × accumulation × world).
        deepspeed.init_distributed(dist_backend="gloo")
    transformers.set_seed(training_args.seed)
    return model_args, data_args, training_args


def resume_from_checkpoint(training_args) -> str | bool | None:
    """``--resume_from_checkpoint`` as ``Trainer.train`` takes it: a checkpoint folder, True (the
    latest in ``--output_dir``) or None (a fresh start; also for "false" or empty)."""
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    return resume or None

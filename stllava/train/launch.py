"""Start-up shared by the training entry points (``stllava.train.train_sft``, ``train_dpo``).

:func:`prepare_run` turns command-line flags into parsed arguments and a process ready to load a
model: CPU fallback, a one-process world for ``--deepspeed`` without a launcher, logging, the
checks of unsupported flags, the gloo process group on CPU, the seed.
:func:`resume_from_checkpoint` reads ``--resume_from_checkpoint`` for ``Trainer.train``.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Callable

import torch
import transformers


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
    """INFO logs from stllava and the Trainer's run summary on the main process, warnings elsewhere.
    A root handler is added only when the caller has none (an in-process caller keeps its own)."""
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    Raises ValueError for unsupported flag values; ``parse`` raises for unknown flags.
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

        deepspeed.init_distributed(dist_backend="gloo")  # before from_pretrained (see ENVIRONMENT.md)
    transformers.set_seed(training_args.seed)
    return model_args, data_args, training_args


def resume_from_checkpoint(training_args) -> str | bool | None:
    """``--resume_from_checkpoint`` as ``Trainer.train`` takes it: a checkpoint folder, True (the
    latest in ``--output_dir``) or None (a fresh start; also for "false" or empty)."""
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    return resume or None

"""A checkpoint folder (any layout the builder reads, LoRA merged in) saved as one full folder.

    python -m stllava.model.merge --model-path OUT/checkpoint-N --model-base BASE \\
        --save-model-path MERGED [--vit-lora OUT/Vit-lora] [--dtype float16]

(``python scripts/merge_lora_weights.py`` takes the same flags and calls this.)

- :func:`~stllava.model.lora.merge_lora` / :func:`~stllava.model.lora.merge_vit_lora` (in
  :mod:`stllava.model.lora`): wrap a module with a LoRA state dict (peft does the arithmetic; we only
  pick the modules), load it, merge it. The builder uses them to load LoRA layouts.
- :func:`merge_checkpoint`: any layout ``stllava.model.builder.load_pretrained_model`` reads (a LoRA
  run's output, a released STLLaVA-Med folder, a projector-only folder; ``Vit-lora/`` found in the
  folder or given) → one full folder: ``config.json`` (model_type ``llava_llama``, the tower's shape
  in ``mm_vision_config``, every recorded field such as ``conv_mode`` kept), ``model.safetensors``
  (LLM + projector + merged tower), the tokenizer (with its SentencePiece ``tokenizer.model``) and
  ``preprocessor_config.json``; it loads with ``model_base=None``. Stage-3 DPO merges its start
  model with it, the CLI and the script are thin wrappers, the demo calls it in-process.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from typing import Sequence

import torch

from stllava import logs
from stllava.errors import StllavaError

logger = logging.getLogger(__name__)

CLI_DESCRIPTION = """Merge a checkpoint (LLM LoRA + projector + ViT-LoRA, or any layout the builder reads) into one
full model folder that loads on its own (model_base=None). Exit codes: 0 merged, 2 bad input
(one error line: e.g. an output folder that exists and is not empty)."""
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class MergeError(StllavaError, ValueError):
    """A merge (or an export: :func:`check_output_folder`) that would overwrite something: an input
    folder, a folder inside one, a non-empty output folder."""


# ---------------------------------------------------------------------------------------------
# A checkpoint folder → one full folder

def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def check_output_folder(save_model_path: str, *inputs: str | None, flag: str = "--save-model-path",
                        overwrite: bool | None = None) -> str:
    """The absolute output folder of a command that writes a new model folder (merge, export).

    Refuses (:class:`MergeError`, one line naming ``flag``) a folder that is one of the ``inputs``
    (however spelled: real paths are compared) or lies inside one, so a source is never written
    over, and an existing non-empty folder — unless ``overwrite`` is True. ``overwrite=None`` means
    the command has no such flag (the message then does not offer one)."""
    out = os.path.abspath(save_model_path)
    real = os.path.realpath(out)
    for src in inputs:
        if not src:
            continue
        src_real = os.path.realpath(src)
        if src_real == real:
            raise MergeError(f"{flag} {save_model_path} is an input folder ({src}); choose a new folder")
        if os.path.isdir(src_real) and real.startswith(src_real.rstrip(os.sep) + os.sep):
            raise MergeError(f"{flag} {save_model_path} is inside an input folder ({src}); choose a new folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise MergeError(f"{flag} {save_model_path} is a file, not a folder; choose a new folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        offer = ", or pass --overwrite to write over its files" if overwrite is False else ""
        raise MergeError(f"{flag} {save_model_path} exists and is not empty; choose a new folder "
                         f"(or delete it first{offer})")
    return out


def merge_checkpoint(model_path: str, model_base: str | None, save_model_path: str, vit_lora: str | None = None,
                     dtype: str | torch.dtype = "float16") -> str:
    """Load ``model_path`` (+ ``model_base``, + ``vit_lora``, default ``model_path/Vit-lora``)
    merged on the CPU in ``dtype`` and save it as one full folder (see the module docstring).

    Returns the absolute ``save_model_path``. Refuses (:class:`MergeError`) to write into an input
    folder or a non-empty folder; raises the builder's errors for incomplete layouts.
    """
    from stllava.model.builder import load_pretrained_model  # transformers: loaded when a merge runs

    out = check_output_folder(save_model_path, model_path, model_base, vit_lora)
    tokenizer, model, processor, _ = load_pretrained_model(model_path, model_base=model_base, device="cpu",
                                                           lora_pt=vit_lora, dtype=_dtype(dtype))
    tower = model.get_model().get_vision_tower()
    if tower is not None:
        model.config.mm_vision_config = tower.config.to_dict()  # the merged folder needs no hub lookup
    model.config.use_cache = True
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    for src in (model_path, model_base):  # transformers 5 writes tokenizer.json only; keep the SentencePiece model
        spm = os.path.join(src, "tokenizer.model") if src else ""
        if spm and os.path.isfile(spm) and not os.path.isfile(os.path.join(out, "tokenizer.model")):
            shutil.copy(spm, os.path.join(out, "tokenizer.model"))
    logger.info("merged %s (base %s) into %s", model_path, model_base, out)
    return out


def build_parser(prog: str = "python -m stllava.model.merge") -> argparse.ArgumentParser:
    """The merge CLI's flags (shared with ``scripts/merge_lora_weights.py``)."""
    ap = argparse.ArgumentParser(prog=prog, description=CLI_DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True, help="the checkpoint folder to merge (LoRA, projector-only, ...)")
    ap.add_argument("--model-base", default=None, help="the base folder the checkpoint was trained from")
    ap.add_argument("--vit-lora", default=None, help="a Vit-lora/ adapter folder (default: MODEL_PATH/Vit-lora)")
    ap.add_argument("--save-model-path", required=True, help="the new, full checkpoint folder (must not exist or "
                    "be empty)")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES),
                    help="dtype of the saved weights (default: float16)")
    logs.add_log_level_arg(ap)
    return ap


def main(argv: Sequence[str] | None = None, prog: str = "python -m stllava.model.merge") -> int:
    """The CLI: parse ``argv``, merge, print one summary line; returns 0. Raises as :func:`merge_checkpoint`
    (``stllava.errors.run_cli`` turns a :class:`MergeError` into one line and exit code 2)."""
    args = build_parser(prog).parse_args(argv)
    logs.setup(args.log_level)
    t0 = time.time()
    out = merge_checkpoint(args.model_path, args.model_base, args.save_model_path, args.vit_lora, args.dtype)
    print(f"merged {args.model_path} (base {args.model_base}) into {out} in {time.time() - t0:.1f} s; "
          f"load it with load_pretrained_model({out!r})")
    return 0


if __name__ == "__main__":
    from stllava.errors import run_cli

    sys.exit(run_cli(main))

"""Merge a LoRA checkpoint (LLM LoRA + projector + ViT-LoRA) into one full model folder.

    python scripts/merge_lora_weights.py --model-path OUT/checkpoint-N --model-base BASE \\
        --save-model-path MERGED [--vit-lora OUT/Vit-lora] [--dtype float16]

The LLaVA-style entry point of ``python -m stllava.model.merge`` (same flags, same result; see
that module for what the merged folder holds). A bad input prints one ``error:`` line, exit code 2.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from stllava.model.merge import DTYPES, MergeError, main, merge_checkpoint  # noqa: E402

merge = merge_checkpoint  # the name this script's function had
__all__ = ["DTYPES", "MergeError", "main", "merge"]

if __name__ == "__main__":
    from stllava.errors import run_cli

    sys.exit(run_cli(lambda argv: main(argv, prog="python scripts/merge_lora_weights.py")))

"""Bridges from stllava to outside evaluation frameworks (docs/Evaluation.md#lmms-eval).

Each subpackage imports its framework only in the modules the framework itself loads, so the
project's own environment can import the rest without it."""

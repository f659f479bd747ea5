"""lmms-eval task YAMLs and their utils.py (loaded by lmms-eval from this folder)."""

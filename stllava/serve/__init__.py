"""Serving: ``python -m stllava.serve.cli`` (interactive chat about one image, SPEC §8)."""

"""Serving (docs/Serving.md): ``python -m stllava.serve.cli`` (chat about one image in the terminal) and
``python -m stllava.serve.api`` (the OpenAI-compatible server with a chat page; docs/Serving.md)."""

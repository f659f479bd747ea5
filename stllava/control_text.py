"""Untrusted text cannot forge a prompt's control tokens (docs/Serving.md, "Errors, limits and safety").

A prompt is a string: the template's text, its separators (``</s>`` after each answer in the v1
templates), the ``<image>`` placeholder, and the messages' text. Tokenization turns every ``</s>``,
``<s>``, ``<unk>`` (every special or added token of the tokenizer) into its control id, and
:func:`stllava.mm_utils.tokenizer_image_token` turns every ``<image>`` into an image slot, wherever
they came from. So a user who types ``</s>`` ends the turn early for the model, and a typed
``<image>`` asks for a second image the request does not have.

At inference (the API server, the chat CLI) every message's text — users', the model's own earlier
answers, assistant turns a client sends — goes through :func:`neutralize` before it is rendered:
a zero-width space (U+200B) after the first character of each control string keeps it visible as
the same text but no longer the control string, so it is tokenized as plain text. Text without a
control string is left exactly as it is, so its ids equal training's and ``eval.model_vqa``'s.
Training and evaluation data are trusted and are not changed.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

from stllava.constants import DEFAULT_IMAGE_TOKEN

BREAK = "\u200b"  # zero-width space: invisible, and no tokenizer's control string contains it


def control_strings(tokenizer) -> tuple[str, ...]:
    """The strings tokenization gives a meaning other than their text: ``<image>`` and the
    tokenizer's special and added tokens (``<s>``, ``</s>``, ``<unk>``, ...), longest first."""
    found = {DEFAULT_IMAGE_TOKEN, *getattr(tokenizer, "all_special_tokens", ())}
    if hasattr(tokenizer, "get_added_vocab"):
        found.update(tokenizer.get_added_vocab())
    return tuple(sorted((s for s in found if s and BREAK not in s), key=lambda s: (-len(s), s)))


@lru_cache(maxsize=16)
def _pattern(controls: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(c) for c in sorted(controls, key=len, reverse=True)))


def neutralize(text: str, controls: Sequence[str] = (DEFAULT_IMAGE_TOKEN,)) -> str:
    """``text`` with a zero-width space after the first character of every occurrence of a string
    of ``controls`` (see :func:`control_strings`), so that none is left; ``text`` itself when it
    holds none."""
    if not controls:
        return text
    pattern = _pattern(tuple(controls))
    # Breaking one occurrence cannot make another (a new match would have to contain the zero-width
    # space); overlapping ones (``<</s>s>``) need another pass. Each pass removes at least one.
    while pattern.search(text):
        text = pattern.sub(lambda m: m[0][0] + BREAK + m[0][1:], text)
    return text

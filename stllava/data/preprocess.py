"""Render conversation records with a template and build their training labels (docs/Method.md#loss-masks).

A record's conversation is a list of ``{"from": "human" | "gpt" | "vuser", "value": str}``.
:func:`preprocess` renders it with a template (``v1``/``vicuna_v1``, ``llava_v1``, ``v1_sq``,
``plain``), tokenizes it with :func:`~stllava.mm_utils.tokenizer_image_token` and masks the labels:
IGNORE_INDEX on the BOS, the system text, every ``USER: …`` instruction and the ``ASSISTANT:`` /
``VUSER:`` tags; trained are each answer and each VUSER question, with their ``</s>``.

How the mask is found (and why it cannot be silently wrong). Tokenizing each round on its own and
adding fixed offsets breaks wherever the tokenizer treats the text after a ``</s>`` differently
(the two ``legacy`` modes do; docs/Differences.md#tokenization-mismatch). So every span boundary is a character
position in the rendered prompt — right after ``ASSISTANT:``/``VUSER:`` (before the space) and right
after each trained ``</s>`` — and its token position is the length of the tokenized prompt prefix
ending there. SentencePiece splits words at whitespace and at special tokens, so those prefixes
tokenize exactly as the start of the whole prompt; each one is *checked* to be a prefix of the full
ids. A failed check is a tokenization mismatch: the sample's labels are blanked, a warning names the
record and both lengths, and the count is returned in ``"mismatches"`` for the caller to report.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Sequence

import torch

from stllava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from stllava.conversation import Conversation, SeparatorStyle, get_conv_template
from stllava.mm_utils import tokenizer_image_token

logger = logging.getLogger(__name__)

HUMAN, GPT, VUSER = "human", "gpt", "vuser"
EOS_TEXT = "</s>"
DATA_VUSER_TURNS = ("train", "published")


def make_sq_rng(seed: int, epoch: int, index: int) -> random.Random:
    """Return the generator for the VUSER draws of record ``index`` in ``epoch``.

    Seeded from a string (hashed with SHA-512 by ``random``, not by ``hash()``), so the draws depend
    only on (seed, epoch, index): the same on any worker count, process or machine.
    """
    return random.Random(f"stllava-sq:{seed}:{epoch}:{index}")


def _record_name(record_ids: Sequence[Any] | None, i: int) -> str:
    return f"record {record_ids[i]!r}" if record_ids is not None else f"record {i}"


def validate_conversation(source: Sequence[dict], has_image: bool, version: str, record: str = "record") -> None:
    """Raise ValueError (naming ``record``, the turn and the fix) unless ``source`` can be trained on.

    Rules: a non-empty list of ``{"from", "value"}`` dicts; roles alternate human/gpt starting with
    human, where a ``vuser`` turn may stand in a human's place (only for ``v1_sq``) and the last
    turn is not human; no empty value; ``<image>`` appears only in the first turn, and there
    exactly when ``has_image``. ``plain`` wants exactly [human with <image>, gpt caption].
    Returns None.
    """
    if not isinstance(source, (list, tuple)) or not source:
        raise ValueError(f"{record}: the conversation must be a non-empty list of turns, got {source!r}")
    roles = []
    for t, turn in enumerate(source):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"{record}, turn {t}: expected a dict with 'from' and 'value', got {turn!r}")
        roles.append(turn["from"])
    if version == "plain":
        if roles != [HUMAN, GPT] or DEFAULT_IMAGE_TOKEN not in source[0]["value"] or not has_image:
            raise ValueError(f"{record}: template 'plain' needs an image and exactly [human with "
                             f"{DEFAULT_IMAGE_TOKEN}, gpt caption]; found roles {roles}, has_image={has_image}")
        return
    allowed_q = (HUMAN, VUSER) if version == "v1_sq" else (HUMAN,)
    bad = [t for t, r in enumerate(roles) if (r not in allowed_q if t % 2 == 0 else r != GPT)]
    if roles[0] != HUMAN or bad or roles[-1] == HUMAN:
        where = f"first wrong turn {bad[0]}" if bad else ("it must start with human" if roles[0] != HUMAN
                                                         else "the last human turn has no answer")
        raise ValueError(
            f"{record}: roles must alternate human/gpt starting with human"
            f"{' (a vuser turn may replace a human one)' if version == 'v1_sq' else ''} and end with an "
            f"answer; found {roles} ({where}). Fix the record or drop it.")
    for t, turn in enumerate(source):
        value = turn["value"]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{record}, turn {t} ({turn['from']}): empty value; every turn needs text")
        if DEFAULT_IMAGE_TOKEN in value and (t > 0 or not has_image):
            raise ValueError(f"{record}, turn {t}: {DEFAULT_IMAGE_TOKEN} is only allowed in the first turn "
                             f"of a record with an image (has_image={has_image})")
    if has_image and DEFAULT_IMAGE_TOKEN not in source[0]["value"]:
        raise ValueError(f"{record}: the record has an image but its first turn has no {DEFAULT_IMAGE_TOKEN}; "
                         f"add '{DEFAULT_IMAGE_TOKEN}\\n' before the first question")


def render_turns(source: Sequence[dict], conv: Conversation, has_image: bool, sq_r: float = 0.0,
                 rng: random.Random | None = None, data_vuser_turns: str = "train") -> list[tuple[str, str, bool]]:
    """Return the ``(role, text, trained)`` messages of a validated record for template ``conv``.

    human → roles[0], gpt → roles[1] (trained), vuser → roles[2]. For ``v1_sq`` and a record with an
    image, each human turn of pair index j > 0 becomes a VUSER turn when ``rng.random() < sq_r``
    (one draw per such turn, in order); such a turn is a trained question, ``question + "</s>"``.
    A vuser turn already in the data is the same (``data_vuser_turns="train"``), or, with
    ``"published"``, the published rendering (docs/Differences.md#data-vuser-turns): the question without ``</s>``
    (a trailing one is dropped), masked like an instruction.
    """
    if data_vuser_turns not in DATA_VUSER_TURNS:
        raise ValueError(f"data_vuser_turns must be one of {DATA_VUSER_TURNS}, got {data_vuser_turns!r}")
    convert = conv.version == "v1_sq" and has_image and sq_r > 0
    messages = []
    for t, turn in enumerate(source):
        frm, text = turn["from"], turn["value"]
        question = text[: -len(EOS_TEXT)] if text.endswith(EOS_TEXT) else text
        if frm == HUMAN and convert and t > 0 and rng.random() < sq_r:
            messages.append((conv.roles[2], question + EOS_TEXT, True))
        elif frm == VUSER and data_vuser_turns == "published":
            messages.append((conv.roles[2], question, False))
        elif frm == VUSER:
            messages.append((conv.roles[2], question + EOS_TEXT, True))
        else:
            messages.append((conv.roles[0] if frm == HUMAN else conv.roles[1], text, frm == GPT))
    return messages


def render_messages(source: Sequence[dict], conv: Conversation, has_image: bool, sq_r: float = 0.0,
                    rng: random.Random | None = None, data_vuser_turns: str = "train") -> list[tuple[str, str]]:
    """The ``(role, text)`` messages of :func:`render_turns` (what the template renders)."""
    return [(role, text) for role, text, _ in render_turns(source, conv, has_image, sq_r, rng, data_vuser_turns)]


def _trained_spans(messages: list[tuple[str, str, bool]], conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Return the prompt and the character spans [start, end) that are trained.

    Each span starts right after ``ROLE:`` of a trained (ASSISTANT or VUSER) message (so it begins
    with the space) and ends right after the message's ``</s>``. Positions come from rendering
    growing prefixes with the template itself, so they cannot drift from ``get_prompt``.
    """
    work = conv.copy()
    work.messages = []
    spans = []
    prev = work.get_prompt()
    for k, (role, text, trained) in enumerate(messages):
        work.append_message(role, text)
        cur = work.get_prompt()
        if trained:
            start = len(prev) + len(role) + 1
            end = len(prev) + len(f"{role}: {text}")
            sep = (conv.sep, conv.sep2)[k % 2]
            if sep == EOS_TEXT:
                end += len(sep)  # an answer's "</s>" is its separator; a VUSER text ends with one
            if not cur.startswith(prev) or cur[len(prev):start] != role + ":" or not cur[:end].endswith(EOS_TEXT):
                raise RuntimeError(f"template {conv.version!r} did not render {role!r} as '{role}: text</s>'")
            spans.append((start, end))
        prev = cur
    return prev, spans


def mask_conversation(prompt: str, spans: list[tuple[int, int]],
                      tokenizer) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """Tokenize ``prompt`` and train only the character ``spans``.

    Returns ``(input_ids, labels, problem)``: ``problem`` is None, or a message describing the
    tokenization mismatch, in which case every label is IGNORE_INDEX.
    """
    ids = tokenizer_image_token(prompt, tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    cache: dict[int, int] = {}

    def token_pos(char_pos: int) -> int:
        if char_pos not in cache:
            head = tokenizer_image_token(prompt[:char_pos], tokenizer)
            cache[char_pos] = len(head) if ids[: len(head)] == head else -1
        return cache[char_pos]

    for start, end in spans:
        a, b = token_pos(start), token_pos(end)
        if a < 0 or b < 0 or b <= a:
            bad = start if a < 0 else end
            n = len(tokenizer_image_token(prompt[:bad], tokenizer))
            problem = (f"tokenization mismatch: the prompt prefix ending at character {bad} "
                       f"({prompt[max(0, bad - 30):bad]!r}) tokenizes to {n} tokens that are not a prefix "
                       f"of the full prompt's {len(ids)} tokens")
            return torch.tensor(ids), torch.full((len(ids),), IGNORE_INDEX), problem
        labels[a:b] = ids[a:b]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), None


def preprocess_plain(sources: Sequence[Sequence[dict]], tokenizer, record_ids=None, has_image: bool = True) -> dict:
    """Alignment pretraining (LLaVA's ``preprocess_plain``): ``"<image>" + caption + "\\n"``, the
    image part (BOS + image token) masked, the caption and newline trained. The human text beside
    ``<image>`` is dropped, as in LLaVA. Returns the same dict as :func:`preprocess`."""
    out = {"input_ids": [], "labels": [], "mismatches": 0, "mismatch_records": []}
    conv = get_conv_template("plain")
    for i, source in enumerate(sources):
        validate_conversation(source, has_image, "plain", _record_name(record_ids, i))
        head = DEFAULT_IMAGE_TOKEN
        prompt = head + source[1]["value"] + conv.sep2
        ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")
        labels = ids.clone()
        labels[: len(tokenizer_image_token(head, tokenizer))] = IGNORE_INDEX
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


class MaskCache:
    """Memo of :func:`mask_conversation` for one tokenizer: an epoch renders the same prompt again
    (a record has few VUSER variants), and tokenizing its prefixes is most of a tiny model's data
    time. Bounded: cleared when it holds ``max_entries`` prompts."""

    def __init__(self, max_entries: int = 20000):
        self.max_entries = max_entries
        self._memo: dict[tuple, tuple] = {}

    def __call__(self, prompt: str, spans: list[tuple[int, int]], tokenizer):
        key = (prompt, tuple(spans))
        hit = self._memo.get(key)
        if hit is None:
            if len(self._memo) >= self.max_entries:
                self._memo.clear()
            hit = self._memo[key] = mask_conversation(prompt, spans, tokenizer)
        ids, labels, problem = hit
        return ids.clone(), labels.clone(), problem


def preprocess(sources: Sequence[Sequence[dict]], tokenizer, has_image: bool, version: str,
               sq_r: float = 0.0, rng: random.Random | None = None,
               record_ids: Sequence[Any] | None = None, data_vuser_turns: str = "train",
               cache: MaskCache | None = None) -> dict:
    """Render, tokenize and mask a batch of conversations.

    Returns ``{"input_ids": [LongTensor], "labels": [LongTensor], "mismatches": int,
    "mismatch_records": [record]}`` — unpadded, untruncated (the collator pads with unk on the
    right and truncates to ``model_max_length``). ``record_ids`` (e.g. dataset indices) name the
    records in errors and warnings. ``sq_r`` > 0 converts human turns to VUSER turns for ``v1_sq``
    records with an image and needs a seeded ``rng`` (see :func:`make_sq_rng`); other templates
    ignore it. Raises ValueError for an unknown template, a bad ``sq_r``/``rng``, or a record
    :func:`validate_conversation` refuses. A tokenization mismatch does not raise: the sample's
    labels are all IGNORE_INDEX, a warning names the record, and it is counted.
    ``data_vuser_turns``: how a vuser turn of the data is treated (:func:`render_messages`). ``cache``
    (a :class:`MaskCache`) memoises the tokenization of prompts seen before (same outputs).
    """
    conv = get_conv_template(version)
    if conv.sep_style is SeparatorStyle.PLAIN:
        return preprocess_plain(sources, tokenizer, record_ids, has_image)
    if not 0.0 <= sq_r <= 1.0:
        raise ValueError(f"sq_r must be in [0, 1], got {sq_r}")
    if sq_r > 0 and version == "v1_sq" and has_image and rng is None:
        raise ValueError("sq_r > 0 needs a seeded rng (stllava.data.preprocess.make_sq_rng) so the VUSER "
                         "draws are reproducible")
    out = {"input_ids": [], "labels": [], "mismatches": 0, "mismatch_records": []}
    for i, source in enumerate(sources):
        name = _record_name(record_ids, i)
        validate_conversation(source, has_image, version, name)
        messages = render_turns(source, conv, has_image, sq_r, rng, data_vuser_turns)
        prompt, spans = _trained_spans(messages, conv)
        ids, labels, problem = (cache or mask_conversation)(prompt, spans, tokenizer)
        if problem is not None:
            out["mismatches"] += 1
            out["mismatch_records"].append(record_ids[i] if record_ids is not None else i)
            logger.warning("%s (template %s): %s; its labels are all ignored", name, version, problem)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out

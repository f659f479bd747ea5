"""The judge's request and the reading of its reply (docs/Method.md#judge), without any HTTP client.

What a judge *server* needs as much as the judge client: the phantom judge of the demo parses
requests with :func:`split_prompt`, and tests build and read replies with these functions, so this
module imports neither ``openai`` nor anything that does.

The request is one user message whose content is ``[text, image]`` — the text first, then the
image, the order of the published ``eval_gpt4v_review.py``::

    [Question]\\n{q}\\n\\n[Answer 1]\\n{a1}\\n\\n[End of Answer 1]\\n\\n\
    [Answer 2]\\n{a2}\\n\\n[End of Answer 2]\\n\\n[System]\\n{rule}\\n\\n

The question and the answers are model text, untrusted: :func:`neutralise` rewrites any delimiter
of this layout inside them (``[System]``, ``[End of Answer 1]``, ... in any case, spacing or
bracket form) with parentheses, so they cannot close their own section and open a forged one
(a forged ``[System]`` with another rule, or a forged ``[Answer 2]`` hiding the real one). Clean
text is left as it is: the prompt is then exactly the published one. What a judge model can still
be talked into by the *content* of an answer is discussed in docs/SelfTraining.md.

The image is a ``data:<mime>;base64,...`` URL; the MIME type comes from the image bytes (PIL),
not the file name. Formats the API does not take (not JPEG/PNG/GIF/WEBP) are re-encoded as PNG.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from stllava.data.images import API_IMAGE_FORMATS, encode_image  # noqa: F401 (the judge's names)
from stllava.errors import StllavaError
from stllava.jsonl import read_utf8

RULES_DIR = Path(__file__).with_name("rules")
DEFAULT_RULE = RULES_DIR / "medical_v1.txt"


@dataclass(frozen=True)
class Rule:
    """The [System] rule text, its version (file stem) and the sha256 of the text."""

    text: str
    version: str
    sha256: str


class RuleError(StllavaError, ValueError):
    """A rule file that is missing, empty or not UTF-8 text."""


def load_rule(path: str | os.PathLike = DEFAULT_RULE) -> Rule:
    """Read a rule file (surrounding whitespace stripped). Refuses (:class:`RuleError`, naming the
    file) a missing or empty file; :class:`~stllava.jsonl.EncodingError` one that is not UTF-8."""
    path = Path(path)
    try:
        text = read_utf8(path).strip()
    except OSError as e:
        raise RuleError(f"{path}: cannot read the rule file ({e.strerror or e}); fix: --rule") from None
    if not text:
        raise RuleError(f"{path}: the rule file is empty; give the [System] instruction text.")
    return Rule(text, path.stem, hashlib.sha256(text.encode("utf-8")).hexdigest())


# Brackets a delimiter may be written with to look like one: ASCII, fullwidth, CJK lenticular and
# tortoise-shell. Their content is compared after NFKC, without spaces or invisible format
# characters (a zero-width space inside "System"), case-folded.
_OPEN, _CLOSE = "[\uff3b\u3010\u3014", "]\uff3d\u3011\u3015"
_BRACKETED = re.compile(f"[{re.escape(_OPEN)}]([^{re.escape(_OPEN + _CLOSE)}]{{1,80}})[{re.escape(_CLOSE)}]")
_DELIMITER_NAME = re.compile(r"question|answer\d+|endofanswer\d+|system")


def _is_delimiter(inner: str) -> bool:
    folded = "".join(ch for ch in unicodedata.normalize("NFKC", inner)
                     if not ch.isspace() and unicodedata.category(ch) != "Cf")
    return _DELIMITER_NAME.fullmatch(folded.casefold()) is not None


def neutralise(text: str) -> str:
    """``text`` (a question or an answer: untrusted model text) with every delimiter of the judge
    prompt's layout -- ``[Question]``, ``[Answer N]``, ``[End of Answer N]``, ``[System]``, in any
    case, spacing or bracket form, anywhere in the text -- written in parentheses instead
    (``(System)``), so it reads as quoted text and cannot open or close a section. Returns ``text``
    itself when it holds none (other brackets, ``[1]`` or ``[left]``, are left alone); idempotent."""
    return _BRACKETED.sub(lambda m: f"({m.group(1)})" if _is_delimiter(m.group(1)) else m.group(0), text)


def build_prompt(question: str, answer1: str, answer2: str, rule_text: str) -> str:
    """The text part of the judge request, exactly the layout of docs/Method.md#judge-prompt."""
    # The question and the answers are model text: neutralised (the rule is the project's own). For
    # text without delimiters the prompt is bit for bit the published one.
    question, answer1, answer2 = neutralise(question), neutralise(answer1), neutralise(answer2)
    return (f"[Question]\n{question}\n\n"
            f"[Answer 1]\n{answer1}\n\n[End of Answer 1]\n\n"
            f"[Answer 2]\n{answer2}\n\n[End of Answer 2]\n\n"
            f"[System]\n{rule_text}\n\n")


_PROMPT_RE = re.compile(r"\A\[Question\]\n(.*?)\n\n\[Answer 1\]\n(.*?)\n\n\[End of Answer 1\]\n\n"
                        r"\[Answer 2\]\n(.*?)\n\n\[End of Answer 2\]\n\n\[System\]\n(.*)\n\n\Z", re.S)


def split_prompt(text: str) -> tuple[str, str, str, str]:
    """Inverse of :func:`build_prompt`: (question, answer1, answer2, rule), the question and the
    answers as sent (:func:`neutralise`-d). For test/phantom judges.

    Refuses (ValueError) text that does not have that layout.
    """
    m = _PROMPT_RE.match(text)
    if m is None:
        raise ValueError("text does not follow the [Question]/[Answer 1]/[Answer 2]/[System] layout")
    return m.group(1), m.group(2), m.group(3), m.group(4)


def parse_scores(reply: str | None) -> tuple[float, float] | None:
    """The two scores on the reply's first line, or None when it is not exactly two finite numbers.

    As docs/Method.md#judge-parsing: first line (after leading blank space), commas read as spaces. "8 6", "8,6",
    "7.5, 9" parse; "Scores: 8 6", "8/10 6/10", "8" and "8 6 5" do not.
    """
    if not reply or not reply.strip():
        return None
    first = reply.strip().splitlines()[0]
    parts = first.replace(",", " ").split()
    if len(parts) != 2:
        return None
    try:
        scores = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    return scores if all(math.isfinite(s) for s in scores) else None


def build_messages(prompt: str, mime: str, data: bytes) -> list[dict]:
    """The chat ``messages``: one user message, content = [text, image data URL]."""
    url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return [{"role": "user", "content": [
        {"type": "text", "text": prompt},
        {"type": "image_url", "image_url": {"url": url}},
    ]}]


def cache_key(image_sha256: str, question: str, answers: list[str], model: str, rule_sha256: str,
              temperature: float, ask: int) -> str:
    """The content key of one request (sha256 hex). ``ask`` 0 is the first ask, 1 the re-ask."""
    blob = json.dumps([image_sha256, question, list(answers), model, rule_sha256, temperature, ask],
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def verdict(scores: tuple[float, float] | None) -> dict:
    """The judge block's ``status``/``scores``/``chosen``/``margin`` for parsed ``scores``:
    ``unparsable`` (None), ``tie`` (equal: nobody is chosen) or ``ok`` (``chosen`` = index of the
    higher score)."""
    if scores is None:
        return {"status": "unparsable", "scores": None, "chosen": None, "margin": None}
    tie = scores[0] == scores[1]
    return {"status": "tie" if tie else "ok", "scores": list(scores), "margin": abs(scores[0] - scores[1]),
            "chosen": None if tie else int(scores[1] > scores[0])}


# --- more than two answers per question (``answers --n-answers K``): best against worst -----------
# The judge prompt compares two answers and scores each on an absolute 1-10 scale. With K > 2
# sampled answers, the distinct ones are judged in pairs (each distinct answer in at least one
# request), each answer's score is the mean of its scores, and the pair is the best- against the
# worst-scored answer. K = 2 is exactly the paper's single comparison.
def distinct_answers(answers: list[str]) -> list[int]:
    """Indices of the first occurrence of each distinct answer (compared stripped), in order."""
    seen: dict[str, int] = {}
    for i, a in enumerate(answers):
        seen.setdefault(a.strip(), i)
    return list(seen.values())


def pair_up(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive pairs of ``indices`` ((0,1), (2,3), ...); an odd one out is paired with the first."""
    pairs = [(indices[i], indices[i + 1]) for i in range(0, len(indices) - 1, 2)]
    if len(indices) % 2:
        pairs.append((indices[-1], indices[0]))
    return pairs


def best_worst(answers: list[str], distinct: list[int], matches: list[dict]) -> dict:
    """The judge block's ``status``/``scores``/``chosen``/``rejected``/``margin`` for K answers from the
    judged ``matches`` (``{"pair": [i, j], "scores": [si, sj] or None}``). An answer's score is the
    mean of its scores; copies of an answer share its score. ``unparsable`` when fewer than two
    distinct answers got a score, ``tie`` when the best and worst score are equal, else ``ok``
    with ``chosen`` the best (first on equal scores) and ``rejected`` the worst."""
    got: dict[int, list[float]] = {}
    for m in matches:
        if m["scores"] is not None:
            for i, s in zip(m["pair"], m["scores"]):
                got.setdefault(i, []).append(s)
    mean = {i: sum(v) / len(v) for i, v in got.items()}
    rep = {answers[i].strip(): i for i in distinct}
    scores = [mean.get(rep[a.strip()]) for a in answers]
    scored = [i for i in distinct if i in mean]
    if len(scored) < 2:
        return {"status": "unparsable", "scores": scores, "chosen": None, "rejected": None, "margin": None}
    best = max(scored, key=lambda i: (mean[i], -i))
    worst = min(scored, key=lambda i: (mean[i], i))
    margin = mean[best] - mean[worst]
    if margin == 0:
        return {"status": "tie", "scores": scores, "chosen": None, "rejected": None, "margin": 0.0}
    return {"status": "ok", "scores": scores, "chosen": best, "rejected": worst, "margin": margin}

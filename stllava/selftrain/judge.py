"""Stage 2(d): an OpenAI-compatible vision model judges the two sampled answers of every question.

    python -m stllava.selftrain.judge --answers answers.jsonl --image-folder IMAGES \\
        --out judged.jsonl [--model gpt-4o] [--base-url URL] [--concurrency 4]

**Input** (``answers.jsonl``, written by the answers stage), one JSON object per line::

    {"question_id": "img1_q0",            # unique string (an int is accepted)
     "image": "img1.jpg",                 # path relative to --image-folder
     "question": "What organ is shown?",
     "answers": ["The liver ...", "A kidney ..."],   # exactly two strings
     ...}                                 # any other fields (model, seeds, ...) are provenance,
                                          # copied to the output unchanged

**Request** (SPEC §5): one user message whose content is ``[text, image]`` -- the text part first,
then the image, the order of the published ``eval_gpt4v_review.py`` -- with temperature 0.2::

    [Question]\\n{q}\\n\\n[Answer 1]\\n{a1}\\n\\n[End of Answer 1]\\n\\n\
    [Answer 2]\\n{a2}\\n\\n[End of Answer 2]\\n\\n[System]\\n{rule}\\n\\n

The image is a ``data:<mime>;base64,...`` URL; the MIME type comes from the image bytes (PIL),
not the file name. Formats the API does not take (not JPEG/PNG/GIF/WEBP) are re-encoded as PNG.

**Output** (``judged.jsonl``): every input record in input order, unchanged, plus a ``"judge"``
object: ``status`` ("ok", "tie", "unparsable", or "identical" when both answers are the same text
and no request is made), ``scores`` [s1, s2] or null, ``chosen`` (0 or 1, the index of the
better answer; null unless ok), ``margin``, ``reply`` (the reply the scores came from),
``replies`` (every reply, in order: a garbage first reply and its re-ask both appear), ``usage``
(prompt/completion tokens), ``model``, ``served_model`` (what the server said it ran),
``rule_version``, ``rule_sha256``, ``temperature``, ``image_sha256``. The file is written once,
atomically, when every item is judged; it does not depend on faults, retries, concurrency or
resumes.

**Resume**: every paid completion is appended (and flushed) to ``<out>.cache.jsonl`` keyed by
sha256 of (image bytes sha256, question, both answers, judge model, rule text sha256,
temperature, ask number). Re-running the same command after a crash, a kill or
``--max-requests`` asks nothing twice. ``<out>.summary.json`` holds counts, retries, tokens and
estimated cost.

Fixed against the reference script: ties no longer go to answer 2 (recorded "tie"); unparsable
replies are re-asked once, then recorded; no hard-coded skip of 2000 items; resume by content key,
not by a wrong index; bounded, logged retries; the openai>=1 client.
"""
from __future__ import annotations

import argparse
import base64
import email.utils
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import sys
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from PIL import Image, UnidentifiedImageError

from stllava.errors import StllavaError
from stllava.jsonl import JsonlError, JsonlWriter, iter_jsonl, write_json_atomic, write_jsonl_atomic

logger = logging.getLogger("stllava.selftrain.judge")

RULES_DIR = Path(__file__).with_name("rules")
DEFAULT_RULE = RULES_DIR / "medical_v1.txt"
# USD per 1M tokens (input, output), OpenAI list prices for standard requests (2025).
# Override with --price-in/--price-out; unknown models are reported without a cost.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-2024-11-20": (2.50, 10.00),
    "gpt-4o-2024-08-06": (2.50, 10.00),
    "gpt-4o-2024-05-13": (5.00, 15.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
}
API_IMAGE_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
RETRY_AFTER_CEILING_S = 600.0
EXIT_ERROR, EXIT_INCOMPLETE = 2, 3


class JudgeError(StllavaError, RuntimeError):
    """A run cannot go on: bad input, a refused request, or retries used up. The message says why."""


class JudgeInputError(JudgeError):
    """A record of the answers file cannot be judged (malformed line, bad fields, missing image)."""


class JudgeAPIError(JudgeError):
    """The server refused a request (4xx other than 408/429) or kept failing past --max-retries."""


class _Stopped(Exception):
    """Internal: the run is stopping (another item failed, or --max-requests was reached)."""


# ---------------------------------------------------------------------------- the prompt and reply
@dataclass(frozen=True)
class Rule:
    """The [System] rule text, its version (file stem) and the sha256 of the text."""

    text: str
    version: str
    sha256: str


def load_rule(path: str | os.PathLike = DEFAULT_RULE) -> Rule:
    """Read a rule file (surrounding whitespace stripped). Refuses an empty file (ValueError)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"{path}: the rule file is empty; give the [System] instruction text.")
    return Rule(text, path.stem, hashlib.sha256(text.encode("utf-8")).hexdigest())


def build_prompt(question: str, answer1: str, answer2: str, rule_text: str) -> str:
    """The text part of the judge request, exactly the SPEC §5 layout."""
    return (f"[Question]\n{question}\n\n"
            f"[Answer 1]\n{answer1}\n\n[End of Answer 1]\n\n"
            f"[Answer 2]\n{answer2}\n\n[End of Answer 2]\n\n"
            f"[System]\n{rule_text}\n\n")


_PROMPT_RE = re.compile(r"\A\[Question\]\n(.*?)\n\n\[Answer 1\]\n(.*?)\n\n\[End of Answer 1\]\n\n"
                        r"\[Answer 2\]\n(.*?)\n\n\[End of Answer 2\]\n\n\[System\]\n(.*)\n\n\Z", re.S)


def split_prompt(text: str) -> tuple[str, str, str, str]:
    """Inverse of :func:`build_prompt`: (question, answer1, answer2, rule). For test/phantom judges.

    Refuses (ValueError) text that does not have the SPEC §5 layout.
    """
    m = _PROMPT_RE.match(text)
    if m is None:
        raise ValueError("text does not follow the [Question]/[Answer 1]/[Answer 2]/[System] layout")
    return m.group(1), m.group(2), m.group(3), m.group(4)


def parse_scores(reply: str | None) -> tuple[float, float] | None:
    """The two scores on the reply's first line, or None when it is not exactly two finite numbers.

    As SPEC §5: first line (after leading blank space), commas read as spaces. "8 6", "8,6",
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


def encode_image(data: bytes) -> tuple[str, bytes]:
    """(MIME type, bytes to send) for image file bytes, the type read from the bytes by PIL.

    JPEG/PNG/GIF/WEBP are sent unchanged; other formats PIL reads are re-encoded as PNG.
    Refuses (ValueError) bytes that are not a readable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.verify()
        if fmt in API_IMAGE_FORMATS:
            return API_IMAGE_FORMATS[fmt], data
        with Image.open(io.BytesIO(data)) as img:
            buf = io.BytesIO()
            img.convert("RGBA" if "A" in img.getbands() else "RGB").save(buf, format="PNG")
        return "image/png", buf.getvalue()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None


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


# ---------------------------------------------------------------------------- input
@dataclass
class Item:
    """One question to judge: its input record, where it came from and its image."""

    index: int
    line: int
    record: dict
    image_path: Path
    image_sha256: str

    @property
    def name(self) -> str:
        return f"{self.record['question_id']} (line {self.line})"


def _check_fields(record: dict) -> str | None:
    """What is wrong with an input record's fields, or None."""
    qid = record.get("question_id")
    if not isinstance(qid, (str, int)) or isinstance(qid, bool) or qid == "":
        return "field 'question_id' must be a non-empty string"
    if not isinstance(record.get("image"), str) or not record["image"]:
        return "field 'image' must be a non-empty string (a path relative to --image-folder)"
    if not isinstance(record.get("question"), str):
        return "field 'question' must be a string"
    answers = record.get("answers")
    if not (isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)):
        found = f"{len(answers)} items" if isinstance(answers, list) else type(answers).__name__
        return f"field 'answers' must be a list of exactly two strings (found {found})"
    return None


def load_items(answers_path: str | os.PathLike, image_folder: str | os.PathLike, *,
               skip_bad: bool = False) -> tuple[list[Item], list[dict]]:
    """Read and check the answers file; return (items, skipped) where skipped = [{line, reason}].

    Every image is read once here (sha256 for the cache key, PIL check of the bytes).
    Refuses (JudgeInputError naming file and line) a malformed line, a record with bad fields,
    a duplicate question_id, a missing or unreadable image -- unless ``skip_bad``, which skips
    and reports it instead. Records after a bad one are never lost.
    """
    answers_path, image_folder = Path(answers_path), Path(image_folder)
    items: list[Item] = []
    skipped: list[dict] = []
    seen: dict[str, int] = {}
    images: dict[Path, str] = {}

    def bad(line: int, reason: str) -> None:
        msg = f"{answers_path}, line {line}: {reason}"
        if not skip_bad:
            raise JudgeInputError(msg + ". Fix the record, or pass --skip-bad to skip and count it.")
        logger.warning("skipping %s", msg)
        skipped.append({"line": line, "reason": reason})

    def on_bad_line(err: JsonlError) -> None:
        bad(err.line, err.reason)

    try:
        for line, record in iter_jsonl(answers_path, skip_bad=skip_bad, on_bad=on_bad_line):
            problem = _check_fields(record)
            if problem:
                bad(line, problem)
                continue
            qid = str(record["question_id"])
            if qid in seen:
                bad(line, f"question_id {qid!r} already used on line {seen[qid]}")
                continue
            path = image_folder / record["image"]
            if path not in images:
                try:
                    data = path.read_bytes()
                    encode_image(data)
                except (FileNotFoundError, IsADirectoryError):
                    bad(line, f"image {record['image']!r} not found (looked for {path}; check --image-folder)")
                    continue
                except (OSError, ValueError) as e:
                    bad(line, f"image {path} cannot be read: {e}")
                    continue
                images[path] = hashlib.sha256(data).hexdigest()
            seen[qid] = line
            items.append(Item(len(items), line, record, path, images[path]))
    except JsonlError as e:
        raise JudgeInputError(str(e)) from None
    except FileNotFoundError:
        raise JudgeInputError(f"{answers_path}: answers file not found") from None
    return items, skipped


# ---------------------------------------------------------------------------- requests
@dataclass
class RetryPolicy:
    """Bounded exponential backoff with jitter: retry k (0-based) waits in [d/2, d], d = min(cap, base*2^k).

    A Retry-After (or retry-after-ms) header on a 429 is used instead, up to 600 s.
    """

    max_retries: int = 6
    base: float = 1.0
    cap: float = 60.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), RETRY_AFTER_CEILING_S)
        d = min(self.cap, self.base * (2 ** retry))
        return d / 2 + self.rng.uniform(0, d / 2)


def retry_after_seconds(headers) -> float | None:
    """Seconds asked for by ``retry-after-ms`` / ``retry-after`` (number or HTTP date), or None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
            if math.isfinite(seconds):
                return seconds
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return email.utils.mktime_tz(parsed) - time.time()
    return None


def _transient(exc: BaseException) -> tuple[str, float | None] | None:
    """(kind, retry_after) when ``exc`` is worth retrying, None when it must stop the run."""
    if isinstance(exc, openai.RateLimitError):
        return "429", retry_after_seconds(exc.response.headers)
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code >= 500:
            return "5xx", None
        if exc.status_code == 408:
            return "408", None
        return None
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", None
    if isinstance(exc, openai.APIConnectionError):
        return "connection", None
    if isinstance(exc, (json.JSONDecodeError, openai.APIResponseValidationError)):
        return "malformed response", None
    return None


@dataclass
class Stats:
    """Counters of one run (thread-safe through ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    http_requests: int = 0
    paid: int = 0
    cache_hits: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    fresh_tokens: list[int] = field(default_factory=lambda: [0, 0])

    def count_retry(self, kind: str) -> None:
        with self.lock:
            self.retries[kind] = self.retries.get(kind, 0) + 1


class Judge:
    """Judges items with an ``openai.OpenAI`` client: cache first, then bounded, logged retries.

    ``cache`` maps cache keys to finished-request entries (loaded from the cache file); every new
    completion is added to it and appended to ``cache_writer`` before it is used.
    ``max_requests`` caps HTTP requests (retries included) for this run; reaching it, or ``stop``
    being set, makes :meth:`judge_item` raise ``_Stopped`` (the item stays pending).
    """

    def __init__(self, client: openai.OpenAI, rule: Rule, *, model: str = "gpt-4o",
                 temperature: float = 0.2, max_tokens: int = 1024, retry: RetryPolicy | None = None,
                 cache: dict[str, dict] | None = None, cache_writer: JsonlWriter | None = None,
                 max_requests: int | None = None, reask_ties: bool = False, secret: str | None = None):
        self.client, self.rule, self.model = client, rule, model
        self.temperature, self.max_tokens = temperature, max_tokens
        self.retry = retry or RetryPolicy()
        self.cache = cache if cache is not None else {}
        self.cache_writer = cache_writer
        self.max_requests = max_requests
        self.reask_ties = reask_ties
        self.secret = secret
        self.stop = threading.Event()
        self.stats = Stats()
        self._key_locks: dict[str, threading.Lock] = {}
        self._key_locks_lock = threading.Lock()

    def redact(self, text: str) -> str:
        return text.replace(self.secret, "***") if self.secret else text

    def _key_lock(self, key: str) -> threading.Lock:
        with self._key_locks_lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _take_request_slot(self) -> None:
        with self.stats.lock:
            if self.stop.is_set():
                raise _Stopped("stopping")
            if self.max_requests is not None and self.stats.http_requests >= self.max_requests:
                raise _Stopped(f"--max-requests {self.max_requests} reached")
            self.stats.http_requests += 1

    def _request(self, item: Item, ask: int) -> Any:
        """One completion for ``item``, retrying transient failures; the ChatCompletion."""
        data = item.image_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != item.image_sha256:
            raise JudgeInputError(f"{item.image_path} changed while the judge was running ({item.name})")
        mime, payload = encode_image(data)
        q, (a1, a2) = item.record["question"], item.record["answers"]
        messages = build_messages(build_prompt(q, a1, a2, self.rule.text), mime, payload)
        for attempt in range(self.retry.max_retries + 1):
            self._take_request_slot()
            try:
                return self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.temperature,
                    max_tokens=self.max_tokens)
            except Exception as exc:  # classified below; anything unknown is re-raised
                kind = _transient(exc)
                if kind is None:
                    if isinstance(exc, openai.APIStatusError):
                        raise JudgeAPIError(self.redact(
                            f"the server refused the request for {item.name} with HTTP {exc.status_code}: "
                            f"{exc}. Nothing was retried; fix the cause (model name, key, request "
                            f"size) and rerun -- finished items are reused from the cache.")) from None
                    raise
                why, retry_after = kind
                if attempt == self.retry.max_retries:
                    raise JudgeAPIError(self.redact(
                        f"giving up on {item.name} after {attempt + 1} attempts; last error: {why} "
                        f"({exc}). Rerun later (finished items are reused) or raise --max-retries."
                    )) from None
                self.stats.count_retry(why)
                delay = self.retry.delay(attempt, retry_after if why == "429" else None)
                logger.warning("%s, ask %d: %s; retry %d/%d in %.2f s", item.name, ask, why,
                               attempt + 1, self.retry.max_retries, delay)
                if self.stop.wait(delay):
                    raise _Stopped("stopping") from None
        raise AssertionError("unreachable")

    def ask(self, item: Item, ask: int) -> dict:
        """The cache entry of ask number ``ask`` for ``item``: from the cache, or asked and stored."""
        q, answers = item.record["question"], item.record["answers"]
        key = cache_key(item.image_sha256, q, answers, self.model, self.rule.sha256, self.temperature, ask)
        with self._key_lock(key):  # two identical items never pay twice, even concurrently
            entry = self.cache.get(key)
            if entry is not None:
                with self.stats.lock:
                    self.stats.cache_hits += 1
                return entry
            response = self._request(item, ask)
            usage = response.usage
            tokens = [usage.prompt_tokens, usage.completion_tokens] if usage else [0, 0]
            content = response.choices[0].message.content if response.choices else None
            entry = {"key": key, "question_id": str(item.record["question_id"]), "ask": ask,
                     "reply": content, "served_model": response.model,
                     "usage": {"prompt_tokens": tokens[0], "completion_tokens": tokens[1]}}
            if self.cache_writer is not None:
                self.cache_writer.write(entry)
            self.cache[key] = entry
            with self.stats.lock:
                self.stats.paid += 1
                self.stats.fresh_tokens[0] += tokens[0]
                self.stats.fresh_tokens[1] += tokens[1]
            logger.debug("%s: ask %d answered: %r", item.name, ask, (content or "")[:80])
            return entry

    def judge_item(self, item: Item) -> dict:
        """The ``judge`` block for ``item`` (see the module docstring). Raises _Stopped or JudgeError.

        A JudgeError sets ``stop`` before it leaves the worker thread, so no queued item starts
        a request after it.
        """
        try:
            return self._judge_item(item)
        except JudgeError:
            self.stop.set()
            raise

    def _judge_item(self, item: Item) -> dict:
        answers = item.record["answers"]
        block: dict[str, Any] = {"status": None, "scores": None, "chosen": None, "margin": None,
                                 "reply": None, "replies": [], "usage": None, "model": self.model,
                                 "served_model": None, "rule_version": self.rule.version,
                                 "rule_sha256": self.rule.sha256, "temperature": self.temperature,
                                 "image_sha256": item.image_sha256}
        if answers[0].strip() == answers[1].strip():
            block.update(status="identical", usage={"prompt_tokens": 0, "completion_tokens": 0})
            return block
        entries = [self.ask(item, 0)]
        scores = parse_scores(entries[0]["reply"])
        if scores is None or (scores[0] == scores[1] and self.reask_ties):
            logger.info("%s: %s first reply %r; asking once more", item.name,
                        "unparsable" if scores is None else "tied", (entries[0]["reply"] or "")[:60])
            entries.append(self.ask(item, 1))
            rescored = parse_scores(entries[1]["reply"])
            if rescored is not None or scores is None:
                scores = rescored
                used = entries[1]
            else:  # a tie re-asked into garbage stays the tie it was
                used = entries[0]
        else:
            used = entries[0]
        block.update(reply=used["reply"], replies=[e["reply"] for e in entries],
                     served_model=used["served_model"],
                     usage={"prompt_tokens": sum(e["usage"]["prompt_tokens"] for e in entries),
                            "completion_tokens": sum(e["usage"]["completion_tokens"] for e in entries)})
        if scores is None:
            block["status"] = "unparsable"
        else:
            block.update(scores=list(scores), margin=abs(scores[0] - scores[1]),
                         status="tie" if scores[0] == scores[1] else "ok",
                         chosen=None if scores[0] == scores[1] else int(scores[1] > scores[0]))
        return block


# ---------------------------------------------------------------------------- the run
def load_cache(path: Path) -> dict[str, dict]:
    """Finished requests from a cache file (first entry per key wins); {} when there is none.

    Refuses (JudgeInputError naming the line) a corrupt line other than a cut-short last one.
    """
    cache: dict[str, dict] = {}
    if not path.exists():
        return cache
    try:
        for line, entry in iter_jsonl(path, allow_truncated_tail=True):
            if not isinstance(entry.get("key"), str) or "reply" not in entry or "usage" not in entry:
                raise JsonlError(path, line, "not a judge cache entry (needs key, reply, usage)")
            cache.setdefault(entry["key"], entry)
    except JsonlError as e:
        raise JudgeInputError(f"resume cache: {e} Deleting the line only costs asking that request again.") from None
    return cache


def price_for(model: str, price_in: float | None = None,
              price_out: float | None = None) -> tuple[float, float] | None:
    """USD per 1M (prompt, completion) tokens for ``model``, or None when unknown.

    Each override replaces its table value; the table matches the exact name or the longest
    dated prefix ("gpt-4o-2024-08-06" -> its own row, "gpt-4o-foo" -> "gpt-4o").
    """
    matches = [m for m in PRICES_PER_MTOK if model == m or model.startswith(m + "-")]
    table = PRICES_PER_MTOK[max(matches, key=len)] if matches else (None, None)
    prices = (table[0] if price_in is None else price_in, table[1] if price_out is None else price_out)
    return None if None in prices else prices


def _cost(tokens: list[int], price: tuple[float, float] | None) -> float | None:
    return None if price is None else round((tokens[0] * price[0] + tokens[1] * price[1]) / 1e6, 6)


def side_path(out: Path, suffix: str) -> Path:
    """``judged.jsonl`` + ``.cache.jsonl`` -> ``judged.cache.jsonl`` (the output's sibling files)."""
    return out.with_suffix(suffix)


def run(args: argparse.Namespace, secret: str) -> tuple[int, dict]:
    """Judge every item of ``args.answers``; write ``args.out`` when all are done. (exit code, summary)."""
    out = Path(args.out)
    cache_path = Path(args.cache) if args.cache else side_path(out, ".cache.jsonl")
    summary_path = side_path(out, ".summary.json")
    rule = load_rule(args.rule)
    items, skipped = load_items(args.answers, args.image_folder, skip_bad=args.skip_bad)
    cache = load_cache(cache_path)
    logger.info("%d items to judge (%d bad input skipped); %d finished requests in %s",
                len(items), len(skipped), len(cache), cache_path)
    client = openai.OpenAI(base_url=args.base_url, api_key=secret, max_retries=0, timeout=args.timeout)
    retry = RetryPolicy(args.max_retries, args.backoff_base, args.backoff_cap)
    with JsonlWriter(cache_path) as writer:
        judge = Judge(client, rule, model=args.model, temperature=args.temperature,
                      max_tokens=args.max_tokens, retry=retry, cache=cache, cache_writer=writer,
                      max_requests=args.max_requests, reask_ties=args.reask_ties, secret=secret)
        results, error = _judge_all(judge, items, args.concurrency)
    statuses: dict[str, int] = {}
    all_tokens = [0, 0]
    for block in results.values():
        statuses[block["status"]] = statuses.get(block["status"], 0) + 1
        all_tokens[0] += block["usage"]["prompt_tokens"]
        all_tokens[1] += block["usage"]["completion_tokens"]
    price = price_for(args.model, args.price_in, args.price_out)
    if price is None:
        logger.warning("no price known for model %r: pass --price-in/--price-out to get a cost", args.model)
    pending = len(items) - len(results)
    summary = {
        "answers": str(args.answers), "out": str(out), "cache": str(cache_path),
        "model": args.model, "rule_version": rule.version, "rule_sha256": rule.sha256,
        "items": len(items), "judged": len(results), "pending": pending, "complete": pending == 0 and not error,
        "status": dict(sorted(statuses.items())),
        "skipped_bad_input": len(skipped), "skipped": skipped,
        "http_requests": judge.stats.http_requests, "paid_requests": judge.stats.paid,
        "cache_hits": judge.stats.cache_hits, "retries": dict(sorted(judge.stats.retries.items())),
        "tokens_this_run": {"prompt": judge.stats.fresh_tokens[0], "completion": judge.stats.fresh_tokens[1]},
        "tokens_all_items": {"prompt": all_tokens[0], "completion": all_tokens[1]},
        "price_usd_per_mtok": list(price) if price else None,
        "cost_usd_this_run": _cost(judge.stats.fresh_tokens, price),
        "cost_usd_all_items": _cost(all_tokens, price),
        "error": error,
    }
    write_json_atomic(summary_path, summary)
    logger.info("%d paid requests this run (%d HTTP requests, %d cache hits): %d prompt + %d completion "
                "tokens, estimated cost $%s; summary in %s", judge.stats.paid, judge.stats.http_requests,
                judge.stats.cache_hits, *judge.stats.fresh_tokens, summary["cost_usd_this_run"], summary_path)
    if error:
        logger.error("%s", error)
        return EXIT_ERROR, summary
    if pending:
        logger.warning("%d of %d items not judged (--max-requests %s reached); %s not written. "
                       "Rerun the same command to finish: nothing already paid is asked again.",
                       pending, len(items), args.max_requests, out)
        return EXIT_INCOMPLETE, summary
    write_jsonl_atomic(out, ({**item.record, "judge": results[item.index]} for item in items))
    logger.info("wrote %d judged items to %s", len(items), out)
    return 0, summary


def _judge_all(judge: Judge, items: list[Item], concurrency: int) -> tuple[dict[int, dict], str | None]:
    """Judge ``items`` on a thread pool; ({item index: judge block}, first fatal error or None).

    The first JudgeError stops the run: no new request starts, requests in flight finish (and are
    cached). An unexpected exception or Ctrl-C does the same and is then re-raised.
    """
    from tqdm import tqdm

    results: dict[int, dict] = {}
    error: str | None = None
    with tqdm(total=len(items), desc="judge", unit="item", disable=None) as progress, \
            ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(judge.judge_item, item): item for item in items}

        def stop_all() -> None:
            judge.stop.set()
            for f in futures:
                f.cancel()

        try:
            for future in as_completed(futures):
                item = futures[future]
                try:
                    results[item.index] = future.result()
                    progress.update(1)
                except (_Stopped, CancelledError):
                    pass  # stays pending
                except JudgeError as e:
                    if error is None:
                        error = str(e)
                        stop_all()
        except BaseException:
            stop_all()
            raise
    return results, error


class _RedactFilter(logging.Filter):
    """Replace the API key in every log record by ***, whatever logger it comes from."""

    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secret in message:
            record.msg, record.args = message.replace(self.secret, "***"), ()
        if record.exc_text and self.secret in record.exc_text:
            record.exc_text = record.exc_text.replace(self.secret, "***")
        return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stllava.selftrain.judge", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--answers", required=True, help="answers.jsonl from the answers stage")
    p.add_argument("--image-folder", required=True, help="folder the records' image paths are relative to")
    p.add_argument("--out", required=True, help="judged.jsonl to write (siblings: .cache.jsonl, .summary.json)")
    p.add_argument("--cache", default=None, help="resume cache file (default: <out>.cache.jsonl)")
    p.add_argument("--model", default="gpt-4o", help="judge model name")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible server (default: OpenAI, or $OPENAI_BASE_URL)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--rule", default=str(DEFAULT_RULE), help="[System] rule text file (its stem is the rule version)")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--max-tokens", type=int, default=1024, help="max_tokens of each judge reply")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    p.add_argument("--max-requests", type=int, default=None,
                   help="stop after this many HTTP requests (retries count) in this run; rerun to continue")
    p.add_argument("--max-retries", type=int, default=6,
                   help="retries per request on 429/5xx/timeout/connection errors")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
    p.add_argument("--backoff-base", type=float, default=1.0, help="first retry waits 0.5-1x this many seconds")
    p.add_argument("--backoff-cap", type=float, default=60.0, help="longest backoff in seconds")
    p.add_argument("--price-in", type=float, default=None, help="USD per 1M prompt tokens (overrides the table)")
    p.add_argument("--price-out", type=float, default=None, help="USD per 1M completion tokens (overrides the table)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad input records instead of stopping")
    p.add_argument("--reask-ties", action="store_true",
                   help="ask once more on a tie (still recorded 'tie' if it repeats)")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 done, 2 error, 3 incomplete)."""
    args = build_parser().parse_args(argv)
    secret = os.environ.get(args.api_key_env, "")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("httpx", "httpx2"):  # one INFO line per HTTP request is noise at 50k requests
            logging.getLogger(name).setLevel(logging.WARNING)
    if secret:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_RedactFilter(secret))
    if not secret:
        logger.error("no API key: set $%s (for a local server without auth any value works, e.g. EMPTY)",
                     args.api_key_env)
        return EXIT_ERROR
    try:
        code, summary = run(args, secret)
    except JudgeError as e:
        logger.error("%s", str(e).replace(secret, "***"))
        return EXIT_ERROR
    printable = {k: v for k, v in summary.items() if k != "skipped"}
    print(json.dumps(printable, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())

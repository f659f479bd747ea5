"""Stage 2(d): an OpenAI-compatible vision model judges the two sampled answers of every question.

    python -m stllava.selftrain.judge --answers answers.jsonl --image-folder IMAGES \\
        --out judged.jsonl [--model gpt-4o] [--base-url URL] [--concurrency 4]

**Input** (``answers.jsonl``, written by the answers stage), one JSON object per line::

    {"question_id": "img1_q0",            # unique string (an int is accepted)
     "image": "img1.jpg",                 # path relative to --image-folder
     "question": "What organ is shown?",
     "answers": ["The liver ...", "A kidney ..."],   # two strings (or K > 2: best vs worst)
     ...}                                 # any other fields (model, seeds, ...) are provenance,
                                          # copied to the output unchanged

**Request** (docs/Method.md#judge-prompt, built by :mod:`stllava.selftrain.judge_prompt`): one user message, the
``[Question]/[Answer 1]/[Answer 2]/[System]`` text then the image as a data URL, temperature 0.2;
sent by :mod:`stllava.selftrain.judge_client` (the ``openai`` client and its retries).

**Output** (``judged.jsonl``): every input record in input order, unchanged, plus a ``"judge"``
object: ``status`` ("ok", "tie", "unparsable", or "identical" when both answers are the same text
and no request is made), ``scores`` [s1, s2] or null, ``chosen`` (0 or 1, the index of the
better answer; null unless ok), ``margin``, ``reply`` (the reply the scores came from),
``replies`` (every reply, in order: a garbage first reply and its re-ask both appear), ``usage``
(prompt/completion tokens), ``model``, ``served_model`` (what the server said it ran),
``rule_version``, ``rule_sha256``, ``temperature``, ``image_sha256``. With K > 2 answers (``answers
--n-answers K``, an extension the paper's method allows), the distinct answers are judged in pairs
(``matches``: each pair, its scores and reply), ``scores`` holds one mean score per answer, and
``chosen``/``rejected`` are the best- and the worst-scored answer. The file is written once,
atomically, when every item is judged; it does not depend on faults, retries, concurrency or
resumes.

**Resume**: every paid completion is appended (and flushed) to ``<out>.cache.jsonl`` keyed by
sha256 of (image bytes sha256, question, both answers, judge model, rule text sha256,
temperature, ask number). Re-running the same command after a crash, a kill or
``--max-requests`` asks nothing twice. ``<out>.summary.json`` holds counts, retries, tokens and
estimated cost.

Nothing is decided or dropped silently (docs/Differences.md#stage-2): a tie is recorded "tie" and
makes no pair; an unparsable reply is re-asked once, then recorded; every item is judged; resume
goes by content key; retries are bounded and logged; the client is openai>=1.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from pathlib import Path

from stllava import chat_client, logs
from stllava.data.images import ImageLoadError, image_path
from stllava.errors import EXIT_FAILED, run_cli
from stllava.jsonl import JsonlError, JsonlWriter, iter_jsonl, write_json_atomic, write_jsonl_atomic
from stllava.selftrain.judge_client import Item, Judge, JudgeError, JudgeInputError, _Stopped
from stllava.selftrain.judge_prompt import DEFAULT_RULE, encode_image, load_rule

logger = logging.getLogger("stllava.selftrain.judge")

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


# ---------------------------------------------------------------------------- input
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
    if not (isinstance(answers, list) and len(answers) >= 2 and all(isinstance(a, str) for a in answers)):
        found = f"{len(answers)} items" if isinstance(answers, list) else type(answers).__name__
        return f"field 'answers' must be a list of at least two strings (found {found})"
    return None


def load_items(answers_path: str | os.PathLike, image_folder: str | os.PathLike, *,
               skip_bad: bool = False) -> tuple[list[Item], list[dict]]:
    """Read and check the answers file; return (items, skipped) where skipped = [{line, reason}].

    Every image is read once here (sha256 for the cache key, PIL check of the bytes).
    Refuses (JudgeInputError naming file and line) a malformed line, a record with bad fields,
    a duplicate question_id, an image path that leaves ``image_folder``
    (:func:`stllava.data.images.image_path`), a missing, unreadable, too large or too thin image
    -- unless ``skip_bad``, which skips and reports it instead. Records after a bad one are never lost.
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
            try:
                path = Path(image_path(str(image_folder), record["image"]))
            except ImageLoadError as e:  # the judge would upload any readable image: keep to the folder
                bad(line, f"{e.kind}: {e.path} ({e.detail})")
                continue
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
        raise JudgeInputError(f"{e}, or pass --skip-bad to skip and count it.") from None
    except FileNotFoundError:
        raise JudgeInputError(f"{answers_path}: answers file not found") from None
    return items, skipped


# ---------------------------------------------------------------------------- the server
def check_base_url(url: str | None, allow_insecure_http: bool, source: str = "--base-url") -> None:
    """:func:`stllava.chat_client.check_base_url`, refusing with :class:`JudgeError`."""
    chat_client.check_base_url(url, allow_insecure_http, source, error=JudgeError)


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
    if not items and not skipped and not args.allow_empty:
        raise JudgeInputError(f"{args.answers} holds no records; fix: pass the answers file of the answers stage "
                              "(or --allow-empty when an empty file is expected)")
    cache = load_cache(cache_path)
    logger.info("%d items to judge (%d bad input skipped); %d finished requests in %s",
                len(items), len(skipped), len(cache), cache_path)
    with JsonlWriter(cache_path) as writer:
        judge = Judge(rule, base_url=args.base_url, api_key=secret, timeout=args.timeout,
                      max_retries=args.max_retries, model=args.model, temperature=args.temperature,
                      max_tokens=args.max_tokens, cache=cache, cache_writer=writer,
                      max_requests=args.max_requests, reask_ties=args.reask_ties)
        try:
            results, error = _judge_all(judge, items, args.concurrency)
        finally:
            judge.close()
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
        return EXIT_FAILED, summary
    if pending:
        logger.warning("%d of %d items not judged (--max-requests %s reached); %s not written. "
                       "Rerun the same command to finish: nothing already paid is asked again.",
                       pending, len(items), args.max_requests, out)
        return EXIT_FAILED, summary
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
    """The command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m stllava.selftrain.judge", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--answers", required=True, help="answers.jsonl from the answers stage")
    p.add_argument("--image-folder", required=True, help="folder the records' image paths are relative to")
    p.add_argument("--out", required=True, help="judged.jsonl to write (siblings: .cache.jsonl, .summary.json)")
    p.add_argument("--cache", default=None, help="resume cache file (default: <out>.cache.jsonl)")
    p.add_argument("--model", default="gpt-4o", help="judge model name")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible server (default: OpenAI, or $OPENAI_BASE_URL)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--allow-insecure-http", action="store_true",
                   help="send the key and the images over plain http to a host other than this machine (refused "
                        "by default; http to localhost is always allowed)")
    p.add_argument("--rule", default=str(DEFAULT_RULE), help="[System] rule text file (its stem is the rule version)")
    p.add_argument("--temperature", type=float, default=0.2, help="sampling temperature of the judge model")
    p.add_argument("--max-tokens", type=int, default=1024, help="max_tokens of each judge reply")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    p.add_argument("--max-requests", type=int, default=None,
                   help="stop after this many HTTP requests (retries count) in this run; rerun to continue")
    p.add_argument("--max-retries", type=int, default=6,
                   help="the openai client's retries per request (408/409/429/5xx, timeouts, connection errors; "
                        "exponential backoff, Retry-After honoured up to 2 min)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
    p.add_argument("--price-in", type=float, default=None, help="USD per 1M prompt tokens (overrides the table)")
    p.add_argument("--price-out", type=float, default=None, help="USD per 1M completion tokens (overrides the table)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad input records instead of stopping")
    p.add_argument("--allow-empty", action="store_true",
                   help="accept an answers file with no records (by default an error: a wrong or unfinished file)")
    p.add_argument("--reask-ties", action="store_true",
                   help="ask once more on a tie (still recorded 'tie' if it repeats)")
    logs.add_log_level_arg(p)
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    secret = os.environ.get(args.api_key_env, "")
    logs.setup(args.log_level)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("httpx", "httpx2"):  # one INFO line per HTTP request is noise at 50k requests
            logging.getLogger(name).setLevel(logging.WARNING)
    if args.base_url:
        check_base_url(args.base_url, args.allow_insecure_http)
    else:  # the openai client's own fallback
        check_base_url(os.environ.get("OPENAI_BASE_URL"), args.allow_insecure_http, "$OPENAI_BASE_URL")
    if not secret:
        raise JudgeError(f"no API key: set ${args.api_key_env} (for a local server without auth any value works, "
                         "e.g. EMPTY)")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RedactFilter(secret))
    try:
        code, summary = run(args, secret)
    except JudgeError as e:  # printed by run_cli: never with the key in it
        raise type(e)(str(e).replace(secret, "***")) from None
    printable = {k: v for k, v in summary.items() if k != "skipped"}
    print(json.dumps(printable, indent=2))
    return code


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code: 0 when judged.jsonl is written, 1 when the
    run stopped without it (a refused request, retries used up, or --max-requests reached: rerun
    to finish), 2 for bad input or flags (see stllava.errors)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

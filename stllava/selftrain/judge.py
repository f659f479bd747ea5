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

**De-biasing** (docs/SelfTraining.md#de-biased-judging; both off by default, and the output is then
exactly the above): ``--swap-check`` asks every pair a second time with Answer 1 and Answer 2
exchanged and keeps a verdict only when both orders prefer the same answer (status
"inconsistent" otherwise; each record gets a ``swap`` object with both orders' verdicts and
``position_consistent``, the summary counts them). ``--judges FILE`` (a JSON, or with PyYAML a
YAML, list of ``{"model", "base_url", "api_key_env"}``) asks several judges and keeps a pair when
a strict majority prefers the same answer -- with two judges, only when both agree -- (status
"no_majority" otherwise; per-judge blocks in ``judges``).

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
import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from pathlib import Path

from stllava import chat_client, logs
from stllava.data.images import ImageLoadError, image_path
from stllava.errors import EXIT_FAILED, run_cli
from stllava.jsonl import JsonlError, JsonlWriter, iter_jsonl, write_json_atomic, write_jsonl_atomic
from stllava.selftrain.judge_client import Item, Judge, JudgeError, JudgeInputError, Panel, Stats, _Stopped
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


JUDGE_FIELDS = {"model": str, "base_url": (str, type(None)), "api_key_env": str,
                "price_in": (int, float), "price_out": (int, float)}


def load_judges(path: str | os.PathLike, *, base_url: str | None = None,
                api_key_env: str = "OPENAI_API_KEY") -> list[dict]:
    """The judges of a ``--judges`` file: a JSON list (YAML too, for a .yaml/.yml file when PyYAML is
    installed) of objects with ``model`` (required), ``base_url`` and ``api_key_env`` (default: the
    ``base_url`` and ``api_key_env`` given here, i.e. the command's flags), optional ``price_in`` /
    ``price_out`` (USD per 1M tokens). Returns one dict per judge with all five keys.

    Refuses (JudgeInputError naming the file and the entry) a missing or unreadable file, a file that
    is not a non-empty list of objects, an unknown key or a wrong type, and two entries of one model
    (their requests would share cache entries, which are keyed by model).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JudgeInputError(f"{path}: cannot read the judges file ({getattr(e, 'strerror', None) or e}); "
                              "fix: --judges") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise JudgeInputError(f"{path}: a YAML judges file needs PyYAML (pip install pyyaml); "
                                      "fix: install it, or write the list as JSON") from None
            entries = yaml.safe_load(text)
        else:
            entries = json.loads(text)
    except JudgeInputError:
        raise
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError: the message names line and column
        raise JudgeInputError(f"{path}: not a valid judges file ({str(e).splitlines()[0]}); fix: write a list of "
                              '{"model": ..., "base_url": ..., "api_key_env": ...} objects') from None
    if not isinstance(entries, list) or not entries:
        raise JudgeInputError(f"{path}: the judges file must hold a non-empty list of judges; fix: write a list of "
                              '{"model": ..., "base_url": ..., "api_key_env": ...} objects')
    judges: list[dict] = []
    for n, entry in enumerate(entries, 1):
        where = f"{path}, entry {n}"
        if not isinstance(entry, dict):
            raise JudgeInputError(f"{where}: a judge must be an object with model, base_url, api_key_env")
        unknown = sorted(set(entry) - set(JUDGE_FIELDS))
        if unknown:
            raise JudgeInputError(f"{where}: unknown key(s) {unknown}; fix: use only {sorted(JUDGE_FIELDS)}")
        for key, kind in JUDGE_FIELDS.items():
            value = entry.get(key)
            if key in entry and (not isinstance(value, kind) or isinstance(value, bool) or value == ""):
                raise JudgeInputError(f"{where}: {key!r} has the wrong type or is empty ({value!r})")
        if "model" not in entry:
            raise JudgeInputError(f"{where}: 'model' is missing; fix: name the judge model")
        earlier = [k for k, j in enumerate(judges, 1) if j["model"] == entry["model"]]
        if earlier:
            raise JudgeInputError(f"{where}: model {entry['model']!r} is already entry {earlier[0]}; fix: give "
                                  "each judge a different model (cached replies are keyed by model)")
        judges.append({"model": entry["model"], "base_url": entry.get("base_url", base_url),
                       "api_key_env": entry.get("api_key_env", api_key_env),
                       "price_in": entry.get("price_in"), "price_out": entry.get("price_out")})
    return judges


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


def run(args: argparse.Namespace, secret: str, judges: list[dict] | None = None) -> tuple[int, dict]:
    """Judge every item of ``args.answers``; write ``args.out`` when all are done. (exit code, summary).
    ``judges``: the panel of ``--judges`` (:func:`load_judges` entries plus each one's ``secret``);
    None: the one judge of ``--model``/``--base-url`` with ``secret``."""
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
    swap_check = getattr(args, "swap_check", False)
    with JsonlWriter(cache_path) as writer:
        if judges is None:
            judge: Judge | Panel = Judge(
                rule, base_url=args.base_url, api_key=secret, timeout=args.timeout,
                max_retries=args.max_retries, model=args.model, temperature=args.temperature,
                max_tokens=args.max_tokens, cache=cache, cache_writer=writer,
                max_requests=args.max_requests, reask_ties=args.reask_ties, swap_check=swap_check)
        else:  # one cache, one request cap, one stop for all of them
            stats, stop = Stats(), threading.Event()
            judge = Panel([Judge(rule, base_url=j["base_url"], api_key=j["secret"], timeout=args.timeout,
                                 max_retries=args.max_retries, model=j["model"], temperature=args.temperature,
                                 max_tokens=args.max_tokens, cache=cache, cache_writer=writer,
                                 max_requests=args.max_requests, reask_ties=args.reask_ties,
                                 swap_check=swap_check, stats=stats, stop=stop) for j in judges],
                          [j["base_url"] for j in judges])
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
    if judges is None:
        price = price_for(args.model, args.price_in, args.price_out)
        if price is None:
            logger.warning("no price known for model %r: pass --price-in/--price-out to get a cost", args.model)
        cost_this_run, cost_all = _cost(judge.stats.fresh_tokens, price), _cost(all_tokens, price)
    else:
        panel = _panel_summary(judges, results, judge.stats, args)
        price = None
        costs = [(j["cost_usd_this_run"], j["cost_usd_all_items"]) for j in panel]
        cost_this_run = None if any(c[0] is None for c in costs) else round(sum(c[0] for c in costs), 6)
        cost_all = None if any(c[1] is None for c in costs) else round(sum(c[1] for c in costs), 6)
    pending = len(items) - len(results)
    summary = {
        "answers": str(args.answers), "out": str(out), "cache": str(cache_path),
        "model": args.model if judges is None else judge.model, "rule_version": rule.version,
        "rule_sha256": rule.sha256,
        "items": len(items), "judged": len(results), "pending": pending, "complete": pending == 0 and not error,
        "status": dict(sorted(statuses.items())),
        "skipped_bad_input": len(skipped), "skipped": skipped,
        "http_requests": judge.stats.http_requests, "paid_requests": judge.stats.paid,
        "cache_hits": judge.stats.cache_hits, "retries": dict(sorted(judge.stats.retries.items())),
        "tokens_this_run": {"prompt": judge.stats.fresh_tokens[0], "completion": judge.stats.fresh_tokens[1]},
        "tokens_all_items": {"prompt": all_tokens[0], "completion": all_tokens[1]},
        "price_usd_per_mtok": list(price) if price else None,
        "cost_usd_this_run": cost_this_run,
        "cost_usd_all_items": cost_all,
        "error": error,
    }
    if swap_check:  # with several judges: the sum of the judges' own counts (each in the judges list)
        counts = (_swap_counts(results.values()) if judges is None else
                  {k: sum(j[k] for j in panel) for k in ("position_consistent", "position_inconsistent")})
        summary.update(swap_check=True, **counts)
        logger.info("swap check: %d of %d pairs scored in both orders position-inconsistent",
                    summary["position_inconsistent"],
                    summary["position_inconsistent"] + summary["position_consistent"])
    if judges is not None:
        summary["judges"] = panel
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


def _swap_counts(blocks) -> dict:
    """Of swap-checked judge blocks: how many were position-consistent and -inconsistent (blocks
    without scores in both orders count in neither)."""
    flags = [b["swap"]["position_consistent"] for b in blocks]
    return {"position_consistent": flags.count(True), "position_inconsistent": flags.count(False)}


def _panel_summary(judges: list[dict], results: dict[int, dict], stats: Stats, args) -> list[dict]:
    """Per judge of a panel: model, base URL, its own status counts (and swap counts), tokens, cost."""
    out = []
    for k, j in enumerate(judges):
        blocks = [r["judges"][k] for r in results.values()]
        statuses: dict[str, int] = {}
        for b in blocks:
            statuses[b["status"]] = statuses.get(b["status"], 0) + 1
        tokens = [sum(b["usage"][kind] for b in blocks) for kind in ("prompt_tokens", "completion_tokens")]
        fresh = stats.fresh_by_model.get(j["model"], [0, 0])
        price = price_for(j["model"], j["price_in"] if j["price_in"] is not None else args.price_in,
                          j["price_out"] if j["price_out"] is not None else args.price_out)
        if price is None:
            logger.warning("no price known for judge model %r: give price_in/price_out in the judges file", j["model"])
        entry = {"model": j["model"], "base_url": j["base_url"], "status": dict(sorted(statuses.items())),
                 "tokens_this_run": {"prompt": fresh[0], "completion": fresh[1]},
                 "price_usd_per_mtok": list(price) if price else None,
                 "cost_usd_this_run": _cost(fresh, price), "cost_usd_all_items": _cost(tokens, price)}
        if getattr(args, "swap_check", False):
            entry.update(_swap_counts(blocks))
        out.append(entry)
    return out


def _judge_all(judge: Judge | Panel, items: list[Item], concurrency: int) -> tuple[dict[int, dict], str | None]:
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
    p.add_argument("--swap-check", action="store_true",
                   help="ask every pair in both orders (Answer 1 and 2 exchanged) and keep a verdict only when both "
                        "prefer the same answer; twice the requests (docs/SelfTraining.md#de-biased-judging)")
    p.add_argument("--judges", default=None,
                   help="JSON (or YAML) list of judges, each {model, base_url, api_key_env}; a pair is kept when a "
                        "strict majority prefers the same answer (with two judges: both agree). Replaces --model, "
                        "--base-url and --api-key-env, which become the entries' defaults")
    logs.add_log_level_arg(p)
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    secret = os.environ.get(args.api_key_env, "")
    logs.setup(args.log_level)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("httpx", "httpx2"):  # one INFO line per HTTP request is noise at 50k requests
            logging.getLogger(name).setLevel(logging.WARNING)
    judges = None
    if args.judges:
        judges = load_judges(args.judges, base_url=args.base_url, api_key_env=args.api_key_env)
        for n, j in enumerate(judges, 1):
            where = f"{args.judges}, entry {n} ({j['model']})"
            check_base_url(j["base_url"] or os.environ.get("OPENAI_BASE_URL"), args.allow_insecure_http,
                           f"{where}: base_url")
            j["secret"] = os.environ.get(j["api_key_env"], "")
            if not j["secret"]:
                raise JudgeError(f"{where}: no API key: set ${j['api_key_env']} (for a local server without auth any "
                                 "value works, e.g. EMPTY)")
        secrets = [j["secret"] for j in judges]
    else:
        if args.base_url:
            check_base_url(args.base_url, args.allow_insecure_http)
        else:  # the openai client's own fallback
            check_base_url(os.environ.get("OPENAI_BASE_URL"), args.allow_insecure_http, "$OPENAI_BASE_URL")
        if not secret:
            raise JudgeError(f"no API key: set ${args.api_key_env} (for a local server without auth any value works, "
                             "e.g. EMPTY)")
        secrets = [secret]
    for handler in logging.getLogger().handlers:
        for key in secrets:
            handler.addFilter(_RedactFilter(key))
    try:
        code, summary = run(args, secret, judges)
    except JudgeError as e:  # printed by run_cli: never with the key in it
        message = str(e)
        for key in secrets:
            message = message.replace(key, "***")
        raise type(e)(message) from None
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

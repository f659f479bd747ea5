"""The judge client: one judged item = at most two chat completions, cached by content, asked
through :class:`stllava.chat_client.ChatClient` (the one client of OpenAI-compatible servers: the
``openai`` client's own retries, a cap on HTTP requests per run (``--max-requests``, retries
included), stopping at once when another item has failed, retry counts by kind for the run's
summary, failing fast on a refused connection, and a 200 whose body does not parse asked again
within the same bound).
"""
from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stllava.chat_client import ChatClient, ClientError, Stats, _Stopped  # noqa: F401 (Stats, _Stopped: judge.py's)
from stllava.errors import EXIT_FAILED
from stllava.jsonl import JsonlWriter
from stllava.selftrain.judge_prompt import (
    Rule,
    best_worst,
    build_messages,
    build_prompt,
    cache_key,
    distinct_answers,
    encode_image,
    neutralise,
    pair_up,
    parse_scores,
)
from stllava.selftrain.judge_prompt import verdict as score_verdict
from stllava.selftrain.judge_votes import majority, position_consistent, swap_checked

logger = logging.getLogger("stllava.selftrain.judge")


class JudgeError(ClientError):
    """A run cannot go on: bad input, a refused request, or retries used up. The message says why."""


class JudgeInputError(JudgeError):
    """A record of the answers file cannot be judged (malformed line, bad fields, missing image)."""


class JudgeAPIError(JudgeError):
    """The server refused a request (4xx other than 408/409/429) or kept failing past --max-retries."""

    exit_code = EXIT_FAILED


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


class Judge(ChatClient):
    """Judges items through a :class:`~stllava.chat_client.ChatClient`: cache first, then the
    client's bounded retries.

    ``cache`` maps cache keys to finished-request entries (loaded from the cache file); every new
    completion is added to it and appended to ``cache_writer`` before it is used.
    ``max_requests`` caps HTTP requests (retries included) for this run; reaching it, or ``stop``
    being set, makes :meth:`judge_item` raise ``_Stopped`` (the item stays pending).
    ``swap_check`` asks every pair in both orders (:func:`stllava.selftrain.judge_votes.swap_checked`).
    ``stats`` and ``stop``, when given, are shared with the other judges of a :class:`Panel`: one
    request cap, one stop, one set of counters for the run.
    """

    api_error = JudgeAPIError

    def __init__(self, rule: Rule, *, base_url: str | None, api_key: str, timeout: float = 120.0,
                 max_retries: int = 6, model: str = "gpt-4o", temperature: float = 0.2, max_tokens: int = 1024,
                 cache: dict[str, dict] | None = None, cache_writer: JsonlWriter | None = None,
                 max_requests: int | None = None, reask_ties: bool = False, swap_check: bool = False,
                 stats: Stats | None = None, stop: threading.Event | None = None):
        super().__init__(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries,
                         max_requests=max_requests, stats=stats, stop=stop)
        self.rule, self.model = rule, model
        self.temperature, self.max_tokens = temperature, max_tokens
        self.cache = cache if cache is not None else {}
        self.cache_writer = cache_writer
        self.reask_ties, self.swap_check = reask_ties, swap_check
        self._key_locks: dict[str, threading.Lock] = {}
        self._key_locks_lock = threading.Lock()

    def _key_lock(self, key: str) -> threading.Lock:
        with self._key_locks_lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _complete(self, item: Item, ask: int, messages: list[dict]) -> Any:
        """One ChatCompletion for ``item``; raises JudgeAPIError when the server refuses or the
        retries are used up, _Stopped when the run stops."""
        return self.complete(item.name, f"{item.name}, ask {ask}", model=self.model, messages=messages,
                             temperature=self.temperature, max_tokens=self.max_tokens)

    def ask(self, item: Item, ask: int, pair: tuple[int, int] = (0, 1)) -> dict:
        """The cache entry of ask number ``ask`` for the answers ``pair`` of ``item``: from the cache,
        or asked and stored."""
        # The key is of the text as sent: a reply paid for before delimiters were neutralised is not
        # reused for the neutralised prompt (clean text, the same either way, keeps its key).
        q, answers = neutralise(item.record["question"]), [neutralise(item.record["answers"][i]) for i in pair]
        key = cache_key(item.image_sha256, q, answers, self.model, self.rule.sha256, self.temperature, ask)
        with self._key_lock(key):  # two identical items never pay twice, even concurrently
            entry = self.cache.get(key)
            if entry is not None:
                with self.stats.lock:
                    self.stats.cache_hits += 1
                return entry
            data = item.image_path.read_bytes()
            if hashlib.sha256(data).hexdigest() != item.image_sha256:
                raise JudgeInputError(f"{item.image_path} changed while the judge was running ({item.name})")
            try:
                mime, payload = encode_image(data)
            except ValueError as e:  # checked when the items were loaded: only a changed setting gets here
                raise JudgeInputError(f"{item.name}: image {item.image_path} cannot be read: {e}") from None
            messages = build_messages(build_prompt(q, answers[0], answers[1], self.rule.text), mime, payload)
            response = self._complete(item, ask, messages)
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
                by_model = self.stats.fresh_by_model.setdefault(self.model, [0, 0])
                by_model[0] += tokens[0]
                by_model[1] += tokens[1]
            logger.debug("%s: ask %d answered: %r", item.name, ask, (content or "")[:80])
            return entry

    def judge_item(self, item: Item) -> dict:
        """The ``judge`` block for ``item`` (see :mod:`stllava.selftrain.judge`). Raises _Stopped or
        JudgeError; a JudgeError sets ``stop`` before it leaves the worker thread, so no queued item
        starts a request after it."""
        try:
            return self._judge_item(item)
        except JudgeError:
            self.stop.set()
            raise

    def _judge_pair(self, item: Item, pair: tuple[int, int]) -> tuple[tuple[float, float] | None, list[dict], dict]:
        """Scores of the two answers ``pair`` (None when unparsable), every entry asked, the one used.
        An unparsable reply (or, with ``reask_ties``, a tie) is asked once more."""
        entries = [self.ask(item, 0, pair)]
        scores = parse_scores(entries[0]["reply"])
        used = entries[0]
        if scores is None or (scores[0] == scores[1] and self.reask_ties):
            logger.info("%s: %s first reply %r; asking once more", item.name,
                        "unparsable" if scores is None else "tied", (entries[0]["reply"] or "")[:60])
            entries.append(self.ask(item, 1, pair))
            rescored = parse_scores(entries[1]["reply"])
            if rescored is not None or scores is None:  # a tie re-asked into garbage stays the tie it was
                scores, used = rescored, entries[1]
        return scores, entries, used

    def _judge_order(self, item: Item, matches: list[tuple[int, int]]) -> tuple[dict, list[dict], list[dict]]:
        """(verdict, match results, entries asked) of the answer pairs ``matches``, each asked in
        its own order; the verdict's scores and indices are in the record's answer order."""
        answers = item.record["answers"]
        entries, results = [], []
        for pair in matches:
            scores, asked, used = self._judge_pair(item, pair)
            entries += asked
            results.append({"pair": list(pair), "scores": list(scores) if scores else None, "reply": used["reply"],
                            "served_model": used["served_model"]})
        if len(answers) == 2:
            got = results[0]
            scores = None if got["scores"] is None else dict(zip(got["pair"], got["scores"]))
            found = score_verdict(None if scores is None else (scores[0], scores[1]))
        else:
            found = best_worst(answers, distinct_answers(answers), results)
        return found, results, entries

    def _judge_item(self, item: Item) -> dict:
        answers = item.record["answers"]
        block: dict[str, Any] = {"status": None, "scores": None, "chosen": None, "margin": None,
                                 "reply": None, "replies": [], "usage": None, "model": self.model,
                                 "served_model": None, "rule_version": self.rule.version,
                                 "rule_sha256": self.rule.sha256, "temperature": self.temperature,
                                 "image_sha256": item.image_sha256}
        distinct = distinct_answers(answers)
        if len(distinct) == 1:
            block.update(status="identical", usage={"prompt_tokens": 0, "completion_tokens": 0})
            if self.swap_check:
                block["swap"] = {"orders": [], "position_consistent": None}
            return block
        matches = [(0, 1)] if len(answers) == 2 else pair_up(distinct)
        found, results, entries = self._judge_order(item, matches)
        orders = [(found, results)]
        if self.swap_check:  # the same pairs, Answer 1 and Answer 2 exchanged: other cache keys
            swapped, swapped_results, asked = self._judge_order(item, [(j, i) for i, j in matches])
            orders.append((swapped, swapped_results))
            entries += asked
            results = results + swapped_results
        first_results = orders[0][1]
        block.update(reply=first_results[-1]["reply"], replies=[e["reply"] for e in entries],
                     served_model=first_results[-1]["served_model"],
                     usage={"prompt_tokens": sum(e["usage"]["prompt_tokens"] for e in entries),
                            "completion_tokens": sum(e["usage"]["completion_tokens"] for e in entries)})
        block.update(swap_checked(found, orders[1][0]) if self.swap_check else found)
        if len(answers) > 2:
            block["matches"] = results
        if self.swap_check:
            block["swap"] = {"orders": [{**v, "swapped": k == 1, "reply": r[-1]["reply"]}
                                        for k, (v, r) in enumerate(orders)],
                             "position_consistent": position_consistent(found, orders[1][0])}
        return block


class Panel:
    """Several judges (``--judges``): every item is judged by each, the verdict is their strict
    majority (:func:`stllava.selftrain.judge_votes.majority`). The judges share one ``stats`` and
    one ``stop``; ``base_urls`` (one per judge) are recorded in the per-judge results."""

    def __init__(self, judges: list[Judge], base_urls: list[str | None]):
        self.judges, self.base_urls = judges, base_urls
        self.stats, self.stop = judges[0].stats, judges[0].stop
        self.model = " + ".join(j.model for j in judges)

    def close(self) -> None:
        """Close every judge's HTTP connections."""
        for j in self.judges:
            j.close()

    def judge_item(self, item: Item) -> dict:
        """The ``judge`` block of ``item``: the majority verdict, with ``judges`` (each judge's own
        block and base URL) and ``agree`` (how many judges prefer the kept answer; 0 when none is kept).
        Raises as :meth:`Judge.judge_item`."""
        blocks = [{**j.judge_item(item), "base_url": url} for j, url in zip(self.judges, self.base_urls)]
        keys = ("status", "scores", "chosen", "margin") + (("rejected",) if len(item.record["answers"]) > 2 else ())
        verdicts = [{k: b.get(k) for k in keys} for b in blocks]
        found = majority(verdicts)
        agreeing = [b for b, v in zip(blocks, verdicts) if found["status"] == "ok" and v["status"] == "ok"
                    and (v["chosen"], v.get("rejected")) == (found["chosen"], found.get("rejected"))]
        speaker = (agreeing or blocks)[0]  # the reply a pair's rationale is taken from
        first = blocks[0]
        return {**found, "reply": speaker["reply"], "replies": [r for b in blocks for r in b["replies"]],
                "usage": {k: sum(b["usage"][k] for b in blocks) for k in ("prompt_tokens", "completion_tokens")},
                "model": self.model, "served_model": speaker["served_model"], "rule_version": first["rule_version"],
                "rule_sha256": first["rule_sha256"], "temperature": first["temperature"],
                "image_sha256": item.image_sha256, "agree": len(agreeing), "judges": blocks}

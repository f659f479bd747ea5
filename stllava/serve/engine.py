"""Dynamic batching: concurrent requests share one ``stllava.generation`` call.

One worker thread owns the model. It takes the first queued :class:`Job`, waits up to ``window_s``
for more (at most ``max_batch``), groups them by decoding mode (greedy, or one temperature / top-p
/ top-k / min-tokens setting — what ``GenerationSettings`` holds per call) and runs each group as
one :func:`stllava.generation.generate_prepared` call. The generation module is batch-invariant
(left padding with position ids from the mask; per-row seeded sampling), so a request's answer does
not depend on its batch-mates.

Per-row behaviour inside a shared call comes from :class:`RowTracker`, a ``StoppingCriteria`` that
``generate`` consults after every step: it ends a row at its own ``max_tokens``, at one of its
``stop`` strings, or when its client went away (the other rows keep going, unchanged), and sends a
streaming row's new text to its request as it appears. Events reach the request's asyncio queue
with ``loop.call_soon_threadsafe``. A full queue is refused at once (HTTP 503 + Retry-After).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from stllava.generation import STOP_STR, GenerationSettings, PreparedBatch, generate_prepared, left_pad
from stllava.serve.protocol import APIError, Result

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One request's generation: its inputs (``prepared`` by ``stllava.generation.prepare_batch``
    for this one prompt, in the request's thread), limits, decoding settings, and the asyncio
    queue (``events`` on ``loop``) its ``("delta", text)``, ``("done", Result)`` or
    ``("error", APIError)`` events go to. ``cancelled`` is set when its client disconnects."""

    prepared: PreparedBatch
    n_images: int
    prompt_tokens: int
    max_tokens: int
    seed: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    emitted: str = ""  # streamed so far (kept on the job so a retried batch does not resend it)

    def mode(self) -> tuple:
        """Jobs with equal modes can share one generate call."""
        if self.temperature == 0:
            return ("greedy", self.min_tokens)
        return ("sample", self.temperature, self.top_p, self.top_k, self.min_tokens)

    def emit(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
            pass


def first_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def streamable(text: str, stops: list[str]) -> str:
    """The part of a growing answer that can be sent already: without a trailing incomplete
    character, a suffix that may become a stop string (or the ``</s>`` the final clean-up
    removes), and trailing whitespace (the final answer is stripped)."""
    text = text.rstrip("\ufffd")
    hold = 0
    for s in (*stops, STOP_STR):
        for k in range(min(len(s), len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[: len(text) - hold].rstrip()


def byte_token_ids(tokenizer) -> frozenset[int]:
    """Ids of SentencePiece's byte-fallback tokens (``<0x41>``): a run of them decodes as one UTF-8
    sequence, so the text of a trailing run can still change when the next byte arrives."""
    return frozenset(i for t, i in tokenizer.get_vocab().items() if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t))


def merge_rows(rows: list[PreparedBatch], pad_id: int) -> PreparedBatch:
    """One left-padded batch of single-prompt batches: the ids, mask and pixels ``prepare_batch``
    gives for all the prompts at once (images are preprocessed one by one either way)."""
    ids, mask = left_pad([r.input_ids[0][r.attention_mask[0].bool()].tolist() for r in rows], pad_id)
    pixels = [r.pixel_values for r in rows if r.pixel_values is not None]
    return PreparedBatch(ids, mask, torch.cat(pixels) if pixels else None)


class RowTracker(StoppingCriteria):
    """Per-row state of one batched ``generate`` call (see the module docstring). ``generate``
    calls it with the ids generated so far; it returns the rows that are finished. Text is streamed
    only after a token that is not a byte token (what is decoded then never changes later)."""

    def __init__(self, jobs: list[Job], tokenizer, byte_ids: frozenset[int] = frozenset()):
        self.jobs, self.tokenizer, self.eos, self.byte_ids = jobs, tokenizer, tokenizer.eos_token_id, byte_ids
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.finish: list[str | None] = [None] * len(jobs)
        self.cut: list[str | None] = [None] * len(jobs)  # the answer when a stop string ended it
        self.saw_eos = [False] * len(jobs)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for i, job in enumerate(self.jobs):
            if self.finish[i] is None:
                self._step(i, job, last[i])
        return torch.tensor([f is not None for f in self.finish], dtype=torch.bool, device=input_ids.device)

    def _step(self, i: int, job: Job, token: int) -> None:
        if token == self.eos:
            self.saw_eos[i], self.finish[i] = True, "stop"
            return
        self.tokens[i].append(token)
        stable = token not in self.byte_ids
        if job.stop or (job.stream and stable):
            text = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True).lstrip()
            # Ending the row here makes this decoding final, so a stop is looked for in all of it.
            at = first_stop(text, job.stop)
            if at is not None:
                self.cut[i], self.finish[i] = text[:at].rstrip(), "stop"
                return
            if job.stream and stable:
                safe = streamable(text, job.stop)
                if len(safe) > len(job.emitted) and safe.startswith(job.emitted):
                    job.emit("delta", safe[len(job.emitted):])
                    job.emitted = safe
        if len(self.tokens[i]) >= job.max_tokens:
            self.finish[i] = "length"
        elif job.cancelled.is_set():
            self.finish[i] = "cancelled"


class BatchingEngine:
    """The worker thread and its queue. ``submit`` a :class:`Job`; ``stats`` for ``/health``."""

    def __init__(self, model, tokenizer, image_processor, *, max_batch: int = 8, window_s: float = 0.01,
                 max_queue: int = 64, prepare_wait_s: float = 0.1):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be ≥ 1, got {max_batch} and {max_queue}")
        self.model, self.tokenizer, self.processor = model, tokenizer, image_processor
        self.max_batch, self.window_s, self.prepare_wait_s = max_batch, window_s, prepare_wait_s
        self.preparing = 0  # requests that arrived and are not queued yet (reading, decoding; set by the backend)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.byte_ids = byte_token_ids(tokenizer)
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # sizes of the generate calls run
        self.running = 0
        self.counts = {"requests": 0, "cancelled": 0, "generated_tokens": 0, "failed_batches": 0}

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._work, name="stllava-generate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish what is queued, then end the worker thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue ``job``; APIError 503 with Retry-After when the queue is full or stopping."""
        if self._stopping.is_set():
            raise APIError(503, "server is shutting down", headers={"Retry-After": "5"})
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"server overloaded: {self._queue.maxsize} requests already queued; retry later",
                           headers={"Retry-After": "1"}) from None

    def stats(self) -> dict:
        return {"queued": self._queue.qsize(), "running": self.running, "batches": len(self.batch_sizes),
                "recent_batch_sizes": list(self.batch_sizes)[-32:], "max_batch": self.max_batch, **self.counts}

    # -------------------------------------------------------------------------------- the worker
    def _collect(self) -> list[Job]:
        """The next batch: the first queued job and those that join it within ``window_s``, or
        later while requests that already arrived are still being prepared (a burst of clients
        whose images are being decoded), up to ``prepare_wait_s`` more and ``max_batch`` jobs."""
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        jobs, t0 = [first], time.monotonic()
        while len(jobs) < self.max_batch:
            waited = time.monotonic() - t0
            if waited >= self.window_s and (self.preparing == 0 or waited >= self.window_s + self.prepare_wait_s):
                break
            try:
                jobs.append(self._queue.get(timeout=0.002))
            except queue.Empty:
                continue
        return jobs

    def _work(self) -> None:
        while not (self._stopping.is_set() and self._queue.empty()):
            jobs = self._collect()
            live = [j for j in jobs if not j.cancelled.is_set()]
            self.counts["cancelled"] += len(jobs) - len(live)
            groups: dict[tuple, list[Job]] = {}
            for j in live:
                groups.setdefault(j.mode(), []).append(j)
            for group in groups.values():
                self.running = len(group)
                self._run(group)
                self.running = 0

    def _run(self, jobs: list[Job]) -> None:
        try:
            self._generate(jobs)
        except Exception as e:  # reported to the requests; it never kills the worker
            self.counts["failed_batches"] += 1
            if len(jobs) > 1:  # find the request that breaks the batch; the others still get answers
                logger.warning("a batch of %d failed (%s: %s); running its requests one by one",
                               len(jobs), type(e).__name__, e)
                for job in jobs:
                    self._run([job])
                return
            logger.error("generation failed", exc_info=e)
            jobs[0].emit("error", APIError(500, f"generation failed ({type(e).__name__})"))

    def _generate(self, jobs: list[Job]) -> None:
        head = jobs[0]
        settings = GenerationSettings(
            max_new_tokens=max(j.max_tokens for j in jobs), temperature=head.temperature,
            top_k=head.top_k if head.temperature else None, top_p=head.top_p if head.temperature else None,
            min_new_tokens=head.min_tokens)
        # prepare_batch's padding: the tokenizer's pad, else unk
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.unk_token_id
        batch = merge_rows([j.prepared for j in jobs], pad_id)
        tracker = RowTracker(jobs, self.tokenizer, self.byte_ids)
        seeds = [j.seed for j in jobs] if settings.do_sample else None
        self.batch_sizes.append(len(jobs))
        texts = generate_prepared(self.model, self.tokenizer, batch, settings, seeds,
                                  stopping_criteria=StoppingCriteriaList([tracker]))
        for i, job in enumerate(jobs):
            text, finish = tracker.cut[i], tracker.finish[i] or "length"
            if text is None:
                text, at = texts[i], first_stop(texts[i], job.stop)
                if at is not None:  # completed by the last tokens, after the tracker looked
                    text, finish = text[:at].rstrip(), "stop"
            n_tokens = len(tracker.tokens[i]) + tracker.saw_eos[i]
            self.counts["generated_tokens"] += n_tokens
            if finish == "cancelled":
                self.counts["cancelled"] += 1
                logger.info("request cancelled by its client after %d tokens", n_tokens)
            self.counts["requests"] += 1
            if job.stream:
                if text.startswith(job.emitted):
                    job.emit("delta", text[len(job.emitted):])
                else:  # decoding a prefix gave text the whole answer does not start with
                    logger.warning("streamed text is not a prefix of the final answer; the tail is not sent")
            job.emit("done", Result(text, finish, job.prompt_tokens, n_tokens))

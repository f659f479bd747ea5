"""Generation through any OpenAI-compatible engine (``--backend openai``) for ``eval.model_vqa``
and ``selftrain.answers`` (docs/Serving.md#generating-through-a-serving-engine).

    --backend openai --base-url http://127.0.0.1:8000/v1 --model NAME [--api-key-env VAR] \\
        [--concurrency 16] [--max-retries 6] [--timeout 600] [--allow-insecure-http]

Each answer is one chat-completions request: one user message holding the image (a base64 data
URL of the file's bytes; JPEG/PNG/GIF/WEBP unchanged, other formats as PNG) and the question text.
The server applies its own chat template (``--model-path`` and ``--conv-mode`` are the local
backend's; they are refused here). Decoding maps onto the request: ``temperature`` (0 = greedy),
``top_p``, ``max_tokens`` = ``--max-new-tokens``, ``seed`` = the item's derived seed (the same
:func:`stllava.generation.derive_seed` as in-process, so a server that seeds per request, like
``stllava.serve.api``, samples what the local path samples), ``top_k`` and ``min_tokens`` in the
body as vLLM's extensions (``extra_body``). K answers per question are K requests with their K
seeds (``n`` > 1 in one request is not portable: ``stllava.serve.api`` takes n = 1 only).

Requests run on ``--concurrency`` threads; blocks of items go through the tools' one resumable loop
(:func:`stllava.tooling.run_batches`), the next blocks' requests queued while the current block
finishes, so records are written in input order and a killed run loses at most the blocks in
flight. Every record's ``settings`` holds the backend, the base URL and the model name, so a file
is resumed only against the same server and model. Retries, the retry accounting and the refusal
of a connection nobody answers are the judge's (:class:`stllava.chat_client.ChatClient`): the first
request that fails for good stops the run (no new request starts), the records before it stay
written, and the error is one line (exit code 1); rerunning resumes.
"""
from __future__ import annotations

import argparse
import base64
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

from stllava.chat_client import ChatClient, ClientAPIError, _Stopped, check_base_url
from stllava.generation import GenerationSettings, clean_output
from stllava.tooling import ToolError

logger = logging.getLogger("stllava.remote_generation")

BACKENDS = ("local", "openai")


class RemoteGenerationError(ClientAPIError):
    """A request failed for good (refused, or retries used up): the run stops; rerun to resume."""


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--backend`` and the flags of the ``openai`` backend to a generating tool's parser."""
    parser.add_argument("--backend", choices=BACKENDS, default="local",
                        help="local: load --model-path in this process; openai: send each request to the "
                             "OpenAI-compatible server at --base-url (vLLM, SGLang, stllava.serve.api)")
    parser.add_argument("--base-url", dest="base_url", default=None,
                        help="--backend openai: the server's URL, e.g. http://127.0.0.1:8000/v1 "
                             "(default: $OPENAI_BASE_URL)")
    parser.add_argument("--model", dest="served_model", default=None,
                        help="--backend openai: the model name the server serves (recorded as the model)")
    parser.add_argument("--api-key-env", dest="api_key_env", default="OPENAI_API_KEY",
                        help="--backend openai: environment variable holding the API key (unset: 'EMPTY', "
                             "what a local server without a key accepts)")
    parser.add_argument("--concurrency", type=int, default=16, help="--backend openai: requests in flight at once")
    parser.add_argument("--max-retries", dest="max_retries", type=int, default=6,
                        help="--backend openai: the openai client's retries per request (408/409/429/5xx, "
                             "timeouts, connection errors; exponential backoff)")
    parser.add_argument("--timeout", type=float, default=600.0, help="--backend openai: seconds per HTTP request")
    parser.add_argument("--allow-insecure-http", dest="allow_insecure_http", action="store_true",
                        help="--backend openai: send the key and the images over plain http to a host other than "
                             "this machine (refused by default; http to localhost is always allowed)")


def is_remote(args: argparse.Namespace) -> bool:
    """Whether the tool generates through a server (``--backend openai``)."""
    return getattr(args, "backend", "local") == "openai"


def base_url(args: argparse.Namespace) -> str | None:
    """``--base-url``, else ``$OPENAI_BASE_URL``, without a trailing slash (None when neither)."""
    url = args.base_url or os.environ.get("OPENAI_BASE_URL")
    return url.rstrip("/") if url else None


def check_remote_args(args: argparse.Namespace) -> None:
    """Refuse (ToolError, one line) flags the ``openai`` backend cannot honour: no model name, no
    base URL, a local model or template (the server has its own), beam search, a concurrency < 1,
    and plain http to another machine without ``--allow-insecure-http``."""
    if args.model_path or getattr(args, "model_base", None) or args.conv_mode:
        raise ToolError("--model-path, --model-base and --conv-mode are for --backend local: with --backend openai "
                        "the server loads the model and applies its own template; fix: drop them, name the served "
                        "model with --model")
    if not args.served_model:
        raise ToolError("--backend openai needs --model (the name the server serves; GET <base-url>/models lists it)")
    url = base_url(args)
    if not url:
        raise ToolError("--backend openai needs --base-url (or $OPENAI_BASE_URL), e.g. http://127.0.0.1:8000/v1")
    source = "--base-url" if args.base_url else "$OPENAI_BASE_URL"
    check_base_url(url, args.allow_insecure_http, source, error=ToolError)
    if args.concurrency < 1:
        raise ToolError(f"--concurrency must be ≥ 1, got {args.concurrency}")
    if getattr(args, "num_beams", 1) > 1:
        raise ToolError("--num-beams > 1 has no chat-completions equivalent; fix: --backend local for beam search")


def remote_settings(args: argparse.Namespace) -> dict:
    """The ``settings`` fields that name where answers come from: backend, base URL and model."""
    return {"backend": "openai", "base_url": base_url(args), "model": args.served_model}


def request_body(settings: GenerationSettings, seed: int | None) -> dict:
    """The decoding fields of a chat-completions request for ``settings`` (see the module docstring);
    ``seed`` is sent when sampling."""
    body: dict = {"temperature": settings.temperature, "max_tokens": settings.max_new_tokens}
    extra: dict = {}
    if settings.do_sample:
        if settings.top_p is not None and settings.top_p < 1.0:
            body["top_p"] = settings.top_p
        if settings.top_k:
            extra["top_k"] = settings.top_k
        if seed is not None:
            body["seed"] = seed
    if settings.min_new_tokens:
        extra["min_tokens"] = settings.min_new_tokens
    if extra:
        body["extra_body"] = extra
    return body


def image_message(image_file: str, text: str) -> list[dict]:
    """The ``messages`` of one question: a user message with the image (data URL) then the text.
    Refuses (ValueError naming no internals) a file that is not a readable image."""
    from stllava.constants import DEFAULT_IMAGE_TOKEN
    from stllava.data.images import encode_image

    # LLaVA's model_vqa rule, as in-process (stllava.generation.image_prompt_text): the image is the
    # image part, never a "<image>" typed in the question.
    text = text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
    with open(image_file, "rb") as f:
        mime, payload = encode_image(f.read())
    url = f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


class RemoteGenerator(ChatClient):
    """Answers questions about images through one server, ``concurrency`` requests at a time.

    :meth:`submit` queues one request and returns its Future (the cleaned answer text). The first
    request that fails for good is kept in ``error`` and stops the run: requests queued after it
    raise ``_Stopped``, and :meth:`result` raises the kept error for them."""

    api_error = RemoteGenerationError
    resume_hint = ("the records already written are kept: rerun the same command to resume",
                   "rerunning resumes")

    def __init__(self, args: argparse.Namespace):
        super().__init__(base_url=base_url(args), api_key=os.environ.get(args.api_key_env) or "EMPTY",
                         timeout=args.timeout, max_retries=args.max_retries)
        self.model = args.served_model
        self.error: RemoteGenerationError | None = None
        self.failed = 0
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=args.concurrency, thread_name_prefix="stllava-remote")
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            for name in ("httpx", "httpx2"):  # one INFO line per HTTP request is noise
                logging.getLogger(name).setLevel(logging.WARNING)

    def __enter__(self) -> "RemoteGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()  # a run that ends early starts nothing new
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.close()
        self.log_summary()  # after the requests in flight ended: the counts are final

    def _ask(self, name: str, image_file: str, text: str, settings: GenerationSettings, seed: int | None) -> str:
        try:
            messages = image_message(image_file, text)
        except ValueError as e:
            raise ToolError(f"{name}: image {image_file}: {e}") from None
        try:
            response = self.complete(name, name, model=self.model, messages=messages,
                                     **request_body(settings, seed))
        except RemoteGenerationError as e:
            with self._lock:
                self.failed += 1
                if self.error is None:
                    self.error = e
            self.stop.set()
            raise
        usage = response.usage
        with self.stats.lock:
            self.stats.paid += 1
            if usage:
                self.stats.fresh_tokens[0] += usage.prompt_tokens
                self.stats.fresh_tokens[1] += usage.completion_tokens
        content = response.choices[0].message.content if response.choices else None
        return clean_output(content or "")

    def submit(self, name: str, image_file: str, text: str, settings: GenerationSettings,
               seed: int | None) -> Future:
        """Queue one request (``name`` names it in errors and logs); the Future gives the answer."""
        return self.pool.submit(self._ask, name, image_file, text, settings, seed)

    def result(self, future: Future) -> str:
        """The answer of ``future``; raises the run's first failure (also for a request that was
        stopped because of it)."""
        try:
            return future.result()
        except _Stopped:
            if self.error is not None:
                raise self.error from None
            raise

    def summary(self) -> dict:
        """Counters for the tool's summary: HTTP requests (retries included), answers received,
        retries by kind, requests failed for good, tokens."""
        return {"http_requests": self.stats.http_requests, "completions": self.stats.paid,
                "retries": dict(sorted(self.stats.retries.items())), "failed": self.failed,
                "tokens": {"prompt": self.stats.fresh_tokens[0], "completion": self.stats.fresh_tokens[1]}}

    def log_summary(self) -> None:
        s = self.summary()
        logger.log(logging.WARNING if s["failed"] else logging.INFO,
                   "%s: %d HTTP requests, %d completions, retries %s, %d failed, %d prompt + %d completion tokens",
                   self.client.base_url, s["http_requests"], s["completions"], s["retries"] or "none", s["failed"],
                   s["tokens"]["prompt"], s["tokens"]["completion"])


def run_remote(args: argparse.Namespace, pending: list, *, settings: GenerationSettings, load: Callable,
               image_file: Callable[[Any], str], name_of: Callable[[Any], str], text_of: Callable[[Any], str],
               seeds_of: Callable[[Any], list], record_of: Callable[[Any, list[str], list], dict],
               block: int, out: str, desc: str, unit: str) -> tuple[float, dict]:
    """Answer ``pending`` items through the server, in the tools' one resumable loop.

    Per item: ``len(seeds_of(item))`` requests (one per seed; a seed of None for greedy decoding)
    about ``image_file(item)`` with the text ``text_of(item)``; ``record_of(item, texts, seeds)``
    makes its record. ``load(items)`` is the tool's image check (``ImageSource.load``: a bad image
    is refused or, with ``--skip-bad``, skipped and counted). Items go in blocks of ``block``; the
    next blocks' requests are queued while a block finishes. Returns (seconds, the client's
    counters, also logged); raises the first request that failed for good
    (:class:`RemoteGenerationError`) after logging the counters, the records before it written."""
    from stllava.tooling import run_batches

    with RemoteGenerator(args) as remote:
        def prepare(items: list):
            keep, _ = load(items)
            return [(it, seeds, [remote.submit(name_of(it), image_file(it), text_of(it), settings, s) for s in seeds])
                    for it, seeds in ((it, seeds_of(it)) for it in keep)]

        def process(items: list, submitted) -> Iterator[dict]:
            for it, seeds, futures in submitted:
                yield record_of(it, [remote.result(f) for f in futures], seeds)

        seconds = run_batches(pending, block, prepare, process, out, desc=desc, unit=unit,
                              progress=not args.no_progress)
    return seconds, remote.summary()

"""The model backend of the protocol app: a chat request → a :class:`~stllava.serve.engine.Job`
→ the answer, whole or streamed.

Checks made before a request is queued (each an HTTP 400 naming the field): the model name, the
messages and images (:mod:`stllava.serve.inputs`), and the context — prompt positions (text tokens
plus the image's feature positions) + ``max_tokens`` must fit the checkpoint's context length. A
conversation whose text is longer than :func:`max_prompt_chars` is refused before it is tokenized.
An omitted ``max_tokens`` means "the rest of the context"; an omitted ``temperature`` is OpenAI's 1,
one below :data:`MIN_TEMPERATURE` means greedy (as in vLLM: dividing the logits by 1e-300 overflows
them); an omitted ``seed`` a random one (the reply is then not reproducible, as with OpenAI).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from stllava.constants import DEFAULT_IMAGE_TOKEN
from stllava.control_text import control_strings
from stllava.generation import prepare_batch
from stllava.mm_utils import decode_size
from stllava.serve.engine import BatchingEngine, Job
from stllava.serve.inputs import ImageLimits, build_prompt
from stllava.serve.protocol import (
    APIError,
    ChatRequest,
    completion_body,
    new_completion_id,
    sse_stream,
    streaming_response,
)

logger = logging.getLogger(__name__)
MIN_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS: lower temperatures decode greedily


def max_prompt_chars(tokenizer, context_len: int) -> int:
    """The most characters of message text a prompt of ``context_len`` tokens can hold, generously:
    twice the longest vocabulary piece per token (16 characters for LLaMA's vocabulary, so 65,536
    characters for a 2048-token context). Longer text cannot fit, whatever it says."""
    longest = max((len(piece) for piece in tokenizer.get_vocab()), default=16)
    return context_len * 2 * max(longest, 1)


class ModelBackend:
    """Serves ``engine``'s model as ``name`` with template ``conv_mode``. ``context_len``: prompt
    positions + max_tokens may not exceed it. ``image_positions``: feature positions one image
    takes in the sequence (the tower's patch count)."""

    def __init__(self, engine: BatchingEngine, name: str, conv_mode: str, context_len: int,
                 image_positions: int, limits: ImageLimits | None = None):
        self.engine, self.name, self.conv_mode = engine, name, conv_mode
        self.context_len, self.image_positions = context_len, image_positions
        self.limits = limits or ImageLimits()
        self.controls = control_strings(engine.tokenizer)  # neutralized in message text
        self.max_chars = max_prompt_chars(engine.tokenizer, context_len)

    def model_ids(self) -> list[str]:
        return [self.name]

    def health(self) -> dict:
        return {"model": self.name, "conv_mode": self.conv_mode, "context_len": self.context_len,
                **self.engine.stats()}

    def arriving(self, change: int) -> None:
        """Count a request whose body is being read as being prepared (the batch may wait for it)."""
        self.engine.preparing += change

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    # ------------------------------------------------------------------------------- requests
    def make_job(self, req: ChatRequest) -> Job:
        """The :class:`Job` for ``req`` (images decoded, prompt rendered and measured); APIError
        400 for anything the model cannot take."""
        chat = build_prompt(req.messages, self.conv_mode, self.limits, self.controls, self.max_chars)
        if chat.images and self.engine.processor is None:
            raise APIError(400, f"model {self.name!r} has no vision tower; send text only", param="messages")
        n_images = chat.prompt.count(DEFAULT_IMAGE_TOKEN)
        # Tokenized and its images preprocessed here, in the request's thread: the worker only merges rows.
        engine = self.engine
        prepared = prepare_batch(engine.tokenizer, engine.processor, engine.model.config, [chat.prompt],
                                 [chat.images or None])
        positions = prepared.input_ids.shape[1] + n_images * (self.image_positions - 1)
        room = self.context_len - positions
        if room < 1:
            raise APIError(400, f"the prompt takes {positions} positions ({self.image_positions} per image) but the "
                           f"model's context is {self.context_len}; shorten the conversation", param="messages",
                           code="context_length_exceeded")
        limit = req.token_limit()
        if limit is None:
            limit = room
        elif limit > room:
            raise APIError(400, f"max_tokens={limit} is beyond the context: the prompt takes {positions} of "
                           f"{self.context_len} positions, leaving {room}", param="max_tokens",
                           code="context_length_exceeded")
        if req.min_tokens > limit:
            raise APIError(400, f"min_tokens={req.min_tokens} is larger than max_tokens={limit}", param="min_tokens")
        temperature = 1.0 if req.temperature is None else req.temperature
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0
        return Job(prepared=prepared, n_images=n_images, prompt_tokens=positions, max_tokens=limit,
                   seed=req.seed if req.seed is not None else secrets.randbelow(2 ** 63),
                   temperature=temperature, top_p=req.top_p, top_k=req.top_k or None, min_tokens=req.min_tokens,
                   stop=req.stop_list(), stream=req.stream)

    @staticmethod
    async def _disconnected(request: Request) -> None:
        """Returns when the client closes its connection (the body is read: only that can come)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def _events(self, job: Job, request: Request):
        """The job's events until it is done; a client that disconnects cancels its generation."""
        done = False
        gone = asyncio.ensure_future(self._disconnected(request))
        try:
            while True:
                get = asyncio.ensure_future(job.events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return
                kind, value = get.result()
                if kind == "error":
                    raise value
                done = kind == "done"
                yield kind, value
                if done:
                    return
        finally:
            gone.cancel()
            if not done:  # the client left (or the stream was cancelled): stop generating for it
                job.cancelled.set()

    async def complete(self, req: ChatRequest, body: dict, request: Request):
        if req.model and req.model != self.name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")
        t0 = time.perf_counter()
        self.engine.preparing += 1  # the batch being collected may wait for this one
        try:
            job = await run_in_threadpool(self.make_job, req)
            job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
            self.engine.submit(job)
        finally:
            self.engine.preparing -= 1
        cid = new_completion_id()

        async def logged(events):
            async for kind, value in events:
                if kind == "done":  # one line per request: sizes and time, never content or images
                    logger.info("%s: %d image(s), %d prompt + %d completion tokens, %s, %.2f s%s", cid,
                                job.n_images, value.prompt_tokens, value.completion_tokens,
                                value.finish_reason, time.perf_counter() - t0, " (streamed)" if job.stream else "")
                yield kind, value

        events = logged(self._events(job, request))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return streaming_response(sse_stream(cid, self.name, events, include_usage))
        result = None
        async for kind, value in events:
            if kind == "done":
                result = value
        if result is None:  # the client disconnected; nobody reads this
            raise APIError(499, "client closed the request")
        return JSONResponse(completion_body(cid, self.name, result.text, result.finish_reason,
                                            result.prompt_tokens, result.completion_tokens))


def build_backend(tokenizer, model, processor, context_len: int, *, name: str, conv_mode: str,
                  max_batch: int = 8, window_s: float = 0.01, max_queue: int = 64,
                  limits: ImageLimits | None = None) -> ModelBackend:
    """A :class:`ModelBackend` (and its :class:`BatchingEngine`) over a loaded model, as
    ``load_pretrained_model`` returns it: the server CLI, the tests and the benchmark use it."""
    tower = model.get_model().get_vision_tower() if hasattr(model, "get_model") else None
    engine = BatchingEngine(model, tokenizer, processor, max_batch=max_batch, window_s=window_s, max_queue=max_queue)
    # JPEGs decoded at the reduced size the model's preprocessing allows, as training decodes them
    limits = dataclasses.replace(limits or ImageLimits(), decode=decode_size(processor, model.config))
    return ModelBackend(engine, name, conv_mode, context_len, tower.num_patches if tower is not None else 1, limits)

"""Answering lmms-eval requests with the project's own generation path (no lmms-eval import).

A request is a question (lmms-eval's *context*), one image and lmms-eval's generation kwargs. The
answer is computed exactly as :mod:`stllava.eval.model_vqa` computes it: the prompt is
:func:`stllava.eval.model_vqa.build_prompt` (``"<image>\\n" + question`` as the USER turn of the
template, assistant slot open), the template is the one :func:`stllava.tooling.resolve_conv_mode`
picks (``conv_mode`` given, else the checkpoint's recorded one, else ``vicuna_v1``), and a batch
goes through :func:`stllava.generation.prepare_batch` and
:func:`stllava.generation.generate_prepared` (greedy unless a temperature > 0 is asked for; then
per-question seeds from ``seed`` and the question id, as ``model_vqa --seed`` derives them).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from stllava.errors import StllavaError
from stllava.eval.model_vqa import DEFAULT_CONV_MODE, Question, build_prompt
from stllava.generation import GenerationSettings, derive_seed, generate_prepared, prepare_batch
from stllava.tooling import load_model, resolve_conv_mode

logger = logging.getLogger(__name__)

# model_vqa's --max-new-tokens default; lmms-eval's kwargs may override it.
DEFAULT_MAX_NEW_TOKENS = 128
# The generation kwargs this adapter understands (lmms-eval's names, which are transformers').
GEN_KEYS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample", "until")


class AdapterError(StllavaError, ValueError):
    """A request or setting the lmms-eval adapter cannot honour; the message names the fix."""


def prompt_for(question: str, conv_mode: str) -> str:
    """The rendered prompt for ``question`` in template ``conv_mode``: model_vqa's own
    :func:`~stllava.eval.model_vqa.build_prompt`, so both ask the same thing."""
    return build_prompt(Question(line=0, question_id="", image="", text=question), conv_mode)


def settings_from_gen_kwargs(gen_kwargs: dict | None) -> tuple[GenerationSettings, list[str]]:
    """``(settings, until)`` from lmms-eval's generation kwargs.

    Missing keys take model_vqa's defaults (greedy, 128 new tokens). ``until`` (a string or a list
    of strings) is returned as a list. ``do_sample`` must agree with ``temperature`` (sampling iff
    temperature > 0). Refuses (AdapterError) keys outside :data:`GEN_KEYS`, ``do_sample`` true with
    temperature 0, and values :class:`~stllava.generation.GenerationSettings` refuses."""
    kw = dict(gen_kwargs or {})
    unknown = sorted(set(kw) - set(GEN_KEYS))
    if unknown:
        raise AdapterError(f"generation kwargs {unknown} are not supported by the stllava model; "
                           f"fix: use only {list(GEN_KEYS)} (--gen_kwargs or the task's generation_kwargs)")
    until = kw.pop("until", None)
    until = [] if until is None else [until] if isinstance(until, str) else list(until)
    if not all(isinstance(u, str) for u in until):
        raise AdapterError(f"generation kwarg until={until!r} must be a string or a list of strings")
    do_sample = kw.pop("do_sample", None)
    try:
        temperature = float(kw.get("temperature") or 0.0)
        if do_sample and temperature == 0:
            raise AdapterError("do_sample=True with temperature 0: the stllava model samples iff temperature > 0; "
                               "fix: give a temperature > 0, or do_sample=False for greedy answers")
        settings = GenerationSettings(
            max_new_tokens=int(kw.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
            min_new_tokens=int(kw.get("min_new_tokens") or 0), temperature=temperature,
            top_k=None if kw.get("top_k") is None else int(kw["top_k"]),
            top_p=None if kw.get("top_p") is None else float(kw["top_p"]),
            num_beams=int(kw.get("num_beams") or 1))
    except AdapterError:
        raise
    except (TypeError, ValueError) as e:
        raise AdapterError(f"invalid generation kwargs {gen_kwargs!r}: {e}") from None
    return settings, until


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of each non-empty stop string in turn (lmms-eval's
    ``until`` contract, as its LLaVA model applies it)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


@dataclass
class Answerer:
    """A loaded checkpoint and its template; :meth:`answer` answers a batch of questions."""

    tokenizer: Any
    model: Any
    image_processor: Any
    conv_mode: str
    seed: int = 0

    def answer(self, questions: Sequence[str], images: Sequence, settings: GenerationSettings,
               keys: Sequence[str]) -> list[str]:
        """The answers to ``questions`` (one PIL image each), in one batched ``generate`` call.

        ``keys`` (the question ids) seed the per-question sampling streams when
        ``settings.temperature > 0``, exactly as ``model_vqa`` seeds them. Returns the cleaned
        answers in order; refuses (ValueError) what :func:`~stllava.generation.prepare_batch` refuses."""
        prompts = [prompt_for(q, self.conv_mode) for q in questions]
        batch = prepare_batch(self.tokenizer, self.image_processor, self.model.config, prompts, list(images))
        seeds = [derive_seed(self.seed, str(k)) for k in keys] if settings.do_sample else None
        return generate_prepared(self.model, self.tokenizer, batch, settings, seeds)


def load_answerer(pretrained: str, model_base: str | None = None, conv_mode: str | None = None,
                  device: str = "cuda", seed: int = 0) -> Answerer:
    """Load ``pretrained`` with the project's loader (:func:`stllava.tooling.load_model`, i.e.
    ``load_pretrained_model``; ``device`` cuda falls back to cpu) and settle the template as
    ``model_vqa`` does. Refuses (ToolError) an unknown template; the loader's refusals propagate."""
    if not pretrained:
        raise AdapterError("model_args need pretrained=CHECKPOINT_FOLDER (a stllava checkpoint)")
    mode, why = resolve_conv_mode(conv_mode, pretrained, DEFAULT_CONV_MODE)
    logger.info("conversation template %s (%s)", mode, why)
    tokenizer, model, processor = load_model(argparse.Namespace(model_path=pretrained, model_base=model_base,
                                                                device=device))
    return Answerer(tokenizer, model, processor, mode, seed)

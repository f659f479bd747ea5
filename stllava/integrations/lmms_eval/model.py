"""The lmms-eval model ``stllava`` (imported by lmms-eval only; docs/Evaluation.md#lmms-eval).

    lmms-eval --model stllava --model_args pretrained=CKPT[,model_base=BASE][,conv_mode=MODE]\\
        [,device=cpu][,seed=0] --batch_size 16 --tasks stllava_vqa_rad \\
        --include_path stllava/integrations/lmms_eval/tasks

``generate_until`` answers as ``python -m stllava.eval.model_vqa`` does (see
:mod:`.answering`): consecutive requests with the same generation kwargs are answered in batches of
``--batch_size`` in the order lmms-eval hands them (a task's documents in order, which for the
stllava tasks is the question file's order), so the same batch size gives model_vqa's batches.
Each request needs exactly one image. ``loglikelihood`` and multi-round generation are refused.
"""
from __future__ import annotations

import json
import logging
from itertools import groupby

from lmms_eval.api.model import lmms
from tqdm import tqdm

from stllava.generation import batched
from stllava.integrations.lmms_eval.answering import (
    AdapterError,
    cut_at_stops,
    load_answerer,
    settings_from_gen_kwargs,
)

logger = logging.getLogger(__name__)


def _kwargs_key(gen_kwargs) -> str:
    return json.dumps(gen_kwargs, sort_keys=True, default=repr)


class Stllava(lmms):
    """A stllava checkpoint behind lmms-eval's simple-model API (``is_simple``)."""

    is_simple = True

    def __init__(self, pretrained: str = "", model_base: str | None = None, conv_mode: str | None = None,
                 device: str | None = "cuda", batch_size: int | str = 1, seed: int | str = 0,
                 max_batch_size: int | None = None, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise AdapterError(f"unknown model_args {sorted(kwargs)}; fix: the stllava model takes pretrained, "
                               "model_base, conv_mode, device, seed (and lmms-eval's --batch_size)")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise AdapterError(f"--batch_size must be ≥ 1, got {batch_size!r}")
        self.answerer = load_answerer(pretrained, model_base or None, conv_mode or None, device or "cuda", int(seed))

    @property
    def model(self):
        return self.answerer.model

    @property
    def tokenizer(self):
        return self.answerer.tokenizer

    def loglikelihood(self, requests):
        raise NotImplementedError("the stllava lmms-eval model answers generate_until tasks only (the VQA "
                                  "protocol of docs/Evaluation.md is greedy generation); loglikelihood / "
                                  "multiple-choice tasks are not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the stllava lmms-eval model answers single-turn generate_until tasks only")

    def generate_until(self, requests) -> list[str]:
        """One answer per request, in request order (see the module docstring)."""
        answers: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="stllava answering")
        indexed = list(enumerate(requests))
        for _, run in groupby(indexed, key=lambda ir: _kwargs_key(ir[1].args[1])):
            run = list(run)
            settings, until = settings_from_gen_kwargs(run[0][1].args[1])
            for batch in batched(run, self.batch_size):
                questions, images, keys = [], [], []
                for _, req in batch:
                    context, _gen, doc_to_visual, doc_id, task, split = req.args
                    doc = self.task_dict[task][split][doc_id]
                    visuals = doc_to_visual(doc) or []
                    if len(visuals) != 1:
                        raise AdapterError(f"task {task}, document {doc_id}: {len(visuals)} images; the stllava "
                                           "model answers questions about exactly one image")
                    questions.append(context)
                    images.append(visuals[0])
                    keys.append(str(doc.get("question_id", doc_id)) if isinstance(doc, dict) else str(doc_id))
                texts = self.answerer.answer(questions, images, settings, keys)
                for (i, req), text in zip(batch, texts):
                    answers[i] = cut_at_stops(text, until)
                    self.cache_hook.add_partial("generate_until", (req.args[0], req.args[1]), answers[i])
                bar.update(len(batch))
        bar.close()
        return answers

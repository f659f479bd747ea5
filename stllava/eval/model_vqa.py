"""Answer a benchmark's questions with a checkpoint, batched (LLaVA-Med's ``model_vqa``).

    python -m stllava.eval.model_vqa --model-path CKPT [--model-base BASE] \\
        --question-file questions.jsonl --image-folder IMAGES --answers-file answers.jsonl \\
        [--conv-mode MODE] [--temperature 0] [--batch-size 16] \\
        [--num-chunks N --chunk-idx K] [--max-new-tokens 128] [--skip-bad] [--overwrite]

**Input**: ``questions.jsonl`` as written by :mod:`stllava.eval.convert`, one
``{"question_id", "image", "text"}`` per line (``image`` relative to ``--image-folder``).
**Output**: one line per question, ``{"question_id", "prompt", "text", "answer_id",
"model_id", "metadata", "settings"}`` — ``prompt`` is the question as asked (LLaVA's
``cur_prompt``), ``text`` the model's answer, ``answer_id`` a fresh uuid4 hex, ``model_id`` the
checkpoint's name, ``settings`` what decided the answer (model path, template, decoding, seed).

The prompt is LLaVA's: ``"<image>\\n" + question`` as the USER turn of the template with the
assistant slot open. The template is ``--conv-mode``, else the one training recorded in the
checkpoint's config (``conv_mode``), else ``vicuna_v1``; the log says which and why. Images are
preprocessed as in training (pad to square). Decoding is greedy by default (``--temperature 0``,
the evaluation protocol); ``--temperature > 0`` samples with a per-question seed derived from
``--seed`` and the question id (same answers at any batch size or chunking).

``--backend openai --base-url URL --model NAME`` sends each question to an OpenAI-compatible
server instead (vLLM, SGLang, ``stllava.serve.api``; ``--concurrency`` requests at once; the
server's template; :mod:`stllava.remote_generation`): no ``--model-path``, same records, ``model_id``
the served name.

Sharding, resume and bad images work as in every generating tool (:mod:`stllava.tooling`):
``--num-chunks N --chunk-idx K`` answers chunk K (``scripts/run_sharded.sh`` runs one process per
GPU and merges); question ids already in ``--answers-file`` are skipped when its settings match
(else refused; ``--overwrite`` starts over); a missing or unreadable image stops the run naming
the question, or with ``--skip-bad`` is skipped and counted.
"""
from __future__ import annotations

import argparse
import logging
import sys
import uuid
from dataclasses import dataclass
from typing import Any

from stllava import logs
from stllava.errors import run_cli
from stllava.generation import (
    GenerationSettings,
    derive_seed,
    generate_prepared,
    image_prompt_text,
    prepare_batch,
    render_prompt,
)
from stllava.jsonl import JsonlError, iter_jsonl
from stllava.remote_generation import add_backend_args, check_remote_args, is_remote, remote_settings, run_remote
from stllava.tooling import (
    ImageSource,
    ToolError,
    add_tool_args,
    check_batch_size,
    load_model,
    model_name,
    model_path_setting,
    plan_work,
    run_batches,
)

logger = logging.getLogger("stllava.eval.model_vqa")
DEFAULT_CONV_MODE = "vicuna_v1"


@dataclass
class Question:
    line: int
    question_id: Any
    image: str
    text: str

    @property
    def key(self) -> str:
        return str(self.question_id)


def load_questions(path: str) -> list[Question]:
    """Read a question JSONL; refuses a bad line, a record without ``question_id``/``image``/
    ``text`` strings, and duplicate question ids (ToolError naming file and line)."""
    questions, seen = [], {}
    try:
        for line, rec in iter_jsonl(path):
            qid = rec.get("question_id")
            if qid is None or isinstance(qid, (bool, list, dict)) or qid == "":
                raise ToolError(f"{path}, line {line}: field 'question_id' is missing or not a string/number; "
                                "fix: write questions with stllava.eval.convert")
            if not isinstance(rec.get("image"), str) or not rec["image"]:
                raise ToolError(f"{path}, line {line} (question_id {qid!r}): field 'image' must be a "
                                "non-empty string (a path relative to --image-folder)")
            if not isinstance(rec.get("text"), str):
                raise ToolError(f"{path}, line {line} (question_id {qid!r}): field 'text' must be a string")
            key = str(qid)
            if key in seen:
                raise ToolError(f"{path}, line {line}: question_id {qid!r} already used on line {seen[key]}; "
                                "fix: ids must be unique (answers are matched by id)")
            seen[key] = line
            questions.append(Question(line, qid, rec["image"], rec["text"]))
    except JsonlError as e:
        raise ToolError(str(e)) from None
    except FileNotFoundError:
        raise ToolError(f"{path}: question file not found; fix: --question-file") from None
    return questions


def settings_from_args(args) -> GenerationSettings:
    """The decoding flags as :class:`GenerationSettings`; ToolError for invalid values."""
    try:
        return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, min_new_tokens=args.min_new_tokens,
                                  num_beams=args.num_beams)
    except ValueError as e:
        raise ToolError(f"invalid decoding flags: {e}") from None


def build_prompt(question: Question, conv_mode: str) -> str:
    """``[USER: "<image>\\n" + question, ASSISTANT: <slot>]`` in template ``conv_mode``."""
    return render_prompt(conv_mode, [(0, image_prompt_text(question.text)), (1, None)])


def run(args: argparse.Namespace, loaded: tuple | None = None) -> dict:
    """Answer the pending questions of one chunk; returns the summary dict.

    ``loaded`` = (tokenizer, model, image_processor) skips loading ``--model-path`` (tests,
    notebooks). Raises ToolError for bad input, before any model is loaded where possible."""
    gen = settings_from_args(args)
    check_batch_size(args)
    if is_remote(args):
        check_remote_args(args)
    images = ImageSource(args.image_folder, lambda q: q.image,
                         lambda q: f"{args.question_file}, line {q.line} (question_id {q.question_id!r})",
                         lambda q: {"question_id": q.question_id, "image": q.image}, args.skip_bad)
    work = plan_work(args, default_conv_mode=DEFAULT_CONV_MODE, settings_of=lambda a: {
                         **(remote_settings(a) if is_remote(a) else {
                             "model_path": model_path_setting(a.model_path),
                             "model_base": model_path_setting(a.model_base), "conv_mode": a.conv_mode}),
                         **gen.to_dict(), "seed": a.seed},
                     read_items=lambda: load_questions(args.question_file), source=args.question_file,
                     what="questions", out=args.answers_file, key="question_id", key_of=lambda q: q.key,
                     done_what="answers", images=images)
    conv_mode, settings, pending = work.conv_mode, work.settings, work.pending
    summary = {"questions": len(work.items), "chunk": len(work.chunk), "already_answered": work.already_done,
               "answered": 0, "skipped_bad": 0, "skipped": images.skipped, "seconds": 0.0}
    logger.info("%d questions, chunk %d/%d holds %d: %d already answered, %d to answer, %d skipped (missing image)",
                len(work.items), args.chunk_idx, args.num_chunks, len(work.chunk), summary["already_answered"],
                len(pending), len(images.skipped))
    if pending and is_remote(args):
        def record(q: Question, texts: list[str], _seeds) -> dict:
            summary["answered"] += 1
            return {"question_id": q.question_id, "prompt": q.text, "text": texts[0], "answer_id": uuid.uuid4().hex,
                    "model_id": args.served_model, "metadata": {}, "settings": settings}

        summary["seconds"], summary["remote"] = run_remote(
            args, pending, settings=gen, load=images.load, image_file=images.path,
            name_of=lambda q: f"question_id {q.question_id!r}", text_of=lambda q: q.text,
            seeds_of=lambda q: [derive_seed(args.seed, q.key) if gen.do_sample else None], record_of=record,
            block=args.concurrency, out=args.answers_file, desc="answering", unit="q")
    elif pending:
        tokenizer, model, processor = loaded if loaded is not None else load_model(args)
        images.for_model(processor, model.config)  # JPEGs decoded as training decodes them
        model_id = model_name(args.model_path)

        def prepare(batch: list[Question]):
            keep, pics = images.load(batch)
            if not keep:
                return keep, None
            prompts = [build_prompt(q, conv_mode) for q in keep]
            return keep, prepare_batch(tokenizer, processor, model.config, prompts, pics)

        def process(batch: list[Question], prepared) -> list[dict]:
            keep, inputs = prepared
            if not keep:
                return []
            seeds = [derive_seed(args.seed, q.key) for q in keep] if gen.do_sample else None
            texts = generate_prepared(model, tokenizer, inputs, gen, seeds)
            summary["answered"] += len(keep)
            return [{"question_id": q.question_id, "prompt": q.text, "text": text, "answer_id": uuid.uuid4().hex,
                     "model_id": model_id, "metadata": {}, "settings": settings} for q, text in zip(keep, texts)]

        summary["seconds"] = run_batches(pending, args.batch_size, prepare, process, args.answers_file,
                                         desc="answering", unit="q", progress=not args.no_progress)
    summary["skipped_bad"] = len(images.skipped)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m stllava.eval.model_vqa", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Both spellings: LLaVA's scripts mix "--model-path" and "--model_path".
    add_tool_args(p, model_help="checkpoint folder", underscore_aliases=True,
                  conv_help=f"conversation template (vicuna_v1 = v1, llava_v1, v1_sq; default: the checkpoint's "
                            f"recorded conv_mode, else {DEFAULT_CONV_MODE})",
                  batch_size=16, batch_help="questions per generate call",
                  seed_help="base seed of the per-question sampling seeds (--temperature > 0)")
    p.add_argument("--question-file", "--question_file", dest="question_file", required=True,
                   help="questions JSONL {question_id, image, text} (stllava.eval.convert)")
    p.add_argument("--image-folder", "--image_folder", dest="image_folder", default="", help="folder of the images")
    p.add_argument("--answers-file", "--answers_file", "--out", dest="answers_file", required=True,
                   help="answers JSONL to write (appended to: resumable)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the evaluation protocol)")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=None, help="nucleus filter when sampling")
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=None, help="top-k filter when sampling")
    p.add_argument("--num-beams", "--num_beams", dest="num_beams", type=int, default=1,
                   help="beam search (greedy only)")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=128,
                   help="answer length limit, in tokens")
    p.add_argument("--min-new-tokens", dest="min_new_tokens", type=int, default=0,
                   help="forbid </s> before this many tokens (smoke tests of random-init models)")
    add_backend_args(p)
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    s = run(args)
    rate = s["answered"] / s["seconds"] if s["seconds"] else 0.0
    print(f"answered {s['answered']} questions in {s['seconds']:.1f} s ({rate:.2f} q/s); "
          f"{s['already_answered']} already answered; {s['skipped_bad']} skipped (bad image); "
          f"chunk {args.chunk_idx}/{args.num_chunks} of {s['questions']} questions → {args.answers_file}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 bad input; see stllava.errors)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

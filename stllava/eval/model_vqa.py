"""Answer a benchmark's questions with a checkpoint, batched (LLaVA-Med's ``model_vqa``).

    python -m stllava.eval.model_vqa --model-path CKPT [--model-base BASE] \\
        --question-file questions.jsonl --image-folder IMAGES --answers-file answers.jsonl \\
        [--conv-mode vicuna_v1] [--temperature 0] [--batch-size 16] \\
        [--num-chunks N --chunk-idx K] [--max-new-tokens 128] [--skip-missing-images]

**Input**: ``questions.jsonl`` as written by :mod:`stllava.eval.convert`, one
``{"question_id", "image", "text"}`` per line (``image`` relative to ``--image-folder``).
**Output**: one line per question, ``{"question_id", "prompt", "text", "answer_id",
"model_id", "metadata"}`` — ``prompt`` is the question as asked (LLaVA's ``cur_prompt``),
``text`` the model's answer, ``answer_id`` a fresh uuid4 hex, ``model_id`` the checkpoint's name.

The prompt is LLaVA's: ``"<image>\\n" + question`` as the USER turn of ``--conv-mode`` with the
assistant slot open; images are preprocessed as in training (pad to square). Decoding is greedy
by default (``--temperature 0``, the evaluation protocol); ``--temperature > 0`` samples with a
per-question seed derived from ``--seed`` and the question id (same answers at any batch size).
Batches are generated with :func:`stllava.generation.generate_prepared` (left padding, KV cache)
while the next batch's images load in a background thread.

**Sharding**: ``--num-chunks N --chunk-idx K`` answers chunk K of LLaVA's ``split_list``: chunks
of ceil(len/N) consecutive questions (so there may be fewer than N non-empty chunks; an index past
the last one answers nothing). **Resume**: question ids already in ``--answers-file`` are skipped
and new answers are appended, flushed after every batch; a last line cut short by a kill is
dropped and rewritten. **Missing images**: an error naming the image, the question and its line;
``--skip-missing-images`` skips and counts them instead (reported in the summary, not written).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from tqdm import tqdm

from stllava.errors import StllavaError
from stllava.generation import (
    GenerationSettings,
    ImageError,
    add_model_args,
    batched,
    derive_seed,
    generate_prepared,
    image_prompt_text,
    load_rgb,
    prefetch,
    prepare_batch,
    render_prompt,
)
from stllava.jsonl import JsonlError, JsonlWriter, iter_jsonl

logger = logging.getLogger("stllava.eval.model_vqa")


class ModelVQAError(StllavaError, ValueError):
    """Bad questions, images or answers file; the message names the file, the record and the fix."""


@dataclass
class Question:
    line: int
    question_id: Any
    image: str
    text: str

    @property
    def key(self) -> str:
        return str(self.question_id)


# --- LLaVA's sharding ---------------------------------------------------------------------------
def split_list(lst: Sequence, n: int) -> list[list]:
    """LLaVA's ``split_list``: consecutive chunks of ceil(len/n) items (possibly fewer than n)."""
    if n < 1:
        raise ValueError(f"--num-chunks must be ≥ 1, got {n}")
    if not lst:
        return []
    size = math.ceil(len(lst) / n)
    return [list(lst[i:i + size]) for i in range(0, len(lst), size)]


def get_chunk(lst: Sequence, n: int, k: int) -> list:
    """Chunk ``k`` of :func:`split_list`; ``[]`` when ``k`` is past the last chunk (LLaVA raised
    IndexError there, e.g. 5 questions in 4 chunks have only 3 chunks of 2). Refuses k ∉ [0, n)."""
    if not 0 <= k < n:
        raise ValueError(f"--chunk-idx must be in [0, {n}), got {k}")
    chunks = split_list(lst, n)
    return chunks[k] if k < len(chunks) else []


# --- files --------------------------------------------------------------------------------------
def load_questions(path: str) -> list[Question]:
    """Read a question JSONL; refuses a bad line, a record without ``question_id``/``image``/
    ``text`` strings, and duplicate question ids (ModelVQAError naming file and line)."""
    questions, seen = [], {}
    try:
        for line, rec in iter_jsonl(path):
            qid = rec.get("question_id")
            if qid is None or isinstance(qid, (bool, list, dict)) or qid == "":
                raise ModelVQAError(f"{path}, line {line}: field 'question_id' is missing or not a string/number; "
                                    "fix: write questions with stllava.eval.convert")
            if not isinstance(rec.get("image"), str) or not rec["image"]:
                raise ModelVQAError(f"{path}, line {line} (question_id {qid!r}): field 'image' must be a "
                                    "non-empty string (a path relative to --image-folder)")
            if not isinstance(rec.get("text"), str):
                raise ModelVQAError(f"{path}, line {line} (question_id {qid!r}): field 'text' must be a string")
            key = str(qid)
            if key in seen:
                raise ModelVQAError(f"{path}, line {line}: question_id {qid!r} already used on line {seen[key]}; "
                                    "fix: ids must be unique (answers are matched by id)")
            seen[key] = line
            questions.append(Question(line, qid, rec["image"], rec["text"]))
    except JsonlError as e:
        raise ModelVQAError(str(e)) from None
    except FileNotFoundError:
        raise ModelVQAError(f"{path}: question file not found; fix: --question-file") from None
    return questions


def answered_ids(path: str) -> set[str]:
    """Question ids (as strings) already in an answers file; empty when it does not exist. A
    cut-short last line (an interrupted run) is ignored: it is re-answered."""
    if not os.path.exists(path):
        return set()
    try:
        return {str(rec["question_id"]) for _, rec in iter_jsonl(path, allow_truncated_tail=True)
                if "question_id" in rec}
    except JsonlError as e:
        raise ModelVQAError(f"{e} (the answers file is appended to when resuming; fix it or choose "
                            "another --answers-file)") from None


# --- answering ----------------------------------------------------------------------------------
def settings_from_args(args) -> GenerationSettings:
    """The decoding flags as :class:`GenerationSettings`; ModelVQAError for invalid values."""
    try:
        return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, min_new_tokens=args.min_new_tokens,
                                  num_beams=args.num_beams)
    except ValueError as e:
        raise ModelVQAError(f"invalid decoding flags: {e}") from None


def build_prompt(question: Question, conv_mode: str) -> str:
    return render_prompt(conv_mode, [(0, image_prompt_text(question.text)), (1, None)])


def run(args: argparse.Namespace, loaded: tuple | None = None) -> dict:
    """Answer the pending questions of one chunk; returns the summary dict.

    ``loaded`` = (tokenizer, model, image_processor) skips loading ``--model-path`` (tests,
    notebooks). Raises ModelVQAError for bad input before any model is loaded where possible."""
    from stllava.mm_utils import get_model_name_from_path

    settings = settings_from_args(args)
    if args.batch_size < 1:
        raise ModelVQAError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    if not 0 <= args.chunk_idx < args.num_chunks:
        raise ModelVQAError(f"--chunk-idx must be in [0, --num-chunks={args.num_chunks}), got {args.chunk_idx}")
    questions = load_questions(args.question_file)
    chunk = get_chunk(questions, args.num_chunks, args.chunk_idx)
    done = answered_ids(args.answers_file)
    chunk_keys = {q.key for q in chunk}
    foreign = done - chunk_keys
    if foreign:
        logger.warning("%s holds %d answers to questions outside chunk %d/%d of %s (e.g. %s)",
                       args.answers_file, len(foreign), args.chunk_idx, args.num_chunks,
                       args.question_file, sorted(foreign)[:3])
    pending = [q for q in chunk if q.key not in done]
    summary = {"questions": len(questions), "chunk": len(chunk), "already_answered": len(chunk) - len(pending),
               "answered": 0, "skipped_missing_images": 0, "skipped": [], "seconds": 0.0}

    # Missing files are found before the model loads; unreadable ones when they are decoded.
    missing = [q for q in pending if not os.path.isfile(os.path.join(args.image_folder, q.image))]
    if missing and not args.skip_missing_images:
        q = missing[0]
        raise ModelVQAError(
            f"{args.question_file}, line {q.line} (question_id {q.question_id!r}): image {q.image!r} not found in "
            f"{args.image_folder} ({len(missing)} of {len(pending)} pending questions miss their image); fix: "
            "--image-folder, or pass --skip-missing-images to skip and count them")
    skipped = {q.key for q in missing}
    for q in missing:
        summary["skipped"].append({"question_id": q.question_id, "image": q.image, "reason": "missing image"})
    pending = [q for q in pending if q.key not in skipped]
    logger.info("%d questions, chunk %d/%d holds %d: %d already answered, %d to answer, %d skipped (missing image)",
                len(questions), args.chunk_idx, args.num_chunks, len(chunk), summary["already_answered"],
                len(pending), len(missing))
    if not pending:
        summary["skipped_missing_images"] = len(summary["skipped"])
        return summary

    if loaded is None:
        from stllava.model.builder import load_pretrained_model

        tokenizer, model, processor, _ = load_pretrained_model(
            os.path.expanduser(args.model_path), args.model_base,
            get_model_name_from_path(args.model_path), device=args.device)
    else:
        tokenizer, model, processor = loaded
    model_id = get_model_name_from_path(os.path.expanduser(args.model_path))

    def prepare(batch: list[Question]):
        keep, images = [], []
        for q in batch:
            try:
                images.append(load_rgb(os.path.join(args.image_folder, q.image)))
                keep.append(q)
            except ImageError as e:
                if not args.skip_missing_images:
                    raise ModelVQAError(f"{args.question_file}, line {q.line} (question_id {q.question_id!r}): {e}; "
                                        "fix the image, or pass --skip-missing-images to skip and count it") from None
                logger.warning("skipping question %r: %s", q.question_id, e)
                summary["skipped"].append({"question_id": q.question_id, "image": q.image, "reason": e.kind})
        if not keep:
            return keep, None
        prompts = [build_prompt(q, args.conv_mode) for q in keep]
        return keep, prepare_batch(tokenizer, processor, model.config, prompts, images)

    t0 = time.perf_counter()
    with JsonlWriter(args.answers_file) as out, tqdm(total=len(pending), desc="answering", unit="q",
                                                     disable=args.no_progress) as bar:
        for batch, (keep, prepared) in prefetch(batched(pending, args.batch_size), prepare):
            if keep:
                seeds = [derive_seed(args.seed, q.key) for q in keep] if settings.do_sample else None
                texts = generate_prepared(model, tokenizer, prepared, settings, seeds)
                for q, text in zip(keep, texts):
                    out.write({"question_id": q.question_id, "prompt": q.text, "text": text,
                               "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}})
                summary["answered"] += len(keep)
            bar.update(len(batch))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["skipped_missing_images"] = len(summary["skipped"])
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Both spellings: LLaVA's scripts mix "--model-path" and "--model_path".
    add_model_args(p, model_help="checkpoint folder", underscore_aliases=True)
    p.add_argument("--question-file", "--question_file", dest="question_file", required=True,
                   help="questions JSONL {question_id, image, text} (stllava.eval.convert)")
    p.add_argument("--image-folder", "--image_folder", dest="image_folder", default="", help="folder of the images")
    p.add_argument("--answers-file", "--answers_file", dest="answers_file", required=True,
                   help="answers JSONL to write (appended to: resumable)")
    p.add_argument("--conv-mode", "--conv_mode", dest="conv_mode", default="vicuna_v1",
                   help="conversation template (vicuna_v1 = v1, llava_v1, v1_sq)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the evaluation protocol)")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=None, help="nucleus filter when sampling")
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=None, help="top-k filter when sampling")
    p.add_argument("--num-beams", "--num_beams", dest="num_beams", type=int, default=1,
                   help="beam search (greedy only)")
    p.add_argument("--seed", type=int, default=0, help="base seed of per-question sampling seeds")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=128)
    p.add_argument("--min-new-tokens", dest="min_new_tokens", type=int, default=0,
                   help="forbid </s> before this many tokens (smoke tests of random-init models)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=16,
                   help="questions per generate call")
    p.add_argument("--num-chunks", "--num_chunks", dest="num_chunks", type=int, default=1, help="shards in all")
    p.add_argument("--chunk-idx", "--chunk_idx", dest="chunk_idx", type=int, default=0, help="this shard (0-based)")
    p.add_argument("--skip-missing-images", action="store_true",
                   help="skip and count questions whose image is missing or unreadable instead of failing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = run(args)
    except ModelVQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rate = summary["answered"] / summary["seconds"] if summary["seconds"] else 0.0
    print(f"answered {summary['answered']} questions in {summary['seconds']:.1f} s ({rate:.2f} q/s); "
          f"{summary['already_answered']} already answered; {summary['skipped_missing_images']} skipped "
          f"(missing/unreadable image); chunk {args.chunk_idx}/{args.num_chunks} of "
          f"{summary['questions']} questions → {args.answers_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

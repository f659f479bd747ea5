"""Stage 2(c): the stage-1 model answers each of its own questions twice, by sampling (SPEC §5).

    python -m stllava.selftrain.answers --model-path CKPT [--model-base BASE] \\
        --questions questions.jsonl --image-folder IMAGES --out answers.jsonl \\
        [--seed 0] [--batch-size 8]

**Input**: the questions file of :mod:`stllava.selftrain.questions` (``{"image", "questions",
"question_ids", ...}`` per image). Also accepted: records without ``question_ids`` (ids become
``"<image>#q<k>"``) and the published ``visual_sq.py`` layout, whose list is called ``prompt``.

**Per question** (the published ``model_collectA.py``, batched and seeded): the prompt
``"<image>\\n" + question`` as the USER turn of ``--conv-mode`` (``llava_v1``, as the reference),
two answers sampled with T = ``--temperature`` 1.2, ``--top-k`` 100, ``--top-p`` 0.95,
≤ ``--max-new-tokens`` 1024, ``</s>`` stripped. Answer j of question ``qid`` uses seed
``derive_seed(--seed, qid, j)`` (the reference used ``set_seed(40)`` / ``set_seed(42)`` for every
question, so each question's two draws were correlated across questions): same seed, same answers,
at any batch size or resume point.

**Output** — the input of :mod:`stllava.selftrain.judge`, one line per question, in input order::

    {"question_id": "img1.jpg#q0", "image": "img1.jpg", "question": "...",
     "answers": ["...", "..."],                        # exactly two
     "answer_seeds": [s1, s2], "seed": 0, "model": "ckpt-name", "settings": {...}}

**Resume**: question ids already in ``--out`` are skipped; a cut-short last line is redone.
A missing or unreadable image stops the run naming it and its line in ``--questions``, unless
``--skip-missing-images`` (skipped and counted; nothing written for those questions).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from stllava.generation import (
    GenerationSettings,
    ImageError,
    add_model_args,
    batched,
    derive_seed,
    generate,
    image_prompt_text,
    load_rgb,
    prefetch,
    render_prompt,
)
from stllava.jsonl import JsonlError, JsonlWriter, iter_jsonl
from stllava.selftrain.questions import SelfTrainError, load_model, model_name, read_done

logger = logging.getLogger("stllava.selftrain.answers")

N_ANSWERS = 2  # the judge compares exactly two answers


@dataclass
class Question:
    line: int
    question_id: str
    image: str
    text: str


def load_questions(path: str) -> list[Question]:
    """Flatten a questions file into one :class:`Question` per question, in file order.

    Refuses (SelfTrainError naming file and line) a malformed line, a record without an
    ``image`` string or a list of question strings, ids that do not match the questions, and
    a question id used twice."""
    out: list[Question] = []
    seen: dict[str, int] = {}
    try:
        for line, rec in iter_jsonl(path):
            where = f"{path}, line {line}"
            image = rec.get("image")
            if not isinstance(image, str) or not image:
                raise SelfTrainError(f"{where}: field 'image' must be a non-empty string")
            questions = rec.get("questions", rec.get("prompt"))
            if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
                raise SelfTrainError(f"{where}: field 'questions' must be a list of strings "
                                     "(the output of stllava.selftrain.questions)")
            ids = rec.get("question_ids")
            if ids is None:
                ids = [f"{image}#q{k}" for k in range(len(questions))]
            if not isinstance(ids, list) or len(ids) != len(questions):
                raise SelfTrainError(f"{where}: 'question_ids' must be a list as long as 'questions' "
                                     f"({len(questions)})")
            for qid, q in zip(ids, questions):
                qid = str(qid)
                if qid in seen:
                    raise SelfTrainError(f"{where}: question id {qid!r} already used on line {seen[qid]}")
                seen[qid] = line
                out.append(Question(line, qid, image, q))
    except JsonlError as e:
        raise SelfTrainError(str(e)) from None
    except FileNotFoundError:
        raise SelfTrainError(f"{path}: questions file not found; fix: --questions") from None
    return out


def answer_prompt(conv_mode: str, question: str) -> str:
    """``[USER: "<image>\\n" + question, ASSISTANT: <slot>]`` in template ``conv_mode``."""
    return render_prompt(conv_mode, [(0, image_prompt_text(question)), (1, None)])


def settings_of(args) -> dict:
    """What determines the output: stored in every record and compared on resume."""
    return {"conv_mode": args.conv_mode, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
            "min_new_tokens": args.min_new_tokens, "seed": args.seed}


def run(args: argparse.Namespace, loaded: tuple | None = None) -> dict:
    """Answer every pending question twice; returns the summary dict.

    ``loaded`` = (tokenizer, model, image_processor) skips loading ``--model-path``."""
    if args.batch_size < 1:
        raise SelfTrainError("--batch-size must be ≥ 1")
    try:
        gen = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, min_new_tokens=args.min_new_tokens)
    except ValueError as e:
        raise SelfTrainError(f"invalid decoding flags: {e}") from None
    if not gen.do_sample:
        raise SelfTrainError("--temperature must be > 0: two greedy answers would be identical")
    settings, model_id = settings_of(args), model_name(args)
    questions = load_questions(args.questions)
    done = read_done(args.out, "question_id", {"settings": settings, "model": model_id})
    pending = [q for q in questions if q.question_id not in done]
    summary = {"questions": len(questions), "already_done": len(questions) - len(pending), "written": 0,
               "skipped": [], "seconds": 0.0}

    missing = [q for q in pending if not os.path.isfile(os.path.join(args.image_folder, q.image))]
    if missing and not args.skip_missing_images:
        q = missing[0]
        raise SelfTrainError(f"{args.questions}, line {q.line}: image {q.image!r} not found in {args.image_folder} "
                             f"({len(missing)} of {len(pending)} pending questions miss their image); fix: "
                             "--image-folder, or pass --skip-missing-images to skip and count them")
    for q in missing:
        summary["skipped"].append({"question_id": q.question_id, "image": q.image, "reason": "missing image"})
    missing_ids = {q.question_id for q in missing}
    pending = [q for q in pending if q.question_id not in missing_ids]
    logger.info("%d questions in %s: %d already in %s, %d to answer, %d skipped (missing image)", len(questions),
                args.questions, summary["already_done"], args.out, len(pending), len(missing))
    if not pending:
        return summary
    tokenizer, model, processor = loaded if loaded is not None else load_model(args)

    # Blocks of whole questions (N_ANSWERS sequences each), about --batch-size sequences per call.
    per_block = max(1, args.batch_size // N_ANSWERS)

    def prepare(block: list[Question]):
        images, keep = {}, []
        for q in block:
            try:
                if q.image not in images:
                    images[q.image] = load_rgb(os.path.join(args.image_folder, q.image))
                keep.append(q)
            except ImageError as e:
                if not args.skip_missing_images:
                    raise SelfTrainError(f"{args.questions}, line {q.line} (question {q.question_id!r}): {e}; fix "
                                         "the image, or pass --skip-missing-images to skip and count it") from None
                logger.warning("skipping question %r: %s", q.question_id, e)
                summary["skipped"].append({"question_id": q.question_id, "image": q.image, "reason": e.kind})
        return keep, images

    t0 = time.perf_counter()
    with JsonlWriter(args.out) as out, tqdm(total=len(pending), desc="answers", unit="q",
                                            disable=args.no_progress) as bar:
        for block, (keep, images) in prefetch(batched(pending, per_block), prepare):
            if keep:
                items = [(q, j) for q in keep for j in range(N_ANSWERS)]
                seeds = [derive_seed(args.seed, q.question_id, j) for q, j in items]
                texts = generate(model, tokenizer, processor, [answer_prompt(args.conv_mode, q.text) for q, _ in items],
                                 [images[q.image] for q, _ in items], gen, seeds)
                for n, q in enumerate(keep):
                    sl = slice(n * N_ANSWERS, (n + 1) * N_ANSWERS)
                    out.write({"question_id": q.question_id, "image": q.image, "question": q.text,
                               "answers": texts[sl], "answer_seeds": seeds[sl], "seed": args.seed,
                               "model": model_id, "settings": settings})
                summary["written"] += len(keep)
            bar.update(len(block))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, model_help="stage-1 checkpoint folder")
    p.add_argument("--questions", required=True, help="questions JSONL from stllava.selftrain.questions")
    p.add_argument("--image-folder", required=True, help="the folder the questions' image paths are relative to")
    p.add_argument("--out", required=True, help="answers JSONL (appended to: resumable); the judge's input")
    p.add_argument("--conv-mode", default="llava_v1", help="template of the answering prompt")
    p.add_argument("--temperature", type=float, default=1.2, help="sampling temperature (> 0)")
    p.add_argument("--top-k", type=int, default=100, help="sampling top-k (0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="sampling top-p (1 = off)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="answer length limit")
    p.add_argument("--min-new-tokens", type=int, default=0,
                   help="forbid </s> before this many tokens (smoke tests of random-init models)")
    p.add_argument("--seed", type=int, default=0, help="base seed; answer j of question Q uses derive_seed(seed, Q, j)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per generate call (2 per question)")
    p.add_argument("--skip-missing-images", action="store_true",
                   help="skip and count questions whose image is missing or unreadable instead of failing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        s = run(args)
    except SelfTrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{s['written']} questions answered ({N_ANSWERS} answers each) in {s['seconds']:.1f} s; "
          f"{s['already_done']} already done; {len(s['skipped'])} skipped (missing/unreadable image) → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

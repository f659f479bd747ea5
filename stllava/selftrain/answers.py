"""Stage 2(c): the stage-1 model samples two (or K) answers to each of its own questions (docs/Method.md#answers).

    python -m stllava.selftrain.answers --model-path CKPT [--model-base BASE] \\
        --questions questions.jsonl --image-folder IMAGES --out answers.jsonl \\
        [--seed 0] [--batch-size 8] [--num-chunks N --chunk-idx K]

**Input**: the questions file of :mod:`stllava.selftrain.questions` (``{"image", "questions",
"question_ids", ...}`` per image). Also accepted: records without ``question_ids`` (ids become
``"<image>#q<k>"``) and the published ``visual_sq.py`` layout, whose list is called ``prompt``.

**Per question** (docs/Method.md#answers, batched and seeded): the prompt
``"<image>\\n" + question`` as the USER turn of the template (``--conv-mode``, else the
checkpoint's recorded ``conv_mode``, else ``llava_v1``, the recipe's), two answers (``--n-answers``
K; the judge then pairs the best with the worst) sampled with
T = ``--temperature`` 1.2, ``--top-k`` 100, ``--top-p`` 0.95, ≤ ``--max-new-tokens`` 1024,
``</s>`` stripped. Answer j of question ``qid`` uses seed ``derive_seed(--seed, qid, j)``, so
every question gets its own random streams (not two shared by all questions,
docs/Differences.md#answer-seeds): same seed, same answers, at any batch size, chunking or
resume point.

**Output** — the input of :mod:`stllava.selftrain.judge`, one line per question, in input order::

    {"question_id": "img1.jpg#q0", "image": "img1.jpg", "question": "...",
     "answers": ["...", "..."],                        # --n-answers of them (2)
     "answer_seeds": [s1, s2], "seed": 0, "model": "ckpt-name", "settings": {...}}

``--backend openai --base-url URL --model NAME`` asks an OpenAI-compatible server instead (one
request per answer, with that answer's seed; the server's template; :mod:`stllava.remote_generation`).

Resume, sharding (over questions) and bad images work as in every generating tool
(:mod:`stllava.tooling`): question ids already in ``--out`` are skipped when its settings match
(else refused; ``--overwrite`` starts over); a missing or unreadable image stops the run naming it
and its line in ``--questions``, or with ``--skip-bad`` is skipped and counted.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from stllava import logs
from stllava.errors import run_cli
from stllava.generation import GenerationSettings, derive_seed, generate, image_prompt_text, render_prompt
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

logger = logging.getLogger("stllava.selftrain.answers")

N_ANSWERS = 2  # the paper's two answers per question (the default of --n-answers)
DEFAULT_CONV_MODE = "llava_v1"


@dataclass
class Question:
    line: int
    question_id: str
    image: str
    text: str


def load_questions(path: str) -> list[Question]:
    """Flatten a questions file into one :class:`Question` per question, in file order.

    Refuses (ToolError naming file and line) a malformed line, a record without an ``image``
    string or a list of question strings, ids that do not match the questions, and a question id
    used twice."""
    out: list[Question] = []
    seen: dict[str, int] = {}
    try:
        for line, rec in iter_jsonl(path):
            where = f"{path}, line {line}"
            image = rec.get("image")
            if not isinstance(image, str) or not image:
                raise ToolError(f"{where}: field 'image' must be a non-empty string")
            questions = rec.get("questions", rec.get("prompt"))
            if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
                raise ToolError(f"{where}: field 'questions' must be a list of strings "
                                "(the output of stllava.selftrain.questions)")
            ids = rec.get("question_ids")
            if ids is None:
                ids = [f"{image}#q{k}" for k in range(len(questions))]
            if not isinstance(ids, list) or len(ids) != len(questions):
                raise ToolError(f"{where}: 'question_ids' must be a list as long as 'questions' ({len(questions)})")
            for qid, q in zip(ids, questions):
                qid = str(qid)
                if qid in seen:
                    raise ToolError(f"{where}: question id {qid!r} already used on line {seen[qid]}")
                seen[qid] = line
                out.append(Question(line, qid, image, q))
    except JsonlError as e:
        raise ToolError(str(e)) from None
    except FileNotFoundError:
        raise ToolError(f"{path}: questions file not found; fix: --questions") from None
    return out


def answer_prompt(conv_mode: str, question: str) -> str:
    """``[USER: "<image>\\n" + question, ASSISTANT: <slot>]`` in template ``conv_mode``."""
    return render_prompt(conv_mode, [(0, image_prompt_text(question)), (1, None)])


def settings_of(args) -> dict:
    """What determines the output: stored in every record and compared on resume."""
    source = remote_settings(args) if is_remote(args) else {
        "model_path": model_path_setting(args.model_path), "model_base": model_path_setting(args.model_base),
        "conv_mode": args.conv_mode}
    return {**source, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
            "min_new_tokens": args.min_new_tokens, "seed": args.seed, "n_answers": args.n_answers}


def run(args: argparse.Namespace, loaded: tuple | None = None) -> dict:
    """Answer every pending question of this chunk twice; returns the summary dict.

    ``loaded`` = (tokenizer, model, image_processor) skips loading ``--model-path``. Raises
    ToolError for bad flags or input or (without ``--skip-bad``) a bad image, ArtifactError for a resume
    conflict."""
    check_batch_size(args)
    try:
        gen = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, min_new_tokens=args.min_new_tokens)
    except ValueError as e:
        raise ToolError(f"invalid decoding flags: {e}") from None
    if not gen.do_sample:
        raise ToolError("--temperature must be > 0: two greedy answers would be identical")
    if args.n_answers < 2:
        raise ToolError(f"--n-answers must be ≥ 2 (a pair needs two answers), got {args.n_answers}")
    k = args.n_answers
    if is_remote(args):
        check_remote_args(args)
    images = ImageSource(args.image_folder, lambda q: q.image,
                         lambda q: f"{args.questions}, line {q.line} (question {q.question_id!r})",
                         lambda q: {"question_id": q.question_id, "image": q.image}, args.skip_bad)
    work = plan_work(args, default_conv_mode=DEFAULT_CONV_MODE, settings_of=settings_of,
                     read_items=lambda: load_questions(args.questions), source=args.questions, what="questions",
                     out=args.out, key="question_id", key_of=lambda q: q.question_id, done_what="answers",
                     images=images)
    conv_mode, settings, pending = work.conv_mode, work.settings, work.pending
    model_id = args.served_model if is_remote(args) else model_name(args.model_path)
    summary = {"questions": len(work.items), "chunk": len(work.chunk), "already_done": work.already_done,
               "written": 0, "skipped": images.skipped, "seconds": 0.0}
    logger.info("%d questions in %s, chunk %d/%d holds %d: %d already in %s, %d to answer, %d skipped "
                "(missing image)", len(work.items), args.questions, args.chunk_idx, args.num_chunks,
                len(work.chunk), summary["already_done"], args.out, len(pending), len(images.skipped))
    if not pending:
        return summary
    if is_remote(args):
        def record(q: Question, texts: list[str], seeds: list[int]) -> dict:
            summary["written"] += 1
            return {"question_id": q.question_id, "image": q.image, "question": q.text, "answers": texts,
                    "answer_seeds": seeds, "seed": args.seed, "model": model_id, "settings": settings}

        summary["seconds"], summary["remote"] = run_remote(
            args, pending, settings=gen, load=images.load, image_file=images.path,
            name_of=lambda q: f"question {q.question_id!r}", text_of=lambda q: q.text,
            seeds_of=lambda q: [derive_seed(args.seed, q.question_id, j) for j in range(k)], record_of=record,
            block=max(1, args.concurrency // k), out=args.out, desc="answers", unit="q")
        return summary
    tokenizer, model, processor = loaded if loaded is not None else load_model(args)
    images.for_model(processor, model.config)  # JPEGs decoded as training decodes them

    def process(block: list[Question], prepared) -> list[dict]:
        keep, pics = prepared
        items = [(q, pic, j) for q, pic in zip(keep, pics) for j in range(k)]
        if not items:
            return []
        seeds = [derive_seed(args.seed, q.question_id, j) for q, _, j in items]
        texts = generate(model, tokenizer, processor, [answer_prompt(conv_mode, q.text) for q, _, _ in items],
                         [pic for _, pic, _ in items], gen, seeds)
        summary["written"] += len(keep)
        return [{"question_id": q.question_id, "image": q.image, "question": q.text,
                 "answers": texts[n * k:(n + 1) * k], "answer_seeds": seeds[n * k:(n + 1) * k], "seed": args.seed,
                 "model": model_id, "settings": settings} for n, q in enumerate(keep)]

    # Blocks of whole questions (k sequences each), about --batch-size sequences per call.
    per_block = max(1, args.batch_size // k)
    summary["seconds"] = run_batches(pending, per_block, images.load, process, args.out,
                                     desc="answers", unit="q", progress=not args.no_progress)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m stllava.selftrain.answers", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tool_args(p, model_help="stage-1 checkpoint folder",
                  conv_help=f"template of the answering prompt (default: the checkpoint's recorded conv_mode, "
                            f"else {DEFAULT_CONV_MODE})",
                  batch_size=8, batch_help="sequences per generate call (--n-answers per question)",
                  seed_help="base seed; answer j of question Q uses derive_seed(seed, Q, j)")
    p.add_argument("--questions", required=True, help="questions JSONL from stllava.selftrain.questions")
    p.add_argument("--image-folder", required=True, help="the folder the questions' image paths are relative to")
    p.add_argument("--out", required=True, help="answers JSONL (appended to: resumable); the judge's input")
    p.add_argument("--temperature", type=float, default=1.2, help="sampling temperature (> 0)")
    p.add_argument("--top-k", type=int, default=100, help="sampling top-k (0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="sampling top-p (1 = off)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="answer length limit")
    p.add_argument("--n-answers", type=int, default=N_ANSWERS,
                   help="sampled answers per question (the paper: 2; more gives the judge best-vs-worst pairs)")
    p.add_argument("--min-new-tokens", type=int, default=0,
                   help="forbid </s> before this many tokens (smoke tests of random-init models)")
    add_backend_args(p)
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    s = run(args)
    print(f"{s['written']} questions answered ({args.n_answers} answers each) in {s['seconds']:.1f} s; "
          f"{s['already_done']} already done; {len(s['skipped'])} skipped (bad image) → {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 bad input; see stllava.errors)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

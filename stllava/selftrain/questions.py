"""Stage 2(a–b): the stage-1 model describes each image, then asks questions about it (docs/Method.md#questions).

    python -m stllava.selftrain.questions --model-path CKPT [--model-base BASE] \\
        --image-folder IMAGES --out questions.jsonl [--n-questions 5] [--seed 0] \\
        [--batch-size 8] [--offset 0] [--limit N] [--dedup] [--num-chunks N --chunk-idx K]

**Images**: every file under ``--image-folder`` (recursively) whose extension is .jpg .jpeg .png
.bmp .tif .tiff (any case), sorted by relative path (``/``-separated); ``--offset``/``--limit``
select a slice of that list, ``--num-chunks``/``--chunk-idx`` this process's chunk of the slice.

**Per image** (docs/Method.md#questions, batched and seeded):

1. greedy description of ``"<image>\\nCan you describe the image in detail?"`` — template
   ``--conv-mode`` (default: the checkpoint's recorded ``conv_mode``, else ``v1_sq``; it needs a
   VUSER role) ``[USER: prompt, ASSISTANT: <slot>]``, ≤ ``--max-desc-tokens`` 1024;
2. ``--n-questions`` (5) sampled questions from ``[USER: prompt, ASSISTANT: description,
   VUSER: <slot>]`` with T = ``--temperature`` 1.2, ``--top-k`` 300, ``--top-p`` 0.95,
   ≤ ``--max-question-tokens`` 300; ``</s>`` stripped. Question k of image ``rel`` is sampled with
   seed ``derive_seed(--seed, rel, k)``: the same seed gives the same questions, at any batch size,
   offset, chunking or resume point. Empty questions are dropped and counted; ``--dedup`` drops
   repeats of an identical question (counted).

**Output**: one JSON line per image, appended and flushed as each batch of images finishes::

    {"image": "sub/img1.jpg", "description": "...", "questions": ["...", ...],
     "question_ids": ["sub/img1.jpg#q0", ...], "question_seeds": [...],
     "dropped": {"empty": 0, "duplicate": 0}, "seed": 0, "model": "ckpt-name",
     "settings": {...model path, template, decoding settings, seed...}}

``question_ids`` keep the sample index k (so ids stay stable when a question is dropped).
Resume, sharding and bad images work as in every generating tool (:mod:`stllava.tooling`):
rerunning skips images already in ``--out`` when its settings match (else refused;
``--overwrite`` starts over); an unreadable image stops the run, or with ``--skip-bad`` is
skipped and counted.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from stllava import logs
from stllava.constants import DEFAULT_IMAGE_TOKEN
from stllava.errors import run_cli
from stllava.generation import GenerationSettings, batched, derive_seed, generate, render_prompt
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

logger = logging.getLogger("stllava.selftrain.questions")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
DESCRIBE_PROMPT = "Can you describe the image in detail?"
DEFAULT_CONV_MODE = "v1_sq"


def list_images(folder: str | os.PathLike, offset: int = 0, limit: int | None = None) -> list[str]:
    """Relative ``/``-paths of every image file under ``folder`` (recursive, extensions
    :data:`IMAGE_EXTENSIONS` in any case), sorted, then sliced ``[offset : offset + limit]``.
    Refuses (ToolError) a folder that does not exist and a negative offset/limit."""
    root = Path(folder)
    if not root.is_dir():
        raise ToolError(f"{folder}: no such folder; fix: --image-folder")
    if offset < 0 or (limit is not None and limit < 0):
        raise ToolError(f"--offset and --limit must be ≥ 0 (got {offset}, {limit})")
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return found[offset:None if limit is None else offset + limit]


def describe_prompt(conv_mode: str, prompt: str = DESCRIBE_PROMPT) -> str:
    """``[USER: "<image>\\n" + prompt, ASSISTANT: <slot>]`` in template ``conv_mode``."""
    return render_prompt(conv_mode, [(0, "<image>\n" + prompt), (1, None)])


def question_prompt(conv_mode: str, description: str, prompt: str = DESCRIBE_PROMPT) -> str:
    """``[USER: "<image>\\n" + prompt, ASSISTANT: description, VUSER: <slot>]``; refuses
    (ToolError) a template without a third (VUSER) role. A literal ``<image>`` the model wrote
    into its description is removed (it would stand for a second image)."""
    from stllava.conversation import get_conv_template

    roles = get_conv_template(conv_mode).roles
    if len(roles) < 3:
        raise ToolError(f"template {conv_mode!r} has no VUSER role (roles {list(roles)}); fix: --conv-mode v1_sq")
    description = description.replace(DEFAULT_IMAGE_TOKEN, "").strip()
    return render_prompt(conv_mode, [(0, "<image>\n" + prompt), (1, description), (2, None)])


def finish_questions(questions: list[str], ids: list[str], seeds: list[int], dedup: bool):
    """Drop empty questions and, with ``dedup``, repeats of an identical (stripped) question.
    Returns ``(questions, ids, seeds, dropped)`` with ``dropped = {"empty": n, "duplicate": m}``."""
    kept, kept_ids, kept_seeds, seen = [], [], [], set()
    dropped = {"empty": 0, "duplicate": 0}
    for q, qid, seed in zip(questions, ids, seeds):
        if not q:
            dropped["empty"] += 1
            continue
        if dedup and q in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(q)
        kept.append(q)
        kept_ids.append(qid)
        kept_seeds.append(seed)
    return kept, kept_ids, kept_seeds, dropped


def settings_of(args) -> dict:
    """What determines the output: stored in every record and compared on resume."""
    return {"model_path": model_path_setting(args.model_path), "model_base": model_path_setting(args.model_base),
            "conv_mode": args.conv_mode, "describe_prompt": args.describe_prompt,
            "max_desc_tokens": args.max_desc_tokens, "n_questions": args.n_questions,
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "max_question_tokens": args.max_question_tokens, "min_new_tokens": args.min_new_tokens,
            "dedup": args.dedup, "seed": args.seed}


def run(args: argparse.Namespace, loaded: tuple | None = None) -> dict:
    """Write questions for this chunk of the selected images; returns the summary dict.

    ``loaded`` = (tokenizer, model, image_processor) skips loading ``--model-path``. Raises
    ToolError for bad flags or (without ``--skip-bad``) a bad image, ArtifactError for a resume conflict."""
    if getattr(args, "backend", "local") != "local":  # the flag exists so that the refusal is one line, not argparse's
        raise ToolError("--backend openai cannot ask the self-questioning turn: chat completions always open an "
                        "assistant turn, the questions are the VUSER role's "
                        "(docs/SelfTraining.md#questions-through-a-serving-engine); fix: run this stage with "
                        "--backend local")
    check_batch_size(args)
    if args.n_questions < 1:
        raise ToolError(f"--n-questions must be ≥ 1, got {args.n_questions}")
    try:
        desc_settings = GenerationSettings(max_new_tokens=args.max_desc_tokens)
        q_settings = GenerationSettings(max_new_tokens=args.max_question_tokens, temperature=args.temperature,
                                        top_k=args.top_k, top_p=args.top_p, min_new_tokens=args.min_new_tokens)
    except ValueError as e:
        raise ToolError(f"invalid decoding flags: {e}") from None
    images = ImageSource(args.image_folder, str, str, lambda rel: {"image": rel}, args.skip_bad)
    work = plan_work(args, default_conv_mode=DEFAULT_CONV_MODE, settings_of=settings_of,
                     # refuses a template without VUSER before loading the model
                     check_template=lambda mode: question_prompt(mode, ""),
                     read_items=lambda: list_images(args.image_folder, args.offset, args.limit),
                     source=args.image_folder, what=f"image files ({', '.join(IMAGE_EXTENSIONS)}) in the selection "
                     f"--offset {args.offset} --limit {args.limit}",
                     out=args.out, key="image", key_of=str, done_what="images", images=images)
    conv_mode, settings, pending = work.conv_mode, work.settings, work.pending
    model_id = model_name(args.model_path)
    summary = {"images": len(work.items), "chunk": len(work.chunk), "already_done": work.already_done,
               "written": 0, "questions": 0, "dropped_empty": 0, "dropped_duplicate": 0,
               "skipped": images.skipped, "seconds": 0.0}
    logger.info("%d images selected under %s, chunk %d/%d holds %d: %d already in %s, %d to do", len(work.items),
                args.image_folder, args.chunk_idx, args.num_chunks, len(work.chunk), summary["already_done"],
                args.out, len(pending))
    if not pending:
        return summary
    tokenizer, model, processor = loaded if loaded is not None else load_model(args)
    images.for_model(processor, model.config)  # JPEGs decoded as training decodes them

    def process(block: list[str], loaded_images) -> list[dict]:
        rels, pics = loaded_images
        if not rels:
            return []
        prompt = describe_prompt(conv_mode, args.describe_prompt)
        descriptions = generate(model, tokenizer, processor, [prompt] * len(pics), pics, desc_settings)
        items = [(i, k) for i in range(len(pics)) for k in range(args.n_questions)]
        seeds = {(i, k): derive_seed(args.seed, rels[i], k) for i, k in items}
        sampled = {}
        for part in batched(items, args.batch_size):
            prompts = [question_prompt(conv_mode, descriptions[i], args.describe_prompt) for i, _ in part]
            texts = generate(model, tokenizer, processor, prompts, [pics[i] for i, _ in part],
                             q_settings, [seeds[it] for it in part])
            sampled.update(zip(part, texts))
        records = []
        for i, rel in enumerate(rels):
            ks = range(args.n_questions)
            qs, ids, qseeds, dropped = finish_questions(
                [sampled[(i, k)] for k in ks], [f"{rel}#q{k}" for k in ks], [seeds[(i, k)] for k in ks], args.dedup)
            records.append({"image": rel, "description": descriptions[i], "questions": qs, "question_ids": ids,
                            "question_seeds": qseeds, "dropped": dropped, "seed": args.seed, "model": model_id,
                            "settings": settings})
            summary["written"] += 1
            summary["questions"] += len(qs)
            summary["dropped_empty"] += dropped["empty"]
            summary["dropped_duplicate"] += dropped["duplicate"]
        return records

    summary["seconds"] = run_batches(pending, args.batch_size, images.load, process, args.out,
                                     desc="questions", unit="img", progress=not args.no_progress)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m stllava.selftrain.questions", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tool_args(p, model_help="stage-1 checkpoint folder",
                  conv_help=f"template with a VUSER role (default: the checkpoint's recorded conv_mode, else "
                            f"{DEFAULT_CONV_MODE})",
                  batch_size=8, batch_help="sequences per generate call (also images per block)",
                  seed_help="base seed; question k of image I uses derive_seed(seed, I, k)")
    p.add_argument("--image-folder", required=True, help="folder of unlabelled images (searched recursively)")
    p.add_argument("--out", required=True, help="questions JSONL (appended to: resumable)")
    p.add_argument("--offset", type=int, default=0, help="skip this many images of the sorted list")
    p.add_argument("--limit", type=int, default=None, help="take at most this many images")
    p.add_argument("--n-questions", type=int, default=5, help="questions sampled per image")
    p.add_argument("--describe-prompt", default=DESCRIBE_PROMPT, help="the first (description) request")
    p.add_argument("--max-desc-tokens", type=int, default=1024, help="description length limit (greedy)")
    p.add_argument("--temperature", type=float, default=1.2, help="question sampling temperature")
    p.add_argument("--top-k", type=int, default=300, help="question sampling top-k (0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="question sampling top-p (1 = off)")
    p.add_argument("--max-question-tokens", type=int, default=300, help="question length limit")
    p.add_argument("--min-new-tokens", type=int, default=0,
                   help="forbid </s> before this many question tokens (smoke tests of random-init models)")
    p.add_argument("--dedup", action="store_true", help="drop repeats of an identical question (counted)")
    p.add_argument("--backend", choices=("local", "openai"), default="local",
                   help="local only (openai is refused): the self-questioning turn cannot be asked through chat "
                        "completions (docs/SelfTraining.md#questions-through-a-serving-engine)")
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    s = run(args)
    print(f"{s['written']} images written ({s['questions']} questions; dropped {s['dropped_empty']} empty, "
          f"{s['dropped_duplicate']} duplicate) in {s['seconds']:.1f} s; {s['already_done']} already done; "
          f"{len(s['skipped'])} unreadable images skipped → {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 bad input; see stllava.errors)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

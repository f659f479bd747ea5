"""Check that lmms-eval scores a benchmark exactly as model_vqa + metrics do (``make lmms-eval``).

    python -m stllava.integrations.lmms_eval.check --out playground/lmms-eval [--batch-size 16]
        [--model-path CKPT] [--src RAW --image-folder IMAGES]

Run it with the interpreter of the lmms-eval environment (``.venv-lmms/bin/python``). Defaults:
the embedded VQA-RAD subset (``stllava/assets/vqa_rad``) and a tiny random-init model built into
``OUT/tiny`` (``python -m stllava.model.tiny``) — its scores are meaningless, but both paths must
give the same ones. Steps, each a command of the project or of lmms-eval, in this interpreter:

1. ``stllava.eval.convert vqa_rad`` → ``OUT/vqa_rad/{test.json,questions.jsonl}``;
2. ``stllava.eval.model_vqa`` (CPU, greedy, ``--batch-size``) → ``OUT/model_vqa/answers.jsonl``,
   then ``stllava.eval.metrics`` → ``OUT/model_vqa/metrics/metrics.json``;
3. ``lmms_eval --model stllava --tasks stllava_vqa_rad`` (same batch size, ``--log_samples``) →
   ``OUT/lmms_eval/``;
4. compare: every metric of the task, the answers question by question, and the project's scorer
   applied to lmms-eval's logged answers. Writes ``OUT/comparison.json``; exits 1 on any difference.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import subprocess
import sys

from stllava import logs
from stllava.errors import EXIT_FAILED, StllavaError, run_cli
from stllava.eval.metrics import load_gt, load_jsonl, score
from stllava.integrations.lmms_eval import TASKS_DIR
from stllava.integrations.lmms_eval.benchmarks import BENCHMARKS
from stllava.integrations.lmms_eval.tasks.utils import METRICS

logger = logging.getLogger("stllava.integrations.lmms_eval.check")
ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "assets", "vqa_rad")
TASK = "stllava_vqa_rad"


class CheckError(StllavaError):
    """A step of the check that could not run; names the step and its log (exit 1: the run failed)."""

    exit_code = EXIT_FAILED


def _run(cmd: list[str], log: str, env: dict | None = None) -> None:
    logger.info("$ %s  (log: %s)", " ".join(cmd), log)
    with open(log, "w", encoding="utf-8") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        with open(log, encoding="utf-8", errors="replace") as fh:
            tail = "".join(fh.readlines()[-15:])
        raise CheckError(f"{cmd[2] if len(cmd) > 2 else cmd[0]} exited {rc}; last lines of {log}:\n{tail}")


def _one(pattern: str) -> str:
    found = sorted(glob.glob(pattern, recursive=True), key=os.path.getmtime)
    if not found:
        raise CheckError(f"no file matches {pattern}: lmms-eval wrote no results")
    return found[-1]


def lmms_results(out_dir: str) -> tuple[dict, dict[str, str]]:
    """``(metrics, answers)`` of the newest lmms-eval run under ``out_dir``: the task's metric values
    (lmms-eval's ``"<metric>,none"`` keys) and ``{question_id: answer}`` from its logged samples."""
    results = json.load(open(_one(os.path.join(out_dir, "**", "*_results.json")), encoding="utf-8"))
    values = results["results"][TASK]
    metrics = {m: values.get(f"{m},none") for m in METRICS}
    answers = {}
    for line in open(_one(os.path.join(out_dir, "**", f"*_samples_{TASK}.jsonl")), encoding="utf-8"):
        if line.strip():
            sample = json.loads(line)
            resp = sample["filtered_resps"]
            while isinstance(resp, list):
                resp = resp[0]
            # A logged sample holds the document's index, not the document; its process_results
            # item holds the test.json record.
            answers[str(json.loads(sample[METRICS[0]]["gt"])["id"])] = resp
    return metrics, answers


def compare(ours: dict, theirs: dict, our_answers: dict[str, str], their_answers: dict[str, str],
            gt: list[dict]) -> dict:
    """The comparison record: per metric both values and whether they are equal (NaN = NaN for an
    empty category), answers equal / differing, and the project's scorer on lmms-eval's answers."""
    rescored = score(gt, [{"question_id": q, "text": t} for q, t in their_answers.items()])["overall"]

    def same(a, b) -> bool:
        a = float("nan") if a is None else a
        b = float("nan") if b is None else b
        return a == b or (a != a and b != b)

    rows = {m: {"model_vqa+metrics": ours.get(m), "lmms_eval": theirs.get(m),
                "metrics_on_lmms_answers": rescored.get(m),
                "identical": same(ours.get(m), theirs.get(m)) and same(rescored.get(m), theirs.get(m))}
            for m in METRICS}
    differing = sorted(q for q in set(our_answers) | set(their_answers) if our_answers.get(q) != their_answers.get(q))
    return {"metrics": rows, "n_questions": len(gt), "answers_identical": len(our_answers) - len(differing),
            "answers_differing": differing[:20], "n_answers_differing": len(differing),
            "ok": all(r["identical"] for r in rows.values()) and not differing}


def render(result: dict) -> str:
    """A markdown table of :func:`compare`'s record."""
    lines = ["| metric | model_vqa + metrics | lmms-eval | identical |", "|---|---|---|---|"]
    for m, r in result["metrics"].items():
        lines.append(f"| {m} | {r['model_vqa+metrics']!r} | {r['lmms_eval']!r} | {'yes' if r['identical'] else 'NO'} |")
    lines.append(f"\nanswers identical: {result['answers_identical']} of {result['n_questions']}"
                 + (f"; differing: {result['answers_differing']}" if result["n_answers_differing"] else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m stllava.integrations.lmms_eval.check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="work folder (created)")
    p.add_argument("--model-path", help="checkpoint (default: a tiny random-init model built into OUT/tiny)")
    p.add_argument("--src", default=os.path.join(ASSET_DIR, "vqa_rad_subset.json"), help="raw VQA-RAD file")
    p.add_argument("--image-folder", default=os.path.join(ASSET_DIR, "images"), help="its images")
    p.add_argument("--batch-size", type=int, default=16, help="questions per generate call, on both paths")
    p.add_argument("--device", default="cpu", help="device of both paths")
    logs.add_log_level_arg(p)
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    data, images = os.path.join(out, "vqa_rad"), os.path.abspath(args.image_folder)
    _run([py, "-m", "stllava.eval.convert", "vqa_rad", "--src", args.src, "--out", data, "--image-folder", images],
         os.path.join(out, "convert.log"))
    model = args.model_path
    if not model:
        model = os.path.join(out, "tiny")
        if not os.path.isfile(os.path.join(model, "config.json")):
            _run([py, "-m", "stllava.model.tiny", "--out", model], os.path.join(out, "tiny.log"))

    mv = os.path.join(out, "model_vqa")
    os.makedirs(mv, exist_ok=True)
    _run([py, "-m", "stllava.eval.model_vqa", "--model-path", model, "--question-file",
          os.path.join(data, "questions.jsonl"), "--image-folder", images, "--answers-file",
          os.path.join(mv, "answers.jsonl"), "--device", args.device, "--batch-size", str(args.batch_size),
          "--overwrite", "--no-progress"], os.path.join(mv, "model_vqa.log"))
    _run([py, "-m", "stllava.eval.metrics", "--gt", os.path.join(data, "test.json"), "--pred",
          os.path.join(mv, "answers.jsonl"), "--out", os.path.join(mv, "metrics")], os.path.join(mv, "metrics.log"))

    lm = os.path.join(out, "lmms_eval")
    bench = BENCHMARKS["vqa_rad"]
    env = {**os.environ, bench.dir_var: data, bench.images_var: images}
    _run([py, "-m", "lmms_eval", "--model", "stllava", "--model_args", f"pretrained={model},device={args.device}",
          "--tasks", TASK, "--include_path", str(TASKS_DIR), "--batch_size", str(args.batch_size),
          "--log_samples", "--output_path", lm], os.path.join(out, "lmms_eval.log"), env=env)

    ours = json.load(open(os.path.join(mv, "metrics", "metrics.json"), encoding="utf-8"))["overall"]
    our_answers = {str(r["question_id"]): r["text"] for r in load_jsonl(os.path.join(mv, "answers.jsonl"))}
    theirs, their_answers = lmms_results(lm)
    result = compare(ours, theirs, our_answers, their_answers, load_gt(os.path.join(data, "test.json")))
    result.update(model=model, batch_size=args.batch_size, device=args.device)
    with open(os.path.join(out, "comparison.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    print(render(result))
    print(f"{'IDENTICAL' if result['ok'] else 'DIFFERENT'} (details: {os.path.join(out, 'comparison.json')})")
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 identical, 1 different or failed, 2 bad input)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

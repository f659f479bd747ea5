#!/usr/bin/env python
"""Throughput of batched vs one-at-a-time greedy answering (issues 4 and 15), in one run.

    python scripts/bench_generation.py [--model-path CKPT] [--batch-size 16] [--questions 32] \\
        [--new-tokens 128] [--repeats 2] [--order file|spread|test-set] [--device cpu] [--json out.json]

Without ``--model-path`` a tiny random-init bundle is built in a temporary folder. Questions are
the first ``--questions`` VQA-RAD questions of the package's embedded subset (real radiographs,
~1000 px), in file order like the real test set, where consecutive questions often share an image
(``--order spread`` takes them round-robin over the subset's 24 images instead, so that the
questions of a batch of up to 24 all have different images: the worst case for batching).
``--order test-set`` takes the whole VQA-RAD test set instead (``../shared/data/vqa_rad/testset.json``,
451 questions on 203 images, or ``--vqa-rad DIR``; all of them unless ``--questions`` is given),
shuffled with a fixed seed so that consecutive questions rarely share an image: what a user's
evaluation run does; skipped, with the reason, when the folder is absent. Every answer has
exactly ``--new-tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``), so both
modes do the same decoding work whatever the model emits. Two ratios, each mode timed
``--repeats`` times, alternating, the best kept (the range is printed too):

* **generation**: inputs tokenized and images preprocessed beforehand; ``model.generate`` on
  batches of ``--batch-size`` vs one question per call: the model-side speed-up;
* **end to end**: ``stllava.eval.model_vqa`` itself (the model loaded once, outside the timing)
  with ``--batch-size N`` vs ``--batch-size 1``: the same code path, image decoding,
  pad-to-square preprocessing, generation and the answers file included. A batch decodes and
  preprocesses an image shared by several of its questions once; in both modes the next batch
  is prepared in a background thread while the current one generates.

Wall time and CPU time (all threads of this process) are both reported. Were the preparation
hidden completely in both modes, the end-to-end ratio would equal the generation ratio; on a
saturated machine the background thread finds no idle core, nothing is hidden, and the ratio
tends to the CPU-time ratio (one-at-a-time generation + preparation over batched generation +
preparation), which is above the generation ratio only where a batch shares images. Also checks
that all four ways give the same greedy answers.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from importlib import resources

import torch

from stllava import logs
from stllava.data.images import jpeg_draft_enabled
from stllava.generation import (
    GenerationSettings,
    batched,
    generate_prepared,
    image_prompt_text,
    load_rgb,
    prepare_batch,
    render_prompt,
)
from stllava.mm_utils import decode_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VQA_RAD = os.path.join(os.path.dirname(REPO), "shared", "data", "vqa_rad")


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result) of ``fn()``."""
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - w0, time.process_time() - c0, result


def alternate(repeats: int, fns: dict) -> tuple[dict, dict]:
    """Time each of ``fns`` ``repeats`` times, alternating between them (a load change on a shared
    machine then hits every mode alike). Returns ({name: [(wall, cpu), ...]}, {name: last result})."""
    times: dict = {k: [] for k in fns}
    results: dict = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu, results[name] = timed(fn)
            times[name].append((wall, cpu))
    return times, results


def spread_order(records: list[dict], key: str) -> list[dict]:
    """``records`` reordered round-robin over their ``key`` values, so consecutive records differ."""
    groups: dict = {}
    for r in records:
        groups.setdefault(r[key], []).append(r)
    out, queues = [], list(groups.values())
    while queues:
        out += [q.pop(0) for q in queues]
        queues = [q for q in queues if q]
    return out


def summarize(times: list, n: int) -> dict:
    walls, cpus = [t[0] for t in times], [t[1] for t in times]
    return {"wall_s": min(walls), "wall_s_max": max(walls), "cpu_s": min(cpus), "cpu_s_max": max(cpus),
            "q_per_s": n / min(walls)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="checkpoint (default: a fresh tiny random-init bundle)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--questions", type=int, default=None,
                    help="questions per timed pass (default 32; --order test-set: all 451)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per answer (fixed)")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per mode; the best is kept")
    ap.add_argument("--order", choices=("file", "spread", "test-set"), default="file",
                    help="file: the subset's order; spread: no two questions of a batch share an image; "
                         "test-set: the whole VQA-RAD test set, shuffled")
    ap.add_argument("--vqa-rad", default=VQA_RAD, help="folder of testset.json and images/ (--order test-set)")
    ap.add_argument("--conv-mode", default="vicuna_v1")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the numbers to this file")
    logs.add_log_level_arg(ap, default="WARNING")
    args = ap.parse_args(argv)
    logs.setup(args.log_level)
    if args.order == "test-set" and not os.path.isfile(os.path.join(args.vqa_rad, "testset.json")):
        reason = f"{args.vqa_rad}/testset.json not found (the shared VQA-RAD copy; give --vqa-rad DIR)"
        print(f"skipped --order test-set: {reason}")
        return {"skipped": reason}

    from stllava.eval import model_vqa
    from stllava.model.builder import load_pretrained_model

    tmp = tempfile.TemporaryDirectory()
    model_path = args.model_path
    if model_path is None:
        from stllava.model.tiny import build_tiny_bundle

        model_path = build_tiny_bundle(os.path.join(tmp.name, "model"))["model"]
    tok, model, proc, _ = load_pretrained_model(model_path, device=args.device)
    need = decode_size(proc, model.config)  # JPEGs decoded as model_vqa (and training) decode them

    if args.order == "test-set":
        qa = json.loads(open(os.path.join(args.vqa_rad, "testset.json")).read())
        random.Random(0).shuffle(qa)
        folder = os.path.join(args.vqa_rad, "images")
    else:
        assets = resources.files("stllava") / "assets" / "vqa_rad"
        qa = json.loads((assets / "vqa_rad_subset.json").read_text())
        folder = str(assets / "images")
    if args.order == "spread":
        qa = spread_order(qa, "image_name")
    count = args.questions or (len(qa) if args.order == "test-set" else 32)
    qa = [dict(qa[i % len(qa)], question_id=i) for i in range(count)]
    qfile = os.path.join(tmp.name, "questions.jsonl")
    with open(qfile, "w") as f:
        f.writelines(json.dumps({"question_id": r["question_id"], "image": r["image_name"], "text": r["question"]})
                     + "\n" for r in qa)
    prompts = [render_prompt(args.conv_mode, [(0, image_prompt_text(r["question"])), (1, None)]) for r in qa]
    settings = GenerationSettings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    n, idx = len(qa), list(range(len(qa)))

    def prep(ids):
        return prepare_batch(tok, proc, model.config, [prompts[i] for i in ids],
                             [load_rgb(os.path.join(folder, qa[i]["image_name"]), need) for i in ids])

    # generation only: everything prepared once, outside the timing
    single_inputs = [prep([i]) for i in idx]
    batch_inputs = [prep(b) for b in batched(idx, args.batch_size)]
    generate_prepared(model, tok, single_inputs[0], settings)  # warm-up
    gen_times, gen_out = alternate(args.repeats, {
        "single": lambda: [generate_prepared(model, tok, b, settings)[0] for b in single_inputs],
        "batched": lambda: sum((generate_prepared(model, tok, b, settings) for b in batch_inputs), [])})

    # end to end: the answering tool itself, --batch-size 1 vs --batch-size N
    def tool(batch_size: int):
        out = os.path.join(tmp.name, f"answers-{batch_size}.jsonl")
        run_args = model_vqa.build_parser().parse_args([
            "--model-path", model_path, "--question-file", qfile, "--image-folder", folder, "--answers-file", out,
            "--conv-mode", args.conv_mode, "--batch-size", str(batch_size), "--max-new-tokens", str(args.new_tokens),
            "--min-new-tokens", str(args.new_tokens), "--device", args.device, "--overwrite", "--no-progress"])
        model_vqa.run(run_args, loaded=(tok, model, proc))
        with open(out) as f:
            by_id = {r["question_id"]: r["text"] for r in map(json.loads, f)}
        return [by_id[r["question_id"]] for r in qa]

    e2e_times, e2e_out = alternate(args.repeats, {"single": lambda: tool(1),
                                                  "batched": lambda: tool(args.batch_size)})
    # image decoding + preprocessing alone, per image (what batching can share or hide)
    prep_cpu = min(timed(lambda: [prep([i]) for i in idx])[1] for _ in range(args.repeats)) / n
    prepared_batched = sum(len({qa[i]["image_name"] for i in b}) for b in batched(idx, args.batch_size))

    res = {
        "device": str(model.device), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "model": model_path if args.model_path else "tiny random-init bundle", "order": args.order,
        "questions": n, "distinct_images": len({r["image_name"] for r in qa}), "batch_size": args.batch_size,
        "new_tokens": args.new_tokens, "repeats": args.repeats,
        "images_prepared": {"single": n, "batched": prepared_batched}, "prep_cpu_s_per_image": prep_cpu,
        "jpeg_draft": bool(need and jpeg_draft_enabled()),
        "batched_equals_single": gen_out["batched"] == gen_out["single"] == e2e_out["single"] == e2e_out["batched"],
    }
    for key, times in (("generation", gen_times), ("end_to_end", e2e_times)):
        s, b = summarize(times["single"], n), summarize(times["batched"], n)
        res[key] = {"single": s, "batched": b, "ratio": s["wall_s"] / b["wall_s"], "cpu_ratio": s["cpu_s"] / b["cpu_s"]}

    print(f"{n} VQA-RAD questions on {res['distinct_images']} images ({args.order} order), {args.new_tokens} new "
          f"tokens each, batch {args.batch_size}, "
          f"device {res['device']}, {res['threads']} torch threads on {res['cpus']} CPUs, best of {args.repeats} "
          f"(load average {os.getloadavg()[0]:.1f})")
    for key, label in (("generation", "generation only"), ("end_to_end", "end to end")):
        r = res[key]
        s, b = r["single"], r["batched"]
        print(f"  {label:16s} one-at-a-time {s['q_per_s']:6.2f} q/s   batched {b['q_per_s']:6.2f} q/s   "
              f"ratio {r['ratio']:5.2f}x wall, {r['cpu_ratio']:5.2f}x CPU time   (wall s: one-at-a-time "
              f"{s['wall_s']:.2f}-{s['wall_s_max']:.2f}, batched {b['wall_s']:.2f}-{b['wall_s_max']:.2f})")
    print(f"  images decoded + preprocessed: {n} one at a time, {prepared_batched} batched "
          f"({prep_cpu * 1e3:.1f} ms CPU each; JPEGs decoded "
          f"{f'reduced to keep {need}' if need and jpeg_draft_enabled() else 'at full size'})")
    res["end_to_end_over_generation"] = res["end_to_end"]["ratio"] / res["generation"]["ratio"]
    print(f"  end-to-end ratio / generation ratio: {res['end_to_end_over_generation']:.2f}")
    print(f"  batched greedy answers identical to one-at-a-time (generation only and end to end): "
          f"{res['batched_equals_single']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    tmp.cleanup()
    return res


if __name__ == "__main__":
    main()

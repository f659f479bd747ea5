#!/usr/bin/env python
"""Throughput of batched vs one-at-a-time greedy answering (issue 4's benchmark), in one run.

    python scripts/bench_generation.py [--model-path CKPT] [--batch-size 16] [--questions 32] \\
        [--new-tokens 128] [--repeats 2] [--device cpu] [--json out.json]

Without ``--model-path`` a tiny random-init bundle is built in a temporary folder. Questions are
VQA-RAD questions about the package's embedded images (real radiographs, ~1000 px). Every answer
has exactly ``--new-tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``), so both modes do
the same decoding work whatever the model emits. Two ratios, each the best of ``--repeats``:

* **generation**: inputs tokenized and images preprocessed beforehand; ``model.generate`` on
  batches of ``--batch-size`` vs one question per call — the model-side speed-up;
* **end to end**: image decoding + pad-to-square preprocessing + generation, i.e. what
  ``stllava.eval.model_vqa`` does (batched, next batch's images prepared in a background thread)
  vs the reference LLaVA-Med loop (per question: open image, preprocess, generate).

Also checks that the batched greedy answers equal the one-at-a-time ones.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from importlib import resources

import torch

from stllava.generation import (
    GenerationSettings,
    batched,
    generate_prepared,
    image_prompt_text,
    load_rgb,
    prefetch,
    prepare_batch,
    render_prompt,
)


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="checkpoint (default: a fresh tiny random-init bundle)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--questions", type=int, default=32, help="questions per timed pass")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per answer (fixed)")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per mode; the best is kept")
    ap.add_argument("--conv-mode", default="vicuna_v1")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from stllava.model.builder import load_pretrained_model

    tmp = None
    model_path = args.model_path
    if model_path is None:
        from stllava.model.tiny import build_tiny_bundle

        tmp = tempfile.TemporaryDirectory()
        model_path = build_tiny_bundle(tmp.name)["model"]
    tok, model, proc, _ = load_pretrained_model(model_path, device=args.device)

    assets = resources.files("stllava") / "assets" / "vqa_rad"
    qa = json.loads((assets / "vqa_rad_subset.json").read_text())
    qa = [qa[i % len(qa)] for i in range(args.questions)]
    paths = [os.path.join(str(assets / "images"), r["image_name"]) for r in qa]
    prompts = [render_prompt(args.conv_mode, [(0, image_prompt_text(r["question"])), (1, None)]) for r in qa]
    settings = GenerationSettings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    idx = list(range(len(qa)))

    def prep(ids):
        return prepare_batch(tok, proc, model.config, [prompts[i] for i in ids], [load_rgb(paths[i]) for i in ids])

    # generation only: everything prepared once, outside the timing
    single_inputs = [prep([i]) for i in idx]
    batch_inputs = [prep(b) for b in batched(idx, args.batch_size)]
    generate_prepared(model, tok, single_inputs[0], settings)  # warm-up
    t_single, out_single = best_of(args.repeats, lambda: [generate_prepared(model, tok, b, settings)[0]
                                                          for b in single_inputs])
    t_batch, out_batch = best_of(args.repeats, lambda: sum((generate_prepared(model, tok, b, settings)
                                                            for b in batch_inputs), []))

    # end to end: image decode + preprocessing + generation
    def e2e_single():
        return [generate_prepared(model, tok, prep([i]), settings)[0] for i in idx]

    def e2e_batched():
        return sum((generate_prepared(model, tok, b, settings)
                    for _, b in prefetch(batched(idx, args.batch_size), prep)), [])

    te_single, e_single = best_of(args.repeats, e2e_single)
    te_batch, e_batch = best_of(args.repeats, e2e_batched)

    n = len(qa)
    res = {
        "device": str(model.device), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "model": model_path if args.model_path else "tiny random-init bundle",
        "questions": n, "batch_size": args.batch_size, "new_tokens": args.new_tokens,
        "generation": {"one_at_a_time_q_per_s": n / t_single, "batched_q_per_s": n / t_batch,
                       "ratio": t_single / t_batch},
        "end_to_end": {"one_at_a_time_q_per_s": n / te_single, "batched_q_per_s": n / te_batch,
                       "ratio": te_single / te_batch},
        "batched_equals_single": out_batch == out_single and e_batch == e_single == out_single,
    }
    print(f"{n} questions, {args.new_tokens} new tokens each, batch {args.batch_size}, device {res['device']}, "
          f"{res['threads']} torch threads on {res['cpus']} CPUs, best of {args.repeats}")
    for key, label in (("generation", "generation only"), ("end_to_end", "end to end")):
        r = res[key]
        print(f"  {label:16s} one-at-a-time {r['one_at_a_time_q_per_s']:7.2f} q/s   batched "
              f"{r['batched_q_per_s']:7.2f} q/s   ratio {r['ratio']:5.2f}x")
    print(f"  batched greedy answers identical to one-at-a-time: {res['batched_equals_single']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    return res


if __name__ == "__main__":
    main()

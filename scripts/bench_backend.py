#!/usr/bin/env python
"""Answers/s of ``model_vqa --backend openai`` through ``stllava.serve.api`` at 16 concurrent
requests vs the in-process loop, same questions and model, one run (issue 22).

    python scripts/bench_backend.py [--model-path CKPT] [--questions 32] [--new-tokens 64] \\
        [--concurrency 16] [--batch-size 16] [--device cpu] [--json out.json]

Without ``--model-path`` a tiny random-init bundle is built in a temporary folder. The questions are
the package's embedded VQA-RAD subset (~1000 px JPEGs), repeated to ``--questions``. Both paths run
``stllava.eval.model_vqa.run`` in this process: the in-process one with the model loaded here at
``--batch-size``, the remote one with ``--backend openai --concurrency`` against the real server
(``python -m stllava.serve.api``, its own process, ``--max-batch`` = the concurrency). Every
answer has exactly ``--new-tokens`` tokens (``--min-new-tokens`` = ``--max-new-tokens``), so both do
the same decoding work. Timed: the tool's own loop (``summary["seconds"]``: images, requests or
generate calls, writing), not loading the model or starting the server. Prints answers/s of each,
the ratio, and whether the greedy answers are equal, record for record.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import resources

from stllava import logs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="checkpoint (default: a fresh tiny random-init bundle)")
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per answer (fixed)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight (and the server's max batch)")
    ap.add_argument("--batch-size", type=int, default=16, help="the in-process loop's batch size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the numbers to this file")
    logs.add_log_level_arg(ap, default="WARNING")
    args = ap.parse_args(argv)
    logs.setup(args.log_level)
    from stllava.eval import model_vqa
    from stllava.model.builder import load_pretrained_model

    tmp = tempfile.TemporaryDirectory()
    model_path = args.model_path
    if model_path is None:
        from stllava.model.tiny import build_tiny_bundle

        model_path = build_tiny_bundle(tmp.name)["model"]
    assets = resources.files("stllava") / "assets" / "vqa_rad"
    qa = json.loads((assets / "vqa_rad_subset.json").read_text())
    qfile = os.path.join(tmp.name, "questions.jsonl")
    with open(qfile, "w") as f:
        for i in range(args.questions):
            r = qa[i % len(qa)]
            f.write(json.dumps({"question_id": i, "image": r["image_name"], "text": r["question"]}) + "\n")
    common = ["--question-file", qfile, "--image-folder", str(assets / "images"), "--max-new-tokens",
              str(args.new_tokens), "--min-new-tokens", str(args.new_tokens), "--no-progress", "--device", args.device]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = os.path.join(tmp.name, "server.log")
    server = subprocess.Popen(
        [sys.executable, "-m", "stllava.serve.api", "--model-path", model_path, "--device", args.device,
         "--port", str(port), "--served-model-name", "bench", "--conv-mode", "vicuna_v1", "--max-batch",
         str(args.concurrency), "--max-queue", str(max(64, 4 * args.concurrency))],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    try:
        loaded = load_pretrained_model(model_path, device=args.device)[:3]
        while "Application startup complete" not in open(log_path).read():
            if server.poll() is not None:
                raise SystemExit(f"the server did not start:\n{open(log_path).read()}")
            time.sleep(0.2)
        # started before the in-process run is timed: its loading does not compete with it
        local_out = os.path.join(tmp.name, "local.jsonl")
        local = model_vqa.run(model_vqa.build_parser().parse_args(
            [*common, "--model-path", model_path, "--conv-mode", "vicuna_v1", "--answers-file", local_out,
             "--batch-size", str(args.batch_size)]), loaded=loaded)
        remote_out = os.path.join(tmp.name, "remote.jsonl")
        remote = model_vqa.run(model_vqa.build_parser().parse_args(
            [*common, "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "bench",
             "--answers-file", remote_out, "--concurrency", str(args.concurrency)]))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
            calls = json.load(r)["recent_batch_sizes"]
    finally:
        server.terminate()
        server.wait(60)

    def texts(path):
        return [json.loads(line)["text"] for line in open(path)]

    n = args.questions
    res = {"device": args.device, "cpus": os.cpu_count(), "threads": os.environ.get("OMP_NUM_THREADS", "all"),
           "model": model_path if args.model_path else "tiny random-init bundle", "questions": n,
           "new_tokens": args.new_tokens, "batch_size": args.batch_size, "concurrency": args.concurrency,
           "in_process": {"seconds": local["seconds"], "answers_per_s": n / local["seconds"]},
           "server": {"seconds": remote["seconds"], "answers_per_s": n / remote["seconds"],
                      "http_requests": remote["remote"]["http_requests"], "retries": remote["remote"]["retries"],
                      "generate_calls": calls},
           "answers_equal": texts(local_out) == texts(remote_out)}
    res["ratio"] = res["server"]["answers_per_s"] / res["in_process"]["answers_per_s"]
    print(f"{n} questions, {args.new_tokens} new tokens each, device {args.device}, "
          f"OMP_NUM_THREADS={res['threads']} on {res['cpus']} CPUs")
    print(f"  in-process model_vqa --batch-size {args.batch_size}: {res['in_process']['answers_per_s']:.2f} answers/s")
    print(f"  --backend openai, {args.concurrency} concurrent requests to stllava.serve.api: "
          f"{res['server']['answers_per_s']:.2f} answers/s (the server's generate calls: {calls})")
    print(f"  ratio server / in-process {res['ratio']:.2f}x; greedy answers equal, record for record: "
          f"{res['answers_equal']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    tmp.cleanup()
    return res


if __name__ == "__main__":
    main()

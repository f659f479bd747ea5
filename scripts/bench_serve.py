#!/usr/bin/env python
"""Serving throughput: 16 concurrent clients vs 16 requests sent one after another (issue 13), one run.

    python scripts/bench_serve.py [--model-path CKPT] [--requests 16] [--new-tokens 64] \\
        [--max-batch 16] [--window-ms 50] [--device cpu] [--json out.json]

Without ``--model-path`` a tiny random-init bundle is built in a temporary folder. The server is
the real one (``python -m stllava.serve.api``, its own process, so the clients do not compete
with it for the GIL). Each client thread POSTs one chat request, encoded beforehand (on a busy
2-core machine the ``openai`` client's own per-call CPU time would spread a burst of 16 over
hundreds of milliseconds; the server is what is measured), asking a VQA-RAD
question about one of the package's radiographs
(~1000 px JPEGs, sent as base64 data URLs). Every answer has exactly ``--new-tokens`` tokens
(vLLM's ``min_tokens`` = ``max_tokens``), so both modes do the same decoding work. Prints the
throughput ratio (goal ≥ 5×), p50/p95 request latency of each mode, the generate-call sizes the
server used, and whether the concurrent greedy answers equal the sequential ones.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from importlib import resources

import openai

from stllava import logs


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1] if len(values) > 1 else values[0]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="checkpoint (default: a fresh tiny random-init bundle)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per answer (fixed)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--window-ms", type=float, default=50.0, help="the server's batch collection window")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the numbers to this file")
    logs.add_log_level_arg(ap, default="WARNING")
    args = ap.parse_args(argv)
    logs.setup(args.log_level)

    tmp = tempfile.TemporaryDirectory()
    model_path = args.model_path
    if model_path is None:
        from stllava.model.tiny import build_tiny_bundle

        model_path = build_tiny_bundle(tmp.name)["model"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(tmp.name, "server.log")
    server = subprocess.Popen(
        [sys.executable, "-m", "stllava.serve.api", "--model-path", model_path, "--device", args.device,
         "--port", str(port), "--served-model-name", "bench", "--conv-mode", "v1", "--max-batch",
         str(args.max_batch), "--batch-window-ms", str(args.window_ms), "--max-queue", str(max(64, args.requests))],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT)

    def health() -> dict:
        with urllib.request.urlopen(url + "/health") as r:
            return json.load(r)

    while "Application startup complete" not in open(log_path).read():
        if server.poll() is not None:
            raise SystemExit(f"the server did not start:\n{open(log_path).read()}")
        time.sleep(0.2)

    assets = resources.files("stllava") / "assets" / "vqa_rad"
    qa = json.loads((assets / "vqa_rad_subset.json").read_text())
    qa = [qa[i % len(qa)] for i in range(args.requests)]
    urls = []
    for r in qa:
        data = (assets / "images" / r["image_name"]).read_bytes()
        urls.append("data:image/jpeg;base64," + base64.b64encode(data).decode())
    bodies = [json.dumps({
        "model": "bench", "temperature": 0, "max_tokens": args.new_tokens, "min_tokens": args.new_tokens,
        "messages": [{"role": "user", "content": [{"type": "text", "text": qa[i]["question"]},
                                                  {"type": "image_url", "image_url": {"url": urls[i]}}]}]}).encode()
              for i in range(args.requests)]
    # the reply is what the openai client would get (it checks the protocol once here)
    first = json.loads(bodies[0])
    check = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0).chat.completions.create(
        extra_body={"min_tokens": first.pop("min_tokens")}, **first)
    assert check.usage.completion_tokens == args.new_tokens

    def ask(i: int) -> tuple[str, float]:
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", bodies[i], {"Content-Type": "application/json"})
        r = json.loads(conn.getresponse().read())
        conn.close()
        assert r["usage"]["completion_tokens"] == args.new_tokens, r
        return r["choices"][0]["message"]["content"], time.perf_counter() - t0

    def concurrently() -> tuple[list, float]:
        results: list = [None] * args.requests
        start = threading.Barrier(args.requests + 1)

        def client_thread(i: int) -> None:
            start.wait()
            results[i] = ask(i)

        threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(args.requests)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        return results, time.perf_counter() - t0

    concurrently()  # warm-up
    t0 = time.perf_counter()
    sequential = [ask(i) for i in range(args.requests)]
    t_seq = time.perf_counter() - t0
    calls_before = health()["batches"]
    results, t_conc = concurrently()
    stats = health()
    batches = stats["recent_batch_sizes"][calls_before - stats["batches"]:]
    server.terminate()
    server.wait(60)

    lat_seq, lat_conc = [s[1] for s in sequential], [r[1] for r in results]
    n = args.requests
    res = {
        "device": args.device, "server_threads": os.environ.get("OMP_NUM_THREADS", "all"), "cpus": os.cpu_count(),
        "model": model_path if args.model_path else "tiny random-init bundle", "requests": n,
        "new_tokens": args.new_tokens, "max_batch": args.max_batch, "window_ms": args.window_ms,
        "sequential": {"seconds": t_seq, "req_per_s": n / t_seq, "p50_s": percentile(lat_seq, 50),
                       "p95_s": percentile(lat_seq, 95)},
        "concurrent": {"seconds": t_conc, "req_per_s": n / t_conc, "p50_s": percentile(lat_conc, 50),
                       "p95_s": percentile(lat_conc, 95)},
        "throughput_ratio": t_seq / t_conc, "generate_calls": batches,
        "answers_equal": [s[0] for s in sequential] == [r[0] for r in results],
    }
    print(f"{n} requests, {args.new_tokens} new tokens each, max batch {args.max_batch}, window {args.window_ms:g} ms, "
          f"device {res['device']}, OMP_NUM_THREADS={res['server_threads']} on {res['cpus']} CPUs")
    for key, label in (("sequential", "one after another"), ("concurrent", f"{n} concurrent clients")):
        r = res[key]
        print(f"  {label:22s} {r['req_per_s']:6.2f} req/s   latency p50 {r['p50_s']:.2f} s  p95 {r['p95_s']:.2f} s")
    print(f"  throughput ratio {res['throughput_ratio']:.1f}x (goal >= 5x); generate calls of sizes {batches}; "
          f"concurrent greedy answers equal the sequential ones: {res['answers_equal']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    tmp.cleanup()
    return res


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Judge throughput against the local OpenAI-compatible server, one run: requests/s and speed-up ratios.

    python scripts/bench_judge.py [--items 200] [--latency 0.2] [--concurrency 1 8 32] [--waves 16] \\
        [--image-size 336] [--answer-chars 800] [--json out.json]

The judge is the real command (``stllava.selftrain.judge.main``, the real ``openai`` client, its
resume cache and summary), run in this process against
``stllava.demo.openai_stub.ChatCompletionServer`` on 127.0.0.1 (also in this process, so the
server's work competes with the judge's for the same interpreter and CPUs: the per-request time
below is judge + client + server). The data set is built in a temporary folder: ``--images``
distinct ``--image-size``² JPEGs (smooth gradients with noise) and one record per item with two
different ``--answer-chars``-character answers. Every reply is ``8 3`` (parsable, no tie), so each
item costs exactly one request. Measured (runs 1 and 2 each on a fresh output and cache):

0. The local server's bare round trip: the median of ``--pings`` ``GET /health`` requests on one
   keep-alive connection (``http.client``; no judge, no ``openai`` client) -- the floor under
   every request below.
1. ``--items`` items, instant server, ``--concurrency 1``: requests/s and milliseconds per request
   (the judge's own time plus the local server's, the round trip of 0. included).
2. A server that holds every reply ``--latency`` seconds (``Reply(delay=...)``), at each
   ``--concurrency`` level, ``--waves`` × concurrency items (so every level runs about as many
   latency periods): requests/s, and the speed-up over the lowest level measured in this run
   (the ideal is the concurrency ratio).
3. Rebuilding run 1's output from its cache: the same command again with ``--max-requests 0``
   (no request may be sent); its output must equal run 1's byte for byte.

Every run must end with exit code 0 and every item judged by exactly one request (cache run:
none); otherwise the script stops with an error. Prints a table; ``--json`` also writes the numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from stllava import logs

REPLY = "8 3\nAnswer 1 is more accurate and more detailed."
KEY_ENV = "OPENAI_API_KEY"  # the judge's default --api-key-env, as in tests/selftrain/test_judge.py
KEY = "sk-bench-judge-local"
WORDS = ("the liver spleen kidney lesion hypodense contrast enhancing margin axial image shows a "
         "well defined mass in the right lobe without calcification or surrounding oedema").split()


def make_dataset(root: Path, n_items: int, n_images: int, size: int, answer_chars: int, seed: int = 0) -> Path:
    """``n_images`` JPEGs in ``root/images`` and ``root/answers.jsonl`` with ``n_items`` records."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = root / "images"
    folder.mkdir(parents=True)
    ramp = np.linspace(0, 1, size)
    names = []
    for k in range(n_images):
        base = 255 * np.outer(ramp, ramp[::-1] if k % 2 else ramp)
        pixels = np.clip(base + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8)
        name = f"img{k}.jpg"
        Image.fromarray(pixels, "L").convert("RGB").save(folder / name, format="JPEG", quality=90)
        names.append(name)
    words = random.Random(seed)

    def answer(prefix: str) -> str:
        text = prefix
        while len(text) < answer_chars:
            text += " " + words.choice(WORDS)
        return text[:answer_chars]

    with open(root / "answers.jsonl", "w") as f:
        for i in range(n_items):
            rec = {"question_id": f"q{i}", "image": names[i % n_images], "question": f"What does image {i} show?",
                   "answers": [answer(f"A{i}:"), answer(f"B{i}:")], "model": "bench"}
            f.write(json.dumps(rec) + "\n")
    return root / "answers.jsonl"


def head(answers: Path, n: int, out: Path) -> Path:
    """The first ``n`` records of ``answers`` in ``out``."""
    with open(answers) as f:
        lines = [next(f) for _ in range(n)]
    out.write_text("".join(lines))
    return out


def run_judge(answers: Path, folder: Path, out: Path, base_url: str, concurrency: int,
              *extra: str) -> tuple[dict, float]:
    """``python -m stllava.selftrain.judge`` in-process; (its printed summary, wall seconds)."""
    from stllava.selftrain import judge

    argv = ["--answers", str(answers), "--image-folder", str(folder), "--out", str(out), "--base-url", base_url,
            "--model", "local-judge", "--concurrency", str(concurrency), "--max-retries", "0", "--timeout", "60",
            "--price-in", "0", "--price-out", "0", "--log-level", "WARNING", *extra]
    printed = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        code = judge.main(argv)
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"the judge exited {code} for {' '.join(argv)}:\n{printed.getvalue()}")
    return json.loads(printed.getvalue()), seconds


def check(summary: dict, items: int, paid: int, what: str) -> None:
    """Every item judged "ok", ``paid`` requests and as many HTTP requests, or stop."""
    got = (summary["items"], summary["judged"], summary["complete"], summary["status"].get("ok", 0),
           summary["paid_requests"], summary["http_requests"])
    if got != (items, items, True, items, paid, paid):
        raise SystemExit(f"{what}: expected {items} items judged ok with {paid} requests; summary: "
                         f"items, judged, complete, ok, paid, http = {got}")


def round_trip_ms(port: int, n: int) -> float:
    """Median milliseconds of ``n`` ``GET /health`` requests on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times = []
    for _ in range(n + 1):  # the first one opens the connection
        t0 = time.perf_counter()
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        times.append(time.perf_counter() - t0)
        if response.status != 200:
            raise SystemExit(f"GET /health: HTTP {response.status}")
    conn.close()
    return 1000 * statistics.median(times[1:])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200, help="items of the instant-server and the cache runs")
    ap.add_argument("--latency", type=float, default=0.2, help="seconds the slow server holds each reply")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                    help="--concurrency levels of the slow-server runs")
    ap.add_argument("--waves", type=int, default=16, help="slow-server items per run = waves x concurrency")
    ap.add_argument("--images", type=int, default=8, help="distinct images")
    ap.add_argument("--image-size", type=int, default=336, help="image side in pixels")
    ap.add_argument("--answer-chars", type=int, default=800, help="characters per answer")
    ap.add_argument("--pings", type=int, default=50, help="GET /health requests of the bare round trip")
    ap.add_argument("--json", help="also write the numbers to this file")
    logs.add_log_level_arg(ap, default="WARNING")
    args = ap.parse_args(argv)
    if min(args.items, args.waves, args.pings, *args.concurrency) < 1 or args.latency <= 0:
        ap.error("--items, --waves, --pings and --concurrency must be >= 1, --latency > 0")
    logs.setup(args.log_level)
    from stllava.demo.openai_stub import ChatCompletionServer, Reply

    levels = sorted(set(args.concurrency))
    old_key = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = KEY
    try:
        with tempfile.TemporaryDirectory() as tmp, ChatCompletionServer(lambda body: REPLY, api_key=KEY) as server:
            root = Path(tmp)
            n_max = max(args.items, args.waves * levels[-1], 2)
            answers = make_dataset(root, n_max, args.images, args.image_size, args.answer_chars)
            folder = root / "images"
            ping_ms = round_trip_ms(server.port, args.pings)
            jpeg_kb = sum(p.stat().st_size for p in folder.iterdir()) / args.images / 1024

            # warm-up: imports, the first client and connection
            check(run_judge(head(answers, 2, root / "warm.jsonl"), folder, root / "warm" / "judged.jsonl",
                            server.base_url, 1)[0], 2, 2, "warm-up")

            instant_in = head(answers, args.items, root / "instant.jsonl")
            instant_out = root / "instant" / "judged.jsonl"
            summary, seconds = run_judge(instant_in, folder, instant_out, server.base_url, 1)
            check(summary, args.items, args.items, "instant server")
            instant = {"items": args.items, "concurrency": 1, "seconds": seconds, "req_per_s": args.items / seconds,
                       "ms_per_request": 1000 * seconds / args.items}
            first_output = instant_out.read_bytes()

            server.scorer = lambda body: Reply(content=REPLY, delay=args.latency)
            slow = []
            for c in levels:
                n = args.waves * c
                summary, seconds = run_judge(head(answers, n, root / f"slow{c}.jsonl"), folder,
                                             root / f"slow{c}" / "judged.jsonl", server.base_url, c)
                check(summary, n, n, f"latency {args.latency:g} s, concurrency {c}")
                slow.append({"items": n, "concurrency": c, "seconds": seconds, "req_per_s": n / seconds})
            for row in slow:
                row["speed_up"] = row["req_per_s"] / slow[0]["req_per_s"]

            server.scorer = lambda body: REPLY
            sent_before = len(server.requests)
            summary, seconds = run_judge(instant_in, folder, instant_out, server.base_url, 1, "--max-requests", "0")
            check(summary, args.items, 0, "rebuild from the cache")
            if summary["cache_hits"] != args.items or len(server.requests) != sent_before:
                raise SystemExit(f"rebuild from the cache: {summary['cache_hits']} cache hits for {args.items} items, "
                                 f"{len(server.requests) - sent_before} requests reached the server")
            same = instant_out.read_bytes() == first_output
            if not same:
                raise SystemExit("rebuild from the cache: the output differs from the instant run's")
            rebuild = {"items": args.items, "seconds": seconds, "cache_hits": summary["cache_hits"],
                       "output_identical": same}
    finally:
        if old_key is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = old_key

    res = {"cpus": os.cpu_count(), "image_size": args.image_size, "jpeg_kb": jpeg_kb, "images": args.images,
           "answer_chars": args.answer_chars, "latency_s": args.latency, "round_trip_ms": ping_ms,
           "instant": instant, "slow": slow, "rebuild": rebuild}
    print(f"judge (in-process) vs the local server (in-process), {args.images} {args.image_size}x{args.image_size} "
          f"JPEGs (~{jpeg_kb:.0f} KB), {args.answer_chars}-character answers, {res['cpus']} CPUs; "
          "one request per item, all items judged")
    print(f"  local server bare round trip (GET /health, keep-alive, median of {args.pings}): {ping_ms:.2f} ms")
    print(f"  {'server':22s} {'concurrency':>11s} {'items':>6s} {'seconds':>8s} {'req/s':>8s} {'speed-up':>9s}")
    print(f"  {'instant':22s} {1:11d} {instant['items']:6d} {instant['seconds']:8.2f} {instant['req_per_s']:8.1f} "
          f"{'':>9s}   ({instant['ms_per_request']:.1f} ms per request)")
    for row in slow:
        print(f"  {f'{args.latency:g} s latency':22s} {row['concurrency']:11d} {row['items']:6d} "
              f"{row['seconds']:8.2f} {row['req_per_s']:8.1f} {row['speed_up']:8.1f}x   "
              f"(ideal {row['concurrency'] / levels[0]:g}x)")
    print(f"  rebuild from the cache (--max-requests 0): {rebuild['items']} items in {rebuild['seconds']:.2f} s, "
          f"{rebuild['cache_hits']} cache hits, 0 requests, output identical: {rebuild['output_identical']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()

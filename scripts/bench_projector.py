"""Benchmark the cluster projector against the published module's formulation, in one run.

    python scripts/bench_projector.py --batch 2 --backward   # 7B sizes: L=576, D=1024, H=4096, N=256, CPU fp32
    python scripts/bench_projector.py --batch 1 2 4 --backward --device cuda
    python scripts/bench_projector.py --small                # D=256, H=512: a quick smoke run

Forms: ``ours`` is `ClusterProjector` as the model runs it (matmul aggregation; in training
`QuickGELU` keeps only its input); ``published`` is the published
module's forward written with plain autograd ops (`published_forward`: the same steps 1-4, the
[B, N, L, D] aggregation of `cluster_aggregate_direct`, QuickGELU as x·sigmoid(1.702x)), on the
same weights and input. Modes: ``aggregate`` = steps 5-6 only (docs/Method.md#cluster-projector; inputs precomputed, no
grad), ``forward`` = the whole projector under no_grad, ``train`` = forward + backward of a
loss on the output (input and every parameter get gradients), with ``--backward``.

Each (batch, mode, form) runs in a fresh subprocess so that one measurement's memory cannot hide
another's. Time: the best of --repeats calls after one warm-up — on CPU the process's CPU time
(user + system, page faults included; the calls run on --threads threads), because on a shared
machine wall time mostly measures the other tenants (wall time is printed too); on CUDA wall time.
Peak memory: bytes allocated above what was live when the call began — on CUDA
`torch.cuda.max_memory_allocated`, on CPU the running sum of the torch profiler's allocation/free
events (the same quantity); on CPU the process's peak-RSS growth (`ru_maxrss`, coarse: the
allocator may reuse freed pages) is printed alongside as a cross-check. In ``train`` mode also "kept":
what autograd holds from the forward until the backward, which inside the model stays allocated
while the whole LLM runs. Prints a table and the published / ours ratios.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time

from stllava import logs

logger = logging.getLogger("bench_projector")
MODES = ("aggregate", "forward", "train")
FORMS = ("ours", "published")


def _parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes B (default 1)")
    ap.add_argument("--tokens", type=int, default=576, help="tokens L (default 576)")
    ap.add_argument("--dim", type=int, default=1024, help="vision width D (default 1024)")
    ap.add_argument("--hidden", type=int, default=4096, help="LLM width H (default 4096)")
    ap.add_argument("--centers", type=int, default=256, help="centres N (default 256)")
    ap.add_argument("--small", action="store_true", help="shrink to D=256, H=512 for a quick run")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per row; the best is kept (default 5)")
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=None,
                    help="only these modes (default: aggregate forward, and train with --backward)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                    help="torch CPU threads (default $OMP_NUM_THREADS or 1)")
    ap.add_argument("--worker", nargs=3, metavar=("BATCH", "MODE", "FORM"), help=argparse.SUPPRESS)
    logs.add_log_level_arg(ap)
    args = ap.parse_args(argv)
    if args.small:
        args.dim, args.hidden = 256, 512
    return args


# ------------------------------------------------------------------------------------------------
# worker: one measurement in this process
# ------------------------------------------------------------------------------------------------
def _cpu_profiled_peak(fn) -> int:
    """Returns the peak of (bytes allocated - bytes freed) by torch on CPU while fn() runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def _kept_for_backward(forward, exclude) -> int:
    """Bytes of the tensors autograd keeps from ``forward()`` until backward (distinct storages, the
    input and the parameters excluded). Inside a model they stay allocated while everything after
    the projector (the whole LLM) runs forward and backward, so they add to the step's peak."""
    import torch

    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return total


def published_forward(proj, x):
    """The published module's forward on `proj`'s weights, plain autograd ops: steps 1-4 as
    `ClusterProjector.assign`, steps 5-6 with [B, N, L, D] temporaries, QuickGELU unfused."""
    import torch

    from stllava.model.projector import cluster_aggregate_direct

    h = proj.mlp[0](cluster_aggregate_direct(x, *proj.assign(x)))
    return proj.mlp[2](h * torch.sigmoid(1.702 * h))


def _worker(args: argparse.Namespace) -> dict:
    import torch

    from stllava.model.projector import ClusterProjector, cluster_aggregate, cluster_aggregate_direct

    torch.set_num_threads(args.threads)
    batch, mode, form = int(args.worker[0]), args.worker[1], args.worker[2]
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    proj = ClusterProjector(args.dim, args.hidden, num_centers=args.centers).to(dev, dtype)
    x = torch.randn(batch, args.tokens, args.dim, device=dev, dtype=dtype)
    run = proj if form == "ours" else (lambda t: published_forward(proj, t))

    if mode == "aggregate":
        agg = cluster_aggregate if form == "ours" else cluster_aggregate_direct
        with torch.no_grad():
            parts = proj.assign(x)

        def call():
            with torch.no_grad():
                return agg(x, *parts)
    elif mode == "forward":
        def call():
            with torch.no_grad():
                return run(x)
    else:
        xg = x.clone().requires_grad_(True)

        def call():
            proj.zero_grad(set_to_none=True)
            xg.grad = None
            run(xg).float().square().mean().backward()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()  # warm-up, also the peak-RSS cross-check
    sync()
    rss_delta = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024  # KiB on Linux
    kept = None
    if mode == "train":  # grads now exist and persist between calls: count them as baseline
        call()
        sync()
        kept = _kept_for_backward(lambda: run(xg), [xg, *proj.parameters()])
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        call()
        sync()
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = _cpu_profiled_peak(call)
    times, walls = [], []
    for _ in range(args.repeats):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        sync()
        walls.append(time.perf_counter() - t0)
        times.append(walls[-1] if cuda else time.process_time() - c0)
    return {"batch": batch, "mode": mode, "form": form, "time_s": min(times), "wall_s": min(walls), "kept_bytes": kept,
            "peak_bytes": peak, "rss_delta_bytes": None if cuda else rss_delta,
            "device": torch.cuda.get_device_name(dev) if cuda else f"cpu x{args.threads} threads"}


# ------------------------------------------------------------------------------------------------
# driver: one subprocess per measurement, then the table
# ------------------------------------------------------------------------------------------------
def _run_one(argv: list[str], batch: int, mode: str, form: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", str(batch), mode, form]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH")) if p)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"worker B={batch} {mode}/{form} failed (rc {res.returncode}):\n"
                           f"{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def _mib(n) -> str:
    return f"{'-':>9}" if n is None else f"{n / 2**20:9.1f}"


def main(argv=None) -> None:
    args = _parse(argv)
    # the worker (a subprocess whose stdout is one JSON line) logs warnings only
    logs.setup(logging.WARNING if args.worker else args.log_level)
    if args.worker:
        print(json.dumps(_worker(args)), flush=True)
        return
    passthrough = list(argv if argv is not None else sys.argv[1:])
    modes = args.modes or (MODES if args.backward else MODES[:2])
    rows = []
    for batch in args.batch:
        for mode in modes:
            for form in FORMS:
                logger.info("B=%d %s/%s ...", batch, mode, form)
                rows.append(_run_one(passthrough, batch, mode, form))
    print(f"\ncluster projector, L={args.tokens} D={args.dim} H={args.hidden} N={args.centers} "
          f"{args.dtype} on {rows[0]['device']}, best of {args.repeats}")
    clock = "wall" if args.device.startswith("cuda") else "CPU"
    print(f"{'B':>2} {'mode':<9} {'form':<9} {clock + ' ms':>9} {'wall ms':>9} {'peak MiB':>9} {'dRSS MiB':>9} "
          f"{'kept MiB':>9}")
    for r in rows:
        print(f"{r['batch']:>2} {r['mode']:<9} {r['form']:<9} {r['time_s'] * 1e3:9.1f} {r['wall_s'] * 1e3:9.1f} "
              f"{_mib(r['peak_bytes'])} {_mib(r['rss_delta_bytes'])} {_mib(r['kept_bytes'])}")
    print("\nratios published / ours")
    by = {(r["batch"], r["mode"], r["form"]): r for r in rows}
    for batch in args.batch:
        for mode in modes:
            m, d = by[(batch, mode, "ours")], by[(batch, mode, "published")]
            kept = (f"   kept for backward x{d['kept_bytes'] / max(m['kept_bytes'], 1):6.2f}"
                    if m.get("kept_bytes") else "")
            print(f"B={batch} {mode:<9} {clock} time x{d['time_s'] / m['time_s']:6.1f}   "
                  f"peak memory x{d['peak_bytes'] / max(m['peak_bytes'], 1):6.1f}{kept}")


if __name__ == "__main__":
    main()

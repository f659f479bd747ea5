"""DPO reference modes compared: peak memory and step time of ``adapter_disabled`` vs ``separate``.

    python scripts/bench_dpo.py                # a 102M-parameter LLM (hidden 1024, 8 layers) on CPU, 6 steps
    python scripts/bench_dpo.py --small        # hidden 256, 4 layers: a quick smoke run
    python scripts/bench_dpo.py --hidden 4096 --layers 32 --intermediate 11008 --vision_hidden 1024 \\
        --vision_layers 24 --image_size 336 --bf16          # 7B-shaped, on a GPU

Both modes train the same random-init model (bigger than the tests' tiny one, so the weights
dominate as they do at 7B) with the published DPO recipe's trainable parts (LLM LoRA, ViT-LoRA,
projector; gradient checkpointing) on the colour preference pairs, through the real entry
(``stllava.train.train_dpo.build_dpo_trainer``) and the real trainer. Each mode runs in a fresh
subprocess so one measurement's memory cannot hide the other's.

Peak memory: bytes held by torch tensors, from just before the model is loaded until the end of
the second training step (the optimizer states exist by then) — on CUDA
``torch.cuda.max_memory_allocated``, on CPU the running sum of the torch profiler's
allocation/free events (tracemalloc cannot see torch's allocator); the process's peak-RSS growth
over the same span is printed as a cross-check (coarse: freed pages are reused). Step time:
median wall time of the steps after the profiled ones. Prints a table and adapter_disabled / separate.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from stllava import logs

logger = logging.getLogger("bench_dpo")
MODES = ("adapter_disabled", "separate")
PROFILED_STEPS = 2


def _parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024, help="LLM width (default 1024)")
    ap.add_argument("--layers", type=int, default=8, help="LLM layers (default 8)")
    ap.add_argument("--intermediate", type=int, default=2816, help="LLM MLP width (default 2816)")
    ap.add_argument("--heads", type=int, default=16, help="LLM attention heads (default 16)")
    ap.add_argument("--vision_hidden", type=int, default=256, help="CLIP width (default 256)")
    ap.add_argument("--vision_layers", type=int, default=4, help="CLIP layers (default 4)")
    ap.add_argument("--image_size", type=int, default=112, help="image side; patches of 14 (default 112: 64 tokens)")
    ap.add_argument("--lora_r", type=int, default=16, help="LLM LoRA rank (default 16)")
    ap.add_argument("--batch", type=int, default=2, help="pairs per step (default 2, i.e. 4 sequences)")
    ap.add_argument("--steps", type=int, default=6, help="training steps per mode (default 6; the first "
                    f"{PROFILED_STEPS} are profiled, the rest timed)")
    ap.add_argument("--bf16", action="store_true", help="bf16 weights (GPU)")
    ap.add_argument("--small", action="store_true", help="hidden 256, 4 layers, 4 steps: a quick smoke run")
    ap.add_argument("--workdir", default=None, help="where the bundle and data go (default: a temporary folder)")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "WORKDIR"), help=argparse.SUPPRESS)
    logs.add_log_level_arg(ap)
    args = ap.parse_args(argv)
    if args.small:
        args.hidden, args.layers, args.intermediate, args.heads, args.steps = 256, 4, 688, 4, 4
    if args.steps <= PROFILED_STEPS:
        ap.error(f"--steps must be > {PROFILED_STEPS}")
    return args


# ------------------------------------------------------------------------------------------------
# worker: one mode in this process
# ------------------------------------------------------------------------------------------------
def _profiled_peak(prof) -> int:
    """Peak of (bytes allocated − bytes freed) by torch on CPU over a finished profile."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def _worker(args: argparse.Namespace) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from stllava.train.train_dpo import build_dpo_trainer

    mode, workdir = args.worker
    cuda = torch.cuda.is_available()
    with open(os.path.join(workdir, "paths.json")) as f:
        paths = json.load(f)
    argv = ["--model_name_or_path", paths["model"], "--data_path", paths["data"], "--image_folder", paths["images"],
            "--output_dir", os.path.join(workdir, f"out_{mode}"), "--ref_model", mode,
            "--lora_enable", "True", "--lora_r", str(args.lora_r), "--lora_alpha", str(2 * args.lora_r),
            "--vit_lora_enable", "--lora_r_vit", "8", "--lora_alpha_vit", "16", "--learning_rate", "1e-3",
            "--per_device_train_batch_size", str(args.batch), "--max_steps", str(args.steps),
            "--gradient_checkpointing", "True", "--model_max_length", "1024", "--save_strategy", "no",
            "--report_to", "none", "--logging_steps", "1", "--dataloader_num_workers", "0", "--verify_workers", "1",
            "--disable_tqdm", "True", *(["--bf16", "True"] if args.bf16 else [])]

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prof = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.__enter__()
    result = {"mode": mode}

    class Measure(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            if state.global_step == PROFILED_STEPS:
                if cuda:
                    result["peak_bytes"] = torch.cuda.max_memory_allocated() - base
                else:
                    prof.__exit__(None, None, None)
                    result["peak_bytes"] = _profiled_peak(prof)
                result["rss_delta_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024

    measure = Measure()
    trainer = build_dpo_trainer(argv, callbacks=[measure])
    model = trainer.model
    ref = trainer.ref_model if trainer.ref_model is not None else trainer.ref_projector
    result["params_policy"] = sum(p.numel() for p in model.parameters())
    result["params_reference"] = sum(p.numel() for p in ref.parameters())
    result["weight_bytes"] = sum(p.numel() * p.element_size() for m in (model, ref) for p in m.parameters())
    result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer.train()
    timed = measure.times[PROFILED_STEPS:]
    result["step_s"] = statistics.median(timed)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    result["first_loss"], result["last_loss"] = logs[0]["loss"], logs[-1]["loss"]
    result["device"] = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()} threads"
    return result


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def _prepare(args: argparse.Namespace, workdir: str) -> None:
    import torch

    from stllava.model.tiny import build_tiny_bundle
    from stllava.toys import write_colour_preference_dataset

    vision = dict(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                  num_hidden_layers=args.vision_layers, num_attention_heads=max(1, args.vision_hidden // 64),
                  image_size=args.image_size, patch_size=14, projection_dim=args.vision_hidden)
    llm = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
               num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=2048)
    paths = build_tiny_bundle(os.path.join(workdir, "bundle"), seed=0, vision=vision, llm=llm)
    if args.bf16:  # store the weights in bf16 as a 7B checkpoint would be
        from stllava.model import LlavaLlamaForCausalLM

        LlavaLlamaForCausalLM.from_pretrained(paths["model"], dtype=torch.bfloat16).save_pretrained(paths["model"])
    data, images = write_colour_preference_dataset(os.path.join(workdir, "pairs"), n=args.batch * args.steps)
    with open(os.path.join(workdir, "paths.json"), "w") as f:
        json.dump({"model": paths["model"], "data": data, "images": images}, f)


def _run_one(argv: list[str], mode: str, workdir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", mode, workdir]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH")) if p)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"worker {mode} failed (rc {res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(lines[-1])


def _mib(n) -> str:
    return f"{n / 2**20:9.1f}"


def main(argv=None) -> None:
    args = _parse(argv)
    # the worker (a subprocess whose stdout is one JSON line) logs warnings only
    logs.setup(logging.WARNING if args.worker else args.log_level)
    if args.worker:
        print(json.dumps(_worker(args)), flush=True)
        return
    passthrough = list(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        logger.info("building the bundle and pairs in %s", workdir)
        _prepare(args, workdir)
        rows = []
        for mode in MODES:
            logger.info("%s ...", mode)
            rows.append(_run_one(passthrough, mode, workdir))
    print(f"\nDPO step, LLM hidden {args.hidden} x {args.layers} layers ({rows[0]['params_policy'] / 1e6:.1f}M "
          f"parameters with tower and LoRA), {args.batch} pairs/step, {'bf16' if args.bf16 else 'fp32'}, "
          f"on {rows[0]['device']}")
    print(f"{'reference':<17} {'ref params':>11} {'weights MiB':>12} {'peak MiB':>9} {'dRSS MiB':>9} {'step s':>8} "
          f"{'loss 1st→last':>16}")
    for r in rows:
        print(f"{r['mode']:<17} {r['params_reference'] / 1e6:10.2f}M {_mib(r['weight_bytes'])}    "
              f"{_mib(r['peak_bytes'])} "
              f"{_mib(r['rss_delta_bytes'])} {r['step_s']:8.3f} {r['first_loss']:7.4f}→{r['last_loss']:.4f}")
    a, s = rows
    print(f"\nadapter_disabled / separate: peak memory x{a['peak_bytes'] / s['peak_bytes']:.3f} (goal <= 0.6), "
          f"peak RSS growth x{a['rss_delta_bytes'] / s['rss_delta_bytes']:.3f}, "
          f"step time x{a['step_s'] / s['step_s']:.3f}")


if __name__ == "__main__":
    main()

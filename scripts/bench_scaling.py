"""How cost grows with the work: a table, fitted slopes and a figure, in one run.

    python scripts/bench_scaling.py                       # tiny bundle on CPU, ~3 min
    python scripts/bench_scaling.py --model-path CKPT --device cuda --out images/scaling_gpu.png

Three series, each on the real code path:

* **generation**: greedy ``model.generate`` (``stllava.generation.generate_prepared``) on batches
  of 1…32 VQA-RAD questions about the package's radiographs, every answer exactly
  ``--new-tokens`` long; answer tokens per second;
* **SFT step** (stage-1 setup: LLM LoRA, ViT-LoRA, trained projector, gradient checkpointing,
  AdamW) on ``--sft-batch`` samples filled to ``model_max_length`` positions (one image each);
  step time and peak memory (torch allocations during the step);
* **DPO step** (``LlavaDPOTrainer.compute_loss``: reference pass, policy pass, loss; backward and
  the optimizer step; no gradient checkpointing) vs pairs per batch.

Time: best of ``--repeats`` — on CPU the process's CPU time (this machine is shared: wall time
mostly measures the other tenants), on CUDA wall time. Each series is fitted with y = a + b·x + c·x²
and labelled from the fit: **flat** (y moves < 10% over the range), **linear** (the quadratic term is
< 15% of the growth a → y at the largest x), **quadratic** (> 50%), else linear + quadratic; the
share of the fixed cost a and the log-log slope (y ∝ x^k between the ends) are printed too.
Generation is fitted on the time per batch, whose fixed part is what batching spreads out. The
figure goes to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from importlib import resources

import numpy as np
import torch

from stllava import logs

logger = logging.getLogger("bench_scaling")


def growth(xs, ys) -> dict:
    """Fit y = a + b·x + c·x²; returns the coefficients, the label (see the module docstring), the
    share of the fixed cost a in the fitted y at the largest x, and the log-log slope."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    c, b, a = np.polyfit(xs, ys, 2) if len(xs) >= 3 else (0.0, *np.polyfit(xs, ys, 1))
    k = float(np.log(ys[-1] / ys[0]) / np.log(xs[-1] / xs[0]))
    rise = b * xs[-1] + c * xs[-1] ** 2
    quad = c * xs[-1] ** 2 / rise if rise > 0 else 0.0
    if abs(ys.max() - ys.min()) < 0.1 * ys.min():
        label = "flat"
    elif quad < 0.15:
        label = "linear"
    elif quad > 0.5:
        label = "quadratic"
    else:
        label = "linear + quadratic"
    return {"a": float(a), "b": float(b), "c": float(c), "quadratic_share": float(quad),
            "fixed_share": float(a / (a + rise)) if a + rise > 0 else 0.0, "loglog_slope": k, "label": label}


class Clock:
    """CPU time of this process on CPU, wall time (synchronised) on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    def best(self, fn, repeats: int) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = self.now()
            fn()
            times.append(self.now() - t0)
        return min(times)


def peak_bytes(fn, device: torch.device) -> int:
    """Bytes allocated by torch above the start while ``fn()`` runs (CUDA counter or CPU profiler)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


# ------------------------------------------------------------------------------------------------
def bench_generation(args, model_path: str, clock: Clock) -> list[dict]:
    from stllava.generation import (
        GenerationSettings,
        generate_prepared,
        image_prompt_text,
        load_rgb,
        prepare_batch,
        render_prompt,
    )
    from stllava.model.builder import load_pretrained_model

    tok, model, proc, _ = load_pretrained_model(model_path, device=args.device)
    assets = resources.files("stllava") / "assets" / "vqa_rad"
    qa = json.loads((assets / "vqa_rad_subset.json").read_text())
    settings = GenerationSettings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    rows = []
    for b in args.generation_batches:
        recs = [qa[i % len(qa)] for i in range(b)]
        batch = prepare_batch(tok, proc, model.config,
                              [render_prompt("vicuna_v1", [(0, image_prompt_text(r["question"])), (1, None)])
                               for r in recs],
                              [load_rgb(os.path.join(str(assets / "images"), r["image_name"])) for r in recs])
        t = clock.best(lambda batch=batch: generate_prepared(model, tok, batch, settings), args.repeats)
        rows.append({"batch": b, "time_s": t, "tokens_per_s": b * args.new_tokens / t})
        logger.info("generation batch %d: %.1f tokens/s", b, rows[-1]["tokens_per_s"])
    return rows


def _sft_batch(n: int, length: int, image_tokens: int, vocab: int, image_size: int, g: torch.Generator) -> dict:
    from stllava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    text = length - image_tokens + 1  # the <image> token becomes image_tokens positions
    ids = torch.randint(3, vocab, (n, text), generator=g)
    ids[:, 0] = 1
    ids[:, min(5, text - 1)] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, : text // 2] = IGNORE_INDEX
    labels[ids == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "images": torch.randn(n, 3, image_size, image_size, generator=g)}


def bench_sft(args, model_path: str, clock: Clock) -> list[dict]:
    from types import SimpleNamespace

    from stllava.model import LlavaLlamaForCausalLM
    from stllava.train.model_setup import make_trainable
    from stllava.train.trainer import build_param_groups

    device = torch.device(args.device)
    model = LlavaLlamaForCausalLM.from_pretrained(model_path)
    model.config.use_cache = False
    tower = model.get_model().get_vision_tower()
    image_tokens, image_size = tower.num_patches, tower.config.image_size
    model = make_trainable(model, SimpleNamespace(
        lora_enable=True, lora_r=8, lora_alpha=16, lora_dropout=0.05, lora_bias="none", vit_lora_enable=True,
        lora_r_vit=4, lora_alpha_vit=8, lora_dropout_vit=0.2)).to(device)
    model.activation_checkpointing_enable()
    model.train()
    hp = SimpleNamespace(learning_rate=1e-4, mm_projector_lr=None, vision_tower_lr=None, weight_decay=0.0)
    opt = torch.optim.AdamW(build_param_groups(model, hp, set()), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    rows = []
    for length in args.sft_lengths:
        batch = {k: v.to(device) for k, v in _sft_batch(args.sft_batch, length, image_tokens,
                                                          model.config.vocab_size, image_size, g).items()}

        def step(batch=batch):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = clock.best(step, args.repeats)
        rows.append({"model_max_length": length, "step_s": t, "peak_mib": peak_bytes(step, device) / 2**20})
        logger.info("SFT length %d: %.3f s, %.1f MiB", length, t, rows[-1]["peak_mib"])
    return rows


def bench_dpo(args, model_path: str, workdir: str, clock: Clock) -> list[dict]:
    from stllava.toys import write_colour_preference_dataset
    from stllava.train.train_dpo import build_dpo_trainer

    data, images = write_colour_preference_dataset(os.path.join(workdir, "pairs"), n=max(args.dpo_pairs))
    trainer = build_dpo_trainer([
        "--model_name_or_path", model_path, "--data_path", data, "--image_folder", images,
        "--output_dir", os.path.join(workdir, "dpo"), "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16",
        "--vit_lora_enable", "True", "--lora_r_vit", "4", "--lora_alpha_vit", "8",
        "--per_device_train_batch_size", "1", "--report_to", "none", "--save_strategy", "no",
        "--dataloader_num_workers", "0", "--verify_workers", "1", "--disable_tqdm", "True"])
    model = trainer.model
    model.train()
    opt = trainer.create_optimizer()
    ds = trainer.train_dataset
    rows = []
    for n in args.dpo_pairs:
        batch = trainer._prepare_inputs(trainer.data_collator([ds[i] for i in range(n)]))

        def step(batch=batch):
            trainer.compute_loss(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = clock.best(step, args.repeats)
        rows.append({"pairs": n, "step_s": t})
        logger.info("DPO %d pairs: %.3f s", n, t)
    return rows


# ------------------------------------------------------------------------------------------------
def figure(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    gen, sft, dpo = res["generation"], res["sft"], res["dpo"]
    ax = axes[0]
    ax.plot([r["batch"] for r in gen], [r["tokens_per_s"] for r in gen], "o-")
    ax.set(xscale="log", xlabel="batch size", ylabel="answer tokens / s", title="generation (greedy)")
    ax.set_xticks([r["batch"] for r in gen], [str(r["batch"]) for r in gen])
    ax = axes[1]
    xs = [r["model_max_length"] for r in sft]
    ax.plot(xs, [r["step_s"] for r in sft], "o-", color="C0")
    ax.set(xlabel="model_max_length (positions per sample)", ylabel="step time (s)", title="SFT step")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["peak_mib"] for r in sft], "s--", color="C1")
    ax2.set_ylabel("peak memory (MiB)", color="C1")
    ax = axes[2]
    ax.plot([r["pairs"] for r in dpo], [r["step_s"] for r in dpo], "o-")
    ax.set(xlabel="pairs per batch", ylabel="step time (s)", title="DPO step")
    for ax, key, what in zip(axes, ("generation_time", "sft_time", "dpo_time"), ("time/batch", "time", "time")):
        ax.text(0.03, 0.92, f"{what}: {res['fits'][key]['label']}", transform=ax.transAxes)
    ax2.text(0.03, 0.82, f"memory: {res['fits']['sft_memory']['label']}", transform=ax2.transAxes, color="C1")
    fig.suptitle(f"{res['model']} on {res['device']} (time: {res['clock']})", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fit_line(name: str, f: dict) -> str:
    return (f"  {name:<16} {f['label']:<19} y = {f['a']:.4g} + {f['b']:.4g}·x + {f['c']:.4g}·x²  (at the largest x: "
            f"fixed cost {f['fixed_share']:.0%}, quadratic term {max(f['quadratic_share'], 0):.0%} of the growth; "
            f"log-log slope {f['loglog_slope']:.2f})")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="LLaVA checkpoint folder (default: a fresh tiny random-init bundle)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--generation-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per answer (fixed)")
    ap.add_argument("--sft-lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--sft-batch", type=int, default=4, help="samples per SFT step")
    ap.add_argument("--dpo-pairs", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per point; the best is kept")
    ap.add_argument("--out", default="images/scaling.png", help="the figure (PNG)")
    ap.add_argument("--json", help="also write the numbers to this file")
    logs.add_log_level_arg(ap)
    args = ap.parse_args(argv)
    logs.setup(args.log_level)
    for name in ("transformers", "stllava"):
        logging.getLogger(name).setLevel(logging.WARNING)
    device = torch.device(args.device)
    clock = Clock(device)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model_path
        if model_path is None:
            from stllava.model.tiny import build_tiny_bundle

            model_path = build_tiny_bundle(os.path.join(tmp, "bundle"))["model"]
        res = {"model": args.model_path or "tiny random-init bundle", "threads": torch.get_num_threads(),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"cpu x{torch.get_num_threads()} threads", "clock": "wall" if clock.cuda else "CPU time"}
        res["generation"] = bench_generation(args, model_path, clock)
        res["sft"] = bench_sft(args, model_path, clock)
        res["dpo"] = bench_dpo(args, model_path, tmp, clock)
    gen, sft, dpo = res["generation"], res["sft"], res["dpo"]
    res["fits"] = {
        "generation_time": growth([r["batch"] for r in gen], [r["time_s"] for r in gen]),
        "sft_time": growth([r["model_max_length"] for r in sft], [r["step_s"] for r in sft]),
        "sft_memory": growth([r["model_max_length"] for r in sft], [r["peak_mib"] for r in sft]),
        "dpo_time": growth([r["pairs"] for r in dpo], [r["step_s"] for r in dpo]),
    }
    print(f"\n{res['model']} on {res['device']}; time = {res['clock']}, best of {args.repeats}")
    print(f"\ngeneration, {args.new_tokens} new tokens per answer\n  {'batch':>5} {'batch s':>9} {'tokens/s':>9}")
    for r in gen:
        print(f"  {r['batch']:>5} {r['time_s']:9.3f} {r['tokens_per_s']:9.1f}")
    print(f"\nSFT step, {args.sft_batch} samples filled to model_max_length\n"
          f"  {'length':>6} {'step s':>8} {'peak MiB':>9}")
    for r in sft:
        print(f"  {r['model_max_length']:>6} {r['step_s']:8.3f} {r['peak_mib']:9.1f}")
    print(f"\nDPO step\n  {'pairs':>5} {'step s':>8}")
    for r in dpo:
        print(f"  {r['pairs']:>5} {r['step_s']:8.3f}")
    print("\nfits (x = batch size / model_max_length / pairs; y = time per batch or step / peak MiB)")
    for name, f in res["fits"].items():
        print(_fit_line(name, f))
    g = res["fits"]["generation_time"]
    if g["b"] > 0:
        print(f"  generation tokens/s = B·{args.new_tokens} / (a + b·B): approaches {args.new_tokens / g['b']:.0f} "
              f"as the batch grows (the fixed per-batch cost a is spread over more answers)")
    figure(res, args.out)
    print(f"\nfigure: {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

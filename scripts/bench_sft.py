"""Stage-1 SFT throughput: samples/s, tokens/s, and the share of time spent splicing images.

    python scripts/bench_sft.py                 # tiny bundle on CPU (what CI machines can run)
    python scripts/bench_sft.py --7b            # 7B-shaped random-init model on a GPU: tokens/s and MFU
    python scripts/bench_sft.py --7b --tiny_shape --device cpu --batch 2 --seq 128   # smoke run of --7b

One training step = forward + backward + AdamW step of the stage-1 setup (LLM LoRA, ViT-LoRA,
trainable projector, gradient checkpointing), on the same batches as the real run (the colour
task of ``stllava.toys.write_colour_dataset`` for the tiny mode; synthetic ids + random images
of the published sizes for ``--7b``). Timers (CUDA-synchronised) around
``prepare_inputs_labels_for_multimodal`` and ``encode_images`` give the forward time of the image
splice alone (the former minus the latter) and of tower + projector.

Tokens are model positions: text tokens plus the image patches spliced in. FLOPs and MFU come from
``stllava.train.throughput`` — the count the training logs use (``ModelFlops``: LLM + tower +
projector, forward + backward, LoRA-aware, no recomputation) over the GPU's dense bf16 peak
(``--peak_tflops``, default from the device name, ``stllava.train.throughput.PEAK_BF16_TFLOPS``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

from stllava import logs

logger = logging.getLogger("bench_sft")



class Timers:
    """Wall-clock totals of wrapped methods (synchronising CUDA so GPU time is counted)."""

    def __init__(self, device: torch.device):
        self.device, self.total = device, {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def wrap(self, obj, name: str):
        fn = getattr(obj, name)

        def timed(*a, **k):
            self.sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            self.sync()
            self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t
            return out

        setattr(obj, name, timed)


def trainable_args(lora_r=128, lora_alpha=256, r_vit=32, alpha_vit=64):
    return SimpleNamespace(lora_enable=True, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.05,
                           lora_bias="none", vit_lora_enable=True, lora_r_vit=r_vit, lora_alpha_vit=alpha_vit,
                           lora_dropout_vit=0.2)


def make_optimizer(model, lr=2e-4, projector_lr=2e-5, vit_lr=5e-5):
    from stllava.train.trainer import build_param_groups

    args = SimpleNamespace(learning_rate=lr, mm_projector_lr=projector_lr, vision_tower_lr=vit_lr, weight_decay=0.0)
    decay = {n for n, _ in model.named_parameters() if "bias" not in n and "norm" not in n}
    return torch.optim.AdamW(build_param_groups(model, args, decay), lr=lr, fused=torch.cuda.is_available())


def run_steps(model, batches, optimizer, steps: int, warmup: int, device: torch.device) -> dict:
    """Train ``warmup`` + ``steps`` steps cycling over ``batches``; returns timings of the last ``steps``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    timers = Timers(device)
    model.train()
    done, t0, samples = 0, None, 0
    while done < warmup + steps:
        batch = {k: v.to(device) for k, v in batches[done % len(batches)].items()}
        if done == warmup:
            timers.wrap(base, "prepare_inputs_labels_for_multimodal")
            timers.wrap(base, "encode_images")
            timers.sync()
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if done >= warmup:
            samples += batch["input_ids"].shape[0]
        done += 1
        last_loss = out.loss.item()
    timers.sync()
    wall = time.perf_counter() - t0
    prep = timers.total.get("prepare_inputs_labels_for_multimodal", 0.0)
    enc = timers.total.get("encode_images", 0.0)
    return {"steps": steps, "wall_s": wall, "step_s": wall / steps, "samples": samples,
            "splice_s": prep - enc, "tower_projector_s": enc, "loss": last_loss}


def step_flops(model, batch: dict, image_tokens: int) -> tuple[int, float]:
    """(positions, model FLOPs) of one training step on ``batch`` (``stllava.train.throughput``)."""
    from stllava.train.throughput import ModelFlops, batch_positions

    lengths, _, images = batch_positions(batch, image_tokens)
    return sum(lengths), ModelFlops.of(model).step(lengths, images)


def bench_tiny(args) -> dict:
    from transformers import CLIPImageProcessor

    from stllava.data.collate import DataCollatorForSupervisedDataset
    from stllava.data.sft import LazySupervisedDataset
    from stllava.data.verify import load_records
    from stllava.model import LlavaLlamaForCausalLM
    from stllava.model.builder import load_tokenizer
    from stllava.model.tiny import build_tiny_bundle
    from stllava.toys import write_colour_dataset
    from stllava.train.model_setup import make_trainable

    device = torch.device("cpu")
    tmp = tempfile.mkdtemp(prefix="bench_sft_")
    paths = build_tiny_bundle(os.path.join(tmp, "bundle"))
    data_path, folder = write_colour_dataset(os.path.join(tmp, "data"), n=args.batch * 4)
    tok = load_tokenizer(paths["model"], 1024, training=True)
    proc = CLIPImageProcessor.from_pretrained(paths["model"])
    ds = LazySupervisedDataset(load_records(data_path), tok, proc, image_folder=folder, version="v1_sq", sq_r=0.5)
    model = LlavaLlamaForCausalLM.from_pretrained(paths["model"])
    model.config.use_cache = False
    image_tokens = model.get_model().get_vision_tower().num_patches
    collate = DataCollatorForSupervisedDataset(tok.pad_token_id, 1024, image_tokens)
    t = time.perf_counter()
    batches = [collate([ds[(0, i)] for i in range(b * args.batch, (b + 1) * args.batch)]) for b in range(4)]
    data_s = (time.perf_counter() - t) / len(batches)
    model = make_trainable(model, trainable_args(8, 16, 4, 8))
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    opt = make_optimizer(model, 1e-3, 1e-3, 1e-3)
    res = run_steps(model, batches, opt, args.steps, args.warmup, device)
    per_batch = [step_flops(model, b, image_tokens) for b in batches]
    timed = range(args.warmup, args.warmup + args.steps)
    positions = sum(per_batch[i % len(batches)][0] for i in timed)
    flops = sum(per_batch[i % len(batches)][1] for i in timed)
    text = sum(int(batches[i % len(batches)]["attention_mask"].sum()) for i in timed)
    res.update(mode="tiny", device="cpu", batch=args.batch, image_tokens=image_tokens,
               samples_per_s=res["samples"] / res["wall_s"], tokens_per_s=positions / res["wall_s"],
               text_tokens_per_s=text / res["wall_s"], achieved_tflops=flops / res["wall_s"] / 1e12,
               splice_share=res["splice_s"] / res["wall_s"],
               tower_projector_share=res["tower_projector_s"] / res["wall_s"], data_s_per_batch=data_s,
               threads=torch.get_num_threads())
    return res


def bench_7b(args) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_7b import build_model  # the GPU check's 7B-shaped model (scripts/bench_7b.py)

    from stllava.constants import IMAGE_TOKEN_INDEX
    from stllava.train.model_setup import attn_implementation, make_trainable
    from stllava.train.throughput import peak_flops

    device = torch.device(args.device)
    attn = attn_implementation(args.attn)
    t = time.perf_counter()
    dtype = torch.float32 if args.tiny_shape else torch.bfloat16
    model = build_model(llm_layers=args.llm_layers, vision_layers=args.vision_layers, tiny=args.tiny_shape, attn=attn,
                        device=device, dtype=dtype)
    cfg = model.config
    logger.info("built 7B-shaped model in %.1f s (attention %s)", time.perf_counter() - t, attn)
    image_tokens = model.get_model().get_vision_tower().num_patches
    model = make_trainable(model, trainable_args())
    for p in model.parameters():  # LoRA weights come out in float32; train everything in bf16
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    model.to(device)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    opt = make_optimizer(model)
    g = torch.Generator().manual_seed(0)
    text = args.seq - image_tokens + 1  # the <image> token itself becomes image_tokens positions
    side = model.get_model().get_vision_tower().config.image_size
    batches = []
    for _ in range(2):
        ids = torch.randint(3, cfg.vocab_size, (args.batch, text), generator=g)
        ids[:, 0] = 1
        ids[:, min(40, text // 2)] = IMAGE_TOKEN_INDEX  # after a system prompt, as in v1_sq
        labels = ids.clone()
        labels[:, :text // 2] = -100
        labels[ids == IMAGE_TOKEN_INDEX] = -100
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                        "images": torch.randn(args.batch, 3, side, side, generator=g).to(dtype)})
    res = run_steps(model, batches, opt, args.steps, args.warmup, device)
    positions, flops = step_flops(model, batches[0], image_tokens)
    positions, flops = positions * args.steps, flops * args.steps
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_llm = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" not in n and "mm_projector" not in n)
    n_vis = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
    n_proj = sum(p.numel() for n, p in model.named_parameters() if "mm_projector" in n)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    achieved = flops / res["wall_s"]
    res.update(mode="7b", device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", batch=args.batch,
               seq=args.seq, attention=attn, trainable_params=n_trainable, llm_params=n_llm, vision_params=n_vis,
               projector_params=n_proj, tokens_per_s=positions / res["wall_s"],
               samples_per_s=res["samples"] / res["wall_s"], achieved_tflops=achieved / 1e12,
               mfu=(achieved / peak) if peak else None, peak_tflops=peak / 1e12 if peak else None,
               splice_share=res["splice_s"] / res["wall_s"],
               tower_projector_share=res["tower_projector_s"] / res["wall_s"],
               max_memory_gib=(torch.cuda.max_memory_allocated() / 2**30) if device.type == "cuda" else None)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--7b", dest="seven_b", action="store_true", help="7B-shaped random-init model (needs a GPU)")
    ap.add_argument("--batch", type=int, default=None, help="samples per step (tiny: 8, 7b: 8)")
    ap.add_argument("--seq", type=int, default=2048, help="7b: positions per sample, image patches included")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (tiny: 20, 7b: 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (tiny: 3, 7b: 1)")
    ap.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false")
    ap.add_argument("--device", default="cuda", help="7b: device (cpu only for a smoke test with few layers)")
    ap.add_argument("--attn", default=None,
                    help="7b: attention kernel (default flash_attention_2 if available, else sdpa)")
    ap.add_argument("--llm_layers", type=int, default=None, help="7b: override the 32 LLM layers (smoke tests)")
    ap.add_argument("--vision_layers", type=int, default=None, help="7b: override the 24 CLIP layers (smoke tests)")
    ap.add_argument("--tiny_shape", action="store_true", help="7b: tiny widths, fp32 (a CPU smoke run of the 7b code)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak of the GPU for MFU")
    ap.add_argument("--json", default=None, help="also write the result to this file")
    logs.add_log_level_arg(ap)
    args = ap.parse_args(argv)
    logs.setup(args.log_level)
    if args.seven_b:
        args.batch, args.steps = args.batch or 8, args.steps or 3
        args.warmup = 1 if args.warmup is None else args.warmup
        res = bench_7b(args)
    else:
        args.batch, args.steps = args.batch or 8, args.steps or 20
        args.warmup = 3 if args.warmup is None else args.warmup
        res = bench_tiny(args)
    for k, v in res.items():
        print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

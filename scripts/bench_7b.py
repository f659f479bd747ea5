"""The 7B-shaped random-init LLaVA model of the GPU check: attention-kernel parity, batched generation.

    python scripts/bench_7b.py parity   [--llm_layers 4]     # flash-attention-2 vs sdpa logits, bf16
    python scripts/bench_7b.py generate [--llm_layers 8]     # greedy tokens/s at batch 1…32
    python scripts/bench_7b.py generate --tiny --device cpu  # the same code at tiny widths (a smoke run)

The model: Vicuna-7B widths (hidden 4096, MLP 11008, 32 heads, vocab 32000) with ``--llm_layers``
layers, the CLIP ViT-L/14-336 tower (``--vision_layers``, default all 24), the cluster projector;
random init straight on the device in bf16 (``--tiny``: hidden 64, 2 + 2 layers, 112 px images, fp32).
``build_model`` is shared with ``scripts/bench_sft.py --7b``.

``parity`` builds the model twice with the same weights, one per attention kernel (``--kernels``,
default sdpa and flash_attention_2; skipped with a message when flash-attn is not installed), and
compares the logits of a training-shaped batch (one image, right padding on one row) at the real
positions: relative L2 error, max |diff| and top-1 agreement; bf16 rounding alone gives a relative
error of order 1e-2. ``generate`` times greedy ``model.generate`` with exactly ``--new_tokens`` new
tokens per row (best of ``--repeats``, CUDA-synchronised) and prints answer tokens per second.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time

import torch

from stllava import logs

logger = logging.getLogger("bench_7b")

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)
TINY_LLM = dict(LLAMA_7B, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=1000, max_position_embeddings=2048)
TINY_VISION = dict(CLIP_L_336, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   image_size=112, projection_dim=64)


def build_model(*, llm_layers: int | None = None, vision_layers: int | None = None, tiny: bool = False,
                attn: str = "sdpa", device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                seed: int = 0):
    """A random-init LlavaLlamaForCausalLM of 7B shape (or tiny widths), built on ``device`` in
    ``dtype``, cluster projector, ``use_cache`` off (turn it on for generation)."""
    from transformers import CLIPVisionConfig

    from stllava.model import LlavaLlamaConfig, LlavaLlamaForCausalLM

    llm_shape, vision_shape = (TINY_LLM, TINY_VISION) if tiny else (LLAMA_7B, CLIP_L_336)
    llm = dict(llm_shape, num_hidden_layers=llm_layers or llm_shape["num_hidden_layers"])
    vis = CLIPVisionConfig(**dict(vision_shape, num_hidden_layers=vision_layers or vision_shape["num_hidden_layers"]))
    n_patches = (vis.image_size // vis.patch_size) ** 2
    cfg = LlavaLlamaConfig(**llm, mm_vision_tower="openai/clip-vit-large-patch14-336", mm_vision_config=vis.to_dict(),
                           mm_hidden_size=vis.hidden_size, mm_projector_type="cluster",
                           mm_projector_clusters=min(256, n_patches), mm_vision_select_layer=-2,
                           mm_vision_select_feature="patch", image_aspect_ratio="pad", use_cache=False,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaLlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation=attn)
    return model


def random_inputs(model, batch: int, text: int, generator: torch.Generator, pad_last: int = 0) -> dict:
    """``batch`` prompts of ``text`` tokens with one ``<image>`` each (after a 40-token system
    prompt when there is room) and random images; the last row right-padded by ``pad_last``."""
    from stllava.constants import IMAGE_TOKEN_INDEX

    ids = torch.randint(3, model.config.vocab_size, (batch, text), generator=generator)
    ids[:, 0] = 1
    ids[:, min(40, text // 2)] = IMAGE_TOKEN_INDEX
    mask = torch.ones_like(ids)
    if pad_last:
        ids[-1, text - pad_last:] = 0
        mask[-1, text - pad_last:] = 0
    side = model.get_model().get_vision_tower().config.image_size
    dev = model.device
    return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev),
            "images": torch.randn(batch, 3, side, side, generator=generator).to(dev, model.dtype)}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def parity(args) -> dict:
    """Logits of the same weights and batch under two attention kernels (see the module docstring)."""
    a_name, b_name = args.kernels
    if "flash_attention_2" in args.kernels and (importlib.util.find_spec("flash_attn") is None
                                                or not torch.cuda.is_available()):
        print("parity: skipped, flash-attn is not installed here (pip install flash-attn on a CUDA machine)")
        return {"skipped": "flash-attn not installed"}
    dtype = torch.float32 if args.tiny else torch.bfloat16
    a = build_model(llm_layers=args.llm_layers, vision_layers=args.vision_layers, tiny=args.tiny, attn=a_name,
                    device=args.device, dtype=dtype).eval()
    b = build_model(llm_layers=args.llm_layers, vision_layers=args.vision_layers, tiny=args.tiny, attn=b_name,
                    device=args.device, dtype=dtype, seed=1).eval()
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(0)
    inputs = random_inputs(a, 2, args.text, g, pad_last=args.text // 4)
    with torch.no_grad():
        la, lb = a(**inputs).logits.float(), b(**inputs).logits.float()
        real = a.prepare_inputs_labels_for_multimodal(inputs["input_ids"], inputs["attention_mask"], None,
                                                      inputs["images"])[1].bool()
    la, lb = la[real], lb[real]
    res = {"kernels": [a_name, b_name], "positions": int(real.sum()),
           "rel_l2": float((la - lb).norm() / la.norm()), "max_abs_diff": float((la - lb).abs().max()),
           "max_abs_logit": float(la.abs().max()),
           "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).float().mean())}
    ok = res["rel_l2"] < args.tolerance
    print(f"parity {a_name} vs {b_name} ({'tiny' if args.tiny else '7B-shaped'}, {args.llm_layers or 'all'} LLM "
          f"layers, {'fp32' if args.tiny else 'bf16'}, {res['positions']} positions): rel. L2 error "
          f"{res['rel_l2']:.2e}, max |diff| {res['max_abs_diff']:.3g} (max |logit| {res['max_abs_logit']:.3g}), "
          f"top-1 agreement {res['top1_agreement']:.1%} -> {'OK' if ok else 'MISMATCH'} (tolerance {args.tolerance})")
    res["ok"] = ok
    return res


def _attention(requested: str | None) -> str:
    from stllava.train.model_setup import attn_implementation

    return attn_implementation(requested)


def generate_tokens_per_s(args) -> dict:
    """Greedy tokens/s of batched generation at each of ``--batches`` (see the module docstring)."""
    dtype = torch.float32 if args.tiny else torch.bfloat16
    attn = _attention(args.attn)
    model = build_model(llm_layers=args.llm_layers, vision_layers=args.vision_layers, tiny=args.tiny, attn=attn,
                        device=args.device, dtype=dtype).eval()
    model.config.use_cache = True
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batches:
        inputs = random_inputs(model, batch, args.text, g)
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0, eos_token_id=2)
        best = float("inf")
        with torch.no_grad():
            model.generate(inputs["input_ids"], images=inputs["images"], attention_mask=inputs["attention_mask"],
                           **dict(kw, max_new_tokens=2, min_new_tokens=2))  # warm-up
            for _ in range(args.repeats):
                _sync(args.device)
                t0 = time.perf_counter()
                out = model.generate(inputs["input_ids"], images=inputs["images"],
                                     attention_mask=inputs["attention_mask"], **kw)
                _sync(args.device)
                best = min(best, time.perf_counter() - t0)
        assert out.shape == (batch, args.new_tokens), out.shape
        rows.append({"batch": batch, "time_s": best, "tokens_per_s": batch * args.new_tokens / best})
        print(f"generate batch {batch:>3}: {rows[-1]['tokens_per_s']:9.1f} tokens/s ({best:.3f} s for "
              f"{args.new_tokens} new tokens per row)", flush=True)
    return {"attention": attn, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["parity", "generate"])
    ap.add_argument("--llm_layers", type=int, default=None, help="LLM layers (default: parity 4, generate 8)")
    ap.add_argument("--vision_layers", type=int, default=None, help="CLIP layers (default all)")
    ap.add_argument("--tiny", action="store_true", help="tiny widths (a CPU smoke run of the same code)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kernels", nargs=2, default=["sdpa", "flash_attention_2"], help="parity: the two kernels")
    ap.add_argument("--tolerance", type=float, default=0.05, help="parity: largest relative L2 error accepted")
    ap.add_argument("--attn", default=None, help="generate: kernel (default flash_attention_2 if installed, else sdpa)")
    ap.add_argument("--text", type=int, default=None, help="prompt tokens incl. <image> (default parity 1024, "
                    "generate 128; tiny: 64)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="generate: batch sizes")
    ap.add_argument("--new_tokens", type=int, default=128, help="generate: new tokens per row")
    ap.add_argument("--repeats", type=int, default=2, help="generate: timed runs per batch size (best kept)")
    ap.add_argument("--json", default=None, help="also write the result to this file")
    logs.add_log_level_arg(ap, default="WARNING")
    args = ap.parse_args(argv)
    logs.setup(args.log_level)
    if args.llm_layers is None:
        args.llm_layers = 2 if args.tiny else 4 if args.what == "parity" else 8
    if args.text is None:
        args.text = 64 if args.tiny else 1024 if args.what == "parity" else 128
    res = parity(args) if args.what == "parity" else generate_tokens_per_s(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())

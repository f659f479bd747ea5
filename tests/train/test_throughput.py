"""Throughput and MFU in the training logs: the FLOPs count against a hand count on the tiny model,
position counting, the meter's arithmetic, the peak table, and the keys in real SFT and DPO runs."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from stllava.constants import IMAGE_TOKEN_INDEX
from stllava.train.throughput import (
    PEAK_ENV,
    ModelFlops,
    ThroughputMeter,
    batch_positions,
    peak_flops,
    peak_flops_of_name,
)


def _tiny_trainable(bundle, lora: bool, vit_lora: bool):
    from stllava.model import LlavaLlamaForCausalLM
    from stllava.train.model_setup import make_trainable

    model = LlavaLlamaForCausalLM.from_pretrained(bundle["model"])
    return make_trainable(model, SimpleNamespace(
        lora_enable=lora, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_bias="none", vit_lora_enable=vit_lora,
        lora_r_vit=2, lora_alpha_vit=4, lora_dropout_vit=0.0))


# Hand count for the tiny bundle (stllava.model.tiny): LLM width 64, MLP 172, 2 layers, vocab 1000;
# CLIP width 64, MLP 128, 2 layers, 112 px / 14 → 64 patches + CLS = 65 positions, select layer -2
# (layer 0 gets gradients, layer 1 runs forward only); cluster projector D = H = 64, N = 64, 2 iterations.
LLM_FROZEN = 2 * (4 * 64 * 64 + 2 * 64 * 172 + 172 * 64) + 64 * 1000      # 162,816 (lm_head included)
LLM_LORA = 2 * (4 * 4 * (64 + 64) + 2 * 4 * (64 + 172) + 4 * (172 + 64))   # r 4 on q k v o gate up down: 9,760
VIT_FROZEN = 4 * 64 * 64 + 2 * 64 * 128                                     # per layer: 32,768
VIT_LORA = 4 * 2 * (64 + 64) + 2 * 2 * (64 + 128)                           # r 2 on q k v out fc1 fc2: 1,792
CONV = 2 * 3 * 14 * 14 * 64 * 64                                            # patch embedding on 64 patches
ATTN_VIT = 4 * 65 * 65 * 64                                                 # one layer, one image, forward
PROJ_FWD = 2 * 4 * 64 * 64 * 64 + 2 * 2 * 64 * 64 * 64 + 7 * 2 * 64 * 64 * 64  # v f mlp.0 mlp.2; c × 2 iters; 7 bmm


def test_flops_match_a_hand_count_on_the_tiny_model(tiny_bundle):
    flops = ModelFlops.of(_tiny_trainable(tiny_bundle, lora=True, vit_lora=True))
    assert flops.dense == 4 * LLM_FROZEN + 6 * LLM_LORA == 709_824
    assert flops.attention == 3 * 4 * 2 * 64 == 1536
    layer0 = 65 * (4 * VIT_FROZEN + 6 * VIT_LORA) + 3 * ATTN_VIT                 # backward through it
    layer1 = 65 * 2 * (VIT_FROZEN + VIT_LORA) + ATTN_VIT                         # forward only, LoRA included
    assert flops.image == CONV + layer0 + layer1 + 3 * PROJ_FWD == 43_301_888
    # the DPO reference: forward of the start weights (no LoRA)
    assert flops.ref_dense == 2 * LLM_FROZEN and flops.ref_attention == 512
    assert flops.ref_image == CONV + 2 * (65 * 2 * VIT_FROZEN + ATTN_VIT) + PROJ_FWD == 22_315_520

    # full LLM fine-tuning, frozen tower: the tower runs forward only, every LLM weight costs 6
    full = ModelFlops.of(_tiny_trainable(tiny_bundle, lora=False, vit_lora=False))
    assert full.dense == 6 * LLM_FROZEN
    assert full.image == CONV + 2 * (65 * 2 * VIT_FROZEN + ATTN_VIT) + 3 * PROJ_FWD


def test_step_flops_formula():
    f = ModelFlops(dense=10, attention=3, image=1000, ref_dense=2, ref_attention=1, ref_image=100)
    assert f.step([4, 5], images=2) == 10 * 9 + 3 * (16 + 25) + 1000 * 2
    assert f.step([4, 5], images=2, reference=True) == 2213 + 2 * 9 + 41 + 200


def test_batch_positions_counts_image_patches_and_both_dpo_sides():
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6, 7], [1, 8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert batch_positions({"input_ids": ids, "attention_mask": mask}, 576) == ([5 + 575, 3], 2, 1)
    dpo = {"chosen_input_ids": ids, "chosen_attention_mask": mask, "reject_input_ids": ids[:, :4],
           "reject_attention_mask": mask[:, :4]}
    assert batch_positions(dpo, 10) == ([14, 3, 13, 3], 2, 2)


def test_meter_reports_each_interval_and_mfu_only_with_a_peak():
    now = [100.0]
    f = ModelFlops(dense=1000, attention=0, image=0, ref_dense=0, ref_attention=0, ref_image=0)
    meter = ThroughputMeter(f, image_tokens=10, peak=2e6, clock=lambda: now[0])
    batch = {"input_ids": torch.tensor([[1, IMAGE_TOKEN_INDEX, 2]]), "attention_mask": torch.ones(1, 3)}
    meter.count(batch)            # the interval starts here: 12 positions
    now[0] = 102.0
    meter.count(batch)
    now[0] = 104.0                # 24 positions, 2 samples, 24,000 FLOPs in 4 s
    assert meter.report() == {"tokens_per_second": 6.0, "samples_per_second": 0.5, "mfu": 0.003}
    now[0] = 200.0                # the time until the next step (evaluation, saving) does not count
    meter.count(batch)
    now[0] = 203.0
    assert meter.report(reduce_sum=lambda v: [2 * x for x in v]) == {  # two processes
        "tokens_per_second": 8.0, "samples_per_second": round(2 / 3, 4), "mfu": 0.004}
    assert meter.report() == {}   # nothing counted since
    cpu = ThroughputMeter(f, image_tokens=10, peak=None, clock=lambda: now[0])
    cpu.count(batch)
    now[0] = 204.0
    assert set(cpu.report()) == {"tokens_per_second", "samples_per_second"}


def test_peak_table_and_override(monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_flops_of_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_of_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_of_name("NVIDIA L40S") == 362e12 and peak_flops_of_name("NVIDIA L4") == 121e12
    assert peak_flops_of_name("Some Other GPU") is None
    assert peak_flops("cpu") is None
    monkeypatch.setenv(PEAK_ENV, "50")
    assert peak_flops("cpu") == 50e12


def _logged(out):
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    return [e for e in state["log_history"] if "loss" in e]


def test_real_sft_run_logs_throughput(tiny_bundle, tmp_path, monkeypatch):
    """One step over all 6 records: tokens / samples must be their mean spliced length."""
    from transformers import CLIPImageProcessor

    from stllava.data.sft import LazySupervisedDataset
    from stllava.data.verify import load_records
    from stllava.model.builder import load_tokenizer
    from stllava.toys import write_colour_dataset
    from stllava.train.train_sft import run_sft

    monkeypatch.delenv(PEAK_ENV, raising=False)
    data, images = write_colour_dataset(str(tmp_path / "data"), n=4, n_text=2)
    out = str(tmp_path / "out")
    run_sft(["--model_name_or_path", tiny_bundle["model"], "--data_path", data, "--image_folder", images,
             "--output_dir", out, "--version", "v1", "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8",
             "--vit_lora_enable", "--lora_r_vit", "2", "--lora_alpha_vit", "4", "--model_max_length", "512",
             "--per_device_train_batch_size", "6", "--max_steps", "2", "--logging_steps", "1",
             "--report_to", "none", "--save_strategy", "no", "--dataloader_num_workers", "0",
             "--verify_workers", "1"])
    logged = _logged(out)
    assert len(logged) == 2
    for e in logged:
        assert e["tokens_per_second"] > 0 and e["samples_per_second"] > 0 and "mfu" not in e  # CPU: no peak
    tok = load_tokenizer(out, 512, training=True)
    ds = LazySupervisedDataset(load_records(data), tok, CLIPImageProcessor.from_pretrained(out), image_folder=images,
                               version="v1", sq_r=0.0)
    spliced = [len(ds[i]["input_ids"]) + 63 * int((ds[i]["input_ids"] == IMAGE_TOKEN_INDEX).sum())
               for i in range(6)]
    assert sum(spliced) > 4 * 64  # four images of 64 patches
    e = logged[0]
    assert e["tokens_per_second"] / e["samples_per_second"] == pytest.approx(sum(spliced) / 6, rel=1e-3)


def test_real_dpo_run_logs_throughput_and_mfu(tiny_bundle, tmp_path, monkeypatch):
    """One step over all 4 pairs (both sides of each, images spliced); a given peak gives mfu."""
    from stllava.toys import write_colour_preference_dataset
    from stllava.train.train_dpo import build_dpo_trainer

    monkeypatch.setenv(PEAK_ENV, "0.001")  # 1 GFLOP/s: the tiny model on this CPU
    data, images = write_colour_preference_dataset(str(tmp_path / "pairs"), n=4)
    trainer = build_dpo_trainer([
        "--model_name_or_path", tiny_bundle["model"], "--data_path", data, "--image_folder", images,
        "--output_dir", str(tmp_path / "out"), "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8",
        "--vit_lora_enable", "True", "--lora_r_vit", "2", "--lora_alpha_vit", "4", "--model_max_length", "512",
        "--per_device_train_batch_size", "4", "--max_steps", "2", "--logging_steps", "1", "--report_to", "none",
        "--save_strategy", "no", "--dataloader_num_workers", "0", "--verify_workers", "1"])
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 2 and all(e["mfu"] > 0 and "rewards/chosen" in e for e in logged)
    ds = trainer.train_dataset
    spliced = sum(len(ds[i][f"{side}_input_ids"]) + 63 for i in range(4) for side in ("chosen", "reject"))
    e = logged[0]
    assert e["tokens_per_second"] / e["samples_per_second"] == pytest.approx(spliced / 4, rel=1e-3)
    # mfu = FLOPs / s / peak: the FLOPs per pair follow from the model's count (reference pass included)
    flops = ModelFlops.of(trainer.model)
    lengths = [len(ds[i][f"{side}_input_ids"]) + 63 for i in range(4) for side in ("chosen", "reject")]
    per_pair = flops.step(lengths, images=8, reference=True) / 4
    assert e["mfu"] * 1e9 / e["samples_per_second"] == pytest.approx(per_pair, rel=2e-3)

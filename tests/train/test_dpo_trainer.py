"""LlavaDPOTrainer in-process (single CPU process, tiny model): the reference really is the start model.

- at step 0 the policy IS the start model, so every reference mode gives loss log 2 (sigmoid), the
  hand values of ipo / hinge, and the same reference log-probs;
- while the policy's projector, LLM LoRA and ViT-LoRA move, the reference log-probs of a fixed batch
  stay identical and equal those of an independently loaded start model — and the published
  code's reference (the policy's projector and tower) would have drifted;
- precomputed reference log-probs are cached, reused when the fingerprint matches, recomputed when not.
"""
import json
import math
import os

import pytest
import torch
from transformers import TrainerCallback

from stllava.toys import write_colour_preference_dataset
from stllava.train.dpo_trainer import check_adapter_reference, concatenated_batch, llava_base
from stllava.train.ref_cache import REF_CACHE_NAME
from stllava.train.train_dpo import build_dpo_trainer


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_colour_preference_dataset(str(tmp_path_factory.mktemp("pairs")), n=8)


def argv(bundle, pairs, out, *extra):
    data, images = pairs
    return ["--model_name_or_path", bundle["model"], "--data_path", data, "--image_folder", images,
            "--output_dir", str(out), "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16",
            "--vit_lora_enable", "True", "--lora_r_vit", "4", "--lora_alpha_vit", "8",
            "--learning_rate", "1e-2", "--mm_projector_lr", "1e-2", "--vision_tower_lr", "1e-2",
            "--model_max_length", "512", "--per_device_train_batch_size", "4", "--logging_steps", "1",
            "--report_to", "none", "--save_strategy", "no", "--seed", "0", "--dataloader_num_workers", "0",
            "--verify_workers", "1", *extra]


def fixed_batch(trainer, n=4):
    ds = trainer.train_dataset
    return concatenated_batch(trainer.data_collator([ds[i] for i in range(n)]), trainer.pad_token_id)


@pytest.mark.parametrize("loss_type,expected", [("sigmoid", math.log(2)), ("ipo", 25.0), ("hinge", 1.0)])
def test_every_reference_mode_gives_the_same_first_step_loss(tiny_bundle, pairs, tmp_path, loss_type, expected):
    """Step 0: z = 0, so sigmoid = log 2, ipo = (0 − 1/(2·0.1))² = 25, hinge = relu(1 − 0) = 1."""
    modes = {"adapter_disabled": [], "separate": ["--ref_model", "separate"],
             "precomputed": ["--precompute_ref_log_probs", "True"]}
    if loss_type != "sigmoid":
        modes.pop("precomputed")
    losses, refs = {}, {}
    for name, extra in modes.items():
        trainer = build_dpo_trainer(argv(tiny_bundle, pairs, tmp_path / name, "--dpo_loss_type", loss_type, *extra))
        assert trainer.ref_mode == ("separate" if name == "separate" else "adapter_disabled")
        if name == "precomputed":
            trainer.precompute_reference_logps()
            assert trainer.ref_projector is None and trainer.ref_cache is not None
        inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        trainer.model.train()
        losses[name] = float(trainer.compute_loss(trainer.model, inputs).detach())
        refs[name] = trainer._metrics["train"]["ref_logps/chosen"][-1]
        assert trainer._metrics["train"]["logps/chosen"][-1] == pytest.approx(refs[name], abs=1e-5)
    for name in losses:
        assert losses[name] == pytest.approx(expected, abs=1e-5), (name, losses)
        assert refs[name] == pytest.approx(refs["adapter_disabled"], abs=1e-5)
    if loss_type == "ipo":
        assert refs["adapter_disabled"] > -20  # ipo logs per-token means, not sums (a few tokens, ~ −7 each)


def test_robust_loss_and_label_smoothing_reach_the_loss(tiny_bundle, pairs, tmp_path, monkeypatch):
    """--dpo_loss_type robust --label_smoothing ε: the trainer computes robust DPO with that ε."""
    from stllava.train import dpo_trainer

    seen = []

    def spy(*args, **kwargs):
        seen.append(args[4:])
        return real(*args, **kwargs)

    real = dpo_trainer.dpo_loss
    monkeypatch.setattr(dpo_trainer, "dpo_loss", spy)
    trainer = build_dpo_trainer(argv(tiny_bundle, pairs, tmp_path / "robust", "--dpo_loss_type", "robust",
                                     "--label_smoothing", "0.2"))
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss = float(trainer.compute_loss(trainer.model, inputs).detach())
    assert seen == [(0.1, "robust", 0.2)]
    # step 0 (z = 0): ((1 − ε) log 2 − ε log 2) / (1 − 2ε) = log 2
    assert loss == pytest.approx(math.log(2), abs=1e-5)


class RecordReference(TrainerCallback):
    """At the start and after every step: the reference log-probs of a fixed batch, the projector
    and a ViT-LoRA B weight, and what the published code's reference (adapters off, the policy's
    projector) gives on the same batch."""

    def __init__(self, trainer, batch):
        self.trainer, self.batch, self.seen = trainer, batch, []

    def record(self):
        model = self.trainer.model
        base = llava_base(model)
        with torch.no_grad():
            ref = self.trainer.reference_logps(model, self.batch).clone()
            was = model.training
            model.eval()
            with model.disable_adapter():  # the published reference: start LLM, policy projector and tower
                published = self.trainer.forward_logps(model, self.batch)[0]
            model.train(was)
        tower = base.get_model().get_vision_tower().vision_tower
        vit_b = dict(tower.named_parameters())["base_model.model.encoder.layers.0.self_attn.q_proj.lora_B.default.weight"]
        self.seen.append({"ref": ref, "published": published,
                          "projector": base.get_model().mm_projector.mlp[0].weight.detach().clone(),
                          "vit_b": vit_b.detach().clone()})

    def on_train_begin(self, args, state, control, **kwargs):
        self.record()

    def on_step_end(self, args, state, control, **kwargs):
        self.record()


@pytest.mark.parametrize("mode", ["adapter_disabled", "separate"])
def test_reference_stays_the_start_model_while_the_policy_moves(tiny_bundle, pairs, tmp_path, mode):
    from stllava.model import LlavaLlamaForCausalLM

    trainer = build_dpo_trainer(argv(tiny_bundle, pairs, tmp_path, "--ref_model", mode, "--max_steps", "3"))
    batch = fixed_batch(trainer)
    probe = RecordReference(trainer, batch)
    trainer.add_callback(probe)
    trainer.train()
    first, seen = probe.seen[0], probe.seen
    assert len(seen) == 4
    for later in seen[1:]:
        assert torch.equal(later["ref"], first["ref"])  # bit for bit, at every step
    assert not torch.equal(seen[-1]["projector"], first["projector"])  # the policy's projector moved
    assert first["vit_b"].abs().max() == 0 and seen[-1]["vit_b"].abs().max() > 0  # and so did its ViT-LoRA
    # the published reference (policy projector + tower) drifts with training; ours does not
    assert torch.allclose(first["published"], first["ref"], atol=1e-5)
    assert (seen[-1]["published"] - first["ref"]).abs().max() > 1e-3
    # ... and ours is the start model itself, loaded afresh
    start = LlavaLlamaForCausalLM.from_pretrained(tiny_bundle["model"]).eval()
    with torch.no_grad():
        expected = trainer.forward_logps(start, batch)[0]
    assert torch.allclose(first["ref"], expected, atol=1e-4), (first["ref"], expected)
    # the DPO metrics were logged at every step
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 3 and all(k in e for e in logged for k in (
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected", "ref_logps/chosen", "ref_logps/rejected"))
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and logged[0]["rewards/margins"] == 0


def test_precomputed_cache_is_written_reused_and_invalidated(tiny_bundle, pairs, tmp_path):
    data, images = pairs
    out = tmp_path / "run"
    trainer = build_dpo_trainer(argv(tiny_bundle, pairs, out, "--precompute_ref_log_probs", "True"))
    live = trainer.reference_logps(trainer.model, fixed_batch(trainer, 8))
    trainer.precompute_reference_logps()
    cache = json.load(open(out / REF_CACHE_NAME))
    assert sorted(cache["ref_logps"], key=int) == [str(i) for i in range(8)]
    assert cache["settings"]["data_path"] == os.path.abspath(data)  # the fingerprint, in the marker form
    stored = torch.tensor([cache["ref_logps"][str(i)][0] for i in range(8)] + [cache["ref_logps"][str(i)][1] for i in range(8)])
    assert torch.allclose(stored, live, atol=1e-5)

    again = build_dpo_trainer(argv(tiny_bundle, pairs, out, "--precompute_ref_log_probs", "True"))
    assert again.ref_cache == trainer.ref_cache and again.ref_projector is None  # reused: no reference weights kept
    # another template (another fingerprint): recomputed, not reused
    other = build_dpo_trainer(argv(tiny_bundle, pairs, out, "--precompute_ref_log_probs", "True",
                                   "--version", "llava_v1"))
    assert other.ref_cache is None and other.ref_projector is not None
    with pytest.raises(RuntimeError, match="released"):
        trainer.reference_logps(trainer.model, fixed_batch(trainer, 1))


def test_adapter_disabled_needs_lora_only_training(tiny_bundle, pairs, tmp_path):
    from stllava.model import LlavaLlamaForCausalLM

    with pytest.raises(ValueError, match="needs --lora_enable"):
        build_dpo_trainer(argv(tiny_bundle, pairs, tmp_path, "--lora_enable", "False", "--ref_model",
                               "adapter_disabled"))
    lora = build_dpo_trainer(argv(tiny_bundle, pairs, tmp_path))
    check_adapter_reference(lora.model)  # LoRA + projector only: fine
    llava_base(lora.model).lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"other than LoRA and the projector train \(\['base_model.model.lm_head"):
        check_adapter_reference(lora.model)
    with pytest.raises(ValueError, match="needs a LoRA run"):
        check_adapter_reference(LlavaLlamaForCausalLM.from_pretrained(tiny_bundle["model"]))
    full = build_dpo_trainer(argv(tiny_bundle, pairs, tmp_path, "--lora_enable", "False"))
    assert full.ref_mode == "separate" and full.ref_model is not None  # the default without LoRA


def test_rpo_alpha_adds_the_chosen_answers_nll(tiny_bundle, pairs, tmp_path):
    """loss = DPO + α · mean over pairs of (−log p(chosen answer) / its tokens); at step 0 DPO = log 2."""
    trainer = build_dpo_trainer(argv(tiny_bundle, pairs, tmp_path / "rpo", "--rpo_alpha", "0.5"))
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    loss = float(trainer.compute_loss(trainer.model, inputs).detach())
    with torch.no_grad():
        sums, counts = trainer.forward_logps(trainer.model, concatenated_batch(inputs, trainer.pad_token_id))
    nll = -sum(float(sums[i]) / int(counts[i]) for i in range(4)) / 4
    assert nll > 0 and loss == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-5)
    assert trainer._metrics["train"]["nll_loss"] == [pytest.approx(nll, rel=1e-5)]
    plain = build_dpo_trainer(argv(tiny_bundle, pairs, tmp_path / "dpo"))
    plain.model.train()
    assert float(plain.compute_loss(plain.model, inputs).detach()) == pytest.approx(math.log(2), abs=1e-5)
    assert "nll_loss" not in plain._metrics["train"]

"""Stage-3 DPO end to end on CPU: from a stage-1 LoRA checkpoint, 2-process DeepSpeed ZeRO-3, dpo_finetune.sh;
the DPO checkpoints load with the builder and chat."""
import json
import math
import os
import shutil
import sys
import textwrap

import pytest
import ranks
import torch

from stllava.model.builder import load_pretrained_model
from stllava.toys import write_colour_preference_dataset
from stllava.train.train_dpo import START_DIR, run_dpo

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "ref_logps/chosen", "ref_logps/rejected")


@pytest.fixture(scope="module")
def setup(tiny_bundle, tmp_path_factory):
    """The colour preference pairs and a stage-1 LoRA-layout checkpoint (LLM LoRA, ViT-LoRA and
    projector moved off their start) over the tiny bundle."""
    from checkpoint_factory import save_lora_layout, trained_lora_model

    root = tmp_path_factory.mktemp("dpo_e2e")
    data, images = write_colour_preference_dataset(str(root / "pairs"), n=16)
    lora = save_lora_layout(trained_lora_model(tiny_bundle["model"], seed=1), str(root / "stage1"), tiny_bundle["model"])
    return {**tiny_bundle, "data": data, "images": images, "stage1": lora}


def common(s, out, *extra):
    return ["--data_path", s["data"], "--image_folder", s["images"], "--output_dir", str(out),
            "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--vit_lora_enable",
            "--lora_r_vit", "4", "--lora_alpha_vit", "8", "--learning_rate", "1e-2", "--mm_projector_lr", "5e-3",
            "--vision_tower_lr", "5e-3", "--model_max_length", "512", "--logging_steps", "1", "--report_to", "none",
            "--seed", "3", "--dataloader_num_workers", "0", "--verify_workers", "1", *extra]


def train_logs(out):
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    return [e for e in state["log_history"] if "loss" in e]


def pair_margins(model, tok, proc, s):
    """log p(chosen) − log p(rejected) of every pair under ``model`` (a loaded, merged model)."""
    from stllava.data.preference import DataCollatorForPreferenceDataset, LazyPreferenceDataset
    from stllava.data.verify import load_records
    from stllava.train.dpo_loss import answer_logps
    from stllava.train.dpo_trainer import concatenated_batch, forward_with_labels, llava_base

    ds = LazyPreferenceDataset(load_records(s["data"]), tok, proc, image_folder=s["images"])
    batch = concatenated_batch(DataCollatorForPreferenceDataset(tok.pad_token_id, 512, 64)([ds[i] for i in range(len(ds))]))
    with torch.no_grad():
        logps = answer_logps(*forward_with_labels(llava_base(model), batch))[0]
    return logps[:len(ds)] - logps[len(ds):]


def chat(folder, base):
    from checkpoint_factory import ASSET_IMAGE
    from PIL import Image

    from stllava.serve.cli import ChatSession

    tok, model, proc, _ = load_pretrained_model(folder, model_base=base, device="cpu")
    answer = ChatSession(model, tok, proc, Image.open(ASSET_IMAGE), "v1", temperature=0.0,
                         max_new_tokens=6).ask("What colour is the image?", None)
    assert answer.strip(), answer
    return tok, model, proc


def test_dpo_from_a_stage1_lora_checkpoint_learns_and_its_checkpoint_chats(setup, tmp_path):
    s, out = setup, tmp_path / "dpo"
    run_dpo(common(s, out, "--model_name_or_path", s["stage1"], "--model_base", s["model"], "--num_train_epochs", "4",
                   "--per_device_train_batch_size", "8", "--save_strategy", "steps", "--save_steps", "4"))
    # the merged stage-1 model was written once and is what the builder makes of the stage-1 folder
    start = out / START_DIR
    tok, merged, proc, _ = load_pretrained_model(s["stage1"], model_base=s["model"], device="cpu")
    _, start_model, _, _ = load_pretrained_model(str(start), device="cpu")
    for a, b in zip(merged.state_dict().values(), start_model.state_dict().values()):
        assert torch.equal(a, b)

    logs = train_logs(str(out))
    assert len(logs) == 8 and all(k in e for e in logs for k in METRICS)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and logs[0]["rewards/accuracies"] == 0
    assert logs[-1]["rewards/accuracies"] == 1.0 and logs[-1]["rewards/margins"] > 2.0 > logs[1]["rewards/margins"]
    assert logs[-1]["loss"] < 0.2 * logs[0]["loss"]

    for d in (out, out / "checkpoint-4"):
        assert {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin", "Vit-lora",
                "config.json", "preprocessor_config.json", "tokenizer_config.json"} <= set(os.listdir(d)), d
    cfg = json.load(open(out / "config.json"))
    assert cfg["dpo_start_model"] == str(start.resolve()) and cfg["model_type"] == "llava_llama"
    for d in (out, out / "checkpoint-4"):  # the DPO template (--version, default v1) in every checkpoint
        assert json.load(open(d / "config.json"))["conv_mode"] == "v1", d

    # loads with the builder (base: the start model), chats, and prefers every chosen answer more than the start did
    _, dpo, _ = chat(str(out), str(start))
    gain = pair_margins(dpo, tok, proc, s) - pair_margins(start_model, tok, proc, s)
    assert (gain > 0).all(), gain


def test_resume_matches_uninterrupted_run(setup, tmp_path):
    """A DPO run resumed from checkpoint-3 logs, at steps 4-8, the losses and DPO metrics of the run
    that was never interrupted: LoRA, ViT-LoRA, projector, optimizer, scheduler and RNG come back,
    and the reference is still the start model (not the restored policy)."""
    from safetensors.torch import load_file

    s = setup
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["--model_name_or_path", s["model"], "--num_train_epochs", "2", "--per_device_train_batch_size", "4",
            "--save_strategy", "steps", "--save_steps", "3", "--lr_scheduler_type", "cosine"]
    run_dpo(common(s, full, *args))
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    run_dpo(common(s, resumed, *args, "--resume_from_checkpoint", str(resumed / "checkpoint-3")))
    a = {e["step"]: e for e in train_logs(str(full))}
    b = {e["step"]: e for e in train_logs(str(resumed))}
    assert sorted(a) == list(range(1, 9)) and sorted(b) == sorted(a)
    for key in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected", "ref_logps/chosen"):
        assert [b[k][key] for k in range(4, 9)] == pytest.approx([a[k][key] for k in range(4, 9)], rel=1e-6), key
    assert a[8]["rewards/margins"] > a[4]["rewards/margins"]  # the steps after the resume did train
    # LoRA B starts at zero and is not zero at step 3: a resume that failed to restore it would differ
    ckpt = load_file(str(full / "checkpoint-3" / "adapter_model.safetensors"))
    assert ckpt["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().max() > 0


ZERO3_DRIVER = textwrap.dedent('''
    """One rank of a 2-process ZeRO-3 DPO run; rank 0 writes what the fixed-batch probe saw to probe.json."""
    import json, os, sys
    import torch
    from transformers import TrainerCallback
    from stllava.train.checkpoint import gather_state_dict
    from stllava.train.dpo_trainer import concatenated_batch, llava_base
    from stllava.train.train_dpo import build_dpo_trainer, train_and_save

    trainer = build_dpo_trainer(sys.argv[1:])
    ds = trainer.train_dataset
    batch = concatenated_batch(trainer.data_collator([ds[i] for i in range(4)]), trainer.pad_token_id)

    class Probe(TrainerCallback):
        seen = []

        def record(self):
            model = trainer.model_wrapped
            with torch.no_grad():
                ref = trainer.reference_logps(model, trainer._prepare_inputs(batch)).float().cpu().tolist()
            proj = gather_state_dict(llava_base(model).get_model().mm_projector.named_parameters())
            self.seen.append({"ref": ref, "projector": float(sum(v.float().abs().sum() for v in proj.values()))})

        def on_train_begin(self, args, state, control, **kw):
            self.record()

        def on_step_end(self, args, state, control, **kw):
            self.record()

    trainer.add_callback(Probe())
    out = train_and_save(trainer)
    if trainer.args.process_index == 0:
        json.dump({"seen": Probe.seen, "ref_mode": trainer.ref_mode}, open(os.path.join(out, "probe.json"), "w"))
''')


@pytest.mark.slow
def test_deepspeed_zero3_two_processes(setup, tmp_path, shm_comm_op):
    """Full-folder start, bf16, ZeRO-3 over 2 CPU processes: the reference of a fixed batch does not
    move while the (gathered) projector does; reward accuracy and margin rise; the separate
    reference (its own ZeRO-3 engine) gives the same first step; the checkpoint loads and chats."""
    s = setup
    driver = tmp_path / "driver.py"
    driver.write_text(ZERO3_DRIVER)
    args = ["--model_name_or_path", s["model"], "--deepspeed", os.path.join(REPO, "scripts", "zero3.json"),
            "--bf16", "True", "--gradient_checkpointing", "True", "--per_device_train_batch_size", "4"]
    a_out, b_out = tmp_path / "a", tmp_path / "b"
    ranks.torchrun(str(driver), common(s, a_out, *args, "--max_steps", "4", "--save_strategy", "steps",
                                      "--save_steps", "2"), env=ENV)
    probe = json.load(open(a_out / "probe.json"))
    assert probe["ref_mode"] == "adapter_disabled" and len(probe["seen"]) == 5
    first = probe["seen"][0]
    assert all(p["ref"] == first["ref"] for p in probe["seen"])  # identical at every step
    assert abs(probe["seen"][-1]["projector"] - first["projector"]) > 1e-3 * first["projector"]
    la = train_logs(str(a_out))
    assert len(la) == 4 and la[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert la[0]["rewards/accuracies"] == 0 and la[-1]["rewards/accuracies"] == 1.0
    assert la[-1]["rewards/margins"] > la[1]["rewards/margins"] > 0
    assert os.path.isdir(a_out / "checkpoint-2" / "global_step2")
    non_lora = torch.load(a_out / "non_lora_trainables.bin", weights_only=True)
    assert non_lora and all(v.numel() > 0 and v.dtype == torch.bfloat16 for v in non_lora.values())  # gathered
    chat(str(a_out), s["model"])

    ranks.torchrun(str(driver), common(s, b_out, *args, "--max_steps", "1", "--save_strategy", "no",
                                       "--ref_model", "separate"), env=ENV)
    probe_b = json.load(open(b_out / "probe.json"))
    lb = train_logs(str(b_out))
    assert probe_b["ref_mode"] == "separate" and probe_b["seen"][0]["ref"] == pytest.approx(first["ref"], rel=1e-3)
    assert lb[0]["loss"] == pytest.approx(la[0]["loss"], abs=1e-6)
    assert lb[0]["ref_logps/chosen"] == pytest.approx(la[0]["ref_logps/chosen"], rel=1e-3)


@pytest.mark.slow
def test_dpo_finetune_sh_runs_with_overrides(setup, tmp_path, shm_comm_op):
    s, out = setup, tmp_path / "sh"
    env = {**ENV, "LAUNCHER": "torchrun", "NUM_GPUS": "1", "PYTHON": sys.executable, "MODEL": s["stage1"],
           "MODEL_BASE": s["model"], "DATA": s["data"], "IMAGES": s["images"], "OUT": str(out), "BATCH": "2",
           "ACCUM": "2", "MAX_LEN": "512", "SAVE_STEPS": "2", "WORKERS": "0", "REPORT_TO": "none",
           "PRECOMPUTE": "True", "EXTRA": "--max_steps 3 --lora_r 8 --lora_alpha 16 --lora_r_vit 4"}
    proc = ranks.run(["bash", os.path.join(REPO, "dpo_finetune.sh")], cwd=str(tmp_path), env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    logs = train_logs(str(out))
    assert len(logs) == 3 and logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert {"adapter_model.safetensors", "non_lora_trainables.bin", "Vit-lora", "config.json", "checkpoint-2",
            START_DIR, "ref_log_probs.json"} <= set(os.listdir(out))
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert (args.learning_rate, args.vision_tower_lr, args.mm_projector_lr, args.dpo_beta, args.lora_dropout_vit,
            args.ref_model, args.num_train_epochs) == (5e-6, 2e-5, 2e-5, 0.1, 0.1, "adapter_disabled", 1)
    assert "--tf32 ignored" in proc.stderr


def test_start_model_is_merged_once_reused_by_its_marker_and_replaced_when_stale(tmp_path, monkeypatch, caplog):
    """The merged start model's marker (stllava.artifacts): same sources → reused, also from a
    marker written before that module (the bare sources object); other sources or a folder left
    without a marker by a killed merge → merged again, the log naming why."""
    import logging
    from types import SimpleNamespace

    from stllava.model import checkpoint_layouts, merge
    from stllava.train.train_dpo import START_MARKER, materialize_start_model

    merges = []

    def fake_merge(model_path, model_base, target, dtype):
        merges.append(dtype)
        os.makedirs(target)
        open(os.path.join(target, "config.json"), "w").write("{}")

    monkeypatch.setattr(checkpoint_layouts, "detect_layout", lambda *a: SimpleNamespace(kind="lora", vit_lora=True))
    monkeypatch.setattr(merge, "merge_checkpoint", fake_merge)
    stage1, base, out = str(tmp_path / "stage1"), str(tmp_path / "base"), str(tmp_path / "out")
    target = materialize_start_model(stage1, base, out, torch.float32)
    marker = os.path.join(target, START_MARKER)
    source = {"dtype": "torch.float32", "model_base": base, "model_name_or_path": stage1}
    assert json.load(open(marker)) == {"settings": source} and merges == [torch.float32]
    with caplog.at_level(logging.INFO, logger="stllava.train.train_dpo"):
        assert materialize_start_model(stage1, base, out, torch.float32) == target and len(merges) == 1
        json.dump(source, open(marker, "w"), indent=1)  # the marker as written before stllava.artifacts
        assert materialize_start_model(stage1, base, out, torch.float32) == target and len(merges) == 1
        assert caplog.text.count("reusing the merged start model") == 2
        materialize_start_model(stage1, base, out, torch.bfloat16)
        assert merges[-1] == torch.bfloat16
        assert "made with other settings (recorded → this run: dtype: 'torch.float32' → 'torch.bfloat16')" in caplog.text
        os.remove(marker)  # a merge killed before its marker was written
        materialize_start_model(stage1, base, out, torch.bfloat16)
        assert len(merges) == 3 and "no marker: an unfinished merge" in caplog.text
    assert json.load(open(marker))["settings"]["dtype"] == "torch.bfloat16"

"""Stage-1 SFT end to end on CPU: learning, checkpoints, resume, 2-process DeepSpeed ZeRO-3, sqllava_med.sh."""
import json
import os
import shutil
import sys

import pytest
import ranks
import torch
from safetensors.torch import load_file

from stllava.train.train_sft import run_sft

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
PROJ = "base_model.model.model.mm_projector."


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """A tiny bundle whose LM head can express confident predictions (init range 0.2; at the default
    0.02 a frozen random head caps the loss near 6), the colour task, and the projector alone."""
    from stllava.model.tiny import build_tiny_bundle
    from stllava.toys import write_colour_dataset

    root = tmp_path_factory.mktemp("learnable")
    paths = build_tiny_bundle(str(root / "bundle"), seed=0, llm={"initializer_range": 0.2})
    data, images = write_colour_dataset(str(root / "data"), n=16, n_text=4)
    sd = load_file(os.path.join(paths["model"], "model.safetensors"))
    projector = {k: v for k, v in sd.items() if "mm_projector" in k}
    torch.save(projector, str(root / "mm_projector.bin"))
    return {**paths, "data": data, "images": images, "projector": str(root / "mm_projector.bin"),
            "projector_sd": projector}


def losses(out):
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def common(b, out, *extra):
    return ["--model_name_or_path", b["model"], "--vision_tower", b["vision_tower"], "--data_path", b["data"],
            "--image_folder", b["images"], "--output_dir", out, "--version", "v1_sq", "--sq_r", "0.5",
            "--lora_enable", "True", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.05",
            "--vit_lora_enable", "--lora_r_vit", "4", "--lora_alpha_vit", "8", "--learning_rate", "1e-2",
            "--mm_projector_lr", "5e-3", "--vision_tower_lr", "5e-3", "--model_max_length", "512",
            "--logging_steps", "1", "--report_to", "none", "--save_strategy", "steps", "--seed", "3", *extra]


def test_sft_learns_the_colour_task(learnable, tmp_path):
    out = str(tmp_path / "out")
    run_sft(common(learnable, out, "--num_train_epochs", "5", "--per_device_train_batch_size", "8",
                   "--save_steps", "6", "--gradient_checkpointing", "True", "--group_by_modality_length", "True",
                   "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.1"))
    loss = losses(out)
    steps = sorted(loss)
    assert len(steps) == 15 and loss[1] > 5.0
    assert sum(loss[s] for s in steps[-3:]) / 3 < 0.25 * loss[1], loss

    for d in (out, os.path.join(out, "checkpoint-6")):
        for f in ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin", "config.json",
                  "Vit-lora/adapter_config.json", "Vit-lora/adapter_model.safetensors", "tokenizer_config.json",
                  "preprocessor_config.json"):
            assert os.path.isfile(os.path.join(d, f)), (d, f)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "llava_llama" and cfg["mm_projector_type"] == "cluster" and cfg["use_cache"]
    # every checkpoint knows the template it was trained with (--version): the tools' default
    for d in (out, os.path.join(out, "checkpoint-6")):
        assert json.load(open(os.path.join(d, "config.json")))["conv_mode"] == "v1_sq", d
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert len(adapter) == 2 * 7 * 2 and all("vision_tower" not in k for k in adapter)
    non_lora = torch.load(os.path.join(out, "non_lora_trainables.bin"), weights_only=True)
    assert sorted(non_lora) == sorted(PROJ + k.split("mm_projector.")[1] for k in learnable["projector_sd"])
    init = {PROJ + k.split("mm_projector.")[1]: v for k, v in learnable["projector_sd"].items()}
    assert not torch.equal(non_lora[PROJ + "c.weight"], init[PROJ + "c.weight"])  # the projector trained
    vit = load_file(os.path.join(out, "Vit-lora", "adapter_model.safetensors"))
    assert vit["base_model.model.encoder.layers.0.self_attn.q_proj.lora_B.weight"].abs().max() > 0  # was zero

    # The trained model answers from the image: each picture's own colour is the likelier answer.
    from types import SimpleNamespace

    from transformers import CLIPImageProcessor

    from stllava.data.sft import LazySupervisedDataset
    from stllava.data.verify import load_records
    from stllava.model import LlavaLlamaForCausalLM
    from stllava.model.builder import load_tokenizer
    from stllava.train.checkpoint import load_llava_trainables
    from stllava.train.model_setup import make_trainable

    model = LlavaLlamaForCausalLM.from_pretrained(learnable["model"])
    model = make_trainable(model, SimpleNamespace(lora_enable=True, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                                                  lora_bias="none", vit_lora_enable=True, lora_r_vit=4,
                                                  lora_alpha_vit=8, lora_dropout_vit=0.0))
    load_llava_trainables(model, out)
    model.eval()
    tok = load_tokenizer(out, 512, training=True)
    ds = LazySupervisedDataset(load_records(learnable["data"]), tok, CLIPImageProcessor.from_pretrained(out),
                               image_folder=learnable["images"], version="v1_sq", sq_r=0.0)
    with torch.no_grad():
        for i, j in ((0, 1), (1, 0), (2, 3)):  # toy records alternate blue, red
            item, other = ds[i], ds[j]
            kw = dict(input_ids=item["input_ids"][None], labels=item["labels"][None])
            own = model(images=item["image"][None], **kw).loss
            swapped = model(images=other["image"][None], **kw).loss
            assert own < swapped, (i, float(own), float(swapped))


def test_resume_matches_uninterrupted_run(learnable, tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    args = ["--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--save_steps", "3",
            "--group_by_modality_length", "True", "--lr_scheduler_type", "cosine"]
    run_sft(common(learnable, full, *args))
    shutil.copytree(os.path.join(full, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    run_sft(common(learnable, resumed, *args, "--resume_from_checkpoint", os.path.join(resumed, "checkpoint-3")))
    a, b = losses(full), losses(resumed)
    assert sorted(a) == list(range(1, 11)) and sorted(b) == sorted(a)
    assert [b[s] for s in range(4, 11)] == pytest.approx([a[s] for s in range(4, 11)], rel=1e-6)
    # LoRA B starts at zero and is not zero at step 3: a resume that failed to restore it would differ
    ckpt = load_file(os.path.join(full, "checkpoint-3", "adapter_model.safetensors"))
    assert ckpt["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().max() > 0


@pytest.mark.slow
def test_deepspeed_zero3_two_processes_and_resume(learnable, tmp_path, shm_comm_op):
    """Plain LLaMA + --vision_tower + --pretrain_mm_mlp_adapter, bf16, ZeRO-3 over 2 CPU processes."""
    b = {**learnable, "model": learnable["llm"]}
    a_out, b_out = str(tmp_path / "a"), str(tmp_path / "b")
    args = ["--deepspeed", os.path.join(REPO, "scripts", "zero3.json"), "--bf16", "True",
            "--pretrain_mm_mlp_adapter", learnable["projector"], "--gradient_checkpointing", "True",
            "--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--save_steps", "3"]
    ranks.torchrun("stllava/train/train_sft.py", common(b, a_out, *args), env=ENV, timeout=900)
    la = losses(a_out)
    assert sorted(la) == [1, 2, 3, 4, 5] and all(v == v and 0 < v < 20 for v in la.values())
    assert os.path.isdir(os.path.join(a_out, "checkpoint-3", "global_step3"))

    # gathered weights, not empty ZeRO-3 shards
    shapes = {PROJ + k.split("mm_projector.")[1]: tuple(v.shape) for k, v in learnable["projector_sd"].items()}
    for d in (a_out, os.path.join(a_out, "checkpoint-3")):
        non_lora = torch.load(os.path.join(d, "non_lora_trainables.bin"), weights_only=True)
        assert {k: tuple(v.shape) for k, v in non_lora.items()} == shapes
        assert all(v.dtype == torch.bfloat16 for v in non_lora.values())
        adapter = load_file(os.path.join(d, "adapter_model.safetensors"))
        assert adapter["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (16, 172)
        assert adapter["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 16)
        vit = load_file(os.path.join(d, "Vit-lora", "adapter_model.safetensors"))
        assert vit["base_model.model.encoder.layers.0.mlp.fc1.lora_A.weight"].shape == (4, 64)
        assert vit["base_model.model.encoder.layers.0.mlp.fc1.lora_B.weight"].abs().max() > 0
        assert json.load(open(os.path.join(d, "config.json")))["mm_hidden_size"] == 64
    assert not torch.equal(non_lora[PROJ + "c.weight"], learnable["projector_sd"]["model.mm_projector.c.weight"].to(torch.bfloat16))

    shutil.copytree(os.path.join(a_out, "checkpoint-3"), os.path.join(b_out, "checkpoint-3"))
    ranks.torchrun("stllava/train/train_sft.py",
                   common(b, b_out, *args, "--resume_from_checkpoint", os.path.join(b_out, "checkpoint-3")),
                   env=ENV, timeout=900)
    lb = losses(b_out)
    assert [lb[4], lb[5]] == pytest.approx([la[4], la[5]], rel=1e-5)  # (it passed the manifest check)

    # A file planted in the checkpoint would run its payload inside DeepSpeed's torch.load: refused.
    import pickle

    c_out, marker = str(tmp_path / "c"), tmp_path / "payload_ran"
    shutil.copytree(os.path.join(a_out, "checkpoint-3"), os.path.join(c_out, "checkpoint-3"))
    planted = os.path.join(c_out, "checkpoint-3", "global_step3", "zero_pp_rank_1_mp_rank_00_model_states.pt")
    with open(planted, "wb") as f:
        f.write(pickle.dumps(_Payload(str(marker))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "stllava/train/train_sft.py", *common(b, c_out, *args, "--resume_from_checkpoint",
                                                 os.path.join(c_out, "checkpoint-3"))]
    proc = ranks.run(cmd, cwd=REPO, env=ENV, timeout=900)
    assert proc.returncode != 0 and not marker.exists()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: refusing to resume")]
    assert len(errors) == 1 and f"{planted} changed since the checkpoint was saved" in errors[0], proc.stderr[-3000:]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_sqllava_med_sh_runs_with_overrides(learnable, tmp_path, shm_comm_op):
    out = str(tmp_path / "sh")
    env = {**ENV, "LAUNCHER": "torchrun", "NUM_GPUS": "1", "PYTHON": sys.executable, "MODEL": learnable["model"],
           "VISION_TOWER": learnable["vision_tower"], "PROJECTOR": learnable["projector"], "DATA": learnable["data"],
           "IMAGES": learnable["images"], "OUT": out, "EPOCHS": "1", "BATCH": "2", "ACCUM": "2", "MAX_LEN": "512",
           "SAVE_STEPS": "2", "WORKERS": "0", "REPORT_TO": "none", "EXTRA": "--max_steps 3"}
    proc = ranks.run(["bash", os.path.join(REPO, "sqllava_med.sh")], cwd=str(tmp_path), env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert sorted(losses(out)) == [1, 2, 3]
    for d in (out, os.path.join(out, "checkpoint-2")):
        assert {"adapter_model.safetensors", "non_lora_trainables.bin", "Vit-lora", "config.json",
                "preprocessor_config.json"} <= set(os.listdir(d))
    assert "--tf32 ignored" in proc.stderr

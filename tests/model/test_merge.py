"""``stllava.model.merge`` (and its wrapper ``scripts/merge_lora_weights.py``): a LoRA checkpoint (+ Vit-lora) becomes one full folder that
loads with ``model_base=None`` and behaves exactly like the unmerged model."""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from checkpoint_factory import (
    greedy,
    legacy_clip_folder,
    legacy_full_folder,
    logits_of,
    sample_inputs,
    save_lora_layout,
    save_released_lora_layout,
    trained_lora_model,
)

from stllava.model.builder import load_pretrained_model
from stllava.model.checkpoint_layouts import detect_layout

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "merge_lora_weights.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("merge_lora_weights", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


merge_script = _load_script()


@pytest.fixture(scope="module")
def trained(tiny_bundle):
    return trained_lora_model(tiny_bundle["model"], seed=11)


@pytest.fixture(scope="module")
def inputs(tiny_bundle):
    tok, model, proc, _ = load_pretrained_model(tiny_bundle["model"], device="cpu")
    return sample_inputs(tok, proc, model.config, "Describe the image.")


@torch.no_grad()
def sampled(model, ids, px, seed=0, n=16):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    torch.manual_seed(seed)
    return base.generate(ids, images=px, max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0,
                         top_k=0, top_p=1.0)[0].tolist()


def test_merge_lora_folder(trained, tiny_bundle, inputs, tmp_path, capsys):
    ids, px = inputs
    lora = save_lora_layout(trained, str(tmp_path / "lora"), tiny_bundle["model"])
    cfg = json.load(open(os.path.join(lora, "config.json")))
    json.dump({**cfg, "conv_mode": "v1_sq"}, open(os.path.join(lora, "config.json"), "w"))  # as training records it
    out = tmp_path / "merged"
    merge_script.main(["--model-path", lora, "--model-base", tiny_bundle["llm"], "--save-model-path", str(out),
                       "--dtype", "float32"])
    assert "merged" in capsys.readouterr().out
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json",
            "tokenizer.model"} <= files  # the SentencePiece model too: the folder is self-contained
    assert json.load(open(out / "config.json"))["conv_mode"] == "v1_sq"  # the template survives the merge
    assert not files & {"adapter_config.json", "non_lora_trainables.bin", "Vit-lora", "mm_projector.bin"}
    assert detect_layout(str(out)).kind == "full"

    _, merged, _, _ = load_pretrained_model(str(out), model_base=None, device="cpu")
    _, unmerged_loaded, _, _ = load_pretrained_model(lora, model_base=tiny_bundle["model"], device="cpu")
    assert merged.config.model_type == "llava_llama" and merged.config.mm_vision_config
    assert (logits_of(merged, ids, px) - logits_of(trained, ids, px)).abs().max() < 1e-5
    # Merged and unmerged (the in-memory PEFT model) generate the same tokens, greedy and sampled.
    want_greedy, want_sampled = greedy(trained, ids, px, 16), sampled(trained, ids, px)
    assert len(set(want_sampled)) > 3  # sampling gives a varied sequence: a real comparison
    for model in (merged, unmerged_loaded):
        assert greedy(model, ids, px, 16) == want_greedy
        assert sampled(model, ids, px) == want_sampled


def test_merge_released_layout_with_explicit_vit_lora(trained, tiny_bundle, inputs, tmp_path):
    ids, px = inputs
    clip = legacy_clip_folder(tiny_bundle["vision_tower"], str(tmp_path / "clip"))
    base = legacy_full_folder(tiny_bundle["model"], str(tmp_path / "base"), clip)
    lora = save_released_lora_layout(trained, str(tmp_path / "stllava-med-lora"), clip)
    vit = shutil.move(os.path.join(lora, "Vit-lora"), tmp_path / "Vit-lora")
    out = merge_script.merge(lora, base, str(tmp_path / "merged"), vit_lora=str(vit), dtype="float32")
    tok, merged, _, _ = load_pretrained_model(out, device="cpu")
    assert (logits_of(merged, ids, px) - logits_of(trained, ids, px)).abs().max() < 1e-5
    assert greedy(merged, ids, px, 12) == greedy(trained, ids, px, 12)


def test_merge_fp16_output(trained, tiny_bundle, tmp_path):
    lora = save_lora_layout(trained, str(tmp_path / "lora"), tiny_bundle["model"])
    out = merge_script.merge(lora, tiny_bundle["model"], str(tmp_path / "merged"))  # default float16
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_merge_refuses_to_overwrite(trained, tiny_bundle, tmp_path):
    lora = save_lora_layout(trained, str(tmp_path / "lora"), tiny_bundle["model"])
    with pytest.raises(ValueError, match="is an input folder"):
        merge_script.merge(lora, tiny_bundle["model"], lora)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        merge_script.merge(lora, tiny_bundle["model"], str(tmp_path / "busy"))


def test_merge_cli_refuses_a_non_empty_folder_in_one_line(tiny_bundle, tmp_path):
    """``python -m stllava.model.merge`` and the script: one error line, exit code 2, no traceback,
    nothing loaded or written."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for cmd in (["-m", "stllava.model.merge"], [str(SCRIPT)]):
        proc = subprocess.run([sys.executable, *cmd, "--model-path", tiny_bundle["model"], "--save-model-path",
                               str(busy)], capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr == (f"error: --save-model-path {busy} exists and is not empty; choose a new folder "
                               "(or delete it first)\n"), cmd
        assert os.listdir(busy) == ["x.txt"]

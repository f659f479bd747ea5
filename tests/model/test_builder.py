"""``load_pretrained_model`` on every checkpoint layout: the loaded (merged) model must compute the
same logits as the in-memory model that was saved (fp32, within 1e-5)."""
import json
import logging
import os
import pickle
import shutil

import pytest
import torch
from checkpoint_factory import (
    TOKENIZER_FILES,
    copy_files,
    greedy,
    legacy_clip_folder,
    legacy_full_folder,
    logits_of,
    perturb_,
    sample_inputs,
    save_lora_layout,
    save_released_lora_layout,
    trained_lora_model,
)

from stllava.model import LlavaLlamaForCausalLM
from stllava.model.builder import load_pretrained_model, resolve_device
from stllava.model.checkpoint_layouts import CheckpointLayoutError, detect_layout, model_key, vit_lora_key
from stllava.model.weights import UnsafeCheckpointError

TOL = 1e-5


@pytest.fixture(scope="module")
def trained(tiny_bundle):
    return trained_lora_model(tiny_bundle["model"])


@pytest.fixture(scope="module")
def lora_dir(trained, tiny_bundle, tmp_path_factory):
    return save_lora_layout(trained, str(tmp_path_factory.mktemp("lora")), tiny_bundle["model"])


@pytest.fixture(scope="module")
def inputs(tiny_bundle):
    tok, model, proc, _ = load_pretrained_model(tiny_bundle["model"], device="cpu")
    ids, px = sample_inputs(tok, proc, model.config)
    return ids, px, logits_of(model, ids, px)  # the untrained bundle's logits


def assert_same(a: torch.Tensor, b: torch.Tensor, tol: float = TOL):
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff < tol, f"max |logit difference| {diff:.3g} >= {tol}"


def assert_plain(model):
    names = [n for n, _ in model.named_parameters()]
    assert not any("lora_" in n or "base_layer" in n for n in names), "PEFT wrappers left in the loaded model"


# ---------------------------------------------------------------------------------------------
# Layouts

@pytest.mark.parametrize("base", ["model", "llm"], ids=["full-llava-base", "plain-llama-base"])
def test_lora_folder_with_base(base, trained, lora_dir, tiny_bundle, inputs):
    ids, px, untrained = inputs
    expected = logits_of(trained, ids, px)
    assert (expected - untrained).abs().max() > 1e-3  # the LoRA, projector and ViT-LoRA do change the model
    tok, model, proc, ctx = load_pretrained_model(lora_dir, model_base=tiny_bundle[base], device="cpu")
    assert_plain(model)
    assert ctx == 1024 and model.dtype == torch.float32 and not model.training
    assert_same(logits_of(model, ids, px), expected)
    assert greedy(model, ids, px) == greedy(trained, ids, px)


def test_vit_lora_as_lora_pt(trained, lora_dir, tiny_bundle, inputs, tmp_path):
    ids, px, _ = inputs
    folder = shutil.copytree(lora_dir, tmp_path / "lora", ignore=shutil.ignore_patterns("Vit-lora"))
    vit = shutil.copytree(os.path.join(lora_dir, "Vit-lora"), tmp_path / "elsewhere" / "Vit-lora")
    expected = logits_of(trained, ids, px)
    _, without, _, _ = load_pretrained_model(str(folder), model_base=tiny_bundle["model"], device="cpu")
    assert (logits_of(without, ids, px) - expected).abs().max() > 1e-4  # the ViT-LoRA matters
    _, model, _, _ = load_pretrained_model(str(folder), model_base=tiny_bundle["model"], device="cpu",
                                           lora_pt=str(vit))
    assert_same(logits_of(model, ids, px), expected)


def test_full_folder_with_vit_lora(tiny_bundle, inputs, tmp_path):
    """A full fine-tune: full weights + Vit-lora/ (found in the folder and merged)."""
    ids, px, untrained = inputs
    model = LlavaLlamaForCausalLM.from_pretrained(tiny_bundle["model"], dtype=torch.float32)
    perturb_(model.model.layers.parameters(), 0.01, seed=3)
    perturb_(model.get_model().mm_projector.parameters(), 0.01, seed=4)
    model.save_pretrained(tmp_path)
    copy_files(tiny_bundle["model"], str(tmp_path), TOKENIZER_FILES + ("preprocessor_config.json",))
    tower = model.get_model().get_vision_tower()
    tower.enable_lora(r=4, alpha=8, dropout=0.0)
    perturb_([p for n, p in tower.named_parameters() if "lora_" in n], 0.05, seed=5)
    tower.vision_tower.save_pretrained(tmp_path / "Vit-lora")
    model.eval()

    assert detect_layout(str(tmp_path)).kind == "full"
    _, loaded, _, _ = load_pretrained_model(str(tmp_path), device="cpu")
    assert_plain(loaded)
    assert_same(logits_of(loaded, ids, px), logits_of(model, ids, px))


def test_projector_only_folder(tiny_bundle, inputs, tmp_path):
    ids, px, untrained = inputs
    model = LlavaLlamaForCausalLM.from_pretrained(tiny_bundle["model"], dtype=torch.float32).eval()
    perturb_(model.get_model().mm_projector.parameters(), 0.05, seed=7)
    torch.save({"model.mm_projector." + k: v for k, v in model.get_model().mm_projector.state_dict().items()},
               tmp_path / "mm_projector.bin")
    model.config.save_pretrained(tmp_path)
    assert detect_layout(str(tmp_path), tiny_bundle["llm"]).kind == "projector"
    # Base: the plain LLaMA folder; the tower comes from mm_vision_tower, the tokenizer from the base.
    _, loaded, _, _ = load_pretrained_model(str(tmp_path), model_base=tiny_bundle["llm"], device="cpu")
    expected = logits_of(model, ids, px)
    assert (expected - untrained).abs().max() > 1e-3
    assert_same(logits_of(loaded, ids, px), expected)


# ---------------------------------------------------------------------------------------------
# The released STLLaVA-Med / SQ-LLaVA layout

@pytest.fixture(scope="module")
def released(trained, tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    clip = legacy_clip_folder(tiny_bundle["vision_tower"], str(root / "clip-vit"))
    base = legacy_full_folder(tiny_bundle["model"], str(root / "sqllava-7b"), clip)
    lora = save_released_lora_layout(trained, str(root / "stllava-med-7b-lora"), clip)
    return {"clip": clip, "base": base, "lora": lora}


def test_released_files_look_like_the_reference(released):
    with open(os.path.join(released["lora"], "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llava" and "rope_theta" in cfg and "mm_vision_config" not in cfg
    adapter = torch.load(os.path.join(released["lora"], "adapter_model.bin"), weights_only=True)
    vit_keys = [k for k in adapter if "vision_tower" in k]
    assert vit_keys and all(".vision_model.encoder.layers." in k for k in vit_keys)
    non_lora = torch.load(os.path.join(released["lora"], "non_lora_trainables.bin"), weights_only=True)
    assert all(k.startswith("base_model.model.model.mm_projector.") for k in non_lora)
    assert not any(os.path.exists(os.path.join(released["lora"], f)) for f in TOKENIZER_FILES)


@pytest.mark.parametrize("variant", ["with-Vit-lora", "vit-only-in-adapter", "llama-base"])
def test_released_layout_loads_and_generates(variant, released, trained, tiny_bundle, inputs, tmp_path, caplog):
    ids, px, _ = inputs
    lora, base = released["lora"], released["base"]
    if variant == "vit-only-in-adapter":
        lora = str(shutil.copytree(lora, tmp_path / "lora", ignore=shutil.ignore_patterns("Vit-lora")))
    if variant == "llama-base":  # tower from mm_vision_tower (a transformers-4 CLIP folder)
        base = tiny_bundle["llm"]
    with caplog.at_level(logging.INFO, logger="stllava"):
        tok, model, proc, ctx = load_pretrained_model(lora, model_base=base, device="cpu")
    assert type(model.config).model_type == "llava_llama"
    assert_plain(model)
    assert_same(logits_of(model, ids, px), logits_of(trained, ids, px))
    out = model.generate(ids, images=px, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert out.shape == (1, 6) and isinstance(tok.decode(out[0]), str)
    if variant == "with-Vit-lora":
        assert "repeats the 24 ViT-LoRA tensors" in caplog.text
    if variant == "vit-only-in-adapter":
        assert "no Vit-lora/ folder was found" in caplog.text


def test_native_llava_config_still_works(released, tmp_path):
    """Loading released 'llava' configs (the fixture and the tests above, in this process) must not
    take the name from transformers' own LLaVA."""
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

    LlavaConfig(vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28,
                               "patch_size": 14},
                text_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                             "vocab_size": 100}).save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert type(cfg) is LlavaConfig and AutoConfig.for_model("llava").__class__ is LlavaConfig
    model = LlavaForConditionalGeneration(cfg)
    assert model.config.text_config.hidden_size == 32


def test_key_mapping_golden():
    assert model_key("base_model.model.model.mm_projector.mlp.0.weight") == "model.mm_projector.mlp.0.weight"
    assert model_key("model.model.mm_projector.c.bias") == "model.mm_projector.c.bias"
    assert (model_key("model.vision_tower.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight")
            == "model.vision_tower.vision_tower.encoder.layers.3.mlp.fc1.weight")
    assert (model_key("base_model.model.model.vision_tower.vision_tower.base_model.model.encoder.layers.0."
                      "self_attn.q_proj.base_layer.weight")
            == "model.vision_tower.vision_tower.encoder.layers.0.self_attn.q_proj.weight")
    want = "base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
    for k in ("base_model.model.model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj."
              "lora_A.weight",  # in a released LLM adapter
              "base_model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",  # Vit-lora
              "base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight",  # ours
              "base_model.model.model.vision_tower.vision_tower.base_model.model.encoder.layers.0.self_attn.q_proj."
              "lora_A.default.weight"):  # named_parameters() of our nested PEFT tower
        assert vit_lora_key(k) == want


# ---------------------------------------------------------------------------------------------
# Refusals and errors

class _Payload:
    """Unpickling this would run code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('executed')",))


@pytest.mark.parametrize("fmt", ["torch-zip", "legacy-pickle"])
def test_pickled_code_is_refused(fmt, lora_dir, tiny_bundle, tmp_path):
    folder = shutil.copytree(lora_dir, tmp_path / "lora")
    marker = tmp_path / "PWNED"
    payload = {"base_model.model.model.mm_projector.c.weight": torch.zeros(2), "x": _Payload(marker)}
    target = folder / "non_lora_trainables.bin"
    if fmt == "torch-zip":
        torch.save(payload, target)
    else:
        with open(target, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_pretrained_model(str(folder), model_base=tiny_bundle["model"], device="cpu")
    assert not marker.exists(), "the pickled payload was executed"
    msg = str(e.value)
    assert "non_lora_trainables.bin" in msg and "refused" in msg and "safetensors" in msg


def _strip(src, dst, *names):
    """A copy of folder ``src`` without its top-level files ``names``."""
    shutil.copytree(src, dst)
    for n in names:
        os.remove(os.path.join(dst, n))
    return str(dst)


def test_missing_files_errors(lora_dir, tiny_bundle, tmp_path):
    cases = []
    no_weights = _strip(lora_dir, tmp_path / "a", "adapter_model.safetensors")
    cases.append(((no_weights, tiny_bundle["model"]), ["the LoRA adapter weights are missing", "adapter_config.json",
                                                       "adapter_model.safetensors|adapter_model.bin"]))
    cases.append(((lora_dir, None), ["pass model_base", "lora layout needs"]))
    (tmp_path / "empty").mkdir()
    cases.append(((str(tmp_path / "empty"), None), ["no checkpoint layout recognised", "holds nothing",
                                                    "full layout needs", "projector layout needs"]))
    shutil.copytree(lora_dir, tmp_path / "c")
    os.remove(tmp_path / "c" / "Vit-lora" / "adapter_model.safetensors")
    cases.append(((str(tmp_path / "c"), tiny_bundle["model"]), ["Vit-lora", "the adapter weights are missing",
                                                               "vit_lora layout needs"]))
    no_cfg = _strip(lora_dir, tmp_path / "d", "config.json")
    cases.append(((no_cfg, tiny_bundle["model"]), ["config.json is missing", "non_lora_trainables.bin"]))
    cases.append(((str(tmp_path / "nope"), None), ["is not a folder"]))
    for (path, base), needles in cases:
        with pytest.raises(CheckpointLayoutError) as e:
            load_pretrained_model(path, model_base=base, device="cpu")
        for n in needles:
            assert n in str(e.value), (path, n, str(e.value))


def test_projector_missing_everywhere_is_an_error(lora_dir, tiny_bundle, tmp_path):
    folder = _strip(lora_dir, tmp_path / "lora", "non_lora_trainables.bin")
    with pytest.raises(CheckpointLayoutError, match="neither in the base .* nor in this folder.*mm_projector"):
        load_pretrained_model(folder, model_base=tiny_bundle["llm"], device="cpu")


def test_devices(tiny_bundle, caplog):
    if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        with caplog.at_level(logging.WARNING):
            assert resolve_device("mps") == "cpu"
        assert "mps" in caplog.text
        _, model, _, _ = load_pretrained_model(tiny_bundle["model"], device="mps")
        assert model.device.type == "cpu" and model.dtype == torch.float32  # the cpu default after the fallback
    if not torch.cuda.is_available():
        assert resolve_device("cuda") == "cpu"
    with pytest.raises(ValueError, match="not one of cpu, cuda"):
        resolve_device("tpu")


def test_quantization_needs_bitsandbytes(tiny_bundle):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available():
        pytest.skip("bitsandbytes and CUDA present: quantized loading is possible here")
    with pytest.raises(ValueError, match="bitsandbytes|CUDA"):
        load_pretrained_model(tiny_bundle["model"], device="cpu", load_4bit=True)


# ---------------------------------------------------------------------------------------------
# Layouts written by a real tiny SFT run (stllava.train.train_sft)

def test_real_sft_run_checkpoints_load_exactly(tiny_bundle, inputs, tmp_path, monkeypatch):
    """Train 3 steps (LLM LoRA + ViT-LoRA + projector), saving at steps 2 and 3; the logits of the
    in-memory model at each save must equal those of the saved folder loaded back, with either base."""
    train_sft = pytest.importorskip("stllava.train.train_sft")
    from stllava.toys import write_colour_dataset
    from stllava.train import trainer as trainer_mod

    ids, px, untrained = inputs
    seen = {}
    original = trainer_mod.LLaVATrainer.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        model, was_training = self.model, self.model.training
        model.eval()
        seen[os.path.basename(output_dir or self.args.output_dir)] = (logits_of(model, ids, px),
                                                                    greedy(model, ids, px, 8))
        model.train(was_training)
        return original(self, output_dir, _internal_call)

    monkeypatch.setattr(trainer_mod.LLaVATrainer, "save_model", save_model)
    data, images = write_colour_dataset(str(tmp_path / "data"), n=8)
    out = train_sft.run_sft([
        "--model_name_or_path", tiny_bundle["model"], "--data_path", data, "--image_folder", images,
        "--output_dir", str(tmp_path / "run"), "--version", "v1_sq", "--sq_r", "0.5",
        "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16",
        "--vit_lora_enable", "True", "--lora_r_vit", "4", "--lora_alpha_vit", "8",
        "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "2", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--model_max_length", "512", "--report_to", "none", "--logging_steps", "1",
        "--dataloader_num_workers", "0", "--verify_workers", "1", "--seed", "0"])
    assert {"checkpoint-2", "run"} <= set(seen)
    for name, folder in (("checkpoint-2", os.path.join(out, "checkpoint-2")), ("run", out)):
        expected, tokens = seen[name]
        assert (expected - untrained).abs().max() > 1e-3
        assert detect_layout(folder, tiny_bundle["model"]).kind == "lora"
        for base in ("model", "llm"):
            _, model, _, _ = load_pretrained_model(folder, model_base=tiny_bundle[base], device="cpu")
            assert_same(logits_of(model, ids, px), expected)
        assert greedy(model, ids, px, 8) == tokens
    assert not torch.equal(seen["checkpoint-2"][0], seen["run"][0])  # step 3 changed the model

    # ... and merged into one full folder (scripts/merge_lora_weights.py) it still generates the same.
    import importlib.util

    spec = importlib.util.spec_from_file_location("merge_lora_weights", os.path.join(
        os.path.dirname(__file__), "..", "..", "scripts", "merge_lora_weights.py"))
    merge_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_script)
    merged_dir = merge_script.merge(out, tiny_bundle["llm"], str(tmp_path / "merged"), dtype="float32")
    _, merged, _, _ = load_pretrained_model(merged_dir, device="cpu")
    # the template the run trained with (--version) is recorded in every checkpoint and survives the merge
    for folder in (out, os.path.join(out, "checkpoint-2"), merged_dir):
        assert json.load(open(os.path.join(folder, "config.json")))["conv_mode"] == "v1_sq", folder
    assert merged.config.conv_mode == "v1_sq"
    assert_same(logits_of(merged, ids, px), seen["run"][0])
    assert greedy(merged, ids, px, 8) == seen["run"][1]


def test_adapter_that_does_not_fit_is_refused(lora_dir, tiny_bundle):
    from stllava.model.builder import merge_lora, read_vit_lora

    hyper, state = read_vit_lora(os.path.join(lora_dir, "Vit-lora"))
    first = sorted(state)[0]
    partial = {k: v for k, v in state.items() if k != first}
    extra = dict(state, **{"base_model.model.encoder.layers.9.mlp.fc1.lora_A.weight": state[first]})
    for bad, needle in ((partial, "LoRA weights missing for"), (extra, "do not fit the model")):
        clip = LlavaLlamaForCausalLM.from_pretrained(tiny_bundle["model"]).get_model().get_vision_tower().clip
        with pytest.raises(ValueError, match=needle):
            merge_lora(clip, bad, hyper, "Vit-lora")

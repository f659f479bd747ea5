"""Broken checkpoint files are refused naming the file (issue 14 §4): pickled code in a full-layout
``pytorch_model.bin`` (UnsafeCheckpointError, as docs/Checkpoints.md promises), weight files cut
short, a config.json or shard index that is not JSON."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from stllava.model import checkpoint_layouts as cl
from stllava.model.builder import load_pretrained_model
from stllava.model.weights import CorruptCheckpointError, UnsafeCheckpointError, check_weight_file


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file if ever unpickled


def _full_copy(tiny_bundle, dst, weights="safetensors"):
    """The tiny full checkpoint in ``dst``, its weights as model.safetensors or pytorch_model.bin."""
    shutil.copytree(tiny_bundle["model"], dst, ignore=shutil.ignore_patterns("llm", "vision_tower"))
    if weights == "bin":
        state = load_file(os.path.join(dst, "model.safetensors"))
        os.remove(os.path.join(dst, "model.safetensors"))
        torch.save(state, os.path.join(dst, "pytorch_model.bin"))
    return str(dst)


def _cut(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_a_clean_bin_checkpoint_still_loads(tiny_bundle, tmp_path):
    folder = _full_copy(tiny_bundle, tmp_path / "bin", "bin")
    _, model, _, _ = load_pretrained_model(folder, device="cpu")
    _, ref, _, _ = load_pretrained_model(tiny_bundle["model"], device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_pickled_code_in_a_full_layout_bin_is_unsafe_checkpoint_error(tiny_bundle, tmp_path):
    """It was refused by transformers' UnpicklingError, which does not name the file."""
    folder = _full_copy(tiny_bundle, tmp_path / "evil", "bin")
    marker = tmp_path / "PWNED"
    target = os.path.join(folder, "pytorch_model.bin")
    state = torch.load(target, weights_only=True)
    torch.save({**state, "x": _Payload(marker)}, target)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_pretrained_model(folder, device="cpu")
    assert not marker.exists(), "the pickled payload was executed"
    msg = str(e.value)
    assert msg.startswith(f"{target} is not a plain tensor checkpoint and was refused (weights_only=True): ")
    assert "\n" not in msg and "safetensors" in msg


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_a_weight_file_cut_short_is_named(tiny_bundle, tmp_path, weights):
    folder = _full_copy(tiny_bundle, tmp_path / "cut", weights)
    target = os.path.join(folder, "model.safetensors" if weights == "safetensors" else "pytorch_model.bin")
    _cut(target)
    with pytest.raises(CorruptCheckpointError) as e:
        load_pretrained_model(folder, device="cpu")
    msg = str(e.value)
    assert msg.startswith(f"{target}: this weight file cannot be read (") and "\n" not in msg
    assert msg.endswith("; fix: copy or download it again (compare its size with the source)")


def test_partial_layout_weight_files_cut_short_are_named(tmp_path):
    """non_lora_trainables.bin, mm_projector.bin, adapter weights go through load_weights."""
    for name, save in (("non_lora_trainables.bin", torch.save),
                       ("adapter_model.safetensors", lambda sd, p: __import__("safetensors.torch").torch.save_file(sd, p))):
        path = str(tmp_path / name)
        save({"base_model.model.model.mm_projector.c.weight": torch.ones(64, 8)}, path)
        assert set(cl.load_weights(path)) == {"base_model.model.model.mm_projector.c.weight"}
        _cut(path)
        with pytest.raises(CorruptCheckpointError, match=f"^{path}: this weight file cannot be read"):
            cl.load_weights(path)
        with pytest.raises(CorruptCheckpointError, match=f"^{path}: "):
            check_weight_file(path)


def test_a_config_that_is_not_json_is_named(tiny_bundle, tmp_path):
    folder = _full_copy(tiny_bundle, tmp_path / "cfg")
    cfg = os.path.join(folder, "config.json")
    text = open(cfg).read()
    with open(cfg, "w") as f:
        f.write(text[:40])  # cut short
    with pytest.raises(CorruptCheckpointError) as e:
        load_pretrained_model(folder, device="cpu")
    assert str(e.value).startswith(f"{cfg}: this JSON file cannot be read (not valid JSON: ")
    assert "at line" in str(e.value) and "fix: correct it" in str(e.value)
    with open(cfg, "w") as f:
        f.write("[1, 2]")
    with pytest.raises(CorruptCheckpointError, match="a JSON list, not an object"):
        cl.detect_layout(folder)


def test_a_sharded_index_that_is_broken_is_named(tiny_bundle, tmp_path):
    folder = _full_copy(tiny_bundle, tmp_path / "sharded")
    os.rename(os.path.join(folder, "model.safetensors"), os.path.join(folder, "model-00001-of-00001.safetensors"))
    index = os.path.join(folder, "model.safetensors.index.json")
    names = load_file(os.path.join(folder, "model-00001-of-00001.safetensors")).keys()
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in names}}, f)
    assert cl.full_weight_files(folder) == [os.path.join(folder, "model-00001-of-00001.safetensors")]
    load_pretrained_model(folder, device="cpu")  # a sound sharded folder loads
    _cut(os.path.join(folder, "model-00001-of-00001.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="model-00001-of-00001.safetensors: this weight file"):
        load_pretrained_model(folder, device="cpu")
    with open(index, "w") as f:
        json.dump({"weight_map": {"a": "model-00002-of-00002.safetensors"}}, f)
    with pytest.raises(cl.CheckpointLayoutError, match="lists shards that are missing"):
        cl.check_full_weights(folder)
    with open(index, "w") as f:
        f.write('{"weight_map": ')
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.index.json: this JSON file cannot be read"):
        cl.check_full_weights(folder)


# ---------------------------------------------------------------------------------------------
# Issue 21: what the config and tokenizer files of a checkpoint can get wrong (docs/BadInputs.md)

def _edit_json(path, edit):
    data = json.load(open(path))
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def test_an_unknown_projector_type_names_config_json(tiny_bundle, tmp_path):
    folder = _full_copy(tiny_bundle, tmp_path / "proj")
    cfg = os.path.join(folder, "config.json")
    _edit_json(cfg, lambda c: c.update(mm_projector_type="mlp2x_relu"))
    with pytest.raises(cl.ConfigError) as e:
        load_pretrained_model(folder, device="cpu")
    msg = str(e.value)
    assert msg.startswith(f"{cfg}: mm_projector_type 'mlp2x_relu' is not a projector stllava builds (")
    assert "fix: set mm_projector_type to the projector the checkpoint was trained with" in msg and "\n" not in msg


def test_a_tokenizer_model_that_is_not_sentencepiece_is_named(tiny_bundle, tmp_path):
    folder = _full_copy(tiny_bundle, tmp_path / "spm")
    os.remove(os.path.join(folder, "tokenizer.json"))  # else transformers reads tokenizer.json alone
    spm = os.path.join(folder, "tokenizer.model")
    with open(spm, "wb") as f:
        f.write(b"<!DOCTYPE html><html>a download that went wrong</html>")
    with pytest.raises(CorruptCheckpointError) as e:
        load_pretrained_model(folder, device="cpu")
    msg = str(e.value)
    assert msg.startswith(f"{spm}: this tokenizer file cannot be read (not a SentencePiece model") and "\n" not in msg
    assert "tiktoken" not in msg and "fix: copy it again from the model's source" in msg


@pytest.mark.parametrize("drop", ["model", "added_tokens"])
def test_a_tokenizer_json_with_a_missing_key_is_named(tiny_bundle, tmp_path, drop):
    folder = _full_copy(tiny_bundle, tmp_path / f"tj_{drop}")
    tj = os.path.join(folder, "tokenizer.json")
    _edit_json(tj, lambda t: t.pop(drop))
    with pytest.raises(CorruptCheckpointError) as e:
        load_pretrained_model(folder, device="cpu")
    msg = str(e.value)
    assert msg.startswith(f"{tj}: this tokenizer file cannot be read (no {drop!r} key") and "\n" not in msg
    assert "tiktoken" not in msg and "fix: copy it again from the model's source" in msg


def test_a_tokenizer_json_that_tokenizers_refuses_is_named(tiny_bundle, tmp_path):
    folder = _full_copy(tiny_bundle, tmp_path / "tj_vocab")
    tj = os.path.join(folder, "tokenizer.json")
    _edit_json(tj, lambda t: t["model"].pop("vocab"))
    with pytest.raises(CorruptCheckpointError, match=f"^{tj}: this tokenizer file cannot be read \\(.*vocab"):
        load_pretrained_model(folder, device="cpu")


def test_remote_code_named_by_auto_map_is_never_run(tiny_bundle, tmp_path):
    """config.json, tokenizer_config.json and preprocessor_config.json may name code in the
    folder (``auto_map``, transformers' trust_remote_code); loading never imports it."""
    folder = _full_copy(tiny_bundle, tmp_path / "remote")
    marker = tmp_path / "REMOTE_CODE_RAN"
    with open(os.path.join(folder, "evil.py"), "w") as f:
        f.write(f"open({str(marker)!r}, 'w').write('imported')\n"
                "from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer, CLIPImageProcessor\n"
                "class EvilConfig(LlamaConfig): model_type = 'evil'\n"
                "class EvilModel(LlamaForCausalLM): pass\n"
                "class EvilTokenizer(LlamaTokenizer): pass\n"
                "class EvilProcessor(CLIPImageProcessor): pass\n")
    _edit_json(os.path.join(folder, "config.json"), lambda c: c.update(auto_map={
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}))
    _edit_json(os.path.join(folder, "tokenizer_config.json"), lambda c: c.update(
        auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}))
    _edit_json(os.path.join(folder, "preprocessor_config.json"), lambda c: c.update(
        auto_map={"AutoImageProcessor": "evil.EvilProcessor"}))
    tok, model, proc, _ = load_pretrained_model(folder, device="cpu")
    assert not marker.exists(), "code named by auto_map was imported"
    assert "evil" not in type(model).__module__ + type(tok).__module__ + type(proc).__module__
    assert getattr(model.config, "auto_map", None) is None  # not carried into a merged or exported folder

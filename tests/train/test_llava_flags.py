"""LLaVA's training flags with LLaVA's meaning: QLoRA (--bits), projector pretraining
(--tune_mm_mlp_adapter) feeding SFT (--pretrain_mm_mlp_adapter), --freeze_backbone,
--freeze_mm_mlp_adapter, --pretrain_lora; and the data check running before any weight loads."""
import importlib.util
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers.training import lora_args
from transformers import TrainerCallback

from stllava.model import LlavaLlamaForCausalLM
from stllava.model.vision_tower import ViTLoraWeightsError
from stllava.train.arguments import parse_args
from stllava.train.manifest import MANIFEST, check_manifest
from stllava.train.model_setup import make_trainable
from stllava.train.train_sft import main, run_sft

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def captions(tiny_bundle, tmp_path_factory):
    """Image-caption records for the plain template (LLaVA's pretraining data format)."""
    from stllava.toys import write_colour_dataset

    root = tmp_path_factory.mktemp("captions")
    data, images = write_colour_dataset(str(root), n=8)
    records = json.load(open(data))
    caps = [{"id": r["id"], "image": r["image"], "conversations": [
        {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": f"a {r['conversations'][1]['value']} picture"}]}
        for r in records]
    path = root / "captions.json"
    path.write_text(json.dumps(caps))
    return {"data": str(path), "images": images, "qa": data}


class Probe(TrainerCallback):
    """Records the trainable names and the projector's weights when training starts."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.trainable = trainable(model)
        self.projector = {k: v.detach().clone() for k, v in model.get_model().mm_projector.state_dict().items()}
        self.model = model


def test_llava_flags_parse_with_their_defaults():
    m, _, t = parse_args(["--output_dir", "o", "--report_to", "none"])
    assert (t.bits, t.double_quant, t.quant_type, t.freeze_mm_mlp_adapter) == (16, True, "nf4", False)
    assert (m.freeze_backbone, m.tune_mm_mlp_adapter, m.pretrain_lora) == (False, False, None)
    m, _, t = parse_args(["--output_dir", "o", "--report_to", "none", "--bits", "4", "--double_quant", "False",
                          "--quant_type", "fp4", "--freeze_backbone", "True", "--tune_mm_mlp_adapter", "True",
                          "--freeze_mm_mlp_adapter", "True", "--pretrain_lora", "x/Vit-lora"])
    assert (t.bits, t.double_quant, t.quant_type, t.freeze_mm_mlp_adapter) == (4, False, "fp4", True)
    assert (m.freeze_backbone, m.tune_mm_mlp_adapter, m.pretrain_lora) == (True, True, "x/Vit-lora")


def test_freeze_flags_have_llavas_meaning(tiny_bundle):
    def build(targs, margs=None):
        return make_trainable(LlavaLlamaForCausalLM.from_pretrained(tiny_bundle["model"]), targs, margs)

    full = lora_args(lora_enable=False, vit_lora_enable=False)
    names = trainable(build(full))
    assert any(n.startswith("model.layers.") for n in names) and "lm_head.weight" in names
    assert not any("vision_tower" in n for n in names)
    # --freeze_backbone: model.model frozen (LLaVA), lm_head and the projector still train
    names = trainable(build(full, SimpleNamespace(freeze_backbone=True)))
    assert names == {"lm_head.weight"} | {n for n in names if ".mm_projector." in n} and len(names) > 1
    # --freeze_mm_mlp_adapter: the projector stays frozen
    names = trainable(build(lora_args(lora_enable=False, vit_lora_enable=False, freeze_mm_mlp_adapter=True),
                            SimpleNamespace(freeze_backbone=True)))
    assert names == {"lm_head.weight"}
    names = trainable(build(lora_args(freeze_mm_mlp_adapter=True)))
    assert names and all("lora_" in n for n in names)
    # --tune_mm_mlp_adapter: the projector alone
    names = trainable(build(lora_args(lora_enable=False, vit_lora_enable=False),
                            SimpleNamespace(tune_mm_mlp_adapter=True)))
    assert names and all(n.startswith("model.mm_projector.") for n in names)


@pytest.mark.parametrize("flags,message", [
    (["--tune_mm_mlp_adapter", "True", "--lora_enable", "True"], "--tune_mm_mlp_adapter trains the projector alone"),
    (["--tune_mm_mlp_adapter", "True", "--freeze_mm_mlp_adapter", "True"], "leaves nothing to train"),
    (["--pretrain_lora", "Vit-lora"], "--pretrain_lora Vit-lora starts the ViT-LoRA: add --vit_lora_enable"),
    (["--pretrain_lora", "nowhere", "--vit_lora_enable"], "--pretrain_lora nowhere does not exist"),
    (["--bits", "4"], "--bits 4 quantizes the LLM, whose weights then cannot train"),
    (["--bits", "3"], "invalid choice"),
])
def test_flag_combinations_are_refused_with_a_reason(captions, tiny_bundle, tmp_path, capsys, flags, message):
    argv = ["--model_name_or_path", tiny_bundle["model"], "--data_path", captions["qa"], "--output_dir",
            str(tmp_path / "o"), "--report_to", "none", *flags]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusal of a value outside the choices
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(HAS_BNB, reason="bitsandbytes is installed: test_qlora_trains_through_bitsandbytes runs instead")
def test_qlora_refused_without_bitsandbytes(captions, tiny_bundle, tmp_path, capsys):
    argv = ["--model_name_or_path", tiny_bundle["model"], "--data_path", captions["qa"], "--output_dir",
            str(tmp_path / "o"), "--report_to", "none", "--bits", "4", "--lora_enable", "True"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bits 4 (QLoRA) needs bitsandbytes, which is not installed" in err[0]
    assert "pip install 'stllava[qlora]'" in err[0]


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install 'stllava[qlora]'); without it "
                                        "test_qlora_refused_without_bitsandbytes checks the refusal")
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_through_bitsandbytes(captions, tiny_bundle, tmp_path, bits):
    import bitsandbytes as bnb

    probe, out = Probe(), str(tmp_path / "q")
    run_sft(["--model_name_or_path", tiny_bundle["model"], "--data_path", captions["qa"], "--image_folder",
             captions["images"], "--output_dir", out, "--report_to", "none", "--version", "v1", "--bits", str(bits),
             "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--vit_lora_enable", "--lora_r_vit", "2",
             "--per_device_train_batch_size", "4", "--max_steps", "2", "--logging_steps", "1", "--save_strategy",
             "no", "--learning_rate", "1e-3", "--model_max_length", "256"], callbacks=[probe])
    base = probe.model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    assert type(base.lm_head) is torch.nn.Linear  # the head, tower and projector are not quantized
    assert type(base.get_model().mm_projector.c) is torch.nn.Linear
    assert all("lora_" in n or ".mm_projector." in n for n in probe.trainable)
    losses = [e["loss"] for e in json.load(open(os.path.join(out, "trainer_state.json")))["log_history"] if "loss" in e]
    assert len(losses) == 2 and all(0 < v < 20 for v in losses)
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


def test_projector_pretraining_then_sft_from_its_mm_projector_bin(captions, tiny_bundle, tmp_path):
    """LLaVA's stage 0 on a plain LLaMA + tower: only the projector trains, mm_projector.bin is saved
    in every checkpoint and at the end, and SFT starts from exactly those weights."""
    from stllava.model.builder import load_pretrained_model
    from stllava.model.weights import load_projector_weights

    probe, out = Probe(), str(tmp_path / "pretrain")
    run_sft(["--model_name_or_path", tiny_bundle["llm"], "--vision_tower", tiny_bundle["vision_tower"],
             "--mm_projector_type", "mlp2x_gelu", "--version", "plain", "--tune_mm_mlp_adapter", "True",
             "--data_path", captions["data"], "--image_folder", captions["images"], "--output_dir", out,
             "--report_to", "none", "--per_device_train_batch_size", "2", "--max_steps", "4", "--save_strategy",
             "steps", "--save_steps", "2", "--learning_rate", "1e-2", "--logging_steps", "1",
             "--model_max_length", "256"], callbacks=[probe])
    assert probe.trainable and all(n.startswith("model.mm_projector.") for n in probe.trainable)
    for d in (out, os.path.join(out, "checkpoint-2"), os.path.join(out, "checkpoint-4")):
        files = set(os.listdir(d))
        assert {"mm_projector.bin", "config.json", "preprocessor_config.json"} <= files, d
        assert not files & {"adapter_model.safetensors", "model.safetensors", "non_lora_trainables.bin"}, d
    assert check_manifest(os.path.join(out, "checkpoint-2")) is None  # written after the save, and matching
    saved = load_projector_weights(os.path.join(out, "mm_projector.bin"))
    assert sorted(saved) == sorted(probe.projector)
    assert any(not torch.equal(saved[k], probe.projector[k]) for k in saved)  # it trained
    at2 = load_projector_weights(os.path.join(out, "checkpoint-2", "mm_projector.bin"))
    assert any(not torch.equal(at2[k], saved[k]) for k in saved)  # checkpoint-2 is an earlier state
    # the builder reads the projector-only folder with its base (LLaVA's layout)
    _, model, _, _ = load_pretrained_model(out, model_base=tiny_bundle["llm"], device="cpu")
    assert all(torch.equal(v, saved[k]) for k, v in model.get_model().mm_projector.state_dict().items())

    sft = Probe()
    run_sft(["--model_name_or_path", tiny_bundle["llm"], "--vision_tower", tiny_bundle["vision_tower"],
             "--mm_projector_type", "mlp2x_gelu", "--pretrain_mm_mlp_adapter", os.path.join(out, "mm_projector.bin"),
             "--version", "v1", "--data_path", captions["qa"], "--image_folder", captions["images"], "--output_dir",
             str(tmp_path / "sft"), "--report_to", "none", "--lora_enable", "True", "--lora_r", "4",
             "--per_device_train_batch_size", "4", "--max_steps", "1", "--save_strategy", "no",
             "--model_max_length", "256"], callbacks=[sft])
    assert sorted(sft.projector) == sorted(saved)
    assert all(torch.equal(sft.projector[k], saved[k]) for k in saved)


def test_pretrain_lora_starts_the_vit_lora_from_a_folder_or_a_file(tiny_bundle, tmp_path):
    def build(**over):
        torch.manual_seed(0)
        model = LlavaLlamaForCausalLM.from_pretrained(tiny_bundle["model"])
        pretrain = over.pop("pretrain_lora", None)
        return make_trainable(model, lora_args(lora_enable=False, **over), SimpleNamespace(pretrain_lora=pretrain))

    def vit(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if "vision_tower" in n and "lora_" in n}

    source = build()
    with torch.no_grad():
        for n, p in source.named_parameters():
            if "vision_tower" in n and "lora_" in n:
                p.normal_()  # lora_B starts at 0: make every weight distinctive
    folder = str(tmp_path / "Vit-lora")
    source.get_model().get_vision_tower().vision_tower.save_pretrained(folder)
    want = vit(source)
    assert vit(build()).keys() == want.keys() and any(not torch.equal(vit(build())[k], want[k]) for k in want)

    for path in (folder, os.path.join(folder, "adapter_model.safetensors")):
        got = vit(build(pretrain_lora=path))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), path
    # a state file keyed as the whole model names it (e.g. a trainer's state dict of the tower)
    whole = str(tmp_path / "vit_state.bin")
    torch.save({"model.vision_tower." + k.split("vision_tower.", 1)[1]: v for k, v in want.items()}, whole)
    got = vit(build(pretrain_lora=whole))
    assert all(torch.equal(got[k], want[k]) for k in want)

    with pytest.raises(ViTLoraWeightsError, match=r"adapter_model.safetensors: .* set --lora_r_vit"):
        build(pretrain_lora=folder, lora_r_vit=3)
    junk = str(tmp_path / "junk.bin")
    torch.save({"model.mm_projector.c.weight": torch.zeros(2)}, junk)
    with pytest.raises(ViTLoraWeightsError, match="junk.bin holds no ViT-LoRA weights"):
        build(pretrain_lora=junk)


def test_data_is_checked_before_any_weight_loads(captions, tiny_bundle, tmp_path, capsys):
    """A model folder whose weights are gone: the bad record is reported (the data check ran
    first), not the missing weights."""
    model = tmp_path / "model"
    shutil.copytree(tiny_bundle["model"], model, ignore=shutil.ignore_patterns("llm", "vision_tower"))
    os.remove(model / "model.safetensors")
    records = json.load(open(captions["qa"]))
    records[1]["image"] = "missing.png"
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    argv = ["--model_name_or_path", str(model), "--data_path", str(data), "--image_folder", captions["images"],
            "--output_dir", str(tmp_path / "o"), "--report_to", "none", "--version", "v1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "missing image" in err and "missing.png" in err and "safetensors" not in err
    # with the data fixed, the weights are what is missing
    with pytest.raises(Exception, match="model.safetensors|no file named|weights"):
        run_sft([a if a != str(data) else captions["qa"] for a in argv])


def test_manifest_is_written_in_every_checkpoint_and_names_a_changed_file(captions, tiny_bundle, tmp_path):
    out = str(tmp_path / "m")
    run_sft(["--model_name_or_path", tiny_bundle["model"], "--data_path", captions["qa"], "--image_folder",
             captions["images"], "--output_dir", out, "--report_to", "none", "--version", "v1", "--lora_enable",
             "True", "--lora_r", "4", "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_strategy",
             "steps", "--save_steps", "1", "--model_max_length", "256"])
    for n in (1, 2):
        ckpt = os.path.join(out, f"checkpoint-{n}")
        listed = json.load(open(os.path.join(ckpt, MANIFEST)))["files"]
        assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json", "non_lora_trainables.bin"} \
            <= set(listed)
        assert check_manifest(ckpt) is None
    with open(os.path.join(out, "checkpoint-2", "optimizer.pt"), "ab") as f:
        f.write(b"x")
    assert "optimizer.pt changed since the checkpoint was saved" in check_manifest(os.path.join(out, "checkpoint-2"))


def test_kbit_quantizes_exactly_the_llm_linear_layers(tiny_bundle):
    """transformers' own matching of the skip list against every Linear of the model: the LLM's
    are quantized, the tower's, the projector's and lm_head are not (no bitsandbytes needed)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from stllava.train.model_setup import KBIT_SKIP_MODULES, llm_lora_target_names

    model = LlavaLlamaForCausalLM.from_pretrained(tiny_bundle["model"])
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    quantized = {n for n in linears if should_convert_module(n, KBIT_SKIP_MODULES)}
    assert quantized == set(llm_lora_target_names(model))
    assert any("vision_tower" in n for n in linears) and any("mm_projector" in n for n in linears)

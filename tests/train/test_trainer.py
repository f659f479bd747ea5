"""LLaVATrainer pieces: optimizer groups, trainable selection, sampler choice, checkpoint save/load."""
import os

import pytest
import torch
from helpers.training import lora_args

from stllava.model import LlavaLlamaForCausalLM
from stllava.train.arguments import TrainingArguments
from stllava.train.checkpoint import (
    load_llava_trainables,
    save_llava_checkpoint,
    trainable_state_dict,
    trainable_summary,
)
from stllava.train.model_setup import llm_lora_target_names, make_trainable
from stllava.train.sampler import LengthGroupedSampler, RandomEpochSampler
from stllava.train.trainer import LLaVATrainer


def build(tiny_bundle, **over):
    torch.manual_seed(0)
    model = LlavaLlamaForCausalLM.from_pretrained(tiny_bundle["model"])
    return make_trainable(model, lora_args(**over))


def targs(tmp_path, **over):
    kw = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", learning_rate=2e-4,
              weight_decay=0.1, save_strategy="no", logging_steps=1)
    return TrainingArguments(**{**kw, **over})


def test_trainable_parts_by_module_path(tiny_bundle):
    model = build(tiny_bundle)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(("lora_" in n) or ("mm_projector" in n) for n in names)
    vit = {n for n in names if "vision_tower" in n}
    # ViT-LoRA is the nested adapter only: the outer (LLM) LoRA wrapped no tower module
    assert vit and all(".vision_tower.vision_tower.base_model.model.encoder." in n for n in vit)
    assert not any("vision_tower" in n and "base_layer.lora" in n for n in names)
    assert not any("lm_head" in n or "embed_tokens" in n for n in names)
    s = trainable_summary(model)
    # tiny LLM: 2 layers x (q,k,v,o 64x64, gate/up 64->172, down 172->64), r=4: A [4, in] + B [out, 4]
    per_layer = 4 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 172 * 4) + (4 * 172 + 64 * 4)
    assert s["llm_lora"] == {"trainable": 2 * per_layer, "frozen": 0}
    assert s["projector"]["frozen"] == 0 and s["vision_tower"]["trainable"] == 0
    assert s["llm"]["trainable"] == 0


def test_lora_targets_cover_every_llm_linear(tiny_bundle):
    model = LlavaLlamaForCausalLM.from_pretrained(tiny_bundle["model"])
    names = llm_lora_target_names(model)
    assert len(names) == 2 * 7 and "lm_head" not in names
    assert all(n.startswith("model.layers.") for n in names)


@pytest.mark.parametrize("projector_lr", [2e-5, None])
def test_optimizer_groups_have_their_lrs(tiny_bundle, tmp_path, projector_lr):
    model = build(tiny_bundle)
    trainer = LLaVATrainer(model=model, args=targs(tmp_path, mm_projector_lr=projector_lr, vision_tower_lr=5e-5))
    opt = trainer.create_optimizer()
    groups = {g["name"]: g for g in opt.param_groups}
    # vision_tower_lr is honoured also when mm_projector_lr is unset (the reference ignored it then)
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()} == {
        "llm/decay": (2e-4, 0.1),
        "projector/decay": (projector_lr or 2e-4, 0.1),
        "projector/no_decay": (projector_lr or 2e-4, 0.0),
        "vision_tower/decay": (5e-5, 0.1),
    }
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable) and len(set(ids)) == len(ids)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)].split("mm_projector.")[1] for p in groups["projector/no_decay"]["params"]}
    assert no_decay == {"c.bias", "v.bias", "f.bias", "ln_1.weight", "ln_1.bias", "mlp.0.bias", "mlp.2.bias"}


class _Lens:
    modality_lengths = [5, -3, 4, -2]
    lengths = [5, 3, 4, 2]

    def __len__(self):
        return 4


def test_train_sampler_choice(tiny_bundle, tmp_path):
    model = build(tiny_bundle)
    t = LLaVATrainer(model=model, args=targs(tmp_path, group_by_modality_length=True, gradient_accumulation_steps=2))
    s = t._get_train_sampler(_Lens())
    assert isinstance(s, LengthGroupedSampler) and s.group_by_modality and s.world_size == 2
    t = LLaVATrainer(model=model, args=targs(tmp_path))
    assert isinstance(t._get_train_sampler(_Lens()), RandomEpochSampler)


def _colour_batches(tiny_bundle, tmp_path, n=8):
    from transformers import CLIPImageProcessor

    from stllava.data.collate import DataCollatorForSupervisedDataset
    from stllava.data.sft import LazySupervisedDataset
    from stllava.data.verify import load_records
    from stllava.model.builder import load_tokenizer
    from stllava.toys import write_colour_dataset

    tok = load_tokenizer(tiny_bundle["model"], 1024, training=True)
    proc = CLIPImageProcessor.from_pretrained(tiny_bundle["model"])
    data, folder = write_colour_dataset(str(tmp_path / "data"), n=n, n_text=2)
    ds = LazySupervisedDataset(load_records(data), tok, proc, image_folder=folder, version="v1_sq", sq_r=0.5)
    return ds, DataCollatorForSupervisedDataset(tok.pad_token_id, 1024, 64), tok, proc


def test_training_changes_trainables_only_and_checkpoint_round_trips(tiny_bundle, tmp_path):
    ds, collate, tok, proc = _colour_batches(tiny_bundle, tmp_path)
    model = build(tiny_bundle)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = targs(tmp_path, learning_rate=1e-2, weight_decay=0.0, max_steps=4, per_device_train_batch_size=5,
                 activation_checkpointing=True)
    trainer = LLaVATrainer(model=model, args=args, train_dataset=ds, data_collator=collate, processing_class=tok,
                           image_processor=proc)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable  # nothing frozen moved
    assert any("mm_projector" in n for n in changed)
    # with gradient checkpointing on, the ViT-LoRA of the used layer (select_layer -2 = layer 0) trains
    vit_b = {n for n in changed if "vision_tower" in n and "lora_B" in n}
    assert vit_b and all(".layers.0." in n for n in vit_b)
    assert any("layers.1.self_attn.q_proj.lora_B" in n and "vision_tower" not in n for n in changed)

    # the checkpoint written by the trainer reloads into a fresh, identically wrapped model
    out = str(tmp_path / "ckpt")
    trainer.save_model(out)
    for f in ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin", "config.json",
              "Vit-lora/adapter_config.json", "Vit-lora/adapter_model.safetensors", "preprocessor_config.json",
              "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    fresh = build(tiny_bundle)
    counts = load_llava_trainables(fresh, out)
    assert counts["non_lora_trainables.bin"] == 14 and counts["Vit-lora"] == 2 * 2 * 6
    got, want = trainable_state_dict(fresh), trainable_state_dict(model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # Vit-lora/ is a plain PEFT folder: the tower alone reloads it
    from stllava.model.vision_tower import CLIPVisionTower

    tower = CLIPVisionTower(tiny_bundle["vision_tower"])
    tower.load_model()
    tower.load_lora(os.path.join(out, "Vit-lora"))
    x = torch.randn(1, 3, 112, 112)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(tower(x), model.get_model().get_vision_tower()(x), atol=1e-6)


def test_save_refuses_foreign_vit_keys(tiny_bundle, tmp_path):
    model = build(tiny_bundle)
    state = trainable_state_dict(model)
    state["base_model.model.model.vision_tower.other.lora_A.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="ViT-LoRA weights outside"):
        save_llava_checkpoint(model, state, str(tmp_path / "x"))


PUBLISHED = """--lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 --deepspeed ./scripts/zero3.json
--model_name_or_path ./checkpoints/sqllava-7B-v1.5-1200k --version v1_sq --data_path d.json --image_folder img
--vision_tower ZachSun/sqllava-7B-vit-L-336-1200k --pretrain_mm_mlp_adapter ./checkpoints/x/mm_projector.bin
--mm_projector_type cluster --mm_vision_select_layer -2 --mm_use_im_start_end False --mm_use_im_patch_token False
--image_aspect_ratio pad --group_by_modality_length False --bf16 True --output_dir OUT --num_train_epochs 3
--per_device_train_batch_size 8 --per_device_eval_batch_size 6 --gradient_accumulation_steps 4
--evaluation_strategy no --save_strategy steps --save_steps 50000 --save_total_limit 2 --learning_rate 2e-4
--vision_tower_lr 5e-5 --vit_lora_enable --lora_alpha_vit 64 --lora_r_vit 32 --weight_decay 0. --warmup_ratio 0.03
--lr_scheduler_type cosine --logging_steps 1 --tf32 True --model_max_length 2048 --gradient_checkpointing True
--dataloader_num_workers 8 --lazy_preprocess True --report_to none --data_aug False --sq_r 0.5""".split()


def test_published_flags_parse(tmp_path):
    import dataclasses

    from stllava.train.arguments import DataArguments, ModelArguments, parse_args

    argv = [str(tmp_path / "out") if a == "OUT" else a for a in PUBLISHED]
    # --deepspeed is transformers' own flag; parsing it here would set up DeepSpeed in the test process
    k = argv.index("--deepspeed")
    argv = argv[:k] + argv[k + 2:]
    m, d, t = parse_args(argv + ["--use_cpu", "True"])
    assert (m.version, m.mm_vision_select_layer, m.mm_projector_type, m.data_aug) == ("v1_sq", -2, "cluster", False)
    assert (d.sq_r, d.image_aspect_ratio, d.lazy_preprocess, d.on_bad_sample) == (0.5, "pad", True, "stop")
    assert t.eval_strategy == "no" and t.warmup_steps == 0.03 and t.lr_scheduler_type == "cosine"
    assert t.tf32 is None  # no CUDA here: accepted, logged, ignored
    assert (t.lora_r, t.lora_alpha, t.lora_r_vit, t.lora_alpha_vit, t.lora_dropout_vit) == (128, 256, 32, 64, 0.2)
    assert (t.mm_projector_lr, t.vision_tower_lr, t.vit_lora_enable, t.group_by_modality_length) == (2e-5, 5e-5, True, False)
    assert t.bf16 and t.gradient_checkpointing and not t.remove_unused_columns and t.model_max_length == 2048
    # the bare spelling of a boolean flag works too; unknown flags do not
    assert parse_args(argv + ["--use_cpu", "True", "--group_by_modality_length"])[2].group_by_modality_length
    with pytest.raises(ValueError, match="not used"):
        parse_args(argv + ["--use_cpu", "True", "--no_such_flag", "1"])
    ours = [f for cls in (ModelArguments, DataArguments) for f in dataclasses.fields(cls)]
    ours += [f for f in dataclasses.fields(TrainingArguments) if f.name in TrainingArguments.__dataclass_fields__
             and f.name not in TrainingArguments.__mro__[1].__dataclass_fields__]
    assert ours and all(f.metadata.get("help") for f in ours), [f.name for f in ours if not f.metadata.get("help")]

"""--loss_averaging: transformers 5's token-weighted SFT loss (default) vs the published
per-micro-batch mean, on micro-batches with unequal numbers of target tokens, each checked
against its hand computation."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from stllava.constants import IGNORE_INDEX
from stllava.data.collate import DataCollatorForSupervisedDataset
from stllava.data.sft import LazySupervisedDataset
from stllava.model import LlavaLlamaForCausalLM
from stllava.model.builder import load_tokenizer
from stllava.model.vision_tower import clip_processor_class
from stllava.toys import write_colour_dataset
from stllava.train.arguments import TrainingArguments
from stllava.train.model_setup import make_trainable
from stllava.train.trainer import LLaVATrainer

# LLM LoRA + ViT-LoRA + projector, no dropout: both computations see the same function
LORA = SimpleNamespace(lora_enable=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_bias="none",
                       vit_lora_enable=True, lora_r_vit=2, lora_alpha_vit=4, lora_dropout_vit=0.0)


class GradProbe(TrainerCallback):
    """The accumulated gradients of the trainable weights, just before the optimizer step."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # (the last CLIP layer's ViT-LoRA gets none: with --mm_vision_select_layer -2 it is unused)
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def setup(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("loss_avg")
    data, images = write_colour_dataset(str(root), n=2)
    records = json.load(open(data))
    records[0]["conversations"] = records[0]["conversations"][:2]  # one short answer ...
    records[1]["conversations"][3]["value"] = ("No, it is a blue picture with nothing red in it at all, "
                                               "as anyone can see from the colour of every pixel")  # ... and a long one
    tok = load_tokenizer(tiny_bundle["model"], 512, training=True)
    processor = clip_processor_class().from_pretrained(tiny_bundle["model"])
    ds = LazySupervisedDataset(records, tok, processor, image_folder=images, version="v1")
    return {"ds": ds, "tok": tok, "root": root}


def model_for(tiny_bundle):
    torch.manual_seed(0)  # the same LoRA initialisation every time
    return make_trainable(LlavaLlamaForCausalLM.from_pretrained(tiny_bundle["model"]), LORA)


def trainer_grads(tiny_bundle, setup, mode):
    probe = GradProbe()
    args = TrainingArguments(output_dir=str(setup["root"] / mode), use_cpu=True, report_to="none",
                             per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=1,
                             max_grad_norm=0.0, save_strategy="no", loss_averaging=mode, learning_rate=1e-3)
    trainer = LLaVATrainer(model=model_for(tiny_bundle), args=args, train_dataset=setup["ds"],
                           data_collator=DataCollatorForSupervisedDataset(setup["tok"].pad_token_id, 512, 1),
                           callbacks=[probe])
    trainer.train()
    return probe.grads


def hand_grads(tiny_bundle, setup, mode):
    """Summed cross-entropy S_i and target count n_i of each sample, combined by hand."""
    model = model_for(tiny_bundle)
    sums, counts = [], []
    for i in range(2):
        item = setup["ds"][i]
        out = model(input_ids=item["input_ids"][None], labels=item["labels"][None], images=item["image"][None])
        logits, labels = out.logits[0, :-1], out.labels[0, 1:]  # position t predicts label t + 1
        keep = labels != IGNORE_INDEX
        sums.append(F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum"))
        counts.append(int(keep.sum()))
    if mode == "tokens":
        loss = (sums[0] + sums[1]) / (counts[0] + counts[1])
    else:
        loss = (sums[0] / counts[0] + sums[1] / counts[1]) / 2
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}, counts


def test_token_weighted_and_per_micro_batch_losses_differ_and_match_their_definitions(tiny_bundle, setup):
    got = {mode: trainer_grads(tiny_bundle, setup, mode) for mode in ("tokens", "micro_batch")}
    for mode in got:
        want, counts = hand_grads(tiny_bundle, setup, mode)
        assert counts[1] > 3 * counts[0]  # unequal micro-batches
        assert got[mode].keys() == want.keys() and want
        for n in want:
            torch.testing.assert_close(got[mode][n], want[n], rtol=1e-4, atol=1e-7, msg=f"{mode}: {n}")
    diff = max(float((got["tokens"][n] - got["micro_batch"][n]).abs().max()) for n in want)
    scale = max(float(g.abs().max()) for g in got["tokens"].values())
    assert diff > 0.05 * scale  # the two definitions give different updates

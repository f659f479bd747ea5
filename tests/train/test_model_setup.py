"""stllava.train.model_setup: the model a run trains (dtype, ZeRO-3 casting, the recorded template)."""
from types import SimpleNamespace

import pytest
import torch

from stllava.model import LlavaLlamaForCausalLM
from stllava.train.model_setup import cast_unpartitioned, compute_dtype, make_trainable

LORA = dict(lora_enable=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_bias="none", vit_lora_enable=True,
            lora_r_vit=2, lora_alpha_vit=4, lora_dropout_vit=0.0)


@pytest.mark.parametrize("bf16,fp16,dtype", [(True, False, torch.bfloat16), (False, True, torch.float16),
                                             (False, False, torch.float32)])
def test_compute_dtype(bf16, fp16, dtype):
    assert compute_dtype(SimpleNamespace(bf16=bf16, fp16=fp16)) is dtype


def test_cast_unpartitioned_gives_one_dtype_and_leaves_zero3_partitions_alone(tiny_bundle):
    """peft creates LoRA weights in float32 on a bf16 model; DeepSpeed wants one dtype. Parameters
    ZeRO-3 already partitioned (they carry ``ds_id``, as deepspeed.zero.Init leaves them) are
    DeepSpeed's: their dtype is not touched."""
    model = LlavaLlamaForCausalLM.from_pretrained(tiny_bundle["model"], dtype=torch.bfloat16)
    model = make_trainable(model, SimpleNamespace(**LORA))
    named = dict(model.named_parameters())
    lora = [n for n in named if "lora_" in n]
    assert lora and {named[n].dtype for n in lora} == {torch.float32}
    partitioned = named["base_model.model.lm_head.weight"]
    partitioned.data = partitioned.data.float()
    partitioned.ds_id = 0  # DeepSpeed's mark of a partitioned parameter

    assert cast_unpartitioned(model, torch.bfloat16) == len(lora)
    assert partitioned.dtype == torch.float32
    assert {p.dtype for n, p in named.items() if p is not partitioned} == {torch.bfloat16}
    assert cast_unpartitioned(model, torch.bfloat16) == 0  # nothing left to cast
    assert all(named[n].requires_grad for n in lora)  # casting keeps them trainable

"""Helpers of the training tests."""
from types import SimpleNamespace


def lora_args(**over) -> SimpleNamespace:
    """The LoRA flags of ``stllava.train.model_setup.make_trainable`` (LLM LoRA r=4 and ViT-LoRA r=2
    on), with ``over`` replacing any of them."""
    base = dict(lora_enable=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_bias="none", vit_lora_enable=True,
                lora_r_vit=2, lora_alpha_vit=4, lora_dropout_vit=0.0)
    return SimpleNamespace(**{**base, **over})

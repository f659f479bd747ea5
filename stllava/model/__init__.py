"""The LLaVA-style model: CLIP tower, projector, LLaMA language model."""
from stllava.model.llava_llama import (  # noqa: F401
    LlavaLlamaConfig,
    LlavaLlamaForCausalLM,
    load_llava_config,
)

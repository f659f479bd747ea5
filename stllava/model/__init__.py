"""The LLaVA-style model: CLIP tower, projector, LLaMA language model.

Names are imported lazily so that ``import stllava.model.projector`` (or the tokenizer helpers)
does not pay for importing the whole model stack.
"""
import importlib

_LAZY = {
    "LlavaLlamaConfig": "stllava.model.llava_llama",
    "LlavaLlamaForCausalLM": "stllava.model.llava_llama",
    "load_llava_config": "stllava.model.llava_llama",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stllava.model' has no attribute {name!r}")

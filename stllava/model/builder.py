"""Load a model for inference: ``load_pretrained_model`` → (tokenizer, model, image_processor, context_len).

Every checkpoint layout of ``stllava.model.checkpoint_layouts`` loads through this one call
(``docs/Checkpoints.md`` has the table):

- a full folder (ours, a merged one, a released full LLaVA one): ``load_pretrained_model(path)``;
- a LoRA folder: ``load_pretrained_model(path, model_base=BASE)``: the base (a full LLaVA folder, or
  a plain LLaMA folder plus the tower named by ``mm_vision_tower``), then ``non_lora_trainables.bin``
  (the projector), then the LLM LoRA merged into the weights;
- a projector-only folder (``mm_projector.bin``): ``load_pretrained_model(path, model_base=BASE)``;
- a ViT-LoRA adapter (``Vit-lora/``, found in ``path`` or given as ``lora_pt``): merged into the tower.

The result is a plain (merged) :class:`LlavaLlamaForCausalLM` in eval mode: no PEFT wrappers.
Weight files are read safely (safetensors, or ``torch.load(weights_only=True)``): a pickle that
holds code is refused, never executed.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import torch
from transformers import LlamaTokenizer
from transformers.utils import logging as hf_logging

from stllava.model import checkpoint_layouts as cl
from stllava.model.llava_llama import LlavaLlamaForCausalLM, load_llava_config
from stllava.model.lora import merge_lora, merge_vit_lora, read_vit_lora
from stllava.model.vision_tower import clip_processor_class

__all__ = ["load_pretrained_model", "load_tokenizer", "load_image_processor", "resolve_device",
           "quantization_config", "load_into", "merge_lora", "merge_vit_lora", "read_vit_lora"]

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """``device``, or 'cpu' (with a warning) when CUDA / MPS is requested but not available."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %r requested but CUDA is not available; using cpu", device)
        return "cpu"
    if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        logger.warning("device 'mps' requested but not available; using cpu")
        return "cpu"
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise ValueError(f"device {device!r} is not one of cpu, cuda, cuda:N, mps")
    return device


def load_tokenizer(path: str, model_max_length: int | None = None, *, training: bool = False) -> LlamaTokenizer:
    """The LLaMA tokenizer of ``path``, the one loader of inference and training.

    Inference (default): pad = unk when the tokenizer has no pad token (LLaVA pads with unk).
    ``training=True`` is LLaVA's v1 training setup: pad = unk always, right padding, and
    ``model_max_length`` (when given) as the tokenizer's maximum length. A tokenizer file that
    cannot be read is refused naming it (:func:`~stllava.model.checkpoint_layouts.tokenizer_file_problem`)."""
    kwargs = {"padding_side": "right"} if training else {}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    try:
        tok = LlamaTokenizer.from_pretrained(path, **kwargs)
    except Exception:
        problem = cl.tokenizer_file_problem(path) if os.path.isdir(path) else None
        if problem is None:
            raise
        raise problem from None
    if training or tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok


def load_image_processor(model_path: str, config, *extra_sources: str | None):
    """The CLIP image processor (:func:`~stllava.model.vision_tower.clip_processor_class`) saved with
    the checkpoint, else one in ``extra_sources`` (e.g. the base folder), else the one of
    ``config.mm_vision_tower`` (a folder or hub id)."""
    for src in (model_path, *extra_sources, getattr(config, "mm_vision_tower", None)):
        if src and os.path.isfile(os.path.join(src, "preprocessor_config.json")):
            return clip_processor_class().from_pretrained(src)
    return clip_processor_class().from_pretrained(config.mm_vision_tower)


def quantization_config(load_8bit: bool, load_4bit: bool, device: str):
    """A ``BitsAndBytesConfig`` for 8/4-bit loading, or None. Raises ValueError when bitsandbytes
    is not installed or the device is not CUDA (bitsandbytes kernels are CUDA-only here)."""
    if not (load_8bit or load_4bit):
        return None
    if load_8bit and load_4bit:
        raise ValueError("choose one of load_8bit / load_4bit (--load-8bit / --load-4bit), not both")
    flag = "--load-8bit" if load_8bit else "--load-4bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{flag} needs bitsandbytes, which is not installed (pip install bitsandbytes, on a "
                         "CUDA machine); or load without quantization")
    if not device.startswith("cuda"):
        raise ValueError(f"{flag} needs a CUDA device (got {device!r}); load without quantization on cpu/mps")
    from transformers import BitsAndBytesConfig

    skip = ["model.mm_projector", "model.vision_tower", "lm_head"]  # stay fp16 (prefixes: transformers 5 matching)
    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16, bnb_4bit_use_double_quant=True,
                              bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip)


# ---------------------------------------------------------------------------------------------
# Base model + partial checkpoints

def _same_source(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")


def _load_base(model_base: str, config, dtype, device: str) -> tuple[LlavaLlamaForCausalLM, set[str]]:
    """The base weights under ``config`` (the checkpoint's), on ``device``; returns the model and the
    state-dict keys nothing has filled yet. The tower is reloaded from ``config.mm_vision_tower``
    when the base has none or names another one (so released checkpoints load as LLaVA's loader does)."""
    if not os.path.isfile(os.path.join(model_base, cl.CONFIG)):
        raise cl.layout_error(model_base, "full", f"the base model folder has no {cl.CONFIG}")
    base_cfg = cl.read_json(os.path.join(model_base, cl.CONFIG))
    cl.check_full_weights(model_base)
    if getattr(config, "mm_vision_tower", None) and not getattr(config, "mm_vision_config", None) \
            and base_cfg.get("mm_vision_config"):
        config.mm_vision_config = base_cfg["mm_vision_config"]  # no hub lookup for the tower's shape
    # transformers would print its table of missing weights (the tower / projector of a plain LLaMA
    # base); they are filled below, and whatever is not raises an error naming it.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = LlavaLlamaForCausalLM.from_pretrained(model_base, config=config, dtype=dtype,
                                                            output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(device)
    missing = set(info["missing_keys"])
    logger.info("loaded base weights from %s (%d weights to fill from elsewhere)", model_base, len(missing))
    tower = model.get_model().get_vision_tower()
    if tower is not None:
        tower_missing = {k for k in missing if "vision_tower" in k}
        wanted, base_tower = config.mm_vision_tower, base_cfg.get("mm_vision_tower")
        if tower_missing or not _same_source(wanted, base_tower):
            try:
                logger.info("loading vision tower weights from %s", wanted)
                tower.load_model(wanted)
                missing -= tower_missing
            except (OSError, ValueError) as e:
                if tower_missing:
                    raise ValueError(f"{model_base} holds no vision tower weights and mm_vision_tower={wanted!r} "
                                     f"could not be loaded ({e}); set mm_vision_tower in the checkpoint's "
                                     "config.json to a local CLIP folder") from None
                logger.warning("mm_vision_tower %r could not be loaded (%s); using the tower weights of the base %s",
                               wanted, str(e).splitlines()[0], model_base)
    return model, missing


def load_into(model: torch.nn.Module, state: dict, source: str) -> set[str]:
    """Load ``state`` (any saved naming, see :func:`~stllava.model.checkpoint_layouts.model_key`) into
    ``model``; returns the keys loaded. Raises ValueError listing keys the model does not have."""
    mapped = {cl.model_key(k): v for k, v in state.items()}
    own = model.state_dict()
    unknown = sorted(k for k in mapped if k not in own)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} tensors have no place in the model ({unknown[:4]})")
    bad = [k for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{source}: shape mismatch for {bad[:4]} (file {tuple(mapped[bad[0]].shape)}, "
                         f"model {tuple(own[bad[0]].shape)})")
    model.load_state_dict(mapped, strict=False)
    logger.info("loaded %d tensors from %s", len(mapped), source)
    return set(mapped)


def _load_partial(layout: cl.Layout, model_base: str, config, dtype, device: str):
    """Base + projector / non-LoRA weights + merged LLM LoRA. Returns ``(model, vit_from_adapter)``:
    ViT-LoRA tensors found inside the LLM adapter (released checkpoints hold them there)."""
    model, missing = _load_base(model_base, config, dtype, device)
    vit_in_adapter, hyper = {}, None
    extra = layout.non_lora if layout.kind == "lora" else layout.projector
    if extra:
        missing -= load_into(model, cl.load_weights(extra), extra)
    elif layout.kind == "lora":
        logger.warning("%s holds no %s: the projector comes from the base %s", layout.model_path, cl.NON_LORA,
                       model_base)
    if missing:
        raise cl.layout_error(layout.model_path, layout.kind,
                              f"{len(missing)} weights are neither in the base {model_base} nor in this folder "
                              f"(e.g. {sorted(missing)[:3]})")
    if layout.kind == "lora":
        hyper = cl.read_lora_config(layout.model_path)
        llm_state, vit_in_adapter = cl.split_adapter_state(cl.load_weights(layout.adapter_weights),
                                                           layout.adapter_weights)
        if llm_state:
            model = merge_lora(model, llm_state, hyper, layout.adapter_weights)
    return model, (vit_in_adapter, hyper)


def _apply_vit_lora(model, layout: cl.Layout, vit_in_adapter: dict, adapter_hyper: dict | None) -> None:
    if layout.vit_lora:
        hyper, state = read_vit_lora(layout.vit_lora)
        if vit_in_adapter:
            if cl.same_tensors(state, vit_in_adapter):
                logger.info("the LLM adapter repeats the %d ViT-LoRA tensors of %s; merged once", len(state),
                            layout.vit_lora)
            else:
                logger.warning("the LLM adapter holds ViT-LoRA tensors that differ from %s; using %s (as the "
                               "reference's lora_pt did)", layout.vit_lora, layout.vit_lora)
        merge_vit_lora(model, state, hyper, layout.vit_lora)
    elif vit_in_adapter:
        logger.warning("the LLM adapter of %s holds %d ViT-LoRA tensors and no %s/ folder was found: merging them "
                       "with the adapter's alpha/r scaling", layout.model_path, len(vit_in_adapter), cl.VIT_LORA_DIR)
        merge_vit_lora(model, vit_in_adapter, adapter_hyper, layout.adapter_weights, keep_scaling=True)


def load_pretrained_model(model_path: str, model_base: str | None = None, model_name: str | None = None,
                          load_8bit: bool = False, load_4bit: bool = False, device_map="auto",
                          device: str = "cuda", lora_pt: str | None = None, dtype=None):
    """Return ``(tokenizer, model, image_processor, context_len)`` for any checkpoint layout.

    ``model_base``: the base folder of a LoRA / projector-only checkpoint. ``lora_pt``: a
    ``Vit-lora/`` folder (default: ``model_path/Vit-lora`` when present). ``device``: cpu, cuda[:N]
    or mps (falls back to cpu with a warning when unavailable). ``dtype``: default fp16 on
    cuda/mps, fp32 on cpu. ``device_map``: a dict is passed to ``from_pretrained`` (full folders);
    ``"auto"`` puts the whole model on ``device``. ``model_name`` is accepted for LLaVA
    compatibility (layouts are recognised by their files, not their names).

    Raises :class:`~stllava.model.checkpoint_layouts.CheckpointLayoutError` for missing files,
    :class:`~stllava.model.weights.UnsafeCheckpointError` for pickles that are not plain tensors,
    :class:`~stllava.model.weights.CorruptCheckpointError` for weight or JSON files cut short or corrupt,
    ValueError for weights that do not fit and for 8/4-bit loading without bitsandbytes/CUDA.
    """
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if device != "cpu" else torch.float32
    layout = cl.detect_layout(model_path, model_base, lora_pt)
    quant = quantization_config(load_8bit, load_4bit, device)
    if quant is not None and (layout.needs_base or layout.vit_lora):
        raise ValueError(f"8/4-bit loading needs a merged checkpoint; {model_path} is a {layout.kind} layout"
                         f"{' with a ViT-LoRA' if layout.vit_lora else ''}: merge it first "
                         "(python -m stllava.model.merge)")
    config = load_llava_config(model_path)
    logger.info("loading %s (%s layout%s) on %s, %s", model_path, layout.kind,
                ", + ViT-LoRA " + layout.vit_lora if layout.vit_lora else "", device, dtype)

    vit_in_adapter, adapter_hyper = {}, None
    if layout.kind == "full":
        cl.check_full_weights(model_path)  # a cut-short or pickled file is named, not a library error
        kwargs = {}
        if quant is not None:
            kwargs.update(quantization_config=quant, device_map=device_map if isinstance(device_map, dict)
                          else {"": device})
        elif isinstance(device_map, dict):
            kwargs["device_map"] = device_map
        model = LlavaLlamaForCausalLM.from_pretrained(model_path, config=config, dtype=dtype, **kwargs)
        if "device_map" not in kwargs:
            model.to(device)
    else:
        model, (vit_in_adapter, adapter_hyper) = _load_partial(layout, model_base, config, dtype, device)
    _apply_vit_lora(model, layout, vit_in_adapter, adapter_hyper)
    model.eval()

    tok_src = model_path if cl.has_tokenizer(model_path) else model_base
    if not cl.has_tokenizer(tok_src):
        raise cl.layout_error(model_path, layout.kind, "no tokenizer files here"
                              + (f" nor in the base {model_base}" if model_base else ""))
    tokenizer = load_tokenizer(tok_src)
    _add_image_tokens(tokenizer, model)
    image_processor = None
    if getattr(model.config, "mm_vision_tower", None):
        image_processor = load_image_processor(model_path, model.config, model_base)
    context_len = (getattr(model.config, "tokenizer_model_max_length", None)
                   or getattr(model.config, "max_sequence_length", None) or 2048)
    return tokenizer, model, image_processor, context_len


def _add_image_tokens(tokenizer, model) -> None:
    """LLaVA's ``<im_patch>`` / ``<im_start>``/``<im_end>`` tokens when the config asks for them."""
    from stllava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN

    new = []
    if getattr(model.config, "mm_use_im_patch_token", False):
        new.append(DEFAULT_IMAGE_PATCH_TOKEN)
    if getattr(model.config, "mm_use_im_start_end", False):
        new += [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))

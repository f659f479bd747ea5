"""Checkpoint layouts: which files a folder holds, what loading it needs, and how keys are renamed.

A user meets four layouts (``docs/Checkpoints.md`` shows each folder):

``full``       config.json + model weights (``model.safetensors``, sharded, or ``pytorch_model*.bin``);
               ours, a merged one, or a released full LLaVA folder. Loads on its own.
``lora``       config.json + ``adapter_config.json`` + ``adapter_model.{safetensors,bin}``
               (+ ``non_lora_trainables.bin``): a LoRA run's output; needs ``model_base``.
``projector``  config.json + ``mm_projector.bin``: a projector-only (pretraining) run; needs ``model_base``.
any of them    may hold ``Vit-lora/`` (a PEFT adapter of the CLIP tower), merged into the tower.

Released STLLaVA-Med / SQ-LLaVA checkpoints were written by transformers 4 and older peft, so their
key names differ from ours; :func:`model_key`, :func:`vit_lora_key` and :func:`split_adapter_state`
map them. In particular their LLM adapter holds every ``lora_`` parameter of the whole model,
the ViT-LoRA's included, under names such as
``base_model.model.model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight``
(transformers 5's ``CLIPVisionModel`` has no ``vision_model`` level any more).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

import torch

from stllava.errors import StllavaError
from stllava.model.weights import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    check_weight_file,
    corrupt,
    load_state_dict_file,
)

logger = logging.getLogger(__name__)

# The file names of every checkpoint layout: this is their one home (training writes them through
# stllava.train.checkpoint, loading reads them here).
CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"  # what our training writes
ADAPTER_WEIGHTS = (ADAPTER_SAFETENSORS, "adapter_model.bin")  # what loading accepts (released adapters: .bin)
NON_LORA = "non_lora_trainables.bin"
PROJECTOR = "mm_projector.bin"
VIT_LORA_DIR = "Vit-lora"
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")

# What each layout needs, as shown in error messages ("a|b" = one of them).
NEEDS = {
    "full": [CONFIG, "|".join(FULL_WEIGHTS)],
    "lora": [CONFIG, ADAPTER_CONFIG, "|".join(ADAPTER_WEIGHTS), f"{NON_LORA} (unless the base holds the projector)",
             "model_base"],
    "projector": [CONFIG, PROJECTOR, "model_base"],
    "vit_lora": [ADAPTER_CONFIG, "|".join(ADAPTER_WEIGHTS)],
}

_LORA_KINDS = r"(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\." + _LORA_KINDS + r"(?:\.weight)?$")
# An adapter name after the LoRA part ('lora_A.default.weight'), as in keys taken from named_parameters().
_ADAPTER_NAME = re.compile(r"\." + _LORA_KINDS + r"\.(?!weight$)[A-Za-z0-9_-]+(?=(?:\.weight)?$)")


class CheckpointLayoutError(StllavaError, FileNotFoundError):
    """A folder does not hold the files its layout needs (the message lists both)."""


class ConfigError(StllavaError, ValueError):
    """A checkpoint's ``config.json`` holds a value stllava cannot build a model from (the message
    names the file, the field and the fix)."""


@dataclasses.dataclass
class Layout:
    """What :func:`detect_layout` found in a checkpoint folder."""
    kind: str                         # "full", "lora" or "projector"
    model_path: str
    files: list[str]                  # the folder's entries (sorted)
    adapter_weights: str | None = None
    non_lora: str | None = None
    projector: str | None = None
    vit_lora: str | None = None       # a Vit-lora adapter folder (given, or found in model_path)

    @property
    def needs_base(self) -> bool:
        return self.kind in ("lora", "projector")


def _listing(path: str) -> list[str]:
    return sorted(e + ("/" if os.path.isdir(os.path.join(path, e)) else "") for e in os.listdir(path))


def _first(path: str, names) -> str | None:
    for n in names:
        if os.path.isfile(os.path.join(path, n)):
            return os.path.join(path, n)
    return None


def layout_error(path: str, kind: str | None, problem: str) -> CheckpointLayoutError:
    """A :class:`CheckpointLayoutError` naming the folder, its files and what ``kind`` needs."""
    files = _listing(path) if os.path.isdir(path) else []
    kinds = [kind] if kind else list(NEEDS)
    needs = "; ".join(f"{k} layout needs {', '.join(NEEDS[k])}" for k in kinds)
    return CheckpointLayoutError(f"{path}: {problem}. The folder holds {files or 'nothing'}; {needs}. "
                                 "See docs/Checkpoints.md for the layouts and the call that loads each.")


def detect_layout(model_path: str, model_base: str | None = None, lora_pt: str | None = None) -> Layout:
    """Return the :class:`Layout` of ``model_path``.

    Raises :class:`CheckpointLayoutError` (listing the folder's files and what the detected layout
    needs) when the folder is missing, a needed file is absent, or a LoRA / projector-only folder
    comes without ``model_base``.
    """
    if not os.path.isdir(model_path):
        raise CheckpointLayoutError(f"model path {model_path} is not a folder (a checkpoint folder is expected)")
    files = _listing(model_path)
    if lora_pt is None and os.path.isdir(os.path.join(model_path, VIT_LORA_DIR)):
        lora_pt = os.path.join(model_path, VIT_LORA_DIR)
        logger.info("found %s/ in %s: the ViT-LoRA will be merged into the vision tower", VIT_LORA_DIR, model_path)
    if lora_pt is not None:
        check_adapter_folder(lora_pt, "vit_lora")

    if os.path.isfile(os.path.join(model_path, ADAPTER_CONFIG)):
        kind = "lora"
    elif os.path.isfile(os.path.join(model_path, PROJECTOR)) and (model_base or not _first(model_path, FULL_WEIGHTS)):
        kind = "projector"
    elif _first(model_path, FULL_WEIGHTS):
        kind = "full"
    else:
        raise layout_error(model_path, None, "no checkpoint layout recognised")

    if not os.path.isfile(os.path.join(model_path, CONFIG)):
        raise layout_error(model_path, kind, f"{CONFIG} is missing")
    read_json(os.path.join(model_path, CONFIG))  # a config.json that is not JSON is named here
    layout = Layout(kind, model_path, files, vit_lora=lora_pt)
    if kind == "lora":
        layout.adapter_weights = _first(model_path, ADAPTER_WEIGHTS)
        if layout.adapter_weights is None:
            raise layout_error(model_path, kind, "the LoRA adapter weights are missing")
        layout.non_lora = _first(model_path, [NON_LORA])
    elif kind == "projector":
        layout.projector = os.path.join(model_path, PROJECTOR)
    if layout.needs_base and not model_base:
        raise layout_error(model_path, kind, f"a {kind} folder holds only part of the model: pass model_base "
                           "(--model-base), the full LLaVA or LLaMA folder it was trained from")
    if kind == "full" and model_base:
        logger.warning("%s is a full checkpoint; model_base %s is not used", model_path, model_base)
    return layout


def check_adapter_folder(path: str, what: str = "vit_lora") -> str:
    """Return the adapter weight file of PEFT folder ``path``; raises CheckpointLayoutError if absent."""
    if not os.path.isdir(path):
        raise CheckpointLayoutError(f"adapter folder {path} does not exist ({what} layout needs "
                                    f"{', '.join(NEEDS[what])})")
    if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        raise layout_error(path, what, f"{ADAPTER_CONFIG} is missing")
    weights = _first(path, ADAPTER_WEIGHTS)
    if weights is None:
        raise layout_error(path, what, "the adapter weights are missing")
    return weights


def has_tokenizer(path: str | None) -> bool:
    return bool(path) and any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


_TOKENIZER_FIX = ("copy it again from the model's source (the checkpoint, or the base LLaMA/Vicuna folder it was "
                  "trained from)")
TOKENIZER_JSON_KEYS = ("model", "added_tokens")  # what transformers 5 reads without a default


def tokenizer_file_problem(path: str) -> CorruptCheckpointError | None:
    """Why the tokenizer files of folder ``path`` cannot be loaded, as the error to raise (naming
    the file and the fix), or None when they look sound. Called after transformers failed, whose
    own messages name no file (``Model missing``, a bare ``KeyError``, or advice to install
    tiktoken for a ``tokenizer.model`` that is not SentencePiece). Checks, in transformers' order:
    ``tokenizer_config.json`` (JSON), ``tokenizer.json`` (JSON, the keys transformers needs, then
    the tokenizers library's own parse) — else ``tokenizer.model`` (SentencePiece)."""
    config = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config):
        read_json(config)  # raises, naming the file
    tj = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tj):
        data = read_json(tj)
        missing = [k for k in TOKENIZER_JSON_KEYS if k not in data]
        if missing:
            return corrupt(tj, f"no {missing[0]!r} key", "tokenizer file", _TOKENIZER_FIX)
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(tj)
        except Exception as e:  # tokenizers raises a bare Exception
            return corrupt(tj, e, "tokenizer file", _TOKENIZER_FIX)
        return None
    spm = os.path.join(path, "tokenizer.model")
    if os.path.isfile(spm):
        import sentencepiece

        try:
            sentencepiece.SentencePieceProcessor(model_file=spm)
        except Exception as e:  # RuntimeError / OSError from the C++ parser
            return corrupt(spm, f"not a SentencePiece model: {e}", "tokenizer file", _TOKENIZER_FIX)
    return None


_JSON_FIX = "correct it, or copy it again from the checkpoint's source"


def read_json(path: str) -> dict:
    """The JSON object in file ``path``. Refuses (:class:`~stllava.model.weights.CorruptCheckpointError`
    naming the file, line and column) a file that is not UTF-8 JSON or holds something else than an
    object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise corrupt(path, f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}", "JSON file",
                      _JSON_FIX) from None
    except UnicodeDecodeError as e:
        raise corrupt(path, f"not UTF-8 text: {e.reason} at byte {e.start}", "JSON file", _JSON_FIX) from None
    if not isinstance(data, dict):
        raise corrupt(path, f"a JSON {type(data).__name__}, not an object", "JSON file", _JSON_FIX)
    return data


def full_weight_files(model_path: str) -> list[str]:
    """The weight files a full folder loads from: the single file, or every shard its
    ``*.index.json`` lists (refused, naming the index, when it does not parse or lists none)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(model_path, single)):
            return [os.path.join(model_path, single)]
        index_path = os.path.join(model_path, index)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise corrupt(index_path, "no 'weight_map' naming the shards", "shard index")
            shards = [os.path.join(model_path, f) for f in sorted(set(map(str, weight_map.values())))]
            missing = [f for f in shards if not os.path.isfile(f)]
            if missing:
                raise layout_error(model_path, "full", f"{index} lists shards that are missing ({missing[:3]})")
            return shards
    return []


def check_full_weights(model_path: str) -> None:
    """Check every weight file of full folder ``model_path`` before transformers loads it, so that a
    file cut short or holding pickled code is refused naming it (transformers' own errors do not):
    :class:`UnsafeCheckpointError` or :class:`~stllava.model.weights.CorruptCheckpointError`."""
    for path in full_weight_files(model_path):
        check_weight_file(path)


# ---------------------------------------------------------------------------------------------
# Reading weight files

def load_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` (safetensors, or a ``.bin`` read with ``weights_only=True``).

    Raises :class:`UnsafeCheckpointError` for a pickle holding anything but plain tensors (it is
    refused, never executed) and ValueError for a file that is not a ``{name: tensor}`` mapping.
    """
    sd = load_state_dict_file(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UnsafeCheckpointError(f"{path} does not hold a {{name: tensor}} mapping (got {type(sd).__name__}); "
                                    "it is not a checkpoint file this loader understands")
    return sd


def read_lora_config(adapter_dir: str) -> dict:
    """The LoRA hyper-parameters of ``adapter_dir/adapter_config.json`` (r, lora_alpha, use_rslora,
    use_dora, fan_in_fan_out, rank_pattern, alpha_pattern). Refuses non-LoRA PEFT adapters."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    raw = read_json(path)
    ptype = str(raw.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise ValueError(f"{path}: peft_type {ptype!r} is not LORA; only LoRA adapters can be merged")
    out = {"r": int(raw.get("r", 8)), "lora_alpha": float(raw.get("lora_alpha", 8)),
           "use_rslora": bool(raw.get("use_rslora", False)), "use_dora": bool(raw.get("use_dora", False)),
           "fan_in_fan_out": bool(raw.get("fan_in_fan_out", False)),
           "rank_pattern": raw.get("rank_pattern") or {}, "alpha_pattern": raw.get("alpha_pattern") or {}}
    if raw.get("bias", "none") != "none":
        logger.warning("%s: bias=%r; trained biases in the adapter are loaded as they are", path, raw.get("bias"))
    return out


# ---------------------------------------------------------------------------------------------
# Key mapping

def model_key(key: str) -> str:
    """Map a saved key (PEFT-prefixed, transformers-4 CLIP names, nested-PEFT tower names) to the
    name in :class:`~stllava.model.llava_llama.LlavaLlamaForCausalLM`'s state dict, e.g.
    ``base_model.model.model.mm_projector.c.weight`` → ``model.mm_projector.c.weight``."""
    if key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    if key.startswith("model.model."):  # as LLaVA's builder: some saves carry one 'model.' too many
        key = key[len("model."):]
    key = key.replace("vision_tower.vision_tower.base_model.model.", "vision_tower.vision_tower.")
    key = key.replace("vision_tower.vision_tower.vision_model.", "vision_tower.vision_tower.")
    return key.replace(".base_layer.", ".")


def is_lora_key(key: str) -> bool:
    return "lora_" in key


def is_vision_key(key: str) -> bool:
    return "vision_tower" in key or ".vision_model." in key or key.startswith("vision_model.")


def _drop_adapter_name(key: str) -> str:
    return _ADAPTER_NAME.sub(lambda m: "." + m.group("kind"), key)


def vit_lora_key(key: str) -> str:
    """Map a ViT-LoRA key (ours, a released ``Vit-lora/`` one, or one found in a released LLM adapter)
    to its name in a PEFT model around transformers 5's ``CLIPVisionModel``:
    ``base_model.model.encoder.layers.N.<...>.lora_A.weight``. Raises ValueError for a key outside
    the encoder layers (the only place ViT-LoRA targets)."""
    k = _drop_adapter_name(key)
    i = k.find("encoder.layers.")
    if i < 0:
        raise ValueError(f"ViT-LoRA key {key!r} is not inside the CLIP encoder layers; cannot map it to the tower")
    return "base_model.model." + k[i:]


def llm_lora_key(key: str) -> str:
    """Map an LLM LoRA key to its name in a PEFT model around the LLaVA CausalLM
    (``base_model.model.model.layers.N.<...>.lora_A.weight``)."""
    k = _drop_adapter_name(key)
    return k if k.startswith("base_model.model.") else "base_model.model." + k


def lora_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """Module paths (relative to the wrapped model) that LoRA keys of ``state`` belong to."""
    out = set()
    for k in state:
        m = _LORA_KEY.match(_drop_adapter_name(k))
        if m is None:
            raise ValueError(f"{k!r} is not a LoRA parameter name (expected '<module>.lora_A.weight' and alike)")
        out.add(m.group("module"))
    return sorted(out)


def lora_ranks(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """``{module: r}`` from the shapes of the ``lora_A`` weights of ``state``."""
    ranks = {}
    for k, v in state.items():
        m = _LORA_KEY.match(_drop_adapter_name(k))
        if m is not None and m.group("kind") == "lora_A":
            ranks[m.group("module")] = int(v.shape[0])
    return ranks


def split_adapter_state(state: dict[str, torch.Tensor], source: str = "adapter") -> tuple[dict, dict]:
    """Split an LLM adapter's tensors into ``(llm, vit)``, keyed for PEFT models around the CausalLM
    and around the CLIP model respectively (:func:`llm_lora_key`, :func:`vit_lora_key`).

    Raises ValueError (naming ``source``) for tensors that are not LoRA weights.
    """
    llm, vit, other = {}, {}, []
    for k, v in state.items():
        if not is_lora_key(k):
            other.append(k)
        elif is_vision_key(k):
            vit[vit_lora_key(k)] = v
        else:
            llm[llm_lora_key(k)] = v
    if other:
        raise ValueError(f"{source}: {len(other)} tensors are not LoRA weights ({other[:4]}); "
                         "only LoRA adapters (bias='none') can be merged")
    return llm, vit


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)

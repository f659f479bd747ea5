"""Command-line arguments of the training entry points (HfArgumentParser dataclasses).

Every flag of the published ``sqllava_med.sh`` / ``dpo_finetune.sh`` is accepted unchanged,
including spellings transformers 5 dropped: ``--evaluation_strategy`` (mapped to
``--eval_strategy``), ``--warmup_ratio`` (mapped to a fractional ``--warmup_steps``) and ``--tf32``
on a machine without CUDA (logged and ignored; transformers would refuse it). ``--report_to wandb``
without wandb installed falls back to no reporting, with a warning. ``--data_aug`` and
``--lazy_preprocess`` are accepted (data is always loaded lazily;
``--data_aug True`` is refused: the published runs use False and it is not implemented).
LLaVA's ``train.py`` flags are accepted with LLaVA's meaning: ``--bits``/``--double_quant``/
``--quant_type`` (QLoRA), ``--tune_mm_mlp_adapter`` (projector pretraining), ``--freeze_backbone``,
``--freeze_mm_mlp_adapter``, and SQ-LLaVA's ``--pretrain_lora`` (the ViT-LoRA's start). Where this
training differs from the published one, a flag gives the published behaviour
(``--loss_averaging``, ``--model_max_length_unit``, ``--data_vuser_turns``; docs/Differences.md#training).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import logging
import os
import tempfile
import typing
from dataclasses import dataclass, field

import torch
import transformers

from stllava.errors import StllavaError
from stllava.train.dpo_loss import LOSS_TYPES
from stllava.train.ref_cache import REF_CACHE_NAME

logger = logging.getLogger(__name__)


class FlagError(StllavaError, ValueError):
    """A flag value this implementation refuses (the message names the flag and what to pass)."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A LLaVA model folder (ours, or a released 'llava' one: vision tower and projector included) or a "
                "plain LLaMA/Vicuna folder (then --vision_tower attaches a tower and a new projector)."})
    version: str = field(default="v1_sq", metadata={
        "help": "Conversation template: v1_sq (self-questioning, stage 1), v1/vicuna_v1, llava_v1, plain. Recorded "
                "as conv_mode in every checkpoint's config.json (the generating tools' default template)."})
    vision_tower: str | None = field(default=None, metadata={
        "help": "CLIP vision tower folder or hub id. With a full LLaVA model its weights replace the model's tower "
                "weights (as the published scripts expect)."})
    mm_vision_select_layer: int = field(default=-2, metadata={"help": "Tower layer whose hidden state is used."})
    mm_vision_select_feature: str = field(default="patch", metadata={
        "help": "'patch' drops the CLS token, 'cls_patch' keeps it."})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={
        "help": "File with projector weights (mm_projector.bin, or a non_lora_trainables.bin): every "
                "'*mm_projector.*' key is loaded into the projector."})
    mm_projector_type: str = field(default="cluster", metadata={
        "help": "Projector: cluster (SQ-LLaVA prototype extractor), linear, mlp<N>x_gelu, identity. Must match "
                "the model's when it already has one."})
    mm_use_im_start_end: bool = field(default=False, metadata={
        "help": "Wrap image tokens in <im_start>/<im_end> (not supported; the STLLaVA-Med runs use False)."})
    mm_use_im_patch_token: bool = field(default=False, metadata={
        "help": "Use <im_patch> tokens (not supported; the STLLaVA-Med runs use False)."})
    data_aug: bool = field(default=False, metadata={
        "help": "Accepted for the published scripts (which pass False); True is not implemented."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel; default flash_attention_2 when flash-attn is installed and CUDA is used, "
                "else sdpa."})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={
        "help": "Projector pretraining (LLaVA's stage 0): train the projector alone (LLM and tower frozen; "
                "with --version plain on image-caption data) and save only mm_projector.bin (+ config) in every "
                "checkpoint-N/ and the output folder: the file --pretrain_mm_mlp_adapter reads."})
    freeze_backbone: bool = field(default=False, metadata={
        "help": "LLaVA's meaning: freeze the LLM body (embeddings and decoder layers). Without --lora_enable "
                "lm_head and the projector still train; with LoRA everything but the adapters is frozen anyway."})
    pretrain_lora: str | None = field(default=None, metadata={
        "help": "Start the ViT-LoRA (--vit_lora_enable) from a saved Vit-lora/ folder or its adapter weights file "
                "(.safetensors or .bin); its rank must equal --lora_r_vit."})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={
        "help": "LLaVA-Med-format JSON list (or .jsonl): records with 'id', optional 'image', 'conversations'."})
    image_folder: str | None = field(default=None, metadata={
        "help": "Folder the records' 'image' paths are relative to."})
    image_aspect_ratio: str = field(default="pad", metadata={
        "help": "'pad': pad images to a square with the processor's mean colour before the CLIP processor; "
                "anything else: the processor alone (resize + centre crop)."})
    lazy_preprocess: bool = field(default=True, metadata={
        "help": "Accepted for the published scripts; records are always tokenized lazily."})
    sq_r: float = field(default=0.3, metadata={
        "help": "Self-questioning ratio: probability that a human turn after the first becomes a VUSER turn "
                "(v1_sq, records with an image). Drawn reproducibly from (seed, epoch, record index)."})
    on_bad_sample: str = field(default="stop", metadata={
        "help": "What to do with bad records found at start-up (missing/unreadable/truncated images, roles out "
                "of order, <image> mismatches, too long): 'stop' with the report, or 'skip' them and log the count.",
        "choices": ["stop", "skip"]})
    verify_workers: int = field(default=8, metadata={"help": "Threads decoding images in the start-up data check."})
    data_vuser_turns: str = field(default="train", metadata={
        "help": "A 'vuser' turn already in the data: 'train' it like a converted one (question + </s> are "
                "targets), or mask it like an instruction without </s> ('published', as the published preprocess "
                "did; docs/Differences.md#data-vuser-turns). Turns converted by --sq_r are trained either way.",
        "choices": ["train", "published"]})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None, metadata={"help": "Accepted for compatibility (models load locally)."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (HF name)."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Must stay False: the batches carry 'images', which the Trainer would otherwise drop."})
    model_max_length: int = field(default=2048, metadata={
        "help": "Maximum sequence length, counted as --model_max_length_unit says. Longer records are reported by "
                "the start-up check; samples are right-padded and cut to this."})
    model_max_length_unit: str = field(default="positions", metadata={
        "help": "What --model_max_length counts: 'positions' (model positions: an image counts its patch tokens, "
                "576 for CLIP-L/336) or 'text_tokens' (the published code: input ids, an image counting one, so a "
                "sample can reach model_max_length + 575 positions).", "choices": ["positions", "text_tokens"]})
    loss_averaging: str = field(default="tokens", metadata={
        "help": "SFT loss: 'tokens' (transformers 5: cross-entropy summed over every target token of the "
                "accumulated batch on all processes, divided by their count) or 'micro_batch' (the published "
                "transformers 4.3x behaviour: the mean over each micro-batch's tokens, averaged over "
                "micro-batches and processes).", "choices": ["tokens", "micro_batch"]})
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={
        "help": "LLaVA's meaning: keep the projector frozen (it is trained by default)."})
    bits: int = field(default=16, metadata={
        "help": "QLoRA: 4 or 8 loads the LLM's Linear layers through bitsandbytes (tower, projector and lm_head "
                "stay in --bf16/--fp16) and prepares it for k-bit training (peft); needs --lora_enable (or "
                "--tune_mm_mlp_adapter / --freeze_backbone) and bitsandbytes (pip install 'stllava[qlora]'). "
                "16: no quantization.", "choices": [4, 8, 16]})
    double_quant: bool = field(default=True, metadata={
        "help": "4-bit: quantize the quantization constants too (bitsandbytes double quantization)."})
    quant_type: str = field(default="nf4", metadata={
        "help": "4-bit data type: nf4 or fp4.", "choices": ["nf4", "fp4"]})
    trust_resume_checkpoint: bool = field(default=False, metadata={
        "help": "Resume under --deepspeed without checking the checkpoint against the file hashes saved with it "
                "(stllava_manifest.json). DeepSpeed unpickles checkpoint files: only for checkpoints you trust."})
    lora_enable: bool = field(default=False, metadata={"help": "LoRA on every LLM Linear except lm_head."})
    lora_r: int = field(default=64, metadata={"help": "LLM LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LLM LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LLM LoRA dropout."})
    lora_weight_path: str = field(default="", metadata={"help": "Accepted for compatibility (unused)."})
    lora_bias: str = field(default="none", metadata={"help": "LoRA bias: none, all or lora_only."})
    mm_projector_lr: float | None = field(default=None, metadata={
        "help": "Learning rate of the projector (default: --learning_rate)."})
    vision_tower_lr: float | None = field(default=None, metadata={
        "help": "Learning rate of the vision tower's trainable weights, i.e. ViT-LoRA (default: --learning_rate). "
                "Honoured whether or not --mm_projector_lr is set."})
    group_by_modality_length: bool = field(default=False, metadata={
        "help": "Length-grouped sampling that keeps image and text-only samples in separate batches (LLaVA)."})
    vit_lora_enable: bool = field(default=False, metadata={
        "help": "LoRA on every Linear of the CLIP encoder (q/k/v/out_proj, fc1, fc2), trained at --vision_tower_lr "
                "and saved as Vit-lora/."})
    lora_r_vit: int = field(default=32, metadata={"help": "ViT-LoRA rank."})
    lora_alpha_vit: int = field(default=64, metadata={"help": "ViT-LoRA alpha."})
    lora_dropout_vit: float = field(default=0.2, metadata={"help": "ViT-LoRA dropout (0.2 in SFT, 0.1 in DPO)."})
    evaluation_strategy: str | None = field(default=None, metadata={
        "help": "Legacy spelling of --eval_strategy (transformers < 4.46), as the published scripts pass it."})
    warmup_ratio: float | None = field(default=None, metadata={
        "help": "Legacy: fraction of the steps spent warming up (transformers 5 takes it as a float "
                "--warmup_steps < 1); mapped to --warmup_steps."})

    def __post_init__(self):
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None:
            if not 0.0 <= self.warmup_ratio < 1.0:
                raise FlagError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            if self.warmup_steps:
                raise FlagError("give either --warmup_ratio or --warmup_steps, not both")
            self.warmup_steps = self.warmup_ratio
        if self.tf32 and not torch.cuda.is_available():
            logger.warning("--tf32 ignored: it is a CUDA (Ampere+) setting and no GPU is available")
            self.tf32 = None
        report = self.report_to if isinstance(self.report_to, list) else [self.report_to]
        if "wandb" in report and importlib.util.find_spec("wandb") is None:
            logger.warning("--report_to wandb: wandb is not installed; reporting to nothing instead "
                           "(pip install wandb to get it)")
            report = [r for r in report if r != "wandb"] or ["none"]
            self.report_to = report
        super().__post_init__()


# ---------------------------------------------------------------------------------------------
# Stage 3 (DPO): the SFT flags, with DPO's defaults and additions

REF_MODES = ("adapter_disabled", "separate")


@dataclass
class DPOModelArguments(ModelArguments):
    version: str = field(default="v1", metadata={
        "help": "Conversation template of the pairs (the published run: v1); recorded as conv_mode in every "
                "checkpoint's config.json."})
    model_base: str | None = field(default=None, metadata={
        "help": "Base folder of a LoRA-layout stage-1 checkpoint given as --model_name_or_path (the model stage 1 "
                "started from); the merged start model is written to <output_dir>/start_model/."})


@dataclass
class DPOTrainingArguments(TrainingArguments):
    """The SFT training flags plus DPO's; ``--lora_dropout_vit`` defaults to 0.1 here (docs/Method.md#vision-tower)."""

    lora_dropout_vit: float = field(default=0.1, metadata={"help": "ViT-LoRA dropout (0.1 in DPO, 0.2 in SFT)."})
    dpo_beta: float = field(default=0.1, metadata={"help": "β of the DPO loss (the published run: 0.1)."})
    dpo_loss_type: str = field(default="sigmoid", metadata={
        "help": "sigmoid (DPO), ipo (on per-token mean log-probs, as TRL), hinge, or robust (robust DPO, "
                "Chowdhury et al. 2024: unbiased under labels flipped with probability --label_smoothing).",
        "choices": list(LOSS_TYPES)})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "ε, the believed share of wrong preference labels: with sigmoid, conservative DPO (Mitchell 2023; "
                "0 ≤ ε ≤ 0.5); with robust, its flip rate (0 ≤ ε < 0.5). 0 = the plain loss."})
    rpo_alpha: float = field(default=0.0, metadata={
        "help": "Weight of a negative log-likelihood term on the chosen answers (mean per answer token) added "
                "to the DPO loss, as TRL's rpo_alpha (RPO, Pang et al. 2024): it keeps the chosen answers likely "
                "while their margin grows. 0 = the paper's pure DPO."})
    ref_model: str | None = field(default=None, metadata={
        "help": "Where reference log-probs come from: adapter_disabled (the policy with its LoRA adapters, ViT-LoRA "
                "included, disabled and the start projector swapped in; default with --lora_enable) or separate (a "
                "frozen copy of the start model; default otherwise).", "choices": list(REF_MODES)})
    precompute_ref_log_probs: bool = field(default=False, metadata={
        "help": "Compute the reference log-probs of the whole training set once before training and cache them "
                "(--ref_log_probs_path); no reference model is kept while training."})
    eval_data_path: str | None = field(default=None, metadata={
        "help": "Held-out preference pairs (same format as --data_path): scored with eval_rewards/* and "
                "eval_logps/* at every evaluation and once after training (written to eval_results.json)."})
    ref_log_probs_path: str | None = field(default=None, metadata={
        "help": f"Cache file of precomputed reference log-probs (default <output_dir>/{REF_CACHE_NAME}); reused "
                "when its fingerprint (data, start model, preprocessing) matches."})


# The dataclasses each entry point parses its flags into, in the order it returns them.
SFT_ARGUMENTS = (ModelArguments, DataArguments, TrainingArguments)
DPO_ARGUMENTS = (DPOModelArguments, DataArguments, DPOTrainingArguments)
SFT_PROG = "python -m stllava.train.train_sft"
DPO_PROG = "python -m stllava.train.train_dpo"


def check_output_dir(output_dir: str | None) -> None:
    """Refuse (:class:`FlagError`) an ``--output_dir`` that is a file,
    lies under a file, or cannot be created or written (permissions, a read-only file system).
    Creates the folder; returns None."""
    if not output_dir:
        return
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FlagError(f"--output_dir {output_dir} is a file, not a folder; give a folder for the checkpoints")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        parent = os.path.dirname(os.path.abspath(output_dir))
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        why = f"{parent} is a file, not a folder" if os.path.isfile(parent) else f"{e.strerror}"
        raise FlagError(f"--output_dir {output_dir} cannot be created: {why}; give a folder you can write to") from None
    try:
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise FlagError(f"--output_dir {output_dir} cannot be written ({e.strerror}); give a folder you can write "
                        "to") from None


def check_supported(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """Refuse flag values the published flags allow but this implementation does not, missing
    inputs and an unusable ``--output_dir`` (:class:`FlagError` naming the flag and the supported
    value)."""

    if model_args.data_aug:
        raise FlagError("--data_aug True is not implemented (the published STLLaVA-Med runs use False)")
    if model_args.mm_use_im_start_end or model_args.mm_use_im_patch_token:
        raise FlagError("--mm_use_im_start_end / --mm_use_im_patch_token True are not supported "
                        "(the STLLaVA-Med scripts use False)")
    if not 0.0 <= data_args.sq_r <= 1.0:
        raise FlagError(f"--sq_r must be in [0, 1], got {data_args.sq_r}")
    if training_args.lora_bias not in ("none", "all", "lora_only"):
        raise FlagError(f"--lora_bias must be none, all or lora_only, got {training_args.lora_bias!r}")
    if not model_args.model_name_or_path:
        raise FlagError("--model_name_or_path is required")
    if not data_args.data_path:
        raise FlagError("--data_path is required")
    from stllava.jsonl import not_a_file

    if not os.path.exists(data_args.data_path):
        raise FlagError(f"--data_path {data_args.data_path} does not exist; give the training data file "
                        "(a JSON list or JSONL of records)")
    why = not_a_file(data_args.data_path)  # a folder, or a device such as /dev/zero (never read)
    if why is not None:
        raise FlagError(f"--data_path {data_args.data_path} {why}; give the training data file "
                        "(a JSON list or JSONL of records)")
    check_output_dir(training_args.output_dir)  # a file, or not writable: refused before any model loads
    check_trainable_flags(model_args, training_args)
    if training_args.bits != 16:
        check_kbit_training(training_args)


def check_trainable_flags(model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """Refuse (:class:`FlagError`) combinations of LLaVA's trainable-part flags that would train
    nothing or silently freeze what the user asked to train (also ``--bits`` with only the
    quantized LLM to train); ``--pretrain_lora`` needs
    ``--vit_lora_enable`` and an existing path."""

    lora = training_args.lora_enable or training_args.vit_lora_enable
    if model_args.tune_mm_mlp_adapter and lora:
        raise FlagError("--tune_mm_mlp_adapter trains the projector alone: drop --lora_enable / --vit_lora_enable "
                        "(LLaVA would freeze the adapters it just added)")
    if model_args.tune_mm_mlp_adapter and training_args.freeze_mm_mlp_adapter:
        raise FlagError("--tune_mm_mlp_adapter with --freeze_mm_mlp_adapter leaves nothing to train; drop one")
    if training_args.bits != 16 and not (training_args.lora_enable or model_args.tune_mm_mlp_adapter
                                         or model_args.freeze_backbone):
        raise FlagError(f"--bits {training_args.bits} quantizes the LLM, whose weights then cannot train: add "
                        "--lora_enable True (QLoRA), or --tune_mm_mlp_adapter / --freeze_backbone")
    if model_args.pretrain_lora:
        if not training_args.vit_lora_enable:
            raise FlagError(f"--pretrain_lora {model_args.pretrain_lora} starts the ViT-LoRA: add --vit_lora_enable")
        if not os.path.exists(model_args.pretrain_lora):
            raise FlagError(f"--pretrain_lora {model_args.pretrain_lora} does not exist; give a saved Vit-lora/ "
                            "folder or its adapter_model.safetensors / .bin")


def check_kbit_training(training_args: TrainingArguments) -> None:
    """Refuse (:class:`FlagError`, naming what is needed) ``--bits 4|8`` when bitsandbytes is not
    installed or has no backend for this machine (CUDA; recent bitsandbytes also runs on the CPU),
    and under ZeRO-3 (which cannot partition quantized weights)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    flag = f"--bits {training_args.bits}"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FlagError(f"{flag} (QLoRA) needs bitsandbytes, which is not installed: pip install 'stllava[qlora]' "
                        "(or pip install bitsandbytes), on a CUDA machine or with bitsandbytes >= 0.50 on the CPU; "
                        "or train without --bits")
    from transformers.integrations import validate_bnb_backend_availability

    if not validate_bnb_backend_availability(raise_exception=False):
        raise FlagError(f"{flag} (QLoRA): the installed bitsandbytes has no backend for this machine; it needs a "
                        "CUDA GPU (or bitsandbytes >= 0.50 for the CPU)")
    if training_args.deepspeed and is_deepspeed_zero3_enabled():
        raise FlagError(f"{flag}: ZeRO-3 cannot partition bitsandbytes weights; use --deepspeed scripts/zero2.json "
                        "or no --deepspeed")


# ---------------------------------------------------------------------------------------------
# The parser: this project's flags first, in groups, then the Trainer's inherited ones

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each help text; the description keeps its line breaks."""


GROUP_TITLES = {
    "ModelArguments": "model (stllava): the model to train and its vision parts",
    "DPOModelArguments": "model (stllava): the model to train and its vision parts",
    "DataArguments": "data (stllava): records, images, self-questioning, bad records",
    "TrainingArguments": "training (stllava): LoRA, ViT-LoRA, learning rates per part, sampling, length",
    "DPOTrainingArguments": "DPO (stllava): loss, reference model, held-out pairs",
}


class LlavaArgumentParser(transformers.HfArgumentParser):
    """``HfArgumentParser`` whose ``--help`` lists the flags this project adds first, grouped by the
    dataclass that declares them (:data:`GROUP_TITLES`), and the ~150 flags inherited from
    ``transformers.TrainingArguments`` last. Parsing is HfArgumentParser's, unchanged."""

    def __init__(self, dataclass_types, prog: str, description: str | None = None):
        usage = (f"{prog} --model_name_or_path M --data_path F --image_folder D --output_dir O [flag value ...]\n"
                 "(the flags this project adds come first below, then those of transformers.TrainingArguments)")
        super().__init__(dataclass_types, prog=prog, usage=usage, description=description,
                         formatter_class=_HelpFormatter)

    def _add_dataclass_arguments(self, dtype):
        hints = typing.get_type_hints(dtype)
        # Our dataclasses, most derived first (transformers' own class is also named TrainingArguments;
        # ours may live in __main__ when an entry point runs as a script).
        ours = [c for c in dtype.__mro__ if c.__name__ in GROUP_TITLES and not c.__module__.startswith("transformers")]
        groups = self._stllava_groups = getattr(self, "_stllava_groups", {})
        inherited = []
        for f in dataclasses.fields(dtype):
            if not f.init:
                continue
            f.type = hints[f.name]
            owner = next((c for c in ours if f.name in inspect.get_annotations(c)), None)
            if owner is None:
                inherited.append(f)
                continue
            title = GROUP_TITLES[owner.__name__]
            if title not in groups:
                groups[title] = self.add_argument_group(title)
            self._parse_dataclass_field(groups[title], f)
        if inherited:
            group = self.add_argument_group("inherited from transformers.TrainingArguments (HF Trainer)")
            for f in inherited:
                self._parse_dataclass_field(group, f)


def parse_args(argv: list[str] | None = None, prog: str = SFT_PROG, description: str | None = None):
    """Parse ``argv`` into ``(ModelArguments, DataArguments, TrainingArguments)``; unknown flags raise
    (argparse: usage message, exit code 2)."""
    return LlavaArgumentParser(SFT_ARGUMENTS, prog, description).parse_args_into_dataclasses(args=argv)


def parse_dpo_args(argv: list[str] | None = None, prog: str = DPO_PROG, description: str | None = None):
    """``(DPOModelArguments, DataArguments, DPOTrainingArguments)`` from ``argv``; unknown flags exit 2 (argparse)."""
    return LlavaArgumentParser(DPO_ARGUMENTS, prog, description).parse_args_into_dataclasses(args=argv)


# ---------------------------------------------------------------------------------------------
# docs/Flags.md: the table of this project's flags, generated from the dataclasses above

def _default_cell(cls, name: str) -> str:
    f = {f.name: f for f in dataclasses.fields(cls)}.get(name)
    if f is None:
        return "—"
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return "(none)" if value is None or value == "" else f"`{value}`"


def _type_cell(cls, name: str) -> str:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    hint = typing.get_type_hints(cls)[name]
    kinds = [t.__name__ for t in typing.get_args(hint) if t is not type(None)] or [hint.__name__]
    choices = f.metadata.get("choices")
    return " \\| ".join(f"`{c}`" for c in choices) if choices else " or ".join(kinds)


def _help(cls, name: str) -> str:
    text = {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("help", "")
    return text.replace("|", "\\|").replace("<", "&lt;")  # a table cell; <image> is not an HTML tag


def flags_markdown() -> str:
    """docs/Flags.md: one table of every flag the dataclasses of :data:`SFT_ARGUMENTS` and
    :data:`DPO_ARGUMENTS` declare (not those inherited from ``transformers.TrainingArguments``),
    with its default in each entry point ("—": not a flag there), its type and its help text.
    Returns the markdown; ``tests/train/test_flags_doc.py`` fails when the file differs."""
    lines = ["# Training flags", "",
             "<!-- generated by `python -m stllava.train.arguments --markdown > docs/Flags.md`; "
             "tests/train/test_flags_doc.py checks it -->", "",
             "The flags this project declares for `python -m stllava.train.train_sft` (stage 1, `sqllava_med.sh`) "
             "and `python -m stllava.train.train_dpo` (stage 3, `dpo_finetune.sh`), from the dataclasses of "
             "`stllava/train/arguments.py`. Every other flag is `transformers.TrainingArguments`' "
             "(`--learning_rate`, `--bf16`, `--deepspeed`, ...; `--help` lists them after these). A flag is spelled "
             "`--name value` (also `--name-with-dashes`); a boolean takes `True` or `False`, and alone means "
             "`True`. docs/Training.md says what the flags do together.", "",
             "| flag | train_sft default | train_dpo default | type | meaning |", "|---|---|---|---|---|"]
    sft, dpo = dict(zip(("model", "data", "training"), SFT_ARGUMENTS)), dict(zip(("model", "data", "training"),
                                                                              DPO_ARGUMENTS))
    for part in ("model", "data", "training"):
        names = list(inspect.get_annotations(sft[part]))
        names += [n for n in inspect.get_annotations(dpo[part]) if n not in names]
        for name in names:
            in_sft = name in {f.name for f in dataclasses.fields(sft[part])}
            owner = sft[part] if in_sft else dpo[part]
            meaning = _help(owner, name)
            if in_sft and name in inspect.get_annotations(dpo[part]) and _help(dpo[part], name) != meaning:
                meaning += f" train_dpo: {_help(dpo[part], name)}"
            lines.append(f"| `--{name}` | {_default_cell(sft[part], name)} | {_default_cell(dpo[part], name)} "
                         f"| {_type_cell(owner, name)} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    from stllava.train import arguments  # the package's module, not this __main__ copy

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m stllava.train.arguments --markdown  (prints docs/Flags.md)")
    sys.stdout.write(arguments.flags_markdown())

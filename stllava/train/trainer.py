"""``LLaVATrainer``: the HF Trainer with LLaVA's optimizer groups, sampler and checkpoints.

Everything a second trainer needs (the DPO one) is in :class:`LlavaTrainerMixin`; put it first in
the bases of any ``transformers.Trainer`` subclass (``class X(LlavaTrainerMixin, DPOTrainer)``):

- :meth:`~LlavaTrainerMixin.create_optimizer`: decay / no-decay × {LLM, projector at
  ``mm_projector_lr``, vision tower at ``vision_tower_lr``} (:func:`build_param_groups`). Each rate
  is honoured on its own, whether or not the others are set (docs/Differences.md#vision-tower-lr).
  With ZeRO optimizer offload the same groups go to DeepSpeed's CPU Adam.
- :meth:`~LlavaTrainerMixin._get_train_sampler`: ``stllava.train.sampler.build_train_sampler``.
- :meth:`~LlavaTrainerMixin.save_model`: the layout of ``stllava.train.checkpoint`` at every save
  (``checkpoint-N/``) and at the end, gathered under ZeRO-3; the Trainer adds optimizer,
  scheduler, RNG and trainer state to each ``checkpoint-N/`` (DeepSpeed: its ``global_stepN/`` shards).
- :meth:`~LlavaTrainerMixin._load_from_checkpoint`: resume restores LLM LoRA, projector and
  ViT-LoRA (without DeepSpeed; DeepSpeed reloads them from its shards).
- :meth:`~LlavaTrainerMixin._save_checkpoint`: every ``checkpoint-N/`` is written aside
  (``<output_dir>/.stllava-staging/``), gets a manifest of its files' hashes
  (``stllava.train.manifest``, checked before a DeepSpeed resume) and is renamed into place when
  complete (``stllava.train.saving``): a crash or a full disk never leaves a half checkpoint.
- LLaVA's projector pretraining (``args.tune_mm_mlp_adapter``, set from the model flag by the entry
  point): every save writes only ``mm_projector.bin`` + config (+ tokenizer, image processor).

:class:`LLaVATrainer` adds ``--loss_averaging micro_batch``: the published per-micro-batch mean of
the cross-entropy instead of transformers 5's token-weighted average (docs/Differences.md#loss-averaging).
"""
from __future__ import annotations

import logging
import os

import torch
from transformers import Trainer

from stllava.train.checkpoint import (
    PROJECTOR,
    VISION,
    VIT_LORA,
    gather_state_dict,
    load_llava_trainables,
    load_projector_checkpoint,
    param_part,
    save_llava_checkpoint,
    save_projector_checkpoint,
    trainable_state_dict,
)
from stllava.train.manifest import write_manifest
from stllava.train.sampler import build_train_sampler
from stllava.train.saving import STAGING, DiskFullError, is_disk_full, publish_folder, remove_folder, saved_account
from stllava.train.throughput import ThroughputLogMixin

logger = logging.getLogger(__name__)

TRAINING_ARGS_NAME = "training_args.bin"


def optimizer_part(name: str) -> str:
    """``"llm"``, ``"projector"`` or ``"vision_tower"`` (ViT-LoRA, or tower weights if unfrozen)."""
    part = param_part(name)
    return "projector" if part == PROJECTOR else "vision_tower" if part in (VIT_LORA, VISION) else "llm"


def part_lr(part: str, args) -> float:
    """Learning rate of an optimizer part: ``projector`` → ``mm_projector_lr``, ``vision_tower`` →
    ``vision_tower_lr``, each falling back to ``learning_rate`` when None (0 is a rate of 0)."""
    if part == "projector" and getattr(args, "mm_projector_lr", None) is not None:
        return float(args.mm_projector_lr)
    if part == "vision_tower" and getattr(args, "vision_tower_lr", None) is not None:
        return float(args.vision_tower_lr)
    return float(args.learning_rate)


def length_image_tokens(args, image_tokens: int) -> int:
    """How many positions an image counts towards ``--model_max_length``: its ``image_tokens``
    features (``--model_max_length_unit positions``, the default), or 1 (``text_tokens``: the
    published code cut input ids, an image being one of them)."""
    return 1 if getattr(args, "model_max_length_unit", "positions") == "text_tokens" else image_tokens


def build_param_groups(model: torch.nn.Module, args, decay_names: set[str] | list[str]) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters: for each part (LLM, projector,
    vision tower) a decay group (``weight_decay``) and a no-decay one (biases and norms: not in
    ``decay_names``), each with the part's learning rate. Empty groups are left out. Each group
    carries a ``"name"`` (e.g. ``"projector/no_decay"``) for logs and tests."""
    decay_names = set(decay_names)
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part, decay = optimizer_part(name), name in decay_names
        g = groups.setdefault((part, decay), {
            "params": [], "name": f"{part}/{'decay' if decay else 'no_decay'}",
            "weight_decay": args.weight_decay if decay else 0.0, "lr": part_lr(part, args)})
        g["params"].append(p)
    order = [(part, d) for part in ("llm", "projector", "vision_tower") for d in (True, False)]
    return [groups[k] for k in order if k in groups]


def _deepspeed_offloads_optimizer(args) -> bool:
    cfg = getattr(getattr(args, "hf_deepspeed_config", None), "config", None) or {}
    device = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


class LlavaTrainerMixin(ThroughputLogMixin):
    """LLaVA's optimizer groups, sampler, checkpoint saving and resume for any HF Trainer subclass;
    tokens/s, samples/s and MFU in every training log (``stllava.train.throughput``).

    Extra constructor keyword: ``image_processor`` (saved as ``preprocessor_config.json``).
    """

    def __init__(self, *args, image_processor=None, **kwargs):
        self.image_processor = image_processor
        self._staging_save = False
        super().__init__(*args, **kwargs)

    # ---- optimizer -------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """Create ``self.optimizer`` over :func:`build_param_groups` (once) and return it."""
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            groups = build_param_groups(opt_model, self.args, self.get_decay_parameter_names(opt_model))
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            if _deepspeed_offloads_optimizer(self.args):
                # ZeRO-Offload refuses client optimizers other than DeepSpeed's CPU Adam.
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                optimizer_cls = DeepSpeedCPUAdam
                optimizer_kwargs = {"lr": self.args.learning_rate, "adamw_mode": True,
                                    "betas": (self.args.adam_beta1, self.args.adam_beta2),
                                    "eps": self.args.adam_epsilon}
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            logger.info("optimizer %s with %d parameter groups", type(self.optimizer).__name__, len(groups))
            for g in groups:
                logger.info("optimizer group %-24s %4d tensors %12d params  lr %.3g  weight_decay %g", g["name"],
                            len(g["params"]), sum(int(getattr(p, "ds_numel", p.numel())) for p in g["params"]),
                            g["lr"], g["weight_decay"])
        return self.optimizer

    # ---- sampler ---------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if dataset is None or not hasattr(dataset, "__len__"):
            return super()._get_train_sampler(train_dataset)
        return build_train_sampler(dataset, self.args)

    # ---- saving ----------------------------------------------------------------------------
    def llava_config_updates(self) -> dict:
        """Config fields recorded with every checkpoint (the data setup the model was trained for)."""
        out = {"tokenizer_padding_side": "right"}
        if getattr(self.args, "model_max_length", None):
            out["tokenizer_model_max_length"] = self.args.model_max_length
        return out

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the checkpoint layout of ``stllava.train.checkpoint`` to ``output_dir``.

        Every rank must call it (the Trainer does): under ZeRO-3 the trainable parameters (all of
        them without LoRA) are gathered first; the main process writes."""
        output_dir = output_dir or self.args.output_dir
        model = self.model
        if getattr(self.args, "tune_mm_mlp_adapter", False):  # LLaVA's stage 0: the projector alone
            state = trainable_state_dict(model)
            if self.args.should_save:
                save_projector_checkpoint(model, state, output_dir, tokenizer=self.processing_class,
                                          image_processor=self.image_processor,
                                          config_updates=self.llava_config_updates())
                torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()
            return
        if hasattr(model, "peft_config"):
            state = trainable_state_dict(model)
        else:
            state = gather_state_dict(model.named_parameters())
        if self.args.should_save:
            save_llava_checkpoint(model, state, output_dir, tokenizer=self.processing_class,
                                  image_processor=self.image_processor, config_updates=self.llava_config_updates())
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _get_output_dir(self, trial) -> str:
        # While _save_checkpoint runs, the Trainer's own checkpoint writes (model, optimizer,
        # scheduler, RNG, trainer state, rotation) go to the staging folder.
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging_save else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint save, written into ``<run dir>/.stllava-staging/checkpoint-N``,
        then (main process) given its manifest and renamed to ``<run dir>/checkpoint-N``; older
        checkpoints are rotated (``--save_total_limit``) only then. Every process must call it (the
        Trainer does). Raises :class:`~stllava.train.saving.DiskFullError` when the disk fills:
        the partial folder is removed and the message names the last complete checkpoint."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(run_dir, STAGING, name), os.path.join(run_dir, name)
        if self.args.should_save:
            remove_folder(staged)  # what a killed save left
        self._barrier()
        self._staging_save = True
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:
            if not is_disk_full(e, run_dir):
                raise
            remove_folder(staged)
            saved, redo = saved_account(run_dir, self.state.max_steps)
            raise DiskFullError(f"no space left on the disk while saving {final} ({' '.join(str(e).split())[:160]}); "
                                f"the partial checkpoint was removed; {saved}; fix: free space on the disk of "
                                f"{run_dir}, {redo}") from None
        finally:
            self._staging_save = False
        self._barrier()  # every process has written its shards
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            if best and os.path.realpath(best) == os.path.realpath(staged):
                self.state.best_model_checkpoint = final  # found in the staging folder by the Trainer
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            write_manifest(staged)
            publish_folder(staged, final)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self._barrier()

    @staticmethod
    def _barrier() -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Only reached through paths that bypass save_model (none in Trainer.train); keep them consistent.
        output_dir = output_dir or self.args.output_dir
        if state_dict is None:
            state_dict = (trainable_state_dict(self.model) if hasattr(self.model, "peft_config")
                          else gather_state_dict(self.model.named_parameters()))
        if self.args.should_save:
            save_llava_checkpoint(self.model, state_dict, output_dir, tokenizer=self.processing_class,
                                  image_processor=self.image_processor, config_updates=self.llava_config_updates())

    # ---- resume ----------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore LLM LoRA, projector and ViT-LoRA from ``resume_from_checkpoint`` (the Trainer
        then restores optimizer, scheduler and RNG). Not used under DeepSpeed, whose
        ``global_stepN/`` shards hold all trainable states."""
        model = self.model if model is None else model
        if getattr(self.args, "tune_mm_mlp_adapter", False):
            load_projector_checkpoint(model, resume_from_checkpoint)
        elif hasattr(model, "peft_config"):
            load_llava_trainables(model, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)


class LLaVATrainer(LlavaTrainerMixin, Trainer):
    """The stage-1 (SFT) trainer: ``transformers.Trainer`` + :class:`LlavaTrainerMixin`.

    ``--loss_averaging micro_batch`` turns off the Trainer's loss kwargs: the model then averages
    the cross-entropy over each micro-batch's target tokens, the Trainer divides by the
    accumulation steps and the processes' gradients are averaged — the published (transformers
    4.3x) loss. The default (``tokens``) lets transformers 5 pass ``num_items_in_batch``: one sum
    over every target token of the accumulated batch on all processes, divided by their count."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self.args, "loss_averaging", "tokens") == "micro_batch":
            # The Trainer's documented switch: no num_items_in_batch is counted or passed, the loss
            # is divided by the accumulation steps, and it is not rescaled across devices.
            self.model_accepts_loss_kwargs = False

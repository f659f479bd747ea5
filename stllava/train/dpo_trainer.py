"""``LlavaDPOTrainer``: stage-3 DPO on the LLaVA model, with a reference that really is the start model.

The trainer is ``transformers.Trainer`` + :class:`~stllava.train.trainer.LlavaTrainerMixin` (the SFT
optimizer groups, sampler, checkpoint layout and resume, unchanged) + a ``compute_loss`` doing DPO
(``stllava.train.dpo_loss``): chosen and rejected go through the model as ONE batch of 2B rows
(one common width, the images repeated), the answer tokens' log-probs are summed per row, and the
loss compares them with the reference's.

**The reference** (docs/Method.md#dpo-reference) is the whole start model, tower and projector
included: a reference pass through the *policy's* trainable projector or tower would drift with
training (docs/Differences.md#dpo-reference). Its log-probs come from the start weights only, in one of three ways
(``--ref_model``, ``--precompute_ref_log_probs``):

``adapter_disabled``  (default with ``--lora_enable``) the policy itself, run with its LLM LoRA and
                      its ViT-LoRA disabled (peft ``disable_adapter()``, the nested tower adapter
                      included) and a frozen copy of the start projector swapped in for the pass.
                      The only extra memory is that projector copy (24M parameters at 7B). Refused
                      when any other weight trains (full fine-tuning, ``--lora_bias`` != none).
``separate``          a frozen copy of the start model, run whole. Under DeepSpeed it is its own
                      inference engine, ZeRO-3-sharded like the policy (as TRL prepares one);
                      otherwise it sits on the training device.
precomputed           one pass over the training set before the first step (with either of the
                      above), cached per record (its index in the file) in a JSON file
                      (``--ref_log_probs_path``, default ``<output_dir>/ref_log_probs.json``) with a
                      fingerprint of data, start model and preprocessing; a rerun with the same
                      fingerprint reuses it. During training no reference model is kept.

Metrics (averaged over the micro-batches of each logging step and over processes): ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``
(policy) and ``ref_logps/chosen``, ``ref_logps/rejected``.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from collections import defaultdict

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from stllava.constants import IGNORE_INDEX
from stllava.train.arguments import REF_MODES, DPOTrainingArguments  # noqa: F401 (old pickles: below)
from stllava.train.checkpoint import gather_state_dict, zero3_init_disabled
from stllava.train.dpo_loss import answer_logps, check_loss_settings, dpo_loss, loss_uses_mean_logps
from stllava.train.ref_cache import REF_CACHE_NAME, read_ref_cache, write_ref_cache
from stllava.train.trainer import LlavaTrainerMixin

logger = logging.getLogger(__name__)

# DPOTrainingArguments is declared in stllava.train.arguments, with every flag, and imported above
# because the training_args.bin of earlier DPO runs pickled it under this module's name.

METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "ref_logps/chosen", "ref_logps/rejected")


# ---------------------------------------------------------------------------------------------
# Model access helpers

def llava_base(model: nn.Module) -> nn.Module:
    """The ``LlavaLlamaForCausalLM`` inside ``model`` (a DeepSpeed engine, DDP, a PEFT model, or itself)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_adapter_reference(model: nn.Module) -> None:
    """Raise ValueError unless disabling ``model``'s adapters and restoring the projector gives the
    start model: ``model`` is a PEFT model and every trainable weight is a LoRA weight or the projector."""
    if not hasattr(model, "peft_config"):
        raise ValueError("--ref_model adapter_disabled needs a LoRA run (--lora_enable True): without adapters "
                         "there is nothing to disable. Use --ref_model separate.")
    bad = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n and "mm_projector" not in n]
    if bad:
        raise ValueError(f"--ref_model adapter_disabled: weights other than LoRA and the projector train ({bad[:3]}); "
                         "disabling the adapters would not restore them. Use --ref_model separate "
                         "(or --lora_bias none).")


def snapshot_projector(model: nn.Module) -> nn.Module:
    """A frozen, unpartitioned copy of ``model``'s projector as it is now (gathered under ZeRO-3:
    every rank must call this)."""
    from stllava.model.projector import build_vision_projector

    base = llava_base(model)
    proj = base.get_model().mm_projector
    state = gather_state_dict(proj.named_parameters())
    with zero3_init_disabled(), torch.random.fork_rng(devices=[]):  # its random init must not move the run's RNG
        ref = build_vision_projector(base.config)
    missing, unexpected = ref.load_state_dict(state, strict=False)
    missing = [k for k in missing if k in dict(ref.named_parameters())]
    if missing or unexpected:
        raise RuntimeError(f"projector copy does not match the projector: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    dtype = next(iter(state.values())).dtype if state else torch.float32
    return ref.to(dtype=dtype).requires_grad_(False).eval()


@contextlib.contextmanager
def reference_weights(model: nn.Module, ref_projector: nn.Module):
    """Within the block, ``model`` (PEFT-wrapped, possibly inside an engine) computes with its start
    weights: LLM LoRA and ViT-LoRA disabled, ``ref_projector`` in place of the projector, eval mode
    (no dropout, no activation checkpointing). Everything is restored on exit."""
    peft_model = model
    while hasattr(peft_model, "module") and isinstance(peft_model.module, nn.Module):
        peft_model = peft_model.module
    inner = llava_base(model).get_model()
    tower = inner.get_vision_tower()
    was_training = peft_model.training
    with contextlib.ExitStack() as stack:
        # Outer adapter first: peft warns about "irregular" adapters when an inner one is already off.
        stack.enter_context(peft_model.disable_adapter())
        if tower is not None and getattr(tower, "lora_enabled", False):
            stack.enter_context(tower.vision_tower.disable_adapter())
        own = inner.mm_projector
        inner.mm_projector = ref_projector
        stack.callback(setattr, inner, "mm_projector", own)
        peft_model.eval()
        stack.callback(peft_model.train, was_training)
        yield


def prepare_deepspeed_reference(model: nn.Module, accelerator) -> nn.Module:
    """``model`` (frozen) as a DeepSpeed inference engine with the run's config: ZeRO-3-sharded when
    the run uses stage 3, else stage 0 (whole on each process); no optimizer, no scheduler."""
    import deepspeed

    cfg = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = cfg.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        hidden = int(llava_base(model).config.hidden_size)
        for key, value in (("reduce_bucket_size", hidden * hidden),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                           ("stage3_param_persistence_threshold", 10 * hidden)):
            if zero.get(key) == "auto":
                zero[key] = value
    else:
        zero["stage"] = 0
    for key in ("optimizer", "scheduler"):
        cfg.pop(key, None)
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    return engine


def concatenated_batch(inputs: dict, pad_token_id: int = 0) -> dict:
    """``{"input_ids", "labels", "attention_mask", "images"?}`` with 2B rows: the chosen samples, then
    the rejected ones, padded to one width; each pair's image is used for both of its rows."""
    parts = {}
    width = max(inputs["chosen_input_ids"].shape[1], inputs["reject_input_ids"].shape[1])
    for key, pad in (("input_ids", pad_token_id), ("labels", IGNORE_INDEX), ("attention_mask", 0)):
        rows = []
        for side in ("chosen", "reject"):
            t = inputs[f"{side}_{key}"]
            rows.append(nn.functional.pad(t, (0, width - t.shape[1]), value=pad))
        parts[key] = torch.cat(rows, 0)
    images = inputs.get("images")
    if images is not None:
        parts["images"] = (list(images) * 2 if isinstance(images, (list, tuple))
                           else torch.cat([images, images]))
    return parts


def forward_with_labels(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` [2B, L] of a :func:`concatenated_batch` under ``model`` (a DeepSpeed
    engine, a PEFT model or the plain one): the labels come out of the model's splice, aligned with
    the logits; no cross-entropy is computed (``compute_loss=False``)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], images=batch.get("images"),
                labels=batch["labels"], compute_loss=False, use_cache=False)
    return out.logits, out.labels


class _PrecomputeReferenceLogps(TrainerCallback):
    """Runs :meth:`LlavaDPOTrainer.precompute_reference_logps` once the model is wrapped (DeepSpeed
    engine built, resume done) and before the first step."""

    def __init__(self, trainer: "LlavaDPOTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.precompute_reference_logps()


class LlavaDPOTrainer(LlavaTrainerMixin, Trainer):
    """DPO with LLaVA's optimizer groups, sampler and checkpoints (see the module docstring).

    Extra keywords: ``ref_model`` (the frozen start model, needed for ``--ref_model separate``
    unless a matching cache exists), ``ref_log_probs_fingerprint`` (what the cache must match),
    ``start_model`` (recorded as ``dpo_start_model`` in every checkpoint's config: the base to load
    it with). The settings come from :class:`~stllava.train.arguments.DPOTrainingArguments` (plain
    TrainingArguments get the defaults). Refuses inconsistent settings with ValueError.
    """

    # compute_loss returns the mean over the micro-batch's pairs; the Trainer divides by the
    # accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, ref_model: nn.Module | None = None, ref_log_probs_fingerprint: dict | None = None,
                 start_model: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        self.beta = float(getattr(a, "dpo_beta", 0.1))
        self.loss_type = getattr(a, "dpo_loss_type", "sigmoid")
        self.label_smoothing = float(getattr(a, "label_smoothing", 0.0))
        check_loss_settings(self.beta, self.loss_type, self.label_smoothing)
        self.rpo_alpha = float(getattr(a, "rpo_alpha", 0.0))
        if self.rpo_alpha < 0:
            raise ValueError(f"--rpo_alpha must be ≥ 0, got {self.rpo_alpha}")
        self.ref_mode = getattr(a, "ref_model", None) or ("adapter_disabled" if hasattr(self.model, "peft_config")
                                                          else "separate")
        if self.ref_mode not in REF_MODES:
            raise ValueError(f"--ref_model must be one of {REF_MODES}, got {self.ref_mode!r}")
        self.precompute = bool(getattr(a, "precompute_ref_log_probs", False))
        self.ref_cache_path = getattr(a, "ref_log_probs_path", None) or os.path.join(a.output_dir, REF_CACHE_NAME)
        self.ref_fingerprint = ref_log_probs_fingerprint or {}
        self.start_model = start_model
        self.pad_token_id = getattr(self.processing_class, "pad_token_id", None) or 0
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

        self.ref_cache = None
        if self.precompute:
            indices = getattr(self.train_dataset, "indices", None) or range(len(self.train_dataset))
            self.ref_cache = read_ref_cache(self.ref_cache_path, self.ref_fingerprint, indices)
            self.add_callback(_PrecomputeReferenceLogps(self))
        need_reference = self.ref_cache is None
        self.ref_model = self.ref_projector = None
        if self.ref_mode == "adapter_disabled":
            check_adapter_reference(self.model)
            if need_reference:
                self.ref_projector = snapshot_projector(self.model).to(a.device)
        elif need_reference:
            if ref_model is None:
                raise ValueError("--ref_model separate needs the frozen start model (ref_model=...)")
            ref_model.requires_grad_(False).eval()
            self.ref_model = (prepare_deepspeed_reference(ref_model, self.accelerator) if self.is_deepspeed_enabled
                              else ref_model.to(a.device))
        logger.info("DPO: loss %s, beta %g, reference %s%s", self.loss_type, self.beta, self.ref_mode,
                    " (precomputed)" if self.precompute else "")

    @property
    def computes_reference_logps(self) -> bool:
        """Whether each training step runs a reference forward (counted in the throughput log's FLOPs)."""
        return self.ref_cache is None

    # ---- log-probs -------------------------------------------------------------------------
    def forward_logps(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum, count)`` [2B] of the answer log-probs of a :func:`concatenated_batch` under ``model``.
        The labels are the model's own, laid out by its splice (as TRL's ``concatenated_forward``
        takes them from the model), so they line up with the logits by construction."""
        return answer_logps(*forward_with_labels(model, batch))

    @torch.no_grad()
    def reference_logps(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Summed answer log-probs [2B] of the start model on a :func:`concatenated_batch` (``model``
        is the policy, used only in ``adapter_disabled`` mode)."""
        if self.ref_mode == "separate":
            if self.ref_model is None:
                raise RuntimeError("the reference model was released (its log-probs were precomputed)")
            return self.forward_logps(self.ref_model, batch)[0]
        if self.ref_projector is None:
            raise RuntimeError("the reference projector was released (its log-probs were precomputed)")
        with reference_weights(model, self.ref_projector):
            return self.forward_logps(model, batch)[0]

    def cached_reference_logps(self, index: torch.Tensor, device) -> torch.Tensor:
        """Precomputed reference log-probs [2B] (chosen rows, then rejected) of the records ``index``."""
        rows = [self.ref_cache[int(i)] for i in index.tolist()]
        return torch.tensor([r[0] for r in rows] + [r[1] for r in rows], dtype=torch.float32, device=device)

    # ---- loss ------------------------------------------------------------------------------
    def dpo_step(self, model: nn.Module, inputs: dict, split: str = "train") -> torch.Tensor:
        """The mean DPO loss of a collated batch; stores its metrics for the next log."""
        batch = concatenated_batch(inputs, self.pad_token_id)
        n = inputs["chosen_input_ids"].shape[0]
        if self.ref_cache is not None:
            ref = self.cached_reference_logps(inputs["index"], batch["input_ids"].device)
        else:
            ref = self.reference_logps(model, batch)
        policy, count = self.forward_logps(model, batch)
        ref = ref.to(policy.device)
        # RPO's term: the chosen answers' negative log-likelihood per token, from the summed log-probs
        nll = -(policy[:n] / count[:n].clamp(min=1).to(policy.dtype)).mean()
        if loss_uses_mean_logps(self.loss_type):  # per-token means (TRL's IPO)
            denom = count.clamp(min=1).to(policy.dtype)
            policy, ref = policy / denom, ref / denom
        out = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.beta, self.loss_type, self.label_smoothing)
        pd = policy.detach()
        values = torch.stack([out.chosen_rewards.mean(), out.rejected_rewards.mean(),
                              (out.chosen_rewards > out.rejected_rewards).float().mean(),
                              (out.chosen_rewards - out.rejected_rewards).mean(),
                              pd[:n].mean(), pd[n:].mean(), ref[:n].mean(), ref[n:].mean()])
        values = self.accelerator.reduce(values, reduction="mean") if self.accelerator.num_processes > 1 else values
        for name, v in zip(METRIC_NAMES, values.tolist()):
            self._metrics[split][name].append(v)
        if not self.rpo_alpha:
            return out.losses.mean()
        nll_value = self.accelerator.reduce(nll.detach(), reduction="mean") if self.accelerator.num_processes > 1 \
            else nll.detach()
        self._metrics[split]["nll_loss"].append(float(nll_value))
        return out.losses.mean() + self.rpo_alpha * nll

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.dpo_step(model, inputs, "train")
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.dpo_step(model, inputs, "eval").detach()
        return loss, None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged DPO metrics stored since the last log to a training (or evaluation) log."""
        split, prefix = ("train", "") if "loss" in logs else ("eval", "eval_") if "eval_loss" in logs else (None, "")
        if split and self._metrics[split]:
            for name, values in self._metrics[split].items():
                logs[prefix + name] = sum(values) / len(values)
            self._metrics[split].clear()
        super().log(logs, start_time)

    # ---- precomputed reference -------------------------------------------------------------
    def precompute_reference_logps(self) -> None:
        """Fill ``self.ref_cache`` with the reference log-probs of every training record (one pass,
        records dealt round-robin over the processes, then gathered), write it to the cache file and
        release the reference weights. Does nothing when the cache is already there. Every process
        must call it."""
        if self.ref_cache is not None:
            return
        from torch.utils.data import DataLoader, Subset

        ds = self.train_dataset
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_rank = math.ceil(len(ds) / world)
        mine = list(range(rank, len(ds), world)) or [0]
        mine += [mine[-1]] * (per_rank - len(mine))  # equal batch counts: ZeRO-3 forwards are collective
        loader = DataLoader(Subset(ds, mine), batch_size=self.args.per_device_train_batch_size, shuffle=False,
                            collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers)
        model = self.model_wrapped
        found: dict[int, tuple[float, float]] = {}
        logger.info("precomputing reference log-probs of %d records (%s reference)", len(ds), self.ref_mode)
        for inputs in loader:
            inputs = self._prepare_inputs(inputs)
            batch = concatenated_batch(inputs, self.pad_token_id)
            ref = self.reference_logps(model, batch).float().cpu()
            n = inputs["chosen_input_ids"].shape[0]
            for k, idx in enumerate(inputs["index"].tolist()):
                found[int(idx)] = (ref[k].item(), ref[n + k].item())
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, found)
            found = {k: v for part in parts for k, v in part.items()}
        self.ref_cache = found
        if self.args.should_save:
            write_ref_cache(self.ref_cache_path, self.ref_fingerprint, found)
            logger.info("reference log-probs of %d records written to %s", len(found), self.ref_cache_path)
        # The reference weights are no longer needed.
        self.ref_model = self.ref_projector = None

    # ---- saving ----------------------------------------------------------------------------
    def llava_config_updates(self) -> dict:
        out = super().llava_config_updates()
        if self.start_model:
            out["dpo_start_model"] = self.start_model
        return out

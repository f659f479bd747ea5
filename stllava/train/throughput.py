"""Throughput and MFU in every training log: ``tokens_per_second``, ``samples_per_second``, ``mfu``.

:class:`ThroughputLogMixin` (a base of :class:`~stllava.train.trainer.LlavaTrainerMixin`, so SFT
and DPO both get it) counts each micro-batch in ``training_step`` and adds to every training log
(the ones holding ``loss``; they reach ``trainer_state.json``, the ``report_to`` backends and the
console through ``Trainer.log``):

- ``tokens_per_second``: model positions — the non-padding text tokens plus, for each ``<image>``
  token, the image patches spliced in its place (576 for CLIP ViT-L/14-336) — summed over
  processes. In DPO the chosen and the rejected sequence of every pair.
- ``samples_per_second``: dataset records (DPO: pairs), summed over processes.
- ``mfu``: the model FLOPs of those steps (:class:`ModelFlops`) per second over the peak dense bf16
  FLOP/s of the processes' devices (:func:`peak_flops`); absent when the peak is unknown (CPU, an
  unlisted GPU) unless ``STLLAVA_PEAK_TFLOPS`` gives it.

The interval of a log runs from the first training step after the previous training log to this
log, so evaluation and checkpoint saving, which the Trainer runs right after a log, do not count.
Written here because the Trainer's own speed metrics count padded ``input_ids`` only, without the
image patches, and no maintained library counts LLaVA's FLOPs.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence

import torch
from torch import nn

from stllava.splice import splice_layout

logger = logging.getLogger(__name__)

PEAK_ENV = "STLLAVA_PEAK_TFLOPS"
# Dense (no sparsity) bf16 tensor-core peak per GPU in TFLOP/s, from the vendors' data sheets;
# the first name found in torch.cuda.get_device_name() wins, so specific names come first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("B200", 2250.0),
                    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0))


def peak_flops_of_name(name: str) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU called ``name`` (as torch.cuda.get_device_name says), or None."""
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one ``device``: ``$STLLAVA_PEAK_TFLOPS`` × 1e12 when set, else the
    table entry of a CUDA device's name; None for a CPU or an unlisted GPU (then no ``mfu``)."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]) * 1e12
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_of_name(torch.cuda.get_device_name(device))


# ---------------------------------------------------------------------------------------------
# FLOPs

def _base(model: nn.Module) -> nn.Module:
    """The LLaVA CausalLM inside ``model`` (a DeepSpeed engine, DDP, a PEFT model, or itself)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _linears(module: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[nn.Linear, bool]]:
    """The Linear layers under ``module`` (none whose name holds a ``skip`` part), each with whether
    it is a LoRA A/B layer."""
    return [(m, ".lora_" in f".{name}") for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and not any(k in name for k in skip)]


def _matmul_flops(linears: Sequence[tuple[nn.Linear, bool]], traversed: bool, reference: bool = False) -> int:
    """Per position: 2·in·out forward, +2·in·out for the input gradient when backward passes through,
    +2·in·out for the weight gradient when it also trains. ``reference``: forward of the
    non-LoRA weights only (the start model)."""
    total = 0
    for m, lora in linears:
        w = m.in_features * m.out_features
        if reference:
            total += 0 if lora else 2 * w
        else:
            total += 2 * w + (2 * w if traversed else 0) + (2 * w if traversed and m.weight.requires_grad else 0)
    return total


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


@dataclasses.dataclass(frozen=True)
class ModelFlops:
    """Model FLOPs of one training step of a LLaVA model, as trained (LoRA-aware).

    Counted: every Linear (LLM, its LoRA A/B, tower, projector) and the tower's patch convolution,
    2 FLOPs per weight and position forward, +2 for the input gradient when backward passes through
    it, +2 for the weight gradient when it trains (so 6 for a trained weight, 4 for a frozen one
    that backward crosses, 2 for a forward-only one); attention 4·T²·width per layer and sequence of
    T positions forward (QKᵀ and AV over all T, as nanoGPT and PaLM count), twice that in backward;
    the cluster projector's centre matmuls (2·N·L·D each) likewise. Backward crosses a part when it
    or a part before it trains (tower layers in order, then projector, then LLM); tower layers above
    ``mm_vision_select_layer`` run forward only. Not counted: activation recomputation (gradient
    checkpointing: model FLOPs, not hardware FLOPs), the embedding lookup, norms and elementwise ops,
    padding, unused images of text-only samples.

    Per step: ``dense·ΣT + attention·ΣT² + image·images`` over the sequences of the step, plus the
    ``ref_*`` forward terms when a DPO reference pass runs in the step.
    """

    dense: float            # LLM Linears per position
    attention: float        # LLM attention per squared sequence length
    image: float            # vision tower + projector per image
    ref_dense: float        # the same, forward of the start weights (the DPO reference pass)
    ref_attention: float
    ref_image: float

    def step(self, lengths: Sequence[int], images: int, reference: bool = False) -> float:
        """FLOPs of sequences of ``lengths`` positions (image patches included) holding ``images``
        images, plus the reference forward over them when ``reference``."""
        n, sq = sum(int(t) for t in lengths), sum(int(t) * int(t) for t in lengths)
        flops = self.dense * n + self.attention * sq + self.image * images
        if reference:
            flops += self.ref_dense * n + self.ref_attention * sq + self.ref_image * images
        return float(flops)

    @classmethod
    def of(cls, model: nn.Module) -> ModelFlops:
        """Count the FLOPs of ``model`` (a LLaVA CausalLM, PEFT-wrapped or in an engine) as its
        parameters' ``requires_grad`` flags say it trains. Works under ZeRO-3 (shapes come from the
        modules, not the partitioned tensors). Raises ValueError for a model without a vision tower."""
        base = _base(model)
        inner = base.get_model()
        tower, projector = inner.get_vision_tower(), inner.mm_projector
        if tower is None:
            raise ValueError("ModelFlops needs a LLaVA model with a vision tower and projector")
        llm_linears = _linears(base, skip=("vision_tower", "mm_projector"))
        clip = getattr(tower.clip, "vision_model", tower.clip)  # transformers 5 flattened CLIPVisionModel
        layers = list(clip.encoder.layers)
        vcfg = tower.config
        positions = (vcfg.image_size // vcfg.patch_size) ** 2 + 1  # patches + CLS
        used = tower.select_layer % (len(layers) + 1)  # hidden_states[k] is the output of layer k-1
        patch = clip.embeddings.patch_embedding
        conv = 2 * patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1] * patch.out_channels
        image, ref_image = conv * (positions - 1), conv * (positions - 1)
        crossed = _trains(clip.embeddings)
        for i, layer in enumerate(layers):
            crossed = crossed or (i < used and _trains(layer))
            back = crossed and i < used
            lin = _linears(layer)
            attn = 4 * positions * positions * vcfg.hidden_size
            image += positions * _matmul_flops(lin, back) + attn * (3 if back else 1)
            ref_image += positions * _matmul_flops(lin, False, reference=True) + attn
        crossed = crossed or _trains(projector)
        proj, proj_ref = _projector_flops(projector, tower.num_patches, crossed)
        image, ref_image = image + proj, ref_image + proj_ref

        cfg = base.config
        heads = cfg.num_attention_heads
        width = (getattr(cfg, "head_dim", None) or cfg.hidden_size // heads) * heads
        attention = 4 * cfg.num_hidden_layers * width
        return cls(dense=_matmul_flops(llm_linears, True), attention=3 * attention, image=image,
                   ref_dense=_matmul_flops(llm_linears, False, reference=True), ref_attention=attention,
                   ref_image=ref_image)


def _projector_flops(projector: nn.Module, tokens: int, crossed: bool) -> tuple[int, int]:
    """(as trained, forward) FLOPs of the projector on one image's ``tokens`` features."""
    from stllava.model.projector import ClusterProjector

    if not isinstance(projector, ClusterProjector):  # linear / mlp: every Linear sees every token
        lin = _linears(projector)
        return tokens * _matmul_flops(lin, crossed), tokens * _matmul_flops(lin, False, reference=True)
    n, d, iters = projector.num_centers, projector.c.in_features, projector.num_iters
    per_token = [(m, False) for m in (projector.v, projector.f, projector.mlp[0], projector.mlp[2])]
    c = [(projector.c, False)]  # on the N centres, once per iteration
    bmm = (2 * iters + 3) * 2 * n * tokens * d  # per iteration C@V and S@F; cos(C, x); S@F and Sᵀ@O
    fwd = tokens * _matmul_flops(per_token, False, True) + iters * n * _matmul_flops(c, False, True) + bmm
    trained = (tokens * _matmul_flops(per_token, crossed) + iters * n * _matmul_flops(c, crossed)
               + bmm * (3 if crossed else 1))
    return trained, fwd


# ---------------------------------------------------------------------------------------------
# Counting and logging

def batch_positions(inputs: dict, image_tokens: int) -> tuple[list[int], int, int]:
    """``(positions per sequence, samples, images)`` of a collated SFT or DPO batch: non-padding
    tokens with each ``<image>`` token counted as ``image_tokens`` positions; DPO batches count the
    chosen and the rejected sequences (samples = pairs)."""
    sides = ("",) if "input_ids" in inputs else ("chosen_", "reject_")
    lengths, images, samples = [], 0, 0
    for side in sides:
        ids = inputs[f"{side}input_ids"]
        mask = inputs.get(f"{side}attention_mask")
        layout = splice_layout(ids, image_tokens)  # the model's own layout of the sequence
        width = layout.width if mask is None else layout.width * mask.to(layout.width.dtype)
        lengths += width.sum(1).tolist()
        images += int(layout.is_image.sum())
        samples = ids.shape[0]
    return lengths, samples, images


class ThroughputMeter:
    """Counts positions, samples and FLOPs between two training logs (see the module docstring)."""

    def __init__(self, flops: ModelFlops | None, image_tokens: int, peak: float | None, clock=time.perf_counter):
        self.flops_model, self.image_tokens, self.peak, self.clock = flops, image_tokens, peak, clock
        self.start = None
        self.positions = self.samples = 0
        self.flops = 0.0

    def count(self, inputs: dict, reference: bool = False) -> None:
        """Add one micro-batch (``reference``: a reference forward runs on it too)."""
        if self.start is None:
            self.start = self.clock()
        lengths, samples, images = batch_positions(inputs, self.image_tokens)
        self.positions += sum(lengths)
        self.samples += samples
        if self.flops_model is not None:
            self.flops += self.flops_model.step(lengths, images, reference)

    def report(self, reduce_sum=None) -> dict[str, float]:
        """The metrics of the interval since the last report (empty when nothing was counted), then
        a new interval. ``reduce_sum`` sums a list of floats over processes (all must call it)."""
        totals = [float(self.positions), float(self.samples), self.flops]
        if reduce_sum is not None:
            totals = reduce_sum(totals)
        elapsed = self.clock() - self.start if self.start is not None else 0.0
        self.start, self.positions, self.samples, self.flops = None, 0, 0, 0.0
        if elapsed <= 0 or totals[1] == 0:
            return {}
        out = {"tokens_per_second": round(totals[0] / elapsed, 3), "samples_per_second": round(totals[1] / elapsed, 4)}
        if self.peak and self.flops_model is not None:
            out["mfu"] = round(totals[2] / elapsed / self.peak, 5)
        return out


class ThroughputLogMixin:
    """Adds the throughput metrics to every training log of a ``transformers.Trainer`` subclass
    (put it before ``Trainer`` in the bases). A trainer whose steps also run a reference forward
    says so with a ``computes_reference_logps`` attribute (the DPO trainer)."""

    _throughput: ThroughputMeter | None = None

    def _throughput_meter(self) -> ThroughputMeter:
        if self._throughput is None:
            try:
                flops = ModelFlops.of(self.model)
                image_tokens = _base(self.model).get_model().get_vision_tower().num_patches
            except (AttributeError, ValueError) as e:  # a text-only model: positions are tokens
                logger.info("throughput log without FLOPs (%s)", e)
                flops, image_tokens = None, 1
            world = max(int(self.args.world_size), 1)
            peak = peak_flops(self.args.device)
            self._throughput = ThroughputMeter(flops, image_tokens, peak * world if peak else None)
        return self._throughput

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._throughput_meter().count(inputs, reference=bool(getattr(self, "computes_reference_logps", False)))
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._throughput is not None:  # a training log: every process is here
            logs.update(self._throughput.report(self._reduce_sum if self.args.world_size > 1 else None))
        super().log(logs, start_time)

    def _reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.args.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

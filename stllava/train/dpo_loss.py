"""DPO losses and the log-probabilities they compare: pure tensor functions, no model (docs/Method.md#dpo-loss).

- :func:`answer_logps` sums the log-probabilities of the answer tokens (labels != IGNORE_INDEX,
  next-token shifted) per row, and counts them. The labels are the model's own output
  (``LlavaLlamaForCausalLM.forward`` lays them out with the images spliced in), never re-derived;
- :func:`dpo_loss` turns policy and reference log-probs into per-pair losses and rewards. The loss
  type is data (``loss_type``), as in TRL, with TRL's definitions; with ``z = (π_c − π_r) − (ref_c − ref_r)``:

  ``sigmoid``  −log σ(β z)          the DPO paper's loss (the published STLLaVA-Med run, β = 0.1)
  ``ipo``      (z − 1/(2β))²        IPO (Azar et al.); TRL feeds it log-probs *averaged* over the
                                    answer tokens, and so does the trainer (``loss_uses_mean_logps``)
  ``hinge``    relu(1 − β z)         SLiC's hinge loss
  ``robust``   (−(1−ε) log σ(β z) + ε log σ(−β z)) / (1 − 2ε)
                                    robust DPO (Chowdhury et al. 2024): an unbiased loss when each
                                    label is flipped with probability ε (0 ≤ ε < ½)

  With ``label_smoothing`` ε > 0, ``sigmoid`` becomes conservative DPO (cDPO, Mitchell 2023):
  −(1−ε) log σ(β z) − ε log σ(−β z), for labels believed wrong with probability ε (0 ≤ ε ≤ ½).
  ε = 0 is the plain loss, computed as before. ``ipo`` and ``hinge`` take no ε (TRL ignores it
  there; we refuse it).

  Rewards are β·(π − ref) for each side, detached.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stllava.constants import IGNORE_INDEX
from stllava.errors import StllavaError

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust")  # the loss types that take --label_smoothing


class LossSettingsError(StllavaError, ValueError):
    """A DPO loss setting out of its range (the message names the flag and the allowed values)."""


def check_loss_settings(beta: float, loss_type: str, label_smoothing: float = 0.0) -> None:
    """Raise :class:`LossSettingsError` (a ValueError, one line naming the flag) for an unknown
    ``loss_type``, β <= 0, or ``label_smoothing`` ε outside its range: 0 ≤ ε ≤ ½ for ``sigmoid``,
    0 ≤ ε < ½ for ``robust`` (it divides by 1 − 2ε), ε = 0 for the others; returns None."""
    if loss_type not in LOSS_TYPES:
        raise LossSettingsError(f"--dpo_loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise LossSettingsError(f"--dpo_beta must be > 0, got {beta}")
    eps = label_smoothing
    if loss_type not in SMOOTHED_LOSS_TYPES and eps != 0:
        raise LossSettingsError(f"--label_smoothing applies to --dpo_loss_type {' or '.join(SMOOTHED_LOSS_TYPES)}, "
                                f"not {loss_type}: pass 0 (got {eps})")
    if loss_type == "robust" and not 0 <= eps < 0.5:
        raise LossSettingsError(f"--label_smoothing must be in [0, 0.5) for --dpo_loss_type robust "
                                f"(it divides by 1 - 2ε), got {eps}")
    if loss_type == "sigmoid" and not 0 <= eps <= 0.5:
        raise LossSettingsError(f"--label_smoothing must be in [0, 0.5] for --dpo_loss_type sigmoid, got {eps}")


def loss_uses_mean_logps(loss_type: str) -> bool:
    """True when ``loss_type`` compares per-token mean log-probs instead of sums (TRL: IPO)."""
    return loss_type == "ipo"


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)``, each [B]: the summed log-probability of the answer tokens of each row
    (float32) and how many there are. Position t's logits predict label t+1; tokens whose label is
    IGNORE_INDEX (prompt, image, padding) count nothing. Only the answer positions are put through
    log-softmax (in float32), so memory grows with the answers, not with B × L × vocab.
    Refuses logits and labels of different [B, L] shapes (ValueError)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, L]")
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    picked = logits[:, :-1][mask].float()  # [N answer tokens, vocab]
    tok = target[mask]
    lp = picked.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    rows = mask.nonzero()[:, 0]
    total = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows, lp)
    return total, mask.sum(1)


@dataclass
class DPOLossOutput:
    """Per-pair ``losses``, ``chosen_rewards`` and ``rejected_rewards`` (detached), each [B]."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> DPOLossOutput:
    """The DPO-family loss of each pair (see the module docstring for the formulas), with label
    smoothing ε = ``label_smoothing`` for ``sigmoid`` (cDPO) and ``robust``.

    Inputs are log-probs [B] (sums, or means for ``ipo``); the reference ones carry no gradient.
    Refuses what :func:`check_loss_settings` refuses (LossSettingsError, a ValueError).
    """
    check_loss_settings(beta, loss_type, label_smoothing)
    ref_chosen, ref_rejected = ref_chosen.detach(), ref_rejected.detach()
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    eps = label_smoothing
    if loss_type == "sigmoid" and eps == 0:
        losses = -F.logsigmoid(beta * z)  # the paper's loss, computed exactly as before ε existed
    elif loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * z) + eps * F.logsigmoid(-beta * z)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (z - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = torch.relu(1.0 - beta * z)
    return DPOLossOutput(losses, beta * (policy_chosen - ref_chosen).detach(),
                         beta * (policy_rejected - ref_rejected).detach())

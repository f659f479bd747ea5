"""Vision projectors: map vision-tower features [B, L, D] to LLM embeddings [B, L, H] (docs/Method.md#projectors).

`build_vision_projector(config)` picks one from `config.mm_projector_type`:

- ``linear``         nn.Linear(D, H)
- ``mlp<N>x_gelu``   Linear(D, H), then N-1 x [GELU, Linear(H, H)] (keys ``0.*``, ``2.*``, ...)
- ``identity``       returns its input (needs D == H)
- ``cluster``        `ClusterProjector`, SQ-LLaVA's "prototype extractor" (the default)

State-dict keys match the published SQ-LLaVA / STLLaVA-Med checkpoints (``model.mm_projector.*``).

The cluster projector trains in every stage. Its training step is bound by matmuls (over 90% of
its time at 7B sizes on CPU; `scripts/bench_projector.py --backward` compares it with the published
formulation). Of what autograd keeps for backward — alive while the whole LLM runs — the largest
avoidable piece is QuickGELU's sigmoid ([B, L, H]), which `_QuickGELUFunction` recomputes instead,
with the same bits.
"""
from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

DEFAULT_PROJECTOR_TYPE = "cluster"
DEFAULT_NUM_CENTERS = 256
DEFAULT_NUM_ITERS = 2
PROJECTOR_CHOICES = ("linear", "mlp<N>x_gelu", "identity", "cluster")
_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


class _QuickGELUFunction(torch.autograd.Function):
    """x·sigmoid(1.702 x) keeping only x for backward. Autograd on the plain expression also keeps
    sigmoid(1.702 x), one more [B, L, H] activation per step (19 MiB at 7B sizes, batch 2, fp32);
    recomputing it costs one elementwise pass. Forward and backward run the plain expression's ops
    (backward in place where a buffer is free): outputs and gradients are the same bits."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid_(1.702 * x)
        # autograd's two paths into x, its ops in its order: through σ, (grad·x)·σ(1 − σ)·1.702 ...
        through_sigmoid = torch.ops.aten.sigmoid_backward(grad * x, s).mul_(1.702)
        return through_sigmoid.add_(s.mul_(grad))  # ... plus the direct one, grad·σ


class QuickGELU(nn.Module):
    """CLIP's GELU approximation, x * sigmoid(1.702 x). No parameters (keeps ``mlp.1`` key-free).
    In training it keeps only its input for backward (`_QuickGELUFunction`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuickGELUFunction.apply(x)
        return x * torch.sigmoid(1.702 * x)


class IdentityProjector(nn.Module):
    """Returns the vision features unchanged (``mm_projector_type: identity``)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x

    @property
    def config(self) -> dict:
        return {"mm_projector_type": "identity"}


def pairwise_cos_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Returns [B, N, L]: cosine similarity of every row of a [B, N, D] with every row of b [B, L, D]."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-2, -1)


def cluster_aggregate(
    x: torch.Tensor, sim: torch.Tensor, mask: torch.Tensor, feature: torch.Tensor,
    centers_feature: torch.Tensor,
) -> torch.Tensor:
    """Steps 5-6 of docs/Method.md#cluster-projector in matmul form; returns x + Simᵀ @ O, shape [B, L, D].

    O = (Sim @ F + CF) / (count + 1) with count[b, n] = tokens assigned to centre n. Same numbers as
    the published module's [B, N, L, D] broadcast (`cluster_aggregate_direct`) with O(B·N·D) extra memory.
    `sim` and `mask` are [B, N, L] (sim already masked), `feature` [B, L, D], `centers_feature`
    [B, N, D]. The count is summed in float32 (exact), then the result is cast to `feature`'s dtype
    so bf16 runs neither round counts above 256 nor mix dtypes in the next matmul.
    """
    sim = sim.to(feature.dtype)
    count = mask.sum(dim=-1, keepdim=True, dtype=torch.float32)  # [B, N, 1]
    total = sim @ feature + centers_feature
    # float32 at least (float64 stays float64, so float64 checks of the gradients are exact)
    centres = (total.to(torch.promote_types(total.dtype, torch.float32)) / (count + 1.0)).to(feature.dtype)
    return x + sim.transpose(1, 2) @ centres


def cluster_aggregate_direct(
    x: torch.Tensor, sim: torch.Tensor, mask: torch.Tensor, feature: torch.Tensor,
    centers_feature: torch.Tensor,
) -> torch.Tensor:
    """Steps 5-6 as the published module wrote them, with two [B, N, L, D] temporaries; returns [B, L, D].

    Kept only to benchmark against (scripts/bench_projector.py): it needs ~B·N·L·D·4 bytes twice
    (1.2 GB at B=1, N=256, L=576, D=1024 in fp32). Do not use it in the model.
    """
    sim = sim.to(feature.dtype)
    count = mask.sum(dim=-1, keepdim=True, dtype=torch.float32)
    centres = (((feature.unsqueeze(1) * sim.unsqueeze(-1)).sum(dim=2) + centers_feature).float()
               / (count + 1.0)).to(feature.dtype)
    return x + (centres.unsqueeze(2) * sim.unsqueeze(-1)).sum(dim=1)


class ClusterProjector(nn.Module):
    """SQ-LLaVA's cluster projector ("prototype extractor"): x [B, L, D] -> [B, L, H], L kept.

    N centres start as the average-pooled tokens, are refined `num_iters` times by soft assignment,
    then every token is hard-assigned to its most similar centre and receives that centre's
    aggregate, weighted by its similarity, as a residual; `mlp` maps the result to the LLM width.
    Parameter names and shapes match the released checkpoints (docs/Method.md#cluster-projector); ``ln_1`` is unused.
    Refuses num_centers < 1 or num_iters < 0 (ValueError).
    """

    def __init__(self, in_features: int, out_features: int,
                 num_centers: int = DEFAULT_NUM_CENTERS, num_iters: int = DEFAULT_NUM_ITERS):
        super().__init__()
        if num_centers < 1:
            raise ValueError(f"ClusterProjector: num_centers must be >= 1, got {num_centers}")
        if num_iters < 0:
            raise ValueError(f"ClusterProjector: num_iters must be >= 0, got {num_iters}")
        d, h = in_features, out_features
        self.num_centers = num_centers
        self.num_iters = num_iters
        self.sim_alpha = nn.Parameter(torch.ones(1, 1, 1))
        self.sim_beta = nn.Parameter(torch.zeros(1, 1, 1))
        self.c = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.f = nn.Linear(d, d)
        self.ln_1 = nn.LayerNorm(d)  # unused in forward; released checkpoints hold it, so it stays
        self.mlp = nn.Sequential(nn.Linear(d, h), QuickGELU(), nn.Linear(h, h))

    def assign(self, x: torch.Tensor):
        """Steps 1-4 of docs/Method.md#cluster-projector; returns (sim, mask, feature, centers_feature).

        sim [B, N, L] is sigmoid(beta + alpha·cos(centre, token)) kept only at each token's arg-max
        centre; mask [B, N, L] is that one-hot assignment; feature = f(x) [B, L, D];
        centers_feature [B, N, D] is feature average-pooled to N along the tokens.
        """
        value = self.v(x).transpose(1, 2)                                     # [B, D, L]
        feature = self.f(x)                                                   # [B, L, D]
        centers = F.adaptive_avg_pool1d(x.transpose(1, 2), self.num_centers).transpose(1, 2)
        centers_feature = F.adaptive_avg_pool1d(
            feature.transpose(1, 2), self.num_centers).transpose(1, 2)       # [B, N, D]
        # V is normalised along the token axis (its last dim): the released weights were trained so
        # (kept on purpose, docs/Differences.md#kept-on-purpose).
        value = F.normalize(value, dim=-1)
        for _ in range(self.num_iters):
            centers = self.c(centers)
            s = torch.softmax(F.normalize(centers, dim=-1) @ value, dim=-2)   # over centres
            centers = s @ feature                                             # [B, N, D]
        sim = torch.sigmoid(self.sim_beta + self.sim_alpha * pairwise_cos_sim(centers, x))
        mask = torch.zeros_like(sim).scatter_(1, sim.argmax(dim=1, keepdim=True), 1.0)
        return sim * mask, mask, feature, centers_feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the projected features [B, L, H] for x [B, L, D]."""
        if x.dim() != 3:
            raise ValueError(f"ClusterProjector expects [batch, tokens, dim], got shape {tuple(x.shape)}")
        return self.mlp(cluster_aggregate(x, *self.assign(x)))


_WIDTH_FIELDS = {
    "mm_hidden_size": "the vision feature width D, e.g. 1024 for CLIP ViT-L/14",
    "hidden_size": "the LLM hidden width H, e.g. 4096 for a 7B LLaMA",
}


def is_projector_type(name: str) -> bool:
    """Whether :func:`build_vision_projector` builds ``mm_projector_type`` ``name``."""
    match = _MLP_GELU.match(name) if isinstance(name, str) else None
    return name in ("linear", "identity", "cluster") or (match is not None and int(match.group(1)) >= 1)


def _required(config, field: str) -> int:
    value = getattr(config, field, None)
    if value is None:
        raise ValueError(f"build_vision_projector: config has no `{field}` ({_WIDTH_FIELDS[field]}); "
                         f"set it in the model's config.json or model arguments")
    return int(value)


def build_vision_projector(config, delay_load: bool = False, **kwargs) -> nn.Module:
    """Returns the projector named by `config.mm_projector_type` (default ``cluster``).

    Reads `mm_hidden_size` (D) and `hidden_size` (H), and for ``cluster`` the optional
    `mm_projector_clusters` (N, default 256) and `mm_projector_iters` (default 2). Refuses, with a
    ValueError naming the field, a missing width, an unknown type, and ``identity`` with D != H.
    `delay_load` and other keyword arguments are accepted for LLaVA call-compatibility and ignored.
    """
    projector_type = getattr(config, "mm_projector_type", None) or DEFAULT_PROJECTOR_TYPE
    d = _required(config, "mm_hidden_size")
    h = _required(config, "hidden_size")
    if projector_type == "linear":
        return nn.Linear(d, h)
    match = _MLP_GELU.match(projector_type)
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ValueError(f"config `mm_projector_type` {projector_type!r}: the MLP needs >= 1 layer")
        modules: list[nn.Module] = [nn.Linear(d, h)]
        for _ in range(depth - 1):
            modules += [nn.GELU(), nn.Linear(h, h)]
        return nn.Sequential(*modules)
    if projector_type == "identity":
        if d != h:
            raise ValueError(
                f"config `mm_projector_type` 'identity' needs mm_hidden_size == hidden_size, got "
                f"{d} and {h}; use 'linear', 'mlp2x_gelu' or 'cluster' to change the width")
        return IdentityProjector()
    if projector_type == "cluster":
        n = int(getattr(config, "mm_projector_clusters", None) or DEFAULT_NUM_CENTERS)
        iters = getattr(config, "mm_projector_iters", None)
        iters = DEFAULT_NUM_ITERS if iters is None else int(iters)
        return ClusterProjector(d, h, num_centers=n, num_iters=iters)
    raise ValueError(
        f"Unknown projector type {projector_type!r} from config `mm_projector_type`; "
        f"valid choices: {', '.join(PROJECTOR_CHOICES)} (e.g. mlp2x_gelu)")

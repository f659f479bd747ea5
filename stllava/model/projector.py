"""Vision projectors: map vision-tower features [B, L, D] to LLM embeddings [B, L, H] (SPEC §2).

`build_vision_projector(config)` picks one from `config.mm_projector_type`:

- ``linear``         nn.Linear(D, H)
- ``mlp<N>x_gelu``   Linear(D, H), then N-1 x [GELU, Linear(H, H)] (keys ``0.*``, ``2.*``, ...)
- ``identity``       returns its input (needs D == H)
- ``cluster``        `ClusterProjector`, SQ-LLaVA's "prototype extractor" (the default)

State-dict keys match the published SQ-LLaVA / STLLaVA-Med checkpoints (``model.mm_projector.*``).

The cluster projector trains in every stage, so its backward is written for the training step:
two autograd Functions run exactly the forward ops of the plain expressions (same bits) but keep
less for backward and skip dense work there — `_HardAssignAggregate` (steps 4-6: each token has one
centre, so every [B, N, L] product of the chain rule is a gather or scatter-add over the tokens)
and `_QuickGELUFunction` (recomputes its sigmoid). `scripts/bench_projector.py --backward` measures
the step against the published [B, N, L, D] formulation.
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
    """x·sigmoid(1.702 x) with the plain expression's forward ops (same bits), keeping only x for
    backward: autograd would also keep sigmoid(1.702 x), one more [B, L, H] activation per step,
    while recomputing it is one cheap elementwise pass."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        dtype = torch.promote_types(grad.dtype, x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            t = 1.702 * x.to(dtype)
            s = torch.sigmoid(t)
            grad = grad.to(dtype)
            # d/dx x·σ(1.702x) = σ + 1.702x·σ(1 − σ); sigmoid_backward(g, σ) = g·σ(1 − σ)
            return torch.ops.aten.sigmoid_backward(grad, s).mul_(t).addcmul_(grad, s).to(x.dtype)


class QuickGELU(nn.Module):
    """CLIP's GELU approximation, x * sigmoid(1.702 x). No parameters (keeps ``mlp.1`` key-free).
    Keeps only its input for backward (`_QuickGELUFunction`)."""

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
    """Steps 5-6 of SPEC §2 in matmul form; returns x + Simᵀ @ O, shape [B, L, D].

    O = (Sim @ F + CF) / (count + 1) with count[b, n] = tokens assigned to centre n. Same numbers as
    the reference's [B, N, L, D] broadcast (`cluster_aggregate_direct`) with O(B·N·D) extra memory.
    `sim` and `mask` are [B, N, L] (sim already masked), `feature` [B, L, D], `centers_feature`
    [B, N, D]. The count is summed in float32 (exact), then the result is cast to `feature`'s dtype
    so bf16 runs neither round counts above 256 nor mix dtypes in the next matmul.
    """
    sim = sim.to(feature.dtype)
    count = mask.sum(dim=-1, keepdim=True, dtype=torch.float32)  # [B, N, 1]
    return x + sim.transpose(1, 2) @ _centre_values(sim, count, feature, centers_feature)


def _centre_values(sim, count, feature, centers_feature) -> torch.Tensor:
    """O = (Sim @ F + CF) / (count + 1), [B, N, D] in `feature`'s dtype (SPEC §2 step 5), divided
    in float32 at least (bf16 would round the counts)."""
    total = sim @ feature + centers_feature
    return (total.to(_work_dtype(total.dtype)) / (count + 1.0)).to(feature.dtype)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs: the precision the cluster steps compute in."""
    return torch.promote_types(dtype, torch.float32)


def cluster_aggregate_direct(
    x: torch.Tensor, sim: torch.Tensor, mask: torch.Tensor, feature: torch.Tensor,
    centers_feature: torch.Tensor,
) -> torch.Tensor:
    """Steps 5-6 as the reference wrote them, with two [B, N, L, D] temporaries; returns [B, L, D].

    Kept only to benchmark against (scripts/bench_projector.py): it needs ~B·N·L·D·4 bytes twice
    (1.2 GB at B=1, N=256, L=576, D=1024 in fp32). Do not use it in the model.
    """
    sim = sim.to(feature.dtype)
    count = mask.sum(dim=-1, keepdim=True, dtype=torch.float32)
    centres = (((feature.unsqueeze(1) * sim.unsqueeze(-1)).sum(dim=2) + centers_feature).float()
               / (count + 1.0)).to(feature.dtype)
    return x + (centres.unsqueeze(2) * sim.unsqueeze(-1)).sum(dim=1)


def _normalize_backward(grad: torch.Tensor, a: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Gradient w.r.t. ``a`` of F.normalize(a, dim=-1) (a / max(|a|, eps)) given ``grad``, in grad's dtype."""
    a = a.to(grad.dtype)
    norm = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    d = norm.clamp_min(eps)
    y = a / d
    # |a| > eps: (g − y<g, y>) / |a|;  |a| <= eps: the clamp is constant, g / eps
    coef = (grad * y).sum(-1, keepdim=True) * (norm > eps)
    return (grad - y * coef) / d


class _HardAssignAggregate(torch.autograd.Function):
    """Steps 4-6 of SPEC §2: x + Simᵀ @ O [B, L, D] from the refined centres.

    Forward runs the ops of `ClusterProjector.assign` + `cluster_aggregate` (same bits). Backward
    uses that each token l has ONE centre a_l: Sim is zero elsewhere, so the chain rule's
    [B, N, L] × [B, L, D] products (six matmuls and several [B, N, L] temporaries under plain
    autograd) are gathers and scatter-adds over the L tokens, O(B·L·D). Kept for backward: a_l, the
    chosen similarity and cosine per token ([B, 1, L] each) and O, C ([B, N, D]) besides the inputs.
    Gradients are computed in float32 (float64 for float64 inputs), returned in each input's dtype.
    """

    @staticmethod
    def forward(ctx, x, centers, feature, centers_feature, alpha, beta):
        cos = pairwise_cos_sim(centers, x)                                    # [B, N, L]
        sim = torch.sigmoid(beta + alpha * cos)
        idx = sim.argmax(dim=1, keepdim=True)                                 # [B, 1, L]
        mask = torch.zeros_like(sim).scatter_(1, idx, 1.0)
        sim = sim * mask
        sim_f = sim.to(feature.dtype)
        count = mask.sum(dim=-1, keepdim=True, dtype=torch.float32)           # [B, N, 1]
        values = _centre_values(sim_f, count, feature, centers_feature)       # O, [B, N, D]
        ctx.save_for_backward(x, centers, feature, values, count, idx, sim.gather(1, idx),
                              cos.gather(1, idx), alpha.detach().clone())
        ctx.shapes = (alpha.shape, beta.shape)
        ctx.dtypes = (x.dtype, centers.dtype, feature.dtype, centers_feature.dtype, alpha.dtype, beta.dtype)
        return x + sim_f.transpose(1, 2) @ values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, centers, feature, values, count, idx, s, cos, alpha = ctx.saved_tensors
        need_x, need_c, need_f, need_cf, need_a, need_b = ctx.needs_input_grad
        b, n, d = values.shape
        tokens = x.shape[1]
        with torch.autocast(grad.device.type, enabled=False):
            # flat row of each token's centre in a [B·N, D] view: gathers and scatter-adds on dim 0
            rows = (idx.view(b, tokens) + n * torch.arange(b, device=idx.device).view(b, 1)).view(-1)
            work = _work_dtype(grad.dtype)
            g = grad.to(work)
            s_used = s.view(b, tokens, 1).to(feature.dtype).to(work)  # the forward multiplied this (cast) value
            s = s.view(b, tokens).to(work)

            def gather(t):                                       # [B, N, D] -> each token's row, [B, L, D]
                return t.reshape(b * n, d).index_select(0, rows).view(b, tokens, d)

            def scatter(t):                                      # [B, L, D] summed into its centre, [B, N, D]
                return t.new_zeros(b * n, d).index_add_(0, rows, t.reshape(b * tokens, d)).view(b, n, d)

            # out_l = x_l + s_l·O[a_l];  O = (Σ_{l→n} s_l F_l + CF_n) / (count_n + 1)
            g_values = scatter(g * s_used)
            g_p = g_values / (count + 1.0)
            g_p_tok = gather(g_p)
            g_s = (g * gather(values.to(work))).sum(-1) + (feature.to(work) * g_p_tok).sum(-1)   # [B, L]
            # s = sigmoid(z), z = beta + alpha·cos(C[a_l], x_l)
            g_z = g_s * s * (1.0 - s)
            grad_alpha = (g_z * cos.view(b, tokens).to(work)).sum().reshape(ctx.shapes[0]) if need_a else None
            grad_beta = g_z.sum().reshape(ctx.shapes[1]) if need_b else None
            g_cos = (g_z * alpha.to(work).reshape(())).unsqueeze(-1)                            # [B, L, 1]
            grad_c = grad_x = None
            if need_c:
                grad_c = _normalize_backward(scatter(g_cos * F.normalize(x.to(work), dim=-1)), centers)
            if need_x:
                grad_x = g + _normalize_backward(g_cos * gather(F.normalize(centers.to(work), dim=-1)), x)
            grad_f = g_p_tok * s_used if need_f else None
            grad_cf = g_p if need_cf else None
        grads = (grad_x, grad_c, grad_f, grad_cf, grad_alpha, grad_beta)
        return tuple(None if t is None else t.to(dt) for t, dt in zip(grads, ctx.dtypes))


def hard_assign_aggregate(x, centers, feature, centers_feature, alpha, beta) -> torch.Tensor:
    """Steps 4-6 of SPEC §2; returns x + Simᵀ @ O, [B, L, D] (see `_HardAssignAggregate`).

    x [B, L, D], refined centres [B, N, D], feature = f(x) [B, L, D], its pooled centres [B, N, D],
    ``sim_alpha`` and ``sim_beta``. Equal to ``cluster_aggregate(x, *assign(x))`` bit for bit."""
    return _HardAssignAggregate.apply(x, centers, feature, centers_feature, alpha, beta)


class ClusterProjector(nn.Module):
    """SQ-LLaVA's cluster projector ("prototype extractor"): x [B, L, D] -> [B, L, H], L kept.

    N centres start as the average-pooled tokens, are refined `num_iters` times by soft assignment,
    then every token is hard-assigned to its most similar centre and receives that centre's
    aggregate, weighted by its similarity, as a residual; `mlp` maps the result to the LLM width.
    Parameter names and shapes match the published checkpoints (SPEC §2); ``ln_1`` is unused.
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
        self.ln_1 = nn.LayerNorm(d)  # unused in forward, as in the reference; kept for checkpoints
        self.mlp = nn.Sequential(nn.Linear(d, h), QuickGELU(), nn.Linear(h, h))

    def refine(self, x: torch.Tensor):
        """Steps 1-3 of SPEC §2; returns (centers, feature, centers_feature).

        centers [B, N, D] are the refined centres; feature = f(x) [B, L, D]; centers_feature
        [B, N, D] is feature average-pooled to N along the tokens.
        """
        value = self.v(x).transpose(1, 2)                                     # [B, D, L]
        feature = self.f(x)                                                   # [B, L, D]
        centers = F.adaptive_avg_pool1d(x.transpose(1, 2), self.num_centers).transpose(1, 2)
        centers_feature = F.adaptive_avg_pool1d(
            feature.transpose(1, 2), self.num_centers).transpose(1, 2)       # [B, N, D]
        # Reference quirk, kept on purpose: V is normalised along the token axis (its last dim).
        value = F.normalize(value, dim=-1)
        for _ in range(self.num_iters):
            centers = self.c(centers)
            s = torch.softmax(F.normalize(centers, dim=-1) @ value, dim=-2)   # over centres
            centers = s @ feature                                             # [B, N, D]
        return centers, feature, centers_feature

    def assign(self, x: torch.Tensor):
        """Steps 1-4 of SPEC §2 with plain autograd ops; returns (sim, mask, feature, centers_feature).

        sim [B, N, L] is sigmoid(beta + alpha·cos(centre, token)) kept only at each token's arg-max
        centre; mask [B, N, L] is that one-hot assignment. `forward` does the same inside
        `hard_assign_aggregate`; this form is for inspection and benchmarks.
        """
        centers, feature, centers_feature = self.refine(x)
        sim = torch.sigmoid(self.sim_beta + self.sim_alpha * pairwise_cos_sim(centers, x))
        mask = torch.zeros_like(sim).scatter_(1, sim.argmax(dim=1, keepdim=True), 1.0)
        return sim * mask, mask, feature, centers_feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the projected features [B, L, H] for x [B, L, D]."""
        if x.dim() != 3:
            raise ValueError(f"ClusterProjector expects [batch, tokens, dim], got shape {tuple(x.shape)}")
        centers, feature, centers_feature = self.refine(x)
        return self.mlp(hard_assign_aggregate(x, centers, feature, centers_feature, self.sim_alpha, self.sim_beta))


_WIDTH_FIELDS = {
    "mm_hidden_size": "the vision feature width D, e.g. 1024 for CLIP ViT-L/14",
    "hidden_size": "the LLM hidden width H, e.g. 4096 for a 7B LLaMA",
}


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

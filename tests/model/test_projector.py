"""Vision projectors (docs/Method.md#projectors): the cluster projector's exact math, parameter layout and the builder."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stllava.model.projector import (
    ClusterProjector,
    IdentityProjector,
    QuickGELU,
    build_vision_projector,
    cluster_aggregate,
    cluster_aggregate_direct,
)


def _cfg(**kw):
    base = dict(mm_hidden_size=8, hidden_size=12)
    base.update(kw)
    return SimpleNamespace(**base)


# --------------------------------------------------------------------------------------------------
# Independent reference: the SQ-LLaVA forward written out with [B, N, L, D] broadcasts (steps 4-6).
# --------------------------------------------------------------------------------------------------
def _direct_forward(p: ClusterProjector, x: torch.Tensor) -> torch.Tensor:
    n = p.num_centers
    pool = nn.AdaptiveAvgPool1d(n)
    value = p.v(x).permute(0, 2, 1)                                   # [B, D, L]
    feature = p.f(x)                                                  # [B, L, D]
    centers = pool(x.permute(0, 2, 1)).permute(0, 2, 1)               # [B, N, D]
    centers_feature = pool(feature.permute(0, 2, 1)).permute(0, 2, 1)
    for _ in range(p.num_iters):
        centers = p.c(centers)
        s = nn.Softmax(dim=-2)(F.normalize(centers, dim=-1) @ F.normalize(value, dim=-1))
        centers = s @ feature
    # step 4 by broadcasting: cos[b, n, l] = <c_n/|c_n|, x_l/|x_l|>
    cn = centers / centers.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (cn.unsqueeze(2) * xn.unsqueeze(1)).sum(-1)                 # [B, N, L] via [B, N, L, D]
    sim = torch.sigmoid(p.sim_beta + p.sim_alpha * cos)
    mask = F.one_hot(sim.argmax(dim=1), n).permute(0, 2, 1).to(sim.dtype)  # [B, N, L]
    sim = sim * mask
    # steps 5-6 with the reference's [B, N, L, D] temporaries
    agg = ((feature.unsqueeze(1) * sim.unsqueeze(-1)).sum(dim=2) + centers_feature) / (
        mask.sum(dim=-1, keepdim=True) + 1.0)                          # [B, N, D]
    out = x + (agg.unsqueeze(2) * sim.unsqueeze(-1)).sum(dim=1)       # [B, L, D]
    return p.mlp(out)


@pytest.mark.parametrize("seed,b,l,n,d,h", [
    (0, 1, 12, 4, 8, 12),      # L divisible by N
    (1, 2, 37, 8, 16, 20),     # L not divisible by N, B > 1
    (2, 3, 50, 16, 24, 8),     # H < D
    (3, 2, 576, 256, 32, 40),  # the real token / centre counts, small widths
])
def test_cluster_matches_direct_broadcast(seed, b, l, n, d, h):
    torch.manual_seed(seed)
    p = ClusterProjector(d, h, num_centers=n, num_iters=2)
    with torch.no_grad():  # make alpha/beta matter: the defaults 1/0 would hide a swapped pair
        p.sim_alpha.fill_(2.5)
        p.sim_beta.fill_(-0.3)
    x = torch.randn(b, l, d)
    with torch.no_grad():
        got = p(x)
        want = _direct_forward(p, x)
        sim, mask, _, _ = p.assign(x)
    assert got.shape == (b, l, h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the case really exercises hard assignment: one centre per token, several centres in use
    assert torch.equal(mask.sum(dim=1), torch.ones(b, l))
    assert (mask.sum(dim=-1) > 0).sum() > b
    assert torch.all((sim > 0) == (mask > 0))


def test_value_normalised_along_tokens_quirk():
    """Normalising V along D instead (the 'obvious' reading) gives different centres: the test above
    would catch it. Checked here so that claim stays true for the chosen sizes."""
    torch.manual_seed(4)
    p = ClusterProjector(8, 8, num_centers=4, num_iters=1)
    x = torch.randn(1, 12, 8)
    with torch.no_grad():
        c0 = F.adaptive_avg_pool1d(x.transpose(1, 2), 4).transpose(1, 2)
        c0 = F.normalize(p.c(c0), dim=-1)
        v = p.v(x).transpose(1, 2)
        s_tok = torch.softmax(c0 @ F.normalize(v, dim=-1), dim=-2)
        s_dim = torch.softmax(c0 @ F.normalize(v, dim=-2), dim=-2)
    assert not torch.allclose(s_tok, s_dim, atol=1e-3)


def test_matmul_and_direct_aggregate_agree():
    torch.manual_seed(5)
    b, n, l, d = 2, 6, 19, 10
    raw = torch.rand(b, n, l)
    mask = F.one_hot(raw.argmax(1), n).permute(0, 2, 1).float()
    args = (torch.randn(b, l, d), raw * mask, mask, torch.randn(b, l, d), torch.randn(b, n, d))
    torch.testing.assert_close(cluster_aggregate(*args), cluster_aggregate_direct(*args))


def test_cluster_golden_one_centre_by_hand():
    """D = H = 2, N = 1, identity layers, x = [[1, 0], [0, 1]].

    N = 1: the centre softmax is 1 everywhere, so C = f(x0) + f(x1) = [1, 1]; cos(C, x_l) = 1/sqrt2;
    Sim = sigmoid(1/sqrt2) = 0.669761; both tokens pick the only centre, count = 2; CF = mean = [.5, .5];
    O = (Sim·[1, 1] + [.5, .5]) / 3 = 0.389920·[1, 1]; out_l = x_l + Sim·O = x_l + 0.261153;
    mlp (identity Linears) = QuickGELU(out) = z·sigmoid(1.702 z).
    """
    p = ClusterProjector(2, 2, num_centers=1, num_iters=2)
    with torch.no_grad():
        for lin in (p.c, p.v, p.f, p.mlp[0], p.mlp[2]):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    s = 1 / (1 + math.exp(-1 / math.sqrt(2)))
    assert s == pytest.approx(0.669761, abs=1e-6)
    o = (s + 0.5) / 3
    hi, lo = 1 + s * o, s * o
    assert lo == pytest.approx(0.261153, abs=1e-6)
    qg = lambda z: z / (1 + math.exp(-1.702 * z))  # noqa: E731
    want = torch.tensor([[[qg(hi), qg(lo)], [qg(lo), qg(hi)]]])
    with torch.no_grad():
        got = p(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # by hand: 1.702·1.261153 = 2.146482, exp(-2.146482) = 0.116895, 1.261153 / 1.116895 = 1.129160
    assert got[0, 0, 0].item() == pytest.approx(1.129160, abs=1e-5)


def test_cluster_parameter_layout_and_7b_count():
    cfg = SimpleNamespace(mm_projector_type="cluster", mm_hidden_size=1024, hidden_size=4096)
    with torch.device("meta"):
        p = build_vision_projector(cfg)
    assert isinstance(p, ClusterProjector)
    assert (p.num_centers, p.num_iters) == (256, 2)
    shapes = {k: tuple(v.shape) for k, v in p.state_dict().items()}
    assert shapes == {
        "sim_alpha": (1, 1, 1), "sim_beta": (1, 1, 1),
        "c.weight": (1024, 1024), "c.bias": (1024,),
        "v.weight": (1024, 1024), "v.bias": (1024,),
        "f.weight": (1024, 1024), "f.bias": (1024,),
        "ln_1.weight": (1024,), "ln_1.bias": (1024,),
        "mlp.0.weight": (4096, 1024), "mlp.0.bias": (4096,),
        "mlp.2.weight": (4096, 4096), "mlp.2.bias": (4096,),
    }
    # 3·(1024² + 1024) + 2 + 2·1024 + (1024·4096 + 4096) + (4096² + 4096), docs/Method.md#cluster-projector
    assert 3 * (1024**2 + 1024) + 2 + 2 * 1024 + (1024 * 4096 + 4096) + (4096**2 + 4096) == 24_130_562
    assert sum(t.numel() for t in p.parameters()) == 24_130_562


def test_cluster_init_values():
    p = ClusterProjector(4, 6, num_centers=2)
    assert torch.equal(p.sim_alpha, torch.ones(1, 1, 1))
    assert torch.equal(p.sim_beta, torch.zeros(1, 1, 1))
    assert list(p.mlp[1].parameters()) == []


def test_cluster_bf16_autocast_and_pure_bf16():
    torch.manual_seed(6)
    p = ClusterProjector(16, 24, num_centers=8)
    x = torch.randn(2, 30, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = p(x)
    assert out.shape == (2, 30, 24) and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert p.c.weight.grad is not None and torch.isfinite(p.c.weight.grad).all()
    assert p.sim_alpha.grad is not None
    pb = p.to(torch.bfloat16)
    with torch.no_grad():
        outb = pb(x.bfloat16())
    assert outb.dtype == torch.bfloat16 and torch.isfinite(outb).all()


def test_cluster_rejects_bad_input():
    p = ClusterProjector(4, 4, num_centers=2)
    with pytest.raises(ValueError, match="tokens, dim"):
        p(torch.randn(5, 4))
    with pytest.raises(ValueError, match="num_centers"):
        ClusterProjector(4, 4, num_centers=0)


# --------------------------------------------------------------------------------------------------
# The training step: the same bits as plain autograd ops, gradients equal to the published form
# --------------------------------------------------------------------------------------------------
def _plain_forward(p: ClusterProjector, x: torch.Tensor) -> torch.Tensor:
    """The model's forward with plain autograd ops everywhere (QuickGELU unfused)."""
    h = p.mlp[0](cluster_aggregate(x, *p.assign(x)))
    return p.mlp[2](h * torch.sigmoid(1.702 * h))


def _grads(fn, p: ClusterProjector, x: torch.Tensor, weight: torch.Tensor, autocast: bool = False) -> dict:
    """Output and gradients of sum(fn(p, x) * weight) w.r.t. x and every parameter that gets one."""
    p.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fn(p, x)
    (y.double() * weight).sum().backward()
    out = {name: t.grad.clone() for name, t in p.named_parameters() if t.grad is not None}
    out.update(x=x.grad.clone(), out=y.detach())
    return out


def _projector(seed, d, h, n, iters=2, dtype=torch.float32):
    torch.manual_seed(seed)
    p = ClusterProjector(d, h, num_centers=n, num_iters=iters).to(dtype)
    with torch.no_grad():
        p.sim_alpha.fill_(2.5)
        p.sim_beta.fill_(-0.3)
    return p


@pytest.mark.parametrize("autocast", [False, True])
def test_training_step_is_bit_identical_to_plain_autograd(autocast):
    """Outputs and every gradient: same bits as the plain expression (so seeded runs do not move)."""
    p = _projector(7, 24, 40, 16)
    x, weight = torch.randn(2, 50, 24), torch.randn(2, 50, 40, dtype=torch.float64)
    got = _grads(lambda m, t: m(t), p, x, weight, autocast)
    want = _grads(_plain_forward, p, x, weight, autocast)
    assert set(got) == set(want) and len(got) == 14  # all parameters but ln_1 (unused), x, out
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert torch.equal(p(x), got["out"])


@pytest.mark.parametrize("seed,b,l,n,d,h,iters", [
    (0, 1, 12, 4, 8, 12, 2),
    (1, 2, 37, 8, 16, 20, 2),     # L not divisible by N
    (2, 3, 50, 16, 24, 8, 1),     # H < D, one iteration
    (3, 2, 30, 1, 6, 6, 0),       # one centre, no refinement
    (4, 2, 576, 256, 16, 24, 2),  # the real token / centre counts, small widths
])
def test_gradients_equal_published_form_float64(seed, b, l, n, d, h, iters):
    p = _projector(seed, d, h, n, iters, torch.float64)
    x = torch.randn(b, l, d, dtype=torch.float64)
    weight = torch.randn(b, l, h, dtype=torch.float64)
    got, want = _grads(lambda m, t: m(t), p, x, weight), _grads(_direct_forward, p, x, weight)
    unused = {"ln_1.weight", "ln_1.bias"} | ({"c.weight", "c.bias", "v.weight", "v.bias"} if iters == 0 else set())
    assert set(got) == set(want) == {name for name, _ in p.named_parameters()} - unused | {"x", "out"}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-11, msg=name)
    assert got["sim_alpha"].abs().item() > 0 and got["sim_beta"].abs().item() > 0


def test_gradients_equal_published_form_float32_and_zero_token():
    p = _projector(8, 32, 40, 64)
    x = torch.randn(2, 200, 32)
    x[1, 5] = 0.0  # an all-zero token: the normalisation's eps clamp
    weight = torch.randn(2, 200, 40, dtype=torch.float64)
    got, want = _grads(lambda m, t: m(t), p, x, weight), _grads(_direct_forward, p, x, weight)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-4, atol=2e-5, msg=name)


def test_quick_gelu_passes_gradcheck_and_keeps_only_its_input():
    z = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(QuickGELU(), (z,))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        QuickGELU()(z)
    assert len(kept) == 1 and kept[0] is z
    with torch.no_grad():
        assert torch.equal(QuickGELU()(z), z * torch.sigmoid(1.702 * z))


# --------------------------------------------------------------------------------------------------
# build_vision_projector
# --------------------------------------------------------------------------------------------------
def test_builder_default_is_cluster_and_reads_options():
    p = build_vision_projector(SimpleNamespace(mm_hidden_size=8, hidden_size=12))
    assert isinstance(p, ClusterProjector) and p.num_centers == 256 and p.num_iters == 2
    p = build_vision_projector(_cfg(mm_projector_type="cluster", mm_projector_clusters=16,
                                    mm_projector_iters=3))
    assert (p.num_centers, p.num_iters) == (16, 3)
    assert build_vision_projector(_cfg(mm_projector_iters=0)).num_iters == 0
    assert p(torch.randn(2, 20, 8)).shape == (2, 20, 12)


def test_builder_linear():
    p = build_vision_projector(_cfg(mm_projector_type="linear"), delay_load=True)
    assert type(p) is nn.Linear and (p.in_features, p.out_features) == (8, 12)
    assert p(torch.randn(1, 5, 8)).shape == (1, 5, 12)


def test_builder_mlp_gelu():
    p = build_vision_projector(_cfg(mm_projector_type="mlp2x_gelu"))
    assert list(p.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert isinstance(p[1], nn.GELU)
    assert tuple(p[0].weight.shape) == (12, 8) and tuple(p[2].weight.shape) == (12, 12)
    p3 = build_vision_projector(_cfg(mm_projector_type="mlp3x_gelu"))
    assert [type(m).__name__ for m in p3] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert "4.weight" in p3.state_dict()
    p1 = build_vision_projector(_cfg(mm_projector_type="mlp1x_gelu"))
    assert len(p1) == 1 and p1(torch.randn(3, 8)).shape == (3, 12)
    with pytest.raises(ValueError, match="mlp0x_gelu"):
        build_vision_projector(_cfg(mm_projector_type="mlp0x_gelu"))


def test_builder_identity():
    p = build_vision_projector(_cfg(mm_projector_type="identity", hidden_size=8))
    assert isinstance(p, IdentityProjector)
    x = torch.randn(2, 3, 8)
    assert p(x) is x
    with pytest.raises(ValueError, match="mm_hidden_size == hidden_size.*8 and 12"):
        build_vision_projector(_cfg(mm_projector_type="identity"))


def test_builder_unknown_type_names_value_choices_and_field():
    with pytest.raises(ValueError) as err:
        build_vision_projector(_cfg(mm_projector_type="mlp2x_relu"))
    msg = str(err.value)
    for part in ("'mlp2x_relu'", "mm_projector_type", "linear", "mlp<N>x_gelu", "identity", "cluster"):
        assert part in msg


@pytest.mark.parametrize("missing", ["mm_hidden_size", "hidden_size"])
def test_builder_missing_width_names_field(missing):
    cfg = _cfg(mm_projector_type="linear")
    delattr(cfg, missing)
    with pytest.raises(ValueError, match=f"`{missing}`"):
        build_vision_projector(cfg)

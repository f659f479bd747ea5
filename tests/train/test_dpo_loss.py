"""DPO losses and answer log-probs on crafted numbers (stllava.train.dpo_loss), values worked by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from stllava.constants import IGNORE_INDEX as I
from stllava.constants import IMAGE_TOKEN_INDEX as IMG
from stllava.train.dpo_loss import LossSettingsError, answer_logps, dpo_loss, loss_uses_mean_logps

# Two pairs. Pair 1: z = (−1 − −3) − (−2 − −2) = 2; pair 2: z = (−4 − −1) − (−3 − −1) = −1.
PC, PR = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -1.0])
RC, RR = torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -1.0])


@pytest.mark.parametrize("loss_type,expected", [
    # −log σ(βz) = log(1 + e^(−βz)), β = 0.1
    ("sigmoid", [math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.1))]),  # 0.598139, 0.744397
    # (z − 1/(2β))² = (z − 5)²
    ("ipo", [9.0, 36.0]),
    # relu(1 − βz)
    ("hinge", [0.8, 1.1]),
])
def test_loss_types_match_hand_values(loss_type, expected):
    out = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type=loss_type)
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    # rewards β(π − ref), the same for every loss type
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.1], abs=1e-7)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.0], abs=1e-7)


def test_sigmoid_loss_at_equal_policy_and_reference_is_log2_and_gradient_sign():
    pc = torch.tensor([-5.0, -7.0], requires_grad=True)
    pr = torch.tensor([-6.0, -2.0], requires_grad=True)
    out = dpo_loss(pc, pr, pc.detach().clone(), pr.detach().clone(), beta=0.1)
    assert out.losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)
    out.losses.sum().backward()
    # d/dπ_c of −log σ(β z) at z = 0 is −β/2: raising the chosen log-prob lowers the loss
    assert pc.grad.tolist() == pytest.approx([-0.05, -0.05]) and pr.grad.tolist() == pytest.approx([0.05, 0.05])


def test_reference_gets_no_gradient_and_bad_settings_are_refused():
    pc, rc = torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    dpo_loss(pc, torch.tensor([-1.0]), rc, torch.tensor([-1.0])).losses.sum().backward()
    assert rc.grad is None and pc.grad is not None
    with pytest.raises(ValueError, match="dpo_loss_type"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(ValueError, match="dpo_beta"):
        dpo_loss(PC, PR, RC, RR, beta=0.0)
    assert loss_uses_mean_logps("ipo") and not loss_uses_mean_logps("sigmoid")


def _sp(x: float) -> float:
    """softplus(x) = log(1 + e^x) = −log σ(−x)."""
    return math.log(1 + math.exp(x))


# With β = 0.1 the two pairs have βz = 0.2 and −0.1; −log σ(βz) = sp(−βz), −log σ(−βz) = sp(βz).
@pytest.mark.parametrize("loss_type,eps,expected", [
    # conservative DPO (cDPO): (1−ε)·sp(−βz) + ε·sp(βz)
    ("sigmoid", 0.1, [0.9 * _sp(-0.2) + 0.1 * _sp(0.2), 0.9 * _sp(0.1) + 0.1 * _sp(-0.1)]),
    ("sigmoid", 0.5, [0.5 * _sp(-0.2) + 0.5 * _sp(0.2), 0.5 * _sp(0.1) + 0.5 * _sp(-0.1)]),
    # robust DPO: ((1−ε)·sp(−βz) − ε·sp(βz)) / (1 − 2ε)
    ("robust", 0.1, [(0.9 * _sp(-0.2) - 0.1 * _sp(0.2)) / 0.8, (0.9 * _sp(0.1) - 0.1 * _sp(-0.1)) / 0.8]),
    ("robust", 0.25, [(0.75 * _sp(-0.2) - 0.25 * _sp(0.2)) / 0.5, (0.75 * _sp(0.1) - 0.25 * _sp(-0.1)) / 0.5]),
    # ε = 0: robust is plain DPO
    ("robust", 0.0, [_sp(-0.2), _sp(0.1)]),
])
def test_noisy_label_losses_match_hand_values(loss_type, eps, expected):
    out = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type=loss_type, label_smoothing=eps)
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.1], abs=1e-7)


def test_default_loss_is_bit_identical_to_the_plain_dpo_loss():
    """sigmoid with ε = 0 (the default) is computed exactly as before label smoothing existed."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g, dtype=torch.float32) * 30 for _ in range(4))
    before = -F.logsigmoid(0.1 * ((pc - pr) - (rc - rr)))  # the implementation of the paper's loss until now
    for out in (dpo_loss(pc, pr, rc, rr), dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", label_smoothing=0.0)):
        assert torch.equal(out.losses, before)
    pc.requires_grad_(True)
    dpo_loss(pc, pr, rc, rr).losses.sum().backward()
    grad = pc.grad.clone()
    pc.grad = None
    (-F.logsigmoid(0.1 * ((pc - pr) - (rc - rr)))).sum().backward()
    assert torch.equal(grad, pc.grad)


def test_robust_loss_is_unbiased_under_flipped_labels():
    """Chowdhury et al.'s claim: if a pair's label is flipped with probability ε, the expected robust
    loss, (1−ε)·L(z) + ε·L(−z), equals the clean DPO loss −log σ(βz)."""
    z = torch.linspace(-30, 30, 61, dtype=torch.float64)
    zero = torch.zeros_like(z)
    clean = dpo_loss(z, zero, zero, zero, beta=0.1).losses
    for eps in (0.05, 0.2, 0.4):
        rob, rob_flipped = (dpo_loss(x, zero, zero, zero, beta=0.1, loss_type="robust", label_smoothing=eps).losses
                            for x in (z, -z))
        assert torch.allclose((1 - eps) * rob + eps * rob_flipped, clean, atol=1e-12)


def test_conservative_loss_is_smallest_where_the_model_trusts_the_label_1_minus_eps():
    """cDPO is the cross-entropy against the soft label 1 − ε: its gradient vanishes at σ(βz) = 1 − ε."""
    eps, beta = 0.2, 0.1
    z_star = math.log((1 - eps) / eps) / beta  # σ(β z*) = 1 − ε
    z = torch.tensor([z_star - 5, z_star, z_star + 5], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(3, dtype=torch.float64)
    dpo_loss(z, zero, zero, zero, beta=beta, label_smoothing=eps).losses.sum().backward()
    assert z.grad[0] < 0 and abs(z.grad[1].item()) < 1e-12 and z.grad[2] > 0


@pytest.mark.parametrize("loss_type,eps,message", [
    ("robust", 0.5, r"\[0, 0.5\) for --dpo_loss_type robust"),
    ("robust", -0.1, r"\[0, 0.5\) for --dpo_loss_type robust"),
    ("sigmoid", 0.6, r"\[0, 0.5\] for --dpo_loss_type sigmoid"),
    ("sigmoid", -0.01, r"\[0, 0.5\] for --dpo_loss_type sigmoid"),
    ("ipo", 0.1, "--label_smoothing applies to --dpo_loss_type sigmoid or robust"),
    ("hinge", 0.1, "--label_smoothing applies to --dpo_loss_type sigmoid or robust"),
])
def test_label_smoothing_out_of_range_is_refused(loss_type, eps, message):
    with pytest.raises(LossSettingsError, match=message):
        dpo_loss(PC, PR, RC, RR, loss_type=loss_type, label_smoothing=eps)


def test_answer_logps_sums_only_answer_tokens():
    big = 100.0  # on positions whose next label is ignored: must not count
    logits = torch.tensor([[
        [0.0, 0.0, math.log(2)],   # predicts label[1] = 2: p = 2/4
        [math.log(3), 0.0, 0.0],   # predicts label[2] = 0: p = 3/5
        [big, -big, 0.0],          # predicts label[3] = IGNORE
        [big, big, big],           # last position predicts nothing
    ], [[big, 0.0, 0.0]] * 4])
    labels = torch.tensor([[I, 2, 0, I], [1, I, I, I]])  # row 2: its only label is at position 0 (never a target)
    logits.requires_grad_(True)
    total, count = answer_logps(logits, labels)
    assert total.tolist() == pytest.approx([math.log(0.5 * 0.6), 0.0], abs=1e-6)  # ln 0.3 = −1.20397
    assert count.tolist() == [2, 0]
    total.sum().backward()
    assert logits.grad[0, :2].abs().sum() > 0 and logits.grad[0, 2:].abs().sum() == 0 and logits.grad[1].abs().sum() == 0
    with pytest.raises(ValueError, match="disagree"):
        answer_logps(logits[:, :3], labels)


def test_dpo_logps_read_the_answers_where_the_models_splice_put_them(tiny_bundle):
    """DPO's labels are the model's own (forward_with_labels). Worked by hand with 64 positions per
    image: row 0 = [1, 9, <image>, 11, 12, 13] puts 12, 13 at output positions 67, 68, so they are
    predicted by the logits at 66, 67; row 1 = [1, <image>, 21, 22] puts 21, 22 at 65, 66; row 2 has
    no image (its sample's image is unused) and its answers 32, 33, 34 sit at 2, 3, 4."""
    from stllava.model import LlavaLlamaForCausalLM
    from stllava.train.dpo_trainer import forward_with_labels

    model = LlavaLlamaForCausalLM.from_pretrained(tiny_bundle["model"]).eval()
    ids = torch.tensor([[1, 9, IMG, 11, 12, 13], [1, IMG, 21, 22, 0, 0], [1, 31, 32, 33, 34, 0]])
    labels = torch.tensor([[I, I, I, I, 12, 13], [I, I, 21, 22, I, I], [I, I, 32, 33, 34, I]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [1] * 5 + [0]])
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "images": torch.randn(3, 3, 112, 112)}
    with torch.no_grad():
        logits, spliced = forward_with_labels(model, batch)
    assert logits.shape[:2] == spliced.shape == (3, 5 + 64)  # row 0: 5 text tokens + the image
    lp = logits.float().log_softmax(-1)
    total, count = answer_logps(logits, spliced)
    assert count.tolist() == [2, 2, 3]
    assert total[0].item() == pytest.approx((lp[0, 66, 12] + lp[0, 67, 13]).item(), abs=1e-5)
    assert total[1].item() == pytest.approx((lp[1, 64, 21] + lp[1, 65, 22]).item(), abs=1e-5)
    assert total[2].item() == pytest.approx((lp[2, 1, 32] + lp[2, 2, 33] + lp[2, 3, 34]).item(), abs=1e-5)


@pytest.mark.parametrize("flags,message", [
    (["--dpo_loss_type", "robust", "--label_smoothing", "0.5"], "--label_smoothing must be in [0, 0.5) for "
                                                                  "--dpo_loss_type robust"),
    (["--label_smoothing", "0.7"], "--label_smoothing must be in [0, 0.5] for --dpo_loss_type sigmoid"),
])
def test_train_dpo_refuses_label_smoothing_out_of_range_in_one_line(tmp_path, capsys, flags, message):
    from stllava.train.train_dpo import main

    data = tmp_path / "pairs.json"
    data.write_text("[]")
    rc = main(["--model_name_or_path", str(tmp_path / "never-loaded"), "--data_path", str(data),
               "--output_dir", str(tmp_path / "o"), "--report_to", "none", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err

"""DPO losses and answer log-probs on crafted numbers (stllava.train.dpo_loss), values worked by hand."""
import math

import pytest
import torch

from stllava.constants import IGNORE_INDEX as I
from stllava.constants import IMAGE_TOKEN_INDEX as IMG
from stllava.train.dpo_loss import answer_logps, dpo_loss, loss_uses_mean_logps

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

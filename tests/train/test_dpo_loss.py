"""DPO losses and answer log-probs on crafted numbers (stllava.train.dpo_loss), values worked by hand."""
import math

import pytest
import torch

from stllava.constants import IGNORE_INDEX as I
from stllava.constants import IMAGE_TOKEN_INDEX as IMG
from stllava.train.dpo_loss import (
    answer_logps,
    dpo_loss,
    image_positions_from_shapes,
    loss_uses_mean_logps,
    spliced_labels,
)

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


def test_spliced_labels_by_hand():
    ids = torch.tensor([[1, IMG, 5, 6], [1, 7, 8, 0]])
    labels = torch.tensor([[I, I, 5, 6], [I, 7, 8, I]])
    assert image_positions_from_shapes(ids, 6) == 3
    out = spliced_labels(ids, labels, 3)
    assert out.tolist() == [[I, I, I, I, 5, 6], [I, 7, 8, I, I, I]]
    assert spliced_labels(ids, labels, 3, width=8).shape == (2, 8)
    with pytest.raises(ValueError, match="positions"):
        spliced_labels(ids, labels, 3, width=5)
    with pytest.raises(ValueError, match="cannot align"):
        image_positions_from_shapes(ids, 3)
    assert image_positions_from_shapes(torch.tensor([[1, 2]]), 2) == 1


def test_spliced_labels_match_the_models_splice(tiny_bundle):
    """The layout must be the one LlavaLlamaForCausalLM trains with (its own labels output)."""
    from stllava.model import LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM.from_pretrained(tiny_bundle["model"]).eval()
    ids = torch.tensor([[1, 9, IMG, 11, 12, 13], [1, IMG, 21, 22, 0, 0], [1, 31, 32, 33, 34, 0]])
    labels = torch.tensor([[I, I, I, I, 12, 13], [I, I, 21, 22, I, I], [I, I, 32, 33, 34, I]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [1] * 5 + [0]])
    images = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        _, _, _, expected = model.prepare_inputs_labels_for_multimodal(ids, mask, labels, images)
    p = image_positions_from_shapes(ids, expected.shape[1])
    assert p == model.get_model().get_vision_tower().num_patches == 64
    assert torch.equal(spliced_labels(ids, labels, p, expected.shape[1]), expected)

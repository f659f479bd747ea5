"""The one splice layout (stllava.splice): output positions worked by hand, and the model, the
collator and DPO all follow it."""
import pytest
import torch

from stllava.constants import IGNORE_INDEX as I
from stllava.constants import IMAGE_TOKEN_INDEX as IMG
from stllava.splice import splice_layout


def test_layout_by_hand():
    # row 0: 1 → 0, <image> → 1..3, 5 → 4, 6 → 5; row 1: no image, one position per token
    ids = torch.tensor([[1, IMG, 5, 6], [1, 7, 8, 0]])
    is_image, width, start, lengths = splice_layout(ids, 3)
    assert is_image.tolist() == [[False, True, False, False], [False] * 4]
    assert width.tolist() == [[1, 3, 1, 1], [1, 1, 1, 1]]
    assert start.tolist() == [[0, 1, 4, 5], [0, 1, 2, 3]]
    assert lengths.tolist() == [6, 4]
    # two images in a row, one row given without a batch axis
    one = splice_layout(torch.tensor([IMG, 9, IMG]), 2)
    assert one.start.tolist() == [0, 2, 3] and int(one.lengths) == 5
    with pytest.raises(ValueError, match="at least one"):
        splice_layout(ids, 0)


def test_model_and_collator_follow_the_layout():
    """The model puts each token's label at the layout's start (IGNORE_INDEX on image positions),
    and the collator cuts a row exactly where the layout runs past model_max_length."""
    from transformers import CLIPVisionConfig

    from stllava.data.collate import truncate_to_fit
    from stllava.model import LlavaLlamaConfig, LlavaLlamaForCausalLM
    from stllava.model.tiny import TINY_LLM, TINY_VISION

    v = CLIPVisionConfig(**TINY_VISION)
    torch.manual_seed(0)
    model = LlavaLlamaForCausalLM(LlavaLlamaConfig(**TINY_LLM, vocab_size=50, mm_vision_tower="/nonexistent/clip",
                                                   mm_vision_config=v.to_dict(), mm_hidden_size=v.hidden_size,
                                                   mm_projector_type="linear")).eval()
    P = 64  # (112 / 14)² patches
    ids = torch.tensor([[1, 9, IMG, 11, 12], [1, 21, 22, 23, 24]])
    labels = torch.tensor([[I, 9, I, 11, 12], [I, 21, 22, 23, 24]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, images=torch.randn(2, 3, 112, 112), compute_loss=False)
    assert out.loss is None and out.labels.shape == out.logits.shape[:2] == (2, 4 + P)
    expected = torch.full((2, 4 + P), I)
    expected[0, [1, 2 + P, 3 + P]] = torch.tensor([9, 11, 12])
    expected[1, 1:5] = torch.tensor([21, 22, 23, 24])
    assert torch.equal(out.labels, expected)

    # 2 + P + 1 positions hold [1, 9, <image>, 11]; one more would overflow
    cut, cut_labels = truncate_to_fit(ids[0], labels[0], 2 + P + 1, image_tokens=P)
    assert cut.tolist() == [1, 9, IMG, 11] and cut_labels.tolist() == [I, 9, I, 11]
    assert truncate_to_fit(ids[0], labels[0], 2 + P + 2, image_tokens=P)[0].tolist() == ids[0].tolist()

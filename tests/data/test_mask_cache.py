"""The tokenization memo of the SFT dataset: identical items, cache hits across epochs."""
import torch

from stllava.data.preprocess import MaskCache, mask_conversation
from stllava.data.sft import LazySupervisedDataset
from stllava.data.verify import load_records
from stllava.toys import write_colour_dataset


def test_mask_cache_returns_what_mask_conversation_returns(tiny_tokenizer):
    prompt = "SYS USER: <image>\nWhat colour? ASSISTANT: Red.</s>VUSER: Is it red?</s>"
    spans = [(prompt.index(" Red."), prompt.index("</s>") + 4), (prompt.index(" Is it"), len(prompt))]
    cache = MaskCache(max_entries=2)
    want = mask_conversation(prompt, spans, tiny_tokenizer)
    for _ in range(2):
        ids, labels, problem = cache(prompt, spans, tiny_tokenizer)
        assert torch.equal(ids, want[0]) and torch.equal(labels, want[1]) and problem == want[2]
        labels[:] = 0  # a caller changing its copy must not change the memo
    assert len(cache._memo) == 1
    cache(prompt + " ", spans, tiny_tokenizer)
    cache(prompt + "  ", spans, tiny_tokenizer)  # over the bound: the memo starts again
    assert len(cache._memo) == 1


def test_dataset_items_identical_with_and_without_the_memo(tiny_bundle, tmp_path):
    from transformers import CLIPImageProcessor

    from stllava.model.builder import load_tokenizer

    tok = load_tokenizer(tiny_bundle["model"])
    proc = CLIPImageProcessor.from_pretrained(tiny_bundle["model"])
    data, folder = write_colour_dataset(str(tmp_path), n=6, n_text=1)
    cached = LazySupervisedDataset(load_records(data), tok, proc, image_folder=folder, version="v1_sq", sq_r=0.5)
    plain = LazySupervisedDataset(load_records(data), tok, proc, image_folder=folder, version="v1_sq", sq_r=0.5)
    plain.mask_cache = None
    for epoch in range(3):
        for i in range(len(cached)):
            a, b = cached[(epoch, i)], plain[(epoch, i)]
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert 0 < len(cached.mask_cache._memo) < 3 * len(cached)  # later epochs hit the memo

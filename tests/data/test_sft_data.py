"""Stage-1 data: lazy dataset, collator, truncation, samplers, reproducible VUSER draws."""
import json

import pytest
import torch
from torch.utils.data import DataLoader

from stllava.constants import IGNORE_INDEX
from stllava.constants import IMAGE_TOKEN_INDEX as IMG
from stllava.data.collate import DataCollatorForSupervisedDataset, truncate_to_fit
from stllava.data.sft import LazySupervisedDataset
from stllava.data.verify import load_records
from stllava.toys import write_colour_dataset
from stllava.train.sampler import (
    LengthGroupedSampler,
    RandomEpochSampler,
    get_modality_length_grouped_indices,
    split_to_even_chunks,
)


def test_item_and_batch(tok_proc, tmp_path):
    tok, proc = tok_proc
    data, folder = write_colour_dataset(str(tmp_path), n=2, n_text=1)
    ds = LazySupervisedDataset(load_records(data), tok, proc, image_folder=folder, version="v1")
    assert len(ds) == 3 and ds.lengths[2] == len("How many kidneys does a person have? (0)".split()) + 1
    assert [m > 0 for m in ds.modality_lengths] == [True, True, False]
    img, txt = ds[0], ds[2]
    assert img["image"].shape == (3, 112, 112) and (img["input_ids"] == IMG).sum() == 1
    # pad: the 40x28 picture is padded with the processor's mean colour, which normalises to ~0
    assert img["image"][:, 0, 0].abs().max() < 0.02 and img["image"][:, 56, 56].abs().max() > 0.5
    assert torch.equal(txt["image"], torch.zeros(3, 112, 112))
    # trained: " blue</s>" / " No</s>" of the answers, nothing of the question
    trained = tok.decode([t for t in img["labels"].tolist() if t != IGNORE_INDEX])
    assert trained.replace(" ", "") == "blue</s>No</s>"

    batch = DataCollatorForSupervisedDataset(tok.pad_token_id, 1024, 64)([img, txt])
    n0, n1 = len(img["input_ids"]), len(txt["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1)) and batch["images"].shape == (2, 3, 112, 112)
    assert batch["attention_mask"].sum(1).tolist() == [n0, n1]
    short = 0 if n0 < n1 else 1
    assert (batch["input_ids"][short, min(n0, n1):] == tok.unk_token_id).all()
    assert (batch["labels"][short, min(n0, n1):] == IGNORE_INDEX).all()


def test_truncate_counts_image_positions_and_never_cuts_one():
    ids = torch.tensor([1, 5, IMG, 7, 8, 9])
    lab = torch.tensor([-100, -100, -100, 7, 8, 9])
    # spliced end positions with 4 image tokens: 1, 2, 6, 7, 8, 9
    assert truncate_to_fit(ids, lab, 7, 4)[0].tolist() == [1, 5, IMG, 7]
    assert truncate_to_fit(ids, lab, 7, 4)[1].tolist() == [-100, -100, -100, 7]
    assert truncate_to_fit(ids, lab, 3, 4)[0].tolist() == [1, 5, IMG]  # the image is kept whole
    assert truncate_to_fit(ids, lab, 9, 4)[0].tolist() == ids.tolist()
    assert truncate_to_fit(ids, lab, None, 4)[0] is ids
    assert truncate_to_fit(torch.tensor([1, 2, 3, 4]), None, 2)[0].tolist() == [1, 2]


def test_split_to_even_chunks_golden():
    # lengths 9,1,5,5 into 2 chunks of 2: 0->c0(9) 1->c1(1) 2->c1(6) [c1 full] 3->c0
    assert split_to_even_chunks([0, 1, 2, 3], [9, 1, 5, 5], 2) == [[0, 3], [1, 2]]
    assert split_to_even_chunks([0, 1, 2], [1, 1, 1], 2) == [[0, 2], [1]]


def test_modality_grouping_keeps_modalities_apart():
    lengths = [10 + i for i in range(37)] + [-(5 + i) for i in range(21)]  # 37 image, 21 text-only
    bs, world = 4, 2
    mb = bs * world
    sampler = LengthGroupedSampler(bs, world, lengths, seed=3, group_by_modality=True)
    sampler.set_epoch(1)
    pairs = list(sampler)
    assert all(e == 1 for e, _ in pairs) and sorted(i for _, i in pairs) == list(range(58))
    order = [i for _, i in pairs]
    megabatches = [order[k:k + mb] for k in range(0, len(order), mb)]
    # 37 = 4*8+5 image, 21 = 2*8+5 text: 6 pure megabatches, then the 10 left-overs mixed
    assert [len(m) for m in megabatches][:6] == [8] * 6
    for m in megabatches[:6]:
        assert len({lengths[i] > 0 for i in m}) == 1
    assert sorted(megabatches[6] + megabatches[7]) == sorted(order[48:])
    # a pure function of (seed, epoch): same again, different in another epoch
    assert [i for _, i in sampler] == order
    sampler.set_epoch(2)
    assert [i for _, i in sampler] != order


def test_modality_grouping_single_modality_falls_back():
    order = get_modality_length_grouped_indices([3, 1, 2, 5], 2, 1, torch.Generator().manual_seed(0))
    assert sorted(order) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="non-zero"):
        get_modality_length_grouped_indices([3, 0, -2], 1, 1, torch.Generator())


def _multi_turn_records(n):
    recs = []
    for i in range(n):
        conv = [{"from": "human", "value": "<image>\nWhat colour is the image?"}, {"from": "gpt", "value": "red"}]
        for t in range(4):
            conv += [{"from": "human", "value": f"Is there a lesion {t}?"}, {"from": "gpt", "value": "no"}]
        recs.append({"id": f"r{i}", "image": "toy_0000.png", "conversations": conv})
    return recs


def test_vuser_draws_same_with_0_and_2_workers(tok_proc, tmp_path):
    tok, proc = tok_proc
    _, folder = write_colour_dataset(str(tmp_path), n=1)
    ds = LazySupervisedDataset(_multi_turn_records(12), tok, proc, image_folder=folder, version="v1_sq",
                               sq_r=0.5, seed=7)

    def run(workers):
        sampler = RandomEpochSampler(len(ds), seed=11)
        loader = DataLoader(ds, batch_size=3, sampler=sampler, num_workers=workers,
                            collate_fn=lambda items: [(it["input_ids"].tolist()) for it in items])
        out = {}
        for epoch in (0, 1):
            sampler.set_epoch(epoch)  # what the Trainer does at every epoch
            order = [i for _, i in sampler]
            got = [ids for batch in loader for ids in batch]
            out.update({(epoch, i): ids for i, ids in zip(order, got)})
        return out

    a, b = run(0), run(2)
    assert a == b and len(a) == 24
    # the draws really happen (some VUSER turns, not all) and depend on the epoch
    n_vuser = [tok.decode([t for t in ids if t >= 0]).count("VUSER:") for ids in a.values()]
    assert 0 < sum(n_vuser) < 4 * 24
    assert any(a[(0, i)] != a[(1, i)] for i in range(12))
    # an integer index uses the dataset's own epoch
    ds.set_epoch(1)
    assert ds[5]["input_ids"].tolist() == a[(1, 5)]


def test_load_records_errors(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"id": 1}')
    with pytest.raises(ValueError, match="expected a list"):
        load_records(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(str(tmp_path / "missing.json"))
    good = tmp_path / "y.jsonl"
    good.write_text(json.dumps({"id": 1, "conversations": []}) + "\n")
    assert load_records(str(good)) == [{"id": 1, "conversations": []}]


def test_model_max_length_unit_text_tokens_counts_the_image_as_one(tok_proc, tmp_path):
    """The published counting (``--model_max_length_unit text_tokens``): the cut and the start-up
    length check count input ids, an image being one, so a sample may reach max + (patches - 1)
    model positions; the default counts model positions."""
    from types import SimpleNamespace

    from stllava.data.sft import build_sft_dataset
    from stllava.data.verify import BadDataError
    from stllava.splice import splice_layout
    from stllava.train.trainer import length_image_tokens

    patches, max_len = 64, 40
    text = length_image_tokens(SimpleNamespace(model_max_length_unit="text_tokens"), patches)
    positions = length_image_tokens(SimpleNamespace(model_max_length_unit="positions"), patches)
    assert (text, positions, length_image_tokens(SimpleNamespace(), patches)) == (1, patches, patches)

    ids = torch.tensor([1, IMG] + list(range(100, 160)))
    sample = {"input_ids": ids, "labels": ids.clone()}
    cut_text = DataCollatorForSupervisedDataset(0, max_len, text)([sample])["input_ids"][0]
    cut_pos = DataCollatorForSupervisedDataset(0, max_len, positions)([sample])["input_ids"][0]
    assert cut_text.tolist() == ids[:max_len].tolist()  # the published input_ids[:, :max_len]
    assert int(splice_layout(cut_text, patches).lengths) == max_len + patches - 1
    assert cut_pos.tolist() == [1, IMG]  # nothing after the image fits in 40 positions (and it is never cut)

    tok, proc = tok_proc
    data, folder = write_colour_dataset(str(tmp_path), n=2)
    # 79 input ids each: within 100 counting the image as one, 142 positions counting its 64 patches
    kw = dict(image_folder=folder, version="v1", sq_r=0.0, seed=0, image_aspect_ratio="pad", model_max_length=100)
    assert len(build_sft_dataset(data, tok, proc, image_tokens=text, **kw)) == 2
    with pytest.raises(BadDataError, match="too long"):
        build_sft_dataset(data, tok, proc, image_tokens=positions, **kw)

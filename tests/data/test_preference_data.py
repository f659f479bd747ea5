"""Stage-3 data: preference records -> masked chosen/rejected samples, the data check, the collator."""
import json
import os

import pytest
import torch

from stllava.constants import IGNORE_INDEX
from stllava.constants import IMAGE_TOKEN_INDEX as IMG
from stllava.data.preference import DataCollatorForPreferenceDataset, LazyPreferenceDataset, build_preference_dataset
from stllava.data.verify import PROMPT_MISMATCH, BadDataError, load_records, verify_preference_records
from stllava.toys import write_colour_preference_dataset
from stllava.train.dpo_trainer import concatenated_batch


def _trained(tok, labels):
    return tok.decode([t for t in labels.tolist() if t != IGNORE_INDEX]).replace(" ", "")


def test_item_masks_only_the_answers_and_shares_the_prompt(tok_proc, tmp_path):
    tok, proc = tok_proc
    data, folder = write_colour_preference_dataset(str(tmp_path), n=4)
    records = load_records(data)
    assert records[0]["chosen_conversations"][1]["value"] == "blue"  # the toy pictures alternate blue, red
    assert records[0]["reject_conversations"][1]["value"] == "red"
    records[1]["scores"] = {"chosen": 9, "rejected": 2}  # provenance fields are ignored
    ds = LazyPreferenceDataset(records, tok, proc, image_folder=folder, version="v1", indices=[10, 11, 12, 13])
    item = ds[(3, 1)]  # the samplers' (epoch, index) keys work
    assert item["index"] == 11 and item["image"].shape == (3, 112, 112)
    assert _trained(tok, item["chosen_labels"]) == "red</s>" and _trained(tok, item["reject_labels"]) == "blue</s>"
    c, r = item["chosen_input_ids"], item["reject_input_ids"]
    first = int((item["chosen_labels"] != IGNORE_INDEX).nonzero()[0])
    assert (c == IMG).sum() == 1 and torch.equal(c[:first], r[:first])  # same prompt, then the answers differ
    prompt = tok.decode([t for t in c[:first].tolist() if t != IMG])
    assert prompt.endswith("What colour is the image? ASSISTANT:") and "USER:" in prompt
    # words of the longer side ("<image>" is a word, the answer one more) + 128 for the image
    assert ds.lengths[0] == len("<image> What colour is the image? blue".split()) + 128
    assert all(m > 0 for m in ds.modality_lengths)
    assert ds.mismatches == 0


def test_collator_pads_both_sides_to_one_width(tok_proc, tmp_path):
    tok, proc = tok_proc
    data, folder = write_colour_preference_dataset(str(tmp_path), n=2)
    records = load_records(data)
    records[1]["chosen_conversations"][1]["value"] = "it is clearly a red picture"  # a longer chosen answer
    records.append({"id": "text", "chosen_conversations": [{"from": "human", "value": "Two kidneys?"},
                                                           {"from": "gpt", "value": "yes"}],
                    "reject_conversations": [{"from": "human", "value": "Two kidneys?"},
                                             {"from": "gpt", "value": "no, three"}]})
    ds = LazyPreferenceDataset(records, tok, proc, image_folder=folder)
    items = [ds[i] for i in range(3)]
    batch = DataCollatorForPreferenceDataset(tok.pad_token_id, 1024, 64)(items)
    lengths = {s: [len(it[f"{s}_input_ids"]) for it in items] for s in ("chosen", "reject")}
    width = max(max(v) for v in lengths.values())
    for side in ("chosen", "reject"):
        assert batch[f"{side}_input_ids"].shape == batch[f"{side}_labels"].shape == (3, width)
        assert batch[f"{side}_attention_mask"].sum(1).tolist() == lengths[side]
        for b, n in enumerate(lengths[side]):
            assert (batch[f"{side}_input_ids"][b, n:] == tok.pad_token_id).all()
            assert (batch[f"{side}_labels"][b, n:] == IGNORE_INDEX).all()
    assert batch["index"].tolist() == [0, 1, 2] and batch["images"].shape == (3, 3, 112, 112)
    assert torch.equal(batch["images"][2], torch.zeros(3, 112, 112))  # text-only pair: the blank image

    cat = concatenated_batch(batch, tok.pad_token_id)
    assert cat["input_ids"].shape == (6, width) and cat["images"].shape == (6, 3, 112, 112)
    assert torch.equal(cat["input_ids"][3:], batch["reject_input_ids"]) and torch.equal(cat["images"][3:], batch["images"])
    # sides of different widths (another collator) are padded to one
    short = dict(batch, reject_input_ids=batch["reject_input_ids"][:, :5], reject_labels=batch["reject_labels"][:, :5],
                 reject_attention_mask=batch["reject_attention_mask"][:, :5])
    cat = concatenated_batch(short, 0)
    assert cat["labels"].shape == (6, width) and (cat["labels"][3:, 5:] == IGNORE_INDEX).all()
    assert (cat["attention_mask"][3:, 5:] == 0).all()


def _pair(q="<image>\nWhat is it?", a="a", b="b", image="good.png", rid="x"):
    rec = {"id": rid, "chosen_conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
           "reject_conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": b}]}
    if image is not None:
        rec["image"] = image
    return rec


def test_bad_pairs_are_reported_then_stopped_or_skipped(tok_proc, tmp_path):
    from PIL import Image

    tok, proc = tok_proc
    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (20, 30), (200, 10, 10)).save(folder / "good.png")
    (folder / "empty.png").write_bytes(b"")
    no_reject = _pair(rid="no-reject")
    del no_reject["reject_conversations"]
    bad_roles = _pair(rid="bad-roles")
    bad_roles["reject_conversations"][1]["from"] = "human"
    records = [_pair(rid="ok"), _pair(image="missing.png", rid="missing"), _pair(image="empty.png", rid="empty"),
               no_reject, bad_roles, _pair(rid="other-question") | {"reject_conversations": _pair(q="<image>\nWhy?")["reject_conversations"]},
               _pair(q="What is it?", image=None, rid="text-ok"), "not a record"]
    report = verify_preference_records(records, str(folder), data_path="pairs.json")
    by_record = {}
    for p in report.problems:
        by_record.setdefault(p.index, []).append((p.kind, p.detail))
    assert sorted(by_record) == [1, 2, 3, 4, 5, 7]
    assert by_record[1][0][0] == "missing image" and len(by_record[1]) == 1  # reported once, not per side
    assert by_record[2][0][0] == "empty image file"
    assert by_record[3] == [("malformed record", "no 'reject_conversations' list (a DPO record needs "
                                                 "'chosen_conversations' and 'reject_conversations')")]
    assert by_record[4][0][0] == "bad roles or turns" and by_record[4][0][1].startswith("rejected: ")
    assert by_record[5] == [(PROMPT_MISMATCH, by_record[5][0][1])] and "Why?" in by_record[5][0][1]
    assert by_record[7][0][0] == "malformed record"

    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    with pytest.raises(BadDataError, match=r"(?s)record 1 \(id 'missing'\): missing image.*6 bad"):
        build_preference_dataset(str(path), tok, proc, image_folder=str(folder))
    ds = build_preference_dataset(str(path), tok, proc, image_folder=str(folder), on_bad_sample="skip")
    assert ds.indices == [0, 6] and [r["id"] for r in ds.records] == ["ok", "text-ok"]
    assert "image" not in ds[1] or torch.equal(ds[1]["image"], torch.zeros(3, 112, 112))


def test_no_usable_pairs_is_a_clear_error(tok_proc, tmp_path):
    tok, proc = tok_proc
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match=r"empty\.json: no usable records \(0 in the file.*build_pairs stats"):
        build_preference_dataset(str(empty), tok, proc, image_folder=str(tmp_path))
    all_bad = tmp_path / "bad.json"
    all_bad.write_text(json.dumps([_pair(image="missing.png", rid="m")]))
    with pytest.raises(ValueError, match=r"no usable records \(1 in the file, 1 skipped as bad\)"):
        build_preference_dataset(str(all_bad), tok, proc, image_folder=str(tmp_path), on_bad_sample="skip")


def test_too_long_pairs_are_found_with_the_tokenizer(tok_proc, tmp_path):
    tok, proc = tok_proc
    data, folder = write_colour_preference_dataset(str(tmp_path), n=2)
    records = load_records(data)
    records[1]["reject_conversations"][1]["value"] = "red " * 200
    report = verify_preference_records(records, folder, tokenizer=tok, model_max_length=200, image_tokens=64)
    assert [(p.index, p.kind) for p in report.problems] == [(1, "too long")]
    assert report.problems[0].detail.startswith("rejected: ")


def test_real_llama_tokenizer_has_no_mismatch(llama_tokenizer_path, tok_proc, tmp_path):
    """The released DPO schema with the real LLaMA tokenizer (both legacy modes): answers masked exactly."""
    from transformers import LlamaTokenizer

    _, proc = tok_proc
    data, folder = write_colour_preference_dataset(str(tmp_path), n=2)
    records = load_records(data)
    records[0]["chosen_conversations"][1]["value"] = "The image shows a chest X-ray with no acute findings.\nIt is normal."
    for legacy in (True, False):
        tok = LlamaTokenizer.from_pretrained(os.path.dirname(llama_tokenizer_path), legacy=legacy)
        tok.pad_token = tok.unk_token
        ds = LazyPreferenceDataset(records, tok, proc, image_folder=folder)
        item = ds[0]
        assert ds.mismatches == 0
        trained = tok.decode([t for t in item["chosen_labels"].tolist() if t != IGNORE_INDEX])
        assert trained.strip() == records[0]["chosen_conversations"][1]["value"] + "</s>"
        assert tok.decode([t for t in item["reject_labels"].tolist() if t != IGNORE_INDEX]).strip() == "red</s>"

"""Raw benchmark files → LLaVA-Med test files (stllava.eval.convert)."""
import json

import pytest

from stllava.eval import convert
from stllava.eval.convert import ConvertError


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def _content(items):
    """Everything but the id (the two VQA-RAD files number questions differently)."""
    return [(it["image"], it["answer_type"], it["conversations"]) for it in items]


# --- VQA-RAD, real files ----------------------------------------------------------------------
def test_real_vqa_rad_both_sources_agree(vqa_rad_dir):
    split_items, split_stats = convert.convert("vqa_rad", vqa_rad_dir / "testset.json",
                                               image_folder=vqa_rad_dir / "images")
    public_items, public_stats = convert.convert("vqa_rad",
                                                 vqa_rad_dir / "VQA_RAD_Dataset_Public.json")
    for stats, fmt in ((split_stats, "split"), (public_stats, "public")):
        assert stats["source_format"] == fmt
        assert (stats["n_questions"], stats["n_open"], stats["n_closed"], stats["n_images"]) == \
            (451, 179, 272, 203)
    assert public_stats["n_source_records"] == 2248
    assert _content(split_items) == _content(public_items)
    # ids are each file's own qids, unique, ints
    raw = json.loads((vqa_rad_dir / "testset.json").read_text())
    assert [it["id"] for it in split_items] == [r["qid"] for r in raw]
    assert len({it["id"] for it in public_items}) == 451
    assert all(isinstance(it["id"], int) for it in public_items)
    first = split_items[0]
    assert first["conversations"][0] == {"from": "human",
                                         "value": "<image>\n" + raw[0]["question"]}
    assert first["conversations"][1] == {"from": "gpt", "value": raw[0]["answer"]}


def test_real_vqa_rad_forced_wrong_format_is_refused(vqa_rad_dir):
    with pytest.raises(ConvertError, match="no test questions found"):
        convert.convert("vqa_rad", vqa_rad_dir / "testset.json", fmt="public")


# --- VQA-RAD, synthetic (runs without ../shared) ----------------------------------------------
def _rad(qid, phrase, answer="Yes", answer_type="CLOSED", image="synpic1.jpg"):
    return {"qid": qid, "image_name": image, "question": f"Question {qid}?", "answer": answer,
            "answer_type": answer_type, "phrase_type": phrase, "qid_linked_id": "x"}


def test_synthetic_vqa_rad_public_file(tmp_path):
    records = [_rad(0, "freeform"), _rad("1", "test_freeform", answer=4, answer_type="OPEN"),
               _rad(2, "test_para", answer="no", answer_type="CLOSED ", image="synpic2.jpg"),
               _rad(3, "para")]
    items, stats = convert.convert("vqa_rad", _write(tmp_path / "public.json", records))
    assert [it["id"] for it in items] == [1, 2]                      # "1" → 1
    assert items[0]["conversations"][1]["value"] == "4"               # int answer → str
    assert items[1]["answer_type"] == "CLOSED"                        # "CLOSED " stripped
    assert (stats["n_questions"], stats["n_open"], stats["n_closed"], stats["n_images"]) == \
        (2, 1, 1, 2)
    # a split file (testset.json: phrase types without "test_", no release-only fields) keeps
    # every record
    split = [{**{k: v for k, v in r.items() if k != "qid_linked_id"},
              "phrase_type": r["phrase_type"].replace("test_", "")} for r in records]
    items, stats = convert.convert("vqa_rad", _write(tmp_path / "split.json", split))
    assert stats["source_format"] == "split" and stats["n_questions"] == 4


def test_vqa_rad_malformed_record_names_record_and_field(tmp_path):
    records = [_rad(1, "test_freeform"), _rad(2, "test_para")]
    del records[1]["question"]
    with pytest.raises(ConvertError, match=r"record 1: field 'question' is missing; fix: "):
        convert.convert("vqa_rad", _write(tmp_path / "bad.json", records))
    records = [_rad(1, "test_freeform", answer_type="MAYBE")]
    with pytest.raises(ConvertError, match=r"record 0: field 'answer_type' must be OPEN or CLOSED"):
        convert.convert("vqa_rad", _write(tmp_path / "bad2.json", records))
    with pytest.raises(ConvertError, match=r"question ids occur more than once"):
        convert.convert("vqa_rad", _write(tmp_path / "dup.json",
                                          [_rad(1, "test_para"), _rad(1, "test_para")]))
    with pytest.raises(ConvertError, match=r"expected a JSON list"):
        convert.convert("vqa_rad", _write(tmp_path / "obj.json", {"qid": 1}))


def test_missing_images_are_refused(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "synpic1.jpg").write_bytes(b"x")
    src = _write(tmp_path / "t.json",
                 [_rad(1, "test_para"), _rad(2, "test_para", image="nope.jpg")])
    with pytest.raises(ConvertError, match=r"1 images missing .*nope\.jpg"):
        convert.convert("vqa_rad", src, image_folder=tmp_path / "images")


# --- SLAKE ------------------------------------------------------------------------------------
def _slake(qid, lang, answer="Yes", answer_type="CLOSED", img="xmlab1/source.jpg"):
    return {"img_name": img, "question": f"q{qid}", "answer": answer, "answer_type": answer_type,
            "q_lang": lang, "qid": qid, "img_id": 1, "location": "Lung"}


def test_slake_keeps_english_only(tmp_path):
    records = [_slake(1, "en"), _slake(2, "zh", answer="是"), _slake(3, "en", "Lung", "OPEN",
               img="xmlab2/source.jpg"), _slake(4, "zh"), _slake(5, "en", "No")]
    items, stats = convert.convert("slake", _write(tmp_path / "test.json", records))
    assert [it["id"] for it in items] == [1, 3, 5]
    assert (stats["n_questions"], stats["n_open"], stats["n_closed"], stats["n_images"]) == \
        (3, 1, 2, 2)
    assert stats["languages"] == {"en": 3, "zh": 2} and stats["n_skipped_non_english"] == 2
    assert items[1]["image"] == "xmlab2/source.jpg"
    records[2].pop("q_lang")
    with pytest.raises(ConvertError, match=r"record 2: field 'q_lang' is missing"):
        convert.convert("slake", _write(tmp_path / "bad.json", records))


# --- PathVQA ----------------------------------------------------------------------------------
LXMERT = [
    {"img_id": "test_0001",
     "sentf": {"pvqa": ["Is fibrosis present?", "Is this normal?", "What is shown?"]},
     "labelf": {"pvqa": [{"yes": 1}, {"no": 1}, {"fibrosis": 0.3, "scarring": 1.0}]}},
    {"img_id": "test_0002",
     "sentf": {"pvqa": ["Are cells visible?", "What are these?"]},
     "labelf": {"pvqa": [{"Yes": 1}, {"cells": 1}]}},
]


def test_pvqa_lxmert(tmp_path):
    items, stats = convert.convert("pvqa", _write(tmp_path / "pvqa_test.json", LXMERT))
    assert stats["source_format"] == "lxmert"
    assert (stats["n_questions"], stats["n_open"], stats["n_closed"], stats["n_images"]) == \
        (5, 2, 3, 2)
    assert [it["id"] for it in items] == [0, 1, 2, 3, 4]
    assert [it["answer_type"] for it in items] == ["CLOSED", "CLOSED", "OPEN", "CLOSED", "OPEN"]
    assert items[2]["conversations"][1]["value"] == "scarring"        # highest-scored label
    assert items[3]["image"] == "test_0002.jpg"
    bad = json.loads(json.dumps(LXMERT))
    bad[1]["labelf"]["pvqa"].pop()
    with pytest.raises(ConvertError, match=r"record 1: field 'labelf.pvqa' must be a list of 2"):
        convert.convert("pvqa", _write(tmp_path / "bad.json", bad))


def test_pvqa_hf_style_json_and_jsonl(tmp_path):
    rows = [{"image": "test/a.jpg", "question": "Is it red?", "answer": "no"},
            {"image": {"path": "b.jpg", "bytes": None}, "question": "What?", "answer": "gland"},
            {"image": "c.jpg", "question": "Is it?", "answer": "YES"}]
    items, stats = convert.convert("pvqa", _write(tmp_path / "hf.json", rows))
    assert stats["source_format"] == "hf"
    assert (stats["n_questions"], stats["n_open"], stats["n_closed"], stats["n_images"]) == \
        (3, 1, 2, 3)
    assert [it["image"] for it in items] == ["test/a.jpg", "b.jpg", "c.jpg"]
    jsonl = tmp_path / "hf.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    items, _ = convert.convert("pvqa", jsonl)
    assert [it["answer_type"] for it in items] == ["CLOSED", "OPEN"]
    jsonl.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps({"image": "d.jpg",
                                                                "question": "Q?"}) + "\n")
    with pytest.raises(ConvertError, match=r"line 3: field 'answer' is missing"):
        convert.convert("pvqa", jsonl)
    jsonl.write_text(json.dumps(rows[2]) + "\n")  # one record: still JSON Lines, not an object
    items, _ = convert.convert("pvqa", jsonl)
    assert [it["answer_type"] for it in items] == ["CLOSED"]
    jsonl.write_text(json.dumps(rows[2]) + "\n[1, 2]\n")
    with pytest.raises(ConvertError, match=r"line 2: expected a JSON object"):
        convert.convert("pvqa", jsonl)


# --- CLI --------------------------------------------------------------------------------------
def test_cli_writes_test_json_questions_and_stats(tmp_path, capsys):
    src = _write(tmp_path / "pvqa_test.json", LXMERT)
    assert convert.main(["pvqa", "--src", str(src), "--out", str(tmp_path / "out")]) == 0
    test = json.loads((tmp_path / "out" / "test.json").read_text())
    questions = [json.loads(line) for line in
                 (tmp_path / "out" / "questions.jsonl").read_text().splitlines()]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert len(test) == len(questions) == stats["n_questions"] == 5
    assert stats["benchmark"] == "pvqa"
    assert test[0]["conversations"][0]["value"] == "<image>\nIs fibrosis present?"
    assert questions[0] == {"question_id": 0, "image": "test_0001.jpg",
                            "text": "Is fibrosis present?"}
    assert convert.main(["slake", "--src", str(src), "--out", str(tmp_path / "o2")]) == 2
    assert "record 0: field 'q_lang' is missing" in capsys.readouterr().err


# --- files that are not what they claim ---------------------------------------------------------
VQA_RAD_ROWS = [{"qid": i, "image_name": "synpic1.jpg", "question": "Is it?", "answer": "yes",
                 "answer_type": "CLOSED"} for i in range(3)]


def test_truncated_json_list_is_called_cut_short_not_jsonl(tmp_path, capsys):
    """It gave JSON Lines advice and named a --skip-bad flag convert does not have."""
    text = json.dumps(VQA_RAD_ROWS)
    src = tmp_path / "testset.json"
    src.write_text(text[: len(text) // 2])
    assert convert.main(["vqa_rad", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src}: not valid JSON (cut short?): ") and err.count("\n") == 1
    assert "at line 1, column" in err and "download or copy the benchmark file again" in err
    assert "--skip-bad" not in err and "JSON object" not in err and "at at" not in err
    assert not (tmp_path / "out").exists()


def test_bad_jsonl_line_names_no_flag_convert_lacks(tmp_path):
    src = tmp_path / "hf.jsonl"
    src.write_text(json.dumps({"image": "a.jpg", "question": "Q?", "answer": "no"}) + '\n{"image": "b.jpg", "quest\n')
    with pytest.raises(ConvertError) as e:
        convert.convert("pvqa", src)
    assert str(e.value).startswith(f"{src}, line 2: not valid JSON (Unterminated string starting at column 20)")
    assert "--skip-bad" not in str(e.value)


def test_source_that_is_not_utf8_is_named(tmp_path, capsys):
    src = tmp_path / "testset.json"
    src.write_bytes(json.dumps(VQA_RAD_ROWS[:1] + [{**VQA_RAD_ROWS[1], "question": "Lésion ?"}],
                               ensure_ascii=False).encode("latin-1"))
    assert convert.main(["vqa_rad", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src}, line 1: not UTF-8 text (byte 0xe9 at column ") and "iconv" in err

"""Dataset check before training: every bad record named; stop by default, skip and count on demand."""
import io
import json
import logging
import os
import subprocess
import sys

import pytest
from bad_files import write_bomb_png, write_png16
from PIL import Image

from stllava.data.images import ImageLoadError, check_image, load_image
from stllava.data.verify import BadDataError, apply_bad_sample_policy, load_records, main, verify_records

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LONG = " ".join(["the lesion is in the left lung"] * 120)


def _qa(q="<image>\nWhat is shown?", a="A lung."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def write_bad_dataset(root, n_good=4):
    """Good records first, then one of each problem. Returns (data_path, folder, expected {index: kind})."""
    folder = os.path.join(root, "img")
    os.makedirs(folder, exist_ok=True)
    Image.new("RGB", (30, 20), (200, 10, 10)).save(os.path.join(folder, "good.png"))
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, "JPEG")
    with open(os.path.join(folder, "cut.jpg"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # a corrupt (truncated) JPEG
    open(os.path.join(folder, "empty.png"), "wb").close()
    with open(os.path.join(folder, "notes.jpg"), "w") as f:
        f.write("not an image")
    write_bomb_png(os.path.join(folder, "bomb.png"))  # 15000x15000 in a few KB: over the pixel limit
    write_png16(os.path.join(folder, "ct16.png"))      # a good record: loads (scaled), verify notes its mode
    recs = [{"id": f"ok{i}", "image": "good.png", "conversations": _qa()} for i in range(n_good)]
    recs += [
        {"id": "missing", "image": "nope.png", "conversations": _qa()},
        {"id": "corrupt", "image": "cut.jpg", "conversations": _qa()},
        {"id": "empty", "image": "empty.png", "conversations": _qa()},
        {"id": "text-file", "image": "notes.jpg", "conversations": _qa()},
        {"id": "order", "image": "good.png", "conversations": _qa()[::-1]},
        {"id": "no-token", "image": "good.png", "conversations": _qa(q="What is shown?")},
        {"id": "long", "image": "good.png", "conversations": _qa(a=LONG)},
        {"id": "no-convs", "image": "good.png"},
        {"id": "bomb", "image": "bomb.png", "conversations": _qa()},
        {"id": "deep", "image": "ct16.png", "conversations": _qa()},
    ]
    expected = {n_good: "missing image", n_good + 1: "truncated image", n_good + 2: "empty image file",
                n_good + 3: "unreadable image", n_good + 4: "bad roles or turns",
                n_good + 5: "<image> token mismatch", n_good + 6: "too long", n_good + 7: "malformed record",
                n_good + 8: "image too large"}
    path = os.path.join(root, "bad.json")
    with open(path, "w") as f:
        json.dump(recs, f)
    return path, folder, expected


@pytest.fixture(scope="module")
def tokenizer(tiny_bundle):
    from stllava.model.builder import load_tokenizer

    return load_tokenizer(tiny_bundle["model"], 1024, training=True)


def test_check_image_kinds(tmp_path):
    _, folder, _ = write_bad_dataset(str(tmp_path))
    assert check_image(os.path.join(folder, "good.png")) is None
    assert check_image(os.path.join(folder, "nope.png"))[0] == "missing image"
    assert check_image(os.path.join(folder, "cut.jpg"))[0] == "truncated image"
    assert check_image(os.path.join(folder, "empty.png"))[0] == "empty image file"
    assert check_image(os.path.join(folder, "notes.jpg"))[0] == "unreadable image"
    assert load_image(os.path.join(folder, "good.png")).size == (30, 20)
    with pytest.raises(ImageLoadError, match=r"record 7: truncated image: .*cut\.jpg.*stllava\.data\.verify"):
        load_image(os.path.join(folder, "cut.jpg"), record="record 7")


def test_verify_names_every_bad_record(tmp_path, tokenizer):
    path, folder, expected = write_bad_dataset(str(tmp_path))
    report = verify_records(load_records(path), folder, data_path=path, tokenizer=tokenizer,
                            model_max_length=512, image_tokens=64)
    assert {p.index: p.kind for p in report.problems} == expected
    assert report.bad_indices == sorted(expected) and not report.ok
    long = next(p for p in report.problems if p.kind == "too long")
    assert long.record_id == "long" and "> model_max_length 512" in long.detail
    assert report.summary() == (f"{path}: 14 records checked, 9 bad (<image> token mismatch: 1, bad roles or turns: 1, "
                                "empty image file: 1, image too large: 1, malformed record: 1, missing image: 1, "
                                "too long: 1, truncated image: 1, unreadable image: 1)")
    # without a tokenizer there is no length check
    assert "too long" not in verify_records(load_records(path), folder).counts()


def test_verify_cli(tmp_path, tiny_bundle, capsys):
    path, folder, expected = write_bad_dataset(str(tmp_path))
    rc = main(["--data_path", path, "--image_folder", folder, "--tokenizer", tiny_bundle["model"],
               "--model_max_length", "512", "--image_tokens", "64"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 1
    assert out[:2] == [f"record 4 (id 'missing'): missing image: {folder}/nope.png (no such file)",
                       f"record 5 (id 'corrupt'): truncated image: {folder}/cut.jpg (Truncated File Read)"]
    assert out[-1] == (f"{path} (SFT conversations): 14 records checked, 9 bad (<image> token mismatch: 1, "
                       "bad roles or turns: 1, empty image file: 1, image too large: 1, malformed record: 1, "
                       "missing image: 1, too long: 1, truncated image: 1, unreadable image: 1); 1 note")
    assert (f"record 12 (id 'bomb'): image too large: {folder}/bomb.png (225,000,000 pixels, over the limit of "
            "89,478,485; set STLLAVA_MAX_IMAGE_PIXELS to accept larger images)") in out
    assert (f"note: record 13 (id 'deep'): unusual image mode: {folder}/ct16.png: mode I;16 (16-bit): scaled to "
            "8 bits (value / 257) before RGB") in out
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps([{"id": "a", "image": "good.png", "conversations": _qa()}]))
    proc = subprocess.run([sys.executable, "-m", "stllava.data.verify", "--data_path", str(clean), "--image_folder",
                           folder], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{clean} (SFT conversations): 1 records checked, all good"


@pytest.mark.parametrize("content,needle", [
    ("", "is empty"),                                            # an interrupted copy left nothing
    ('[{"id": "a", "image": "good.png", "conversa', "is not valid JSON (cut short?)"),
    ('{"id": "a"}', "holds a JSON dict, expected a list of records"),
    (None, "does not exist"),
])
def test_verify_cli_unreadable_file_is_one_line(tmp_path, content, needle):
    """A file that cannot be read at all: exit 2 and one line naming it and the fix, no traceback."""
    path = tmp_path / "data.json"
    if content is not None:
        path.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "stllava.data.verify", "--data_path", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and str(path) in proc.stderr
    assert needle in proc.stderr and "fix: --data_path" in proc.stderr


def _verify_cli(path):
    """``data.verify --data_path path`` in a child limited to 3 GiB of address space and 60 s (a
    reader that never ends fails there instead of filling the machine's memory)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    return subprocess.run([sys.executable, "-m", "stllava.data.verify", "--data_path", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=60, preexec_fn=limit)


def test_a_folder_or_a_device_as_data_path_is_named_for_what_it_is(tmp_path):
    """Before: a folder (and /dev/zero) 'does not exist'; a reader without that check would read
    /dev/zero for ever."""
    (tmp_path / "train.json").write_text("[]")
    (tmp_path / "eval.jsonl").write_text("")
    proc = _verify_cli(tmp_path)
    assert proc.returncode == 2 and proc.stderr == (
        f"error: --data_path {tmp_path} is a folder, not a file (it holds eval.jsonl, train.json); fix: --data_path "
        "must name a JSON list of records with 'id', 'image' and 'conversations'\n")
    proc = _verify_cli("/dev/zero")
    assert proc.returncode == 2 and proc.stderr.startswith(
        "error: --data_path /dev/zero is not a regular file (a character device, which may never end); fix: ")


def test_a_json_file_holding_json_lines_gets_a_hint(tmp_path):
    path = tmp_path / "train.json"
    path.write_text("".join(json.dumps({"id": str(i), "conversations": _qa("Hi?")}) + "\n" for i in range(3)))
    proc = _verify_cli(path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: {path} looks like JSON Lines (one JSON object per line) but is named .json "
                                  "(not valid JSON: Extra data at line 2, column 1); fix: rename it to train.jsonl, "
                                  "or make it one JSON list of records")
    (tmp_path / "train.jsonl").write_text(path.read_text())
    assert len(load_records(str(tmp_path / "train.jsonl"))) == 3  # the hint's fix works


def test_policy_stop_and_skip(tmp_path, caplog):
    path, folder, expected = write_bad_dataset(str(tmp_path))
    records = load_records(path)
    report = verify_records(records, folder, data_path=path)
    with pytest.raises(BadDataError, match=r"(?s)record 4 \(id 'missing'\).*--on_bad_sample skip") as e:
        apply_bad_sample_policy(records, report, "stop")
    assert e.value.report is report
    with caplog.at_level(logging.WARNING, logger="stllava.data.verify"):
        keep = apply_bad_sample_policy(records, report, "skip")
    assert keep == [0, 1, 2, 3, 10, 13]  # the too-long record stays: no length check without a tokenizer
    assert "skipped 8 of 14 records" in caplog.text
    with pytest.raises(ValueError, match="on_bad_sample"):
        apply_bad_sample_policy(records, report, "ignore")


def _train_argv(tiny_bundle, path, folder, out):
    return ["--model_name_or_path", tiny_bundle["model"], "--data_path", path, "--image_folder", folder,
            "--output_dir", out, "--version", "v1_sq", "--sq_r", "0.5", "--lora_enable", "True", "--lora_r", "4",
            "--vit_lora_enable", "--lora_r_vit", "2", "--model_max_length", "512", "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none"]


def test_training_stops_or_skips(tmp_path, tiny_bundle, caplog):
    from stllava.train.train_sft import run_sft

    path, folder, expected = write_bad_dataset(str(tmp_path))
    out = str(tmp_path / "out")
    with pytest.raises(BadDataError, match=r"(?s)record 10 \(id 'long'\): too long.*9 bad"):
        run_sft(_train_argv(tiny_bundle, path, folder, out))
    assert not os.path.exists(os.path.join(out, "adapter_model.safetensors"))
    with caplog.at_level(logging.WARNING):
        run_sft(_train_argv(tiny_bundle, path, folder, out) + ["--on_bad_sample", "skip"])
    assert "skipped 9 of 14 records" in caplog.text  # the bomb among them; the 16-bit record trained on
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    assert state["global_step"] == 1 and os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


def _pair(rid, image="good.png", chosen="A lung.", rejected="A liver.", question="<image>\nWhat organ is shown?"):
    """A record in the released STLLaVA-Med-DPO schema (what selftrain.build_pairs writes)."""
    return {"id": rid, "image": image,
            "chosen_conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": chosen}],
            "reject_conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": rejected}],
            "scores": [8, 3]}


def test_verify_recognises_preference_pair_files(tmp_path, capsys):
    """The DPO data error tells users to run verify: it must accept valid pair files (it reported
    every record of dpo_train.json as malformed) and name the bad ones."""
    _, folder, _ = write_bad_dataset(str(tmp_path))
    good = tmp_path / "dpo_train.json"
    good.write_text(json.dumps([_pair(f"p{i}") for i in range(5)]))
    assert main(["--data_path", str(good), "--image_folder", folder]) == 0
    assert capsys.readouterr().out.strip() == f"{good} (preference pairs (DPO)): 5 records checked, all good"

    bad = tmp_path / "dpo_bad.json"
    no_reject = _pair("no-reject")
    del no_reject["reject_conversations"]
    bad.write_text(json.dumps([_pair("ok"), _pair("other-q", question="<image>\nWhich side?") | {
        "reject_conversations": _pair("x")["reject_conversations"]}, no_reject, _pair("bomb", image="bomb.png")]))
    assert main(["--data_path", str(bad), "--image_folder", folder]) == 1
    out = capsys.readouterr().out
    assert "record 1 (id 'other-q'): chosen/rejected prompts differ" in out
    assert "record 2 (id 'no-reject'): malformed record: no 'reject_conversations' list" in out
    assert "record 3 (id 'bomb'): image too large" in out
    assert out.strip().endswith("(preference pairs (DPO)): 4 records checked, 3 bad (chosen/rejected prompts "
                                "differ: 1, image too large: 1, malformed record: 1)")


@pytest.mark.parametrize("name,content", [("empty.json", "[]"), ("empty.jsonl", ""), ("blank.jsonl", "\n\n")])
def test_verify_refuses_an_empty_file_unless_allowed(tmp_path, name, content, capsys):
    path = tmp_path / name
    path.write_text(content)
    assert main(["--data_path", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path} holds no records; fix: pass the dataset file (or --allow_empty when an empty " \
                  "file is expected)\n"
    assert main(["--data_path", str(path), "--allow_empty"]) == 0
    assert capsys.readouterr().out.strip() == f"{path} (SFT conversations): 0 records checked, all good"


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_verify_names_a_file_that_is_not_utf8(tmp_path, name, capsys):
    """A Latin-1 file gave a bare UnicodeDecodeError; now one line naming the file, line and byte."""
    rec = {"id": "a", "image": "good.png", "conversations": _qa(a="Une lésion.")}
    text = json.dumps(rec, ensure_ascii=False) if name.endswith(".jsonl") else json.dumps([rec], ensure_ascii=False)
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1") + b"\n")
    col = text.index("é") + 1
    assert main(["--data_path", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{path}, line 1: not UTF-8 text (byte 0xe9 at column {col})" in err and "iconv" in err

"""stllava.eval.model_vqa: batched answering, sharding, resume, missing images, VQA-RAD end to end."""
import json
import logging
import shutil
import time

import pytest
import torch
from bad_files import write_bomb_png
from PIL import Image

from stllava.artifacts import ArtifactError
from stllava.eval import convert, metrics
from stllava.eval.model_vqa import build_parser, main, run
from stllava.tooling import ToolError

logger = logging.getLogger(__name__)


@pytest.fixture()
def vqa(tmp_path):
    """10 questions on 5 small images (some questions share an image), in a tmp folder."""
    g = torch.Generator().manual_seed(1)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        arr = (torch.rand(30 + 9 * i, 50, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"img{i}.png")
    qs = [{"question_id": 100 + k, "image": f"img{k % 5}.png", "text": t}
          for k, t in enumerate(["Is there a fracture?", "What organ is shown?", "Where is the lesion?",
                                 "Is this an MRI or a CT scan?", "Is it normal?", "What is the modality?",
                                 "Which side is abnormal?", "How many nodules?", "Is the heart enlarged?",
                                 "What plane is this?"])]
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    return {"qfile": qfile, "folder": folder, "questions": qs, "tmp": tmp_path}


def _args(tiny_bundle, vqa, answers, *extra):
    return build_parser().parse_args([
        "--model-path", tiny_bundle["model"], "--question-file", str(vqa["qfile"]),
        "--image-folder", str(vqa["folder"]), "--answers-file", str(answers), "--device", "cpu",
        "--max-new-tokens", "8", "--min-new-tokens", "8", "--no-progress", *extra])


def _read(path):
    return [json.loads(line) for line in open(path)]


def test_batched_answers_equal_one_at_a_time(tiny_bundle, loaded, vqa):
    a16, a1 = vqa["tmp"] / "b16.jsonl", vqa["tmp"] / "b1.jsonl"
    s = run(_args(tiny_bundle, vqa, a16, "--batch-size", "16"), loaded)
    run(_args(tiny_bundle, vqa, a1, "--batch-size", "1"), loaded)
    batched, single = _read(a16), _read(a1)
    assert s["answered"] == 10 and len(batched) == 10
    assert [r["question_id"] for r in batched] == [q["question_id"] for q in vqa["questions"]]
    assert [r["text"] for r in batched] == [r["text"] for r in single]
    assert all(r["text"] for r in batched) and len({r["text"] for r in batched}) >= 5
    r = batched[0]
    assert set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata", "settings"}
    assert r["prompt"] == "Is there a fracture?" and r["metadata"] == {}
    assert r["settings"] == {"model_path": tiny_bundle["model"], "model_base": None, "conv_mode": "vicuna_v1",
                             "max_new_tokens": 8, "temperature": 0.0, "top_k": None, "top_p": None,
                             "min_new_tokens": 8, "num_beams": 1, "seed": 0}
    assert r["model_id"] == tiny_bundle["model"].rstrip("/").split("/")[-1]
    ids = [x["answer_id"] for x in batched + single]
    assert len(set(ids)) == 20 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_sampled_answers_depend_on_seed_not_batch(tiny_bundle, loaded, vqa):
    out = {}
    for name, extra in {"b8": ["--batch-size", "8"], "b1": ["--batch-size", "1"],
                        "seed1": ["--batch-size", "8", "--seed", "1"]}.items():
        path = vqa["tmp"] / f"{name}.jsonl"
        run(_args(tiny_bundle, vqa, path, "--temperature", "1.0", "--top-p", "0.9", *extra), loaded)
        out[name] = [r["text"] for r in _read(path)]
    assert out["b8"] == out["b1"]
    assert out["b8"] != out["seed1"]


def test_resume_skips_answered_ids_and_repairs_a_cut_line(tiny_bundle, loaded, vqa):
    full = vqa["tmp"] / "full.jsonl"
    run(_args(tiny_bundle, vqa, full, "--batch-size", "4"), loaded)
    lines = full.read_text().splitlines(keepends=True)
    part = vqa["tmp"] / "part.jsonl"
    part.write_text("".join(lines[:3]) + lines[3][:25])  # 3 answers + a line cut by a kill
    s = run(_args(tiny_bundle, vqa, part, "--batch-size", "4"), loaded)
    assert s["already_answered"] == 3 and s["answered"] == 7
    resumed = _read(part)  # every line valid JSON again
    assert [r["question_id"] for r in resumed] == [q["question_id"] for q in vqa["questions"]]
    assert resumed[:3] == _read(full)[:3]  # finished answers kept as they were (same answer_id)
    assert [r["text"] for r in resumed] == [r["text"] for r in _read(full)]
    again = run(_args(tiny_bundle, vqa, part), loaded)  # nothing left: the model is not needed
    assert again["answered"] == 0 and again["already_answered"] == 10


def test_chunks_partition_the_questions(tiny_bundle, loaded, vqa):
    got = []
    for k in range(3):
        path = vqa["tmp"] / f"3_{k}.jsonl"
        run(_args(tiny_bundle, vqa, path, "--num-chunks", "3", "--chunk-idx", str(k)), loaded)
        got.append([r["question_id"] for r in _read(path)])
    assert [len(c) for c in got] == [4, 4, 2]
    assert sum(got, []) == [q["question_id"] for q in vqa["questions"]]


def test_missing_image_is_an_error_or_a_counted_skip(tiny_bundle, loaded, vqa):
    (vqa["folder"] / "img2.png").unlink()  # questions 102 and 107 use it
    (vqa["folder"] / "img4.png").write_bytes(b"garbage")  # 104 and 109: unreadable
    out = vqa["tmp"] / "a.jsonl"
    with pytest.raises(ToolError, match=r"line 3 \(question_id 102\): image 'img2.png' not found.*"
                                        r"2 of 10.*--skip-bad"):
        run(_args(tiny_bundle, vqa, out), loaded)
    (vqa["folder"] / "img2.png").write_bytes(b"")  # now present but empty
    with pytest.raises(ToolError, match=r"question_id 102\): empty image file.*--skip-bad"):
        run(_args(tiny_bundle, vqa, out), loaded)
    (vqa["folder"] / "img2.png").unlink()
    s = run(_args(tiny_bundle, vqa, out, "--skip-bad", "--batch-size", "3"), loaded)
    assert s["answered"] == 6 and s["skipped_bad"] == 4
    assert sorted(x["question_id"] for x in s["skipped"]) == [102, 104, 107, 109]
    assert {x["reason"] for x in s["skipped"]} == {"missing image", "unreadable image"}
    assert sorted(r["question_id"] for r in _read(out)) == [100, 101, 103, 105, 106, 108]


def test_resume_with_other_settings_refuses_or_starts_over(tiny_bundle, loaded, vqa):
    """The VQA-RAD trap: a rerun with another template must not report the old template's answers."""
    out = vqa["tmp"] / "a.jsonl"
    run(_args(tiny_bundle, vqa, out), loaded)
    first = _read(out)
    with pytest.raises(ArtifactError, match=r"a.jsonl, line 1: made with other settings \(recorded → this run: "
                                            r"conv_mode: 'vicuna_v1' → 'v1_sq'\); fix: .*--overwrite"):
        run(_args(tiny_bundle, vqa, out, "--conv-mode", "v1_sq"), loaded)
    with pytest.raises(ArtifactError, match=r"other settings \(recorded → this run: temperature: 0.0 → 0.5\)"):
        run(_args(tiny_bundle, vqa, out, "--temperature", "0.5"), loaded)
    assert _read(out) == first  # refused before anything was written
    s = run(_args(tiny_bundle, vqa, out, "--conv-mode", "v1_sq", "--overwrite"), loaded)
    assert s["answered"] == 10 and s["already_answered"] == 0
    redone = _read(out)
    assert len(redone) == 10 and {r["settings"]["conv_mode"] for r in redone} == {"v1_sq"}
    assert [r["text"] for r in redone] != [r["text"] for r in first]  # the template changes the answers


def _checkpoint_recording(tiny_bundle, folder, conv_mode):
    """A copy of the tiny checkpoint whose config.json records ``conv_mode`` (as training writes it)."""
    shutil.copytree(tiny_bundle["model"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "conv_mode": conv_mode}))
    return folder


def test_template_defaults_to_the_one_the_checkpoint_records(tiny_bundle, loaded, vqa, caplog):
    ckpt = _checkpoint_recording(tiny_bundle, vqa["tmp"] / "ckpt-sq", "v1_sq")
    explicit, recorded = vqa["tmp"] / "explicit.jsonl", vqa["tmp"] / "recorded.jsonl"
    run(_args(tiny_bundle, vqa, explicit, "--conv-mode", "v1_sq"), loaded)
    with caplog.at_level(logging.INFO, logger="stllava.tooling"):
        assert main(["--model-path", str(ckpt), "--question-file", str(vqa["qfile"]), "--image-folder",
                     str(vqa["folder"]), "--answers-file", str(recorded), "--device", "cpu", "--max-new-tokens", "8",
                     "--min-new-tokens", "8", "--no-progress"]) == 0
    assert f"conversation template v1_sq (recorded in {ckpt / 'config.json'})" in caplog.text
    got = _read(recorded)
    assert {r["settings"]["conv_mode"] for r in got} == {"v1_sq"}
    assert [r["text"] for r in got] == [r["text"] for r in _read(explicit)]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stllava.tooling"):  # the flag still wins
        run(_args(tiny_bundle, vqa, vqa["tmp"] / "flag.jsonl", "--conv-mode", "llava_v1"), loaded)
    assert "conversation template llava_v1 (from --conv-mode)" in caplog.text


def test_bad_question_file_names_the_line(tiny_bundle, loaded, vqa):
    vqa["qfile"].write_text('{"question_id": 1, "image": "img0.png", "text": "a"}\n'
                            '{"question_id": 1, "image": "img1.png", "text": "b"}\n')
    with pytest.raises(ToolError, match="line 2: question_id 1 already used on line 1"):
        run(_args(tiny_bundle, vqa, vqa["tmp"] / "x.jsonl"), loaded)
    vqa["qfile"].write_text('{"question_id": 1, "text": "a"}\n')
    with pytest.raises(ToolError, match="line 1 .*'image'"):
        run(_args(tiny_bundle, vqa, vqa["tmp"] / "x.jsonl"), loaded)


def test_an_empty_question_file_is_an_error_unless_allowed(tiny_bundle, vqa, capsys):
    """It exited 0 with "answered 0 questions" and wrote nothing."""
    vqa["qfile"].write_text("\n")
    out = vqa["tmp"] / "a.jsonl"
    argv = ["--model-path", tiny_bundle["model"], "--question-file", str(vqa["qfile"]), "--image-folder",
            str(vqa["folder"]), "--answers-file", str(out), "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"error: {vqa['qfile']} holds no questions; fix: check the path (or pass "
                                       "--allow-empty when an empty input is expected)\n")
    assert main(argv + ["--allow-empty"]) == 0 and "answered 0 questions" in capsys.readouterr().out


def test_an_image_over_the_pixel_limit_is_named_or_a_counted_skip(tiny_bundle, loaded, vqa):
    write_bomb_png(vqa["folder"] / "img3.png")  # questions 103 and 108: 15000x15000 in a few KB
    out = vqa["tmp"] / "a.jsonl"
    with pytest.raises(ToolError, match=r"line 4 \(question_id 103\): image too large: .*img3\.png "
                                        r"\(225,000,000 pixels, over the limit of 89,478,485; set "
                                        r"STLLAVA_MAX_IMAGE_PIXELS.*--skip-bad"):
        run(_args(tiny_bundle, vqa, out), loaded)
    s = run(_args(tiny_bundle, vqa, out, "--skip-bad", "--batch-size", "4"), loaded)
    assert s["answered"] == 8 and s["skipped_bad"] == 2
    assert s["skipped"] == [{"question_id": 103, "image": "img3.png", "reason": "image too large"},
                            {"question_id": 108, "image": "img3.png", "reason": "image too large"}]


def test_a_question_file_that_is_not_utf8_is_named(tiny_bundle, loaded, vqa):
    vqa["qfile"].write_bytes(b'{"question_id": 1, "image": "img0.png", "text": "Qu\'est-ce que c\'est ?"}\n'
                             b'{"question_id": 2, "image": "img0.png", "text": "Une l\xe9sion ?"}\n')
    with pytest.raises(ToolError, match=r"questions\.jsonl, line 2: not UTF-8 text \(byte 0xe9 at column 55\)"):
        run(_args(tiny_bundle, vqa, vqa["tmp"] / "x.jsonl"), loaded)


def test_resume_when_the_kill_cut_a_multibyte_character(tiny_bundle, loaded, vqa):
    """Answers are written with ensure_ascii=False; a kill inside "é" must be trimmed like any cut line."""
    for q in vqa["questions"]:
        q["text"] = q["text"].replace("?", " (lésion) ?")
    vqa["qfile"].write_text("".join(json.dumps(q) + "\n" for q in vqa["questions"]))
    full = vqa["tmp"] / "full.jsonl"
    run(_args(tiny_bundle, vqa, full, "--batch-size", "4"), loaded)
    data = full.read_bytes().split(b"\n")
    cut = data[3][: data[3].index("é".encode()) + 1]  # inside the two bytes of "é"
    part = vqa["tmp"] / "part.jsonl"
    part.write_bytes(b"\n".join(data[:3]) + b"\n" + cut)
    s = run(_args(tiny_bundle, vqa, part, "--batch-size", "4"), loaded)
    assert s["already_answered"] == 3 and s["answered"] == 7
    assert [r["text"] for r in _read(part)] == [r["text"] for r in _read(full)]


def _answer_and_score(tiny_bundle, test_dir, image_folder, batch_size=32):
    answers = test_dir / "answers.jsonl"
    t0 = time.perf_counter()
    rc = main(["--model-path", tiny_bundle["model"], "--question-file", str(test_dir / "questions.jsonl"),
               "--image-folder", str(image_folder), "--answers-file", str(answers), "--device", "cpu",
               "--batch-size", str(batch_size), "--max-new-tokens", "4", "--no-progress"])
    seconds = time.perf_counter() - t0
    assert rc == 0
    result = metrics.score(metrics.load_gt(test_dir / "test.json"), metrics.load_jsonl(answers))
    return result, seconds


def test_embedded_vqa_rad_subset_end_to_end(tiny_bundle, tmp_path):
    """Runs without ../shared: the package's 24-image VQA-RAD subset (65 test questions)."""
    from importlib import resources

    assets = resources.files("stllava") / "assets" / "vqa_rad"
    items, stats = convert.convert("vqa_rad", assets / "vqa_rad_subset.json", fmt="public",
                                   image_folder=assets / "images")
    convert.write(items, stats, tmp_path)
    result, _ = _answer_and_score(tiny_bundle, tmp_path, assets / "images")
    o = result["overall"]
    assert (o["n_questions"], o["n_scored"], o["n_open"], o["n_closed"]) == (65, 65, 22, 43)
    assert all(0.0 <= o[k] <= 100.0 for k in ("open_recall", "open_f1", "closed_acc", "closed_acc_strict"))


@pytest.mark.slow
def test_real_vqa_rad_test_set_answered_and_scored(tiny_bundle, vqa_rad_dir, tmp_path):
    """Issue 4 acceptance: all 451 VQA-RAD test questions answered by the tiny model and scored."""
    items, stats = convert.convert("vqa_rad", vqa_rad_dir / "testset.json", image_folder=vqa_rad_dir / "images")
    convert.write(items, stats, tmp_path)
    result, seconds = _answer_and_score(tiny_bundle, tmp_path, vqa_rad_dir / "images")
    logger.info("VQA-RAD: 451 questions answered (4 new tokens, batch 32) in %.1f s", seconds)
    o = result["overall"]
    assert (o["n_questions"], o["n_scored"], o["n_missing"], o["n_open"], o["n_closed"]) == (451, 451, 0, 179, 272)
    rows = result["rows"]
    assert len(rows) == 451 and sum(bool(r["prediction"]) for r in rows) > 400
    assert all(o[k] is not None for k in ("open_recall", "open_f1", "closed_acc", "closed_acc_strict"))

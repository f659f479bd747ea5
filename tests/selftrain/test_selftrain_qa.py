"""stllava.selftrain.questions / answers: seeded, batch-size-invariant, resumable, judge-ready."""
import json

import pytest
import torch
from PIL import Image

from stllava.artifacts import ArtifactError
from stllava.selftrain import answers as answers_mod
from stllava.selftrain import questions as questions_mod
from stllava.selftrain.questions import finish_questions, list_images
from stllava.tooling import ToolError


def test_list_images_recursive_sorted_filtered(tmp_path):
    for name in ["b.JPG", "a.png", "sub/c.TIFF", "sub/d.tif", "sub/deep/e.bmp", "f.jpeg", "notes.txt",
                 "g.gif", "sub/h.Png"]:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (tmp_path / "dir.jpg").mkdir()  # a folder named like an image is not an image
    everything = ["a.png", "b.JPG", "f.jpeg", "sub/c.TIFF", "sub/d.tif", "sub/deep/e.bmp", "sub/h.Png"]
    assert list_images(tmp_path) == everything
    assert list_images(tmp_path, offset=2, limit=3) == everything[2:5]
    assert list_images(tmp_path, offset=6, limit=5) == everything[6:]
    with pytest.raises(ToolError, match="no such folder"):
        list_images(tmp_path / "nope")


def test_finish_questions_drops_empty_and_counts_duplicates():
    qs = ["What organ?", "", "What organ?", "Is it normal?", "What organ?"]
    ids = [f"q{k}" for k in range(5)]
    kept, kept_ids, seeds, dropped = finish_questions(qs, ids, list(range(5)), dedup=True)
    assert kept == ["What organ?", "Is it normal?"] and kept_ids == ["q0", "q3"] and seeds == [0, 3]
    assert dropped == {"empty": 1, "duplicate": 2}
    kept, _, _, dropped = finish_questions(qs, ids, list(range(5)), dedup=False)
    assert kept == ["What organ?", "What organ?", "Is it normal?", "What organ?"]
    assert dropped == {"empty": 1, "duplicate": 0}


def test_question_prompt_is_the_v1_sq_layout():
    p = questions_mod.question_prompt("v1_sq", "A chest X-ray.")
    assert p.endswith("image, etc. Again, do not ask about uncertain details. USER: <image>\nCan you describe "
                      "the image in detail? ASSISTANT: A chest X-ray.</s>VUSER:")
    assert questions_mod.describe_prompt("v1_sq").endswith(" USER: <image>\nCan you describe the image in "
                                                           "detail? ASSISTANT:")
    # an "<image>" the model wrote into its description must not become a second image slot
    assert questions_mod.question_prompt("v1_sq", "See <image> here.").count("<image>") == 1
    with pytest.raises(ToolError, match="no VUSER role"):
        questions_mod.question_prompt("llava_v1", "x")


# --- with the tiny model --------------------------------------------------------------------
@pytest.fixture()
def images(tmp_path):
    g = torch.Generator().manual_seed(2)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.jpg", "sub/c.png", "sub/d.PNG"]):
        arr = (torch.rand(30 + 11 * i, 44, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / name)
    return folder


def _q_args(tiny_bundle, folder, out, *extra):
    return questions_mod.build_parser().parse_args([
        "--model-path", tiny_bundle["model"], "--image-folder", str(folder), "--out", str(out),
        "--device", "cpu", "--max-desc-tokens", "10", "--max-question-tokens", "8", "--n-questions", "3",
        "--no-progress", *extra])


def _a_args(tiny_bundle, folder, qfile, out, *extra):
    return answers_mod.build_parser().parse_args([
        "--model-path", tiny_bundle["model"], "--image-folder", str(folder), "--questions", str(qfile),
        "--out", str(out), "--device", "cpu", "--max-new-tokens", "8", "--no-progress", *extra])


def _read(path):
    return [json.loads(line) for line in open(path)]


def test_questions_reproducible_and_identical_between_batch_sizes(tiny_bundle, loaded, images, tmp_path):
    b8, b1, again, other = (tmp_path / f"{n}.jsonl" for n in ("b8", "b1", "again", "other"))
    s = questions_mod.run(_q_args(tiny_bundle, images, b8, "--batch-size", "8"), loaded)
    questions_mod.run(_q_args(tiny_bundle, images, b1, "--batch-size", "1"), loaded)
    questions_mod.run(_q_args(tiny_bundle, images, again, "--batch-size", "8"), loaded)
    questions_mod.run(_q_args(tiny_bundle, images, other, "--batch-size", "8", "--seed", "7"), loaded)
    assert b8.read_text() == b1.read_text() == again.read_text()
    recs = _read(b8)
    assert [r["image"] for r in recs] == ["a.png", "b.jpg", "sub/c.png", "sub/d.PNG"]
    assert s["written"] == 4 and s["questions"] == sum(len(r["questions"]) for r in recs)
    r = recs[2]
    assert r["question_ids"][0] == "sub/c.png#q0" and r["seed"] == 0 and r["model"]
    assert r["description"] and all(q and "</s>" not in q for q in r["questions"])
    assert len(r["questions"]) + sum(r["dropped"].values()) == 3
    assert r["settings"]["temperature"] == 1.2 and r["settings"]["top_k"] == 300 and r["settings"]["top_p"] == 0.95
    # the seed decides the questions (not the greedy descriptions)
    others = _read(other)
    assert [o["description"] for o in others] == [r["description"] for r in recs]
    assert [o["questions"] for o in others] != [r["questions"] for r in recs]
    # a slice gives the same records as the full run
    part = tmp_path / "part.jsonl"
    questions_mod.run(_q_args(tiny_bundle, images, part, "--offset", "1", "--limit", "2"), loaded)
    assert _read(part) == recs[1:3]


def test_questions_dedup_counts_identical_questions(tiny_bundle, loaded, images, tmp_path):
    out = tmp_path / "q.jsonl"
    # top-k 1 turns sampling into greedy: the 3 questions of an image are identical
    s = questions_mod.run(_q_args(tiny_bundle, images, out, "--top-k", "1", "--dedup", "--min-new-tokens", "2"),
                          loaded)
    recs = _read(out)
    assert all(len(r["questions"]) == 1 and r["dropped"] == {"empty": 0, "duplicate": 2} for r in recs)
    assert s["dropped_duplicate"] == 8 and s["questions"] == 4


def test_questions_resume_after_a_cut_last_line(tiny_bundle, loaded, images, tmp_path, caplog):
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    questions_mod.run(_q_args(tiny_bundle, images, full), loaded)
    lines = full.read_text().splitlines(keepends=True)
    part.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # killed while writing image 2
    s = questions_mod.run(_q_args(tiny_bundle, images, part, "--batch-size", "3"), loaded)
    assert s["already_done"] == 1 and s["written"] == 3
    assert part.read_text() == full.read_text()
    assert "cut-short last line" in caplog.text
    # a different setting is refused instead of mixing two runs in one file
    with pytest.raises(ArtifactError, match=r"line 1: made with other settings \(recorded → this run: seed: 0 → 3\)"):
        questions_mod.run(_q_args(tiny_bundle, images, part, "--seed", "3"), loaded)


def _questions_file(tiny_bundle, loaded, images, tmp_path):
    qfile = tmp_path / "questions.jsonl"
    questions_mod.run(_q_args(tiny_bundle, images, qfile, "--limit", "3", "--min-new-tokens", "2"), loaded)
    return qfile


def test_answers_identical_between_batch_sizes_and_read_by_the_judge(tiny_bundle, loaded, images, tmp_path):
    from stllava.selftrain.judge import load_items

    qfile = _questions_file(tiny_bundle, loaded, images, tmp_path)
    n_q = sum(len(r["questions"]) for r in _read(qfile))
    b8, b1, seed1 = tmp_path / "a8.jsonl", tmp_path / "a1.jsonl", tmp_path / "s1.jsonl"
    s = answers_mod.run(_a_args(tiny_bundle, images, qfile, b8, "--batch-size", "8"), loaded)
    answers_mod.run(_a_args(tiny_bundle, images, qfile, b1, "--batch-size", "1"), loaded)
    answers_mod.run(_a_args(tiny_bundle, images, qfile, seed1, "--seed", "1"), loaded)
    assert s["written"] == n_q and b8.read_text() == b1.read_text()
    recs = _read(b8)
    assert [r["question_id"] for r in recs] == [i for r in _read(qfile) for i in r["question_ids"]]
    r = recs[0]
    assert r["question"] == _read(qfile)[0]["questions"][0] and r["image"] == "a.png"
    assert len(r["answers"]) == 2 and len(set(r["answer_seeds"])) == 2
    assert sum(a != b for a, b in (x["answers"] for x in recs)) >= n_q - 1  # two different draws
    assert [x["answers"] for x in _read(seed1)] != [x["answers"] for x in recs]
    assert r["settings"] == {"model_path": tiny_bundle["model"], "model_base": None,
                             "conv_mode": "llava_v1", "temperature": 1.2, "top_k": 100, "top_p": 0.95,
                             "max_new_tokens": 8, "min_new_tokens": 0, "seed": 0, "n_answers": 2}
    items, skipped = load_items(b8, images)  # the judge's own loader accepts the file
    assert len(items) == n_q and skipped == []
    assert items[0].record["answers"] == r["answers"]

    # K = 4 answers: answer j keeps its own seed, so the first two are the K = 2 answers
    four = tmp_path / "a4.jsonl"
    answers_mod.run(_a_args(tiny_bundle, images, qfile, four, "--n-answers", "4", "--batch-size", "6"), loaded)
    for k2, k4 in zip(recs, _read(four)):
        assert len(k4["answers"]) == 4 and k4["answers"][:2] == k2["answers"]
        assert k4["answer_seeds"][:2] == k2["answer_seeds"] and len(set(k4["answer_seeds"])) == 4
    assert len(load_items(four, images)[0]) == n_q


def test_answers_resume_and_missing_images(tiny_bundle, loaded, images, tmp_path):
    qfile = _questions_file(tiny_bundle, loaded, images, tmp_path)
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    answers_mod.run(_a_args(tiny_bundle, images, qfile, full), loaded)
    lines = full.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:2]) + lines[2][:10])
    s = answers_mod.run(_a_args(tiny_bundle, images, qfile, part, "--batch-size", "4"), loaded)
    assert s["already_done"] == 2 and s["written"] == len(lines) - 2
    assert part.read_text() == full.read_text()

    (images / "b.jpg").unlink()
    out = tmp_path / "m.jsonl"
    with pytest.raises(ToolError, match=r"questions.jsonl, line 2 \(question 'b.jpg#q0'\): image 'b.jpg' not found"
                                        r".*--skip-bad"):
        answers_mod.run(_a_args(tiny_bundle, images, qfile, out), loaded)
    s = answers_mod.run(_a_args(tiny_bundle, images, qfile, out, "--skip-bad"), loaded)
    n_b = len(_read(qfile)[1]["questions"])
    assert len(s["skipped"]) == n_b and {x["image"] for x in s["skipped"]} == {"b.jpg"}
    assert {r["image"] for r in _read(out)} == {"a.png", "sub/c.png"}


def test_answers_accept_the_reference_layout_and_refuse_bad_records(tiny_bundle, loaded, images, tmp_path):
    qfile = tmp_path / "ref.jsonl"  # visual_sq.py wrote {"question_id": n, "image", "prompt": [questions]}
    qfile.write_text(json.dumps({"question_id": 1, "image": "a.png", "prompt": ["What is it?", "Where?"]}) + "\n")
    out = tmp_path / "a.jsonl"
    answers_mod.run(_a_args(tiny_bundle, images, qfile, out), loaded)
    assert [r["question_id"] for r in _read(out)] == ["a.png#q0", "a.png#q1"]
    qfile.write_text('{"image": "a.png", "questions": ["x"]}\n{"image": "a.png", "questions": "x"}\n')
    with pytest.raises(ToolError, match="line 2: field 'questions' must be a list"):
        answers_mod.run(_a_args(tiny_bundle, images, qfile, tmp_path / "b.jsonl"), loaded)
    with pytest.raises(ToolError, match="temperature must be > 0"):
        answers_mod.run(_a_args(tiny_bundle, images, qfile, out, "--temperature", "0"), loaded)


def test_questions_and_answers_chunks_concatenate_to_the_single_run(tiny_bundle, loaded, images, tmp_path):
    """Sharding: chunk files, concatenated in chunk order, are byte-identical to one process's file."""
    whole = tmp_path / "q.jsonl"
    questions_mod.run(_q_args(tiny_bundle, images, whole, "--min-new-tokens", "2"), loaded)
    parts = []
    for k in range(3):  # 4 images in 3 chunks: ceil(4/3) = 2 per chunk, so chunk 2 is empty
        part = tmp_path / f"q.{k}.jsonl"
        s = questions_mod.run(_q_args(tiny_bundle, images, part, "--min-new-tokens", "2", "--num-chunks", "3",
                                      "--chunk-idx", str(k), "--batch-size", "1"), loaded)
        assert s["chunk"] == [2, 2, 0][k]
        parts.append(part.read_text() if part.exists() else "")
    assert "".join(parts) == whole.read_text()

    answers = tmp_path / "a.jsonl"
    answers_mod.run(_a_args(tiny_bundle, images, whole, answers), loaded)
    n = len(answers.read_text().splitlines())
    parts = []
    for k in range(2):
        part = tmp_path / f"a.{k}.jsonl"
        s = answers_mod.run(_a_args(tiny_bundle, images, whole, part, "--num-chunks", "2", "--chunk-idx", str(k)),
                            loaded)
        assert s["written"] == s["chunk"] == [(n + 1) // 2, n // 2][k]
        parts.append(part.read_text())
    assert "".join(parts) == answers.read_text()
    with pytest.raises(ToolError, match=r"--chunk-idx must be in \[0, --num-chunks\)"):
        answers_mod.run(_a_args(tiny_bundle, images, whole, answers, "--num-chunks", "2", "--chunk-idx", "2"), loaded)


def test_answers_resume_with_other_settings_refuses_or_starts_over(tiny_bundle, loaded, images, tmp_path):
    qfile = _questions_file(tiny_bundle, loaded, images, tmp_path)
    out = tmp_path / "a.jsonl"
    answers_mod.run(_a_args(tiny_bundle, images, qfile, out), loaded)
    before = out.read_text()
    with pytest.raises(ArtifactError, match=r"line 1: made with other settings \(recorded → this run: conv_mode: "
                                            r"'llava_v1' → 'v1_sq'\); fix: .*pass --overwrite"):
        answers_mod.run(_a_args(tiny_bundle, images, qfile, out, "--conv-mode", "v1_sq"), loaded)
    assert out.read_text() == before
    s = answers_mod.run(_a_args(tiny_bundle, images, qfile, out, "--conv-mode", "v1_sq", "--overwrite"), loaded)
    assert s["already_done"] == 0 and s["written"] == len(before.splitlines())
    assert {r["settings"]["conv_mode"] for r in _read(out)} == {"v1_sq"}

"""selftrain.questions / answers with untrusted inputs (issue 21): a thin image (tiny on disk,
gigapixels once padded) and image paths that leave --image-folder are named, or skipped and counted."""
import json
import os

import pytest
from bad_files import write_thin_png
from PIL import Image
from test_selftrain_qa import _a_args, _q_args, _read, images  # noqa: F401 (fixtures)

from stllava.selftrain import answers as answers_mod
from stllava.selftrain import questions as questions_mod
from stllava.tooling import ToolError


def test_questions_name_or_skip_a_thin_image_and_a_link_out_of_the_folder(tiny_bundle, loaded, images, tmp_path):  # noqa: F811
    write_thin_png(images / "sub" / "c.png")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (20, 20), (9, 9, 9)).save(secret)
    os.symlink(secret, images / "e.png")  # listed with the folder's images, but it is not one of them
    out = tmp_path / "q.jsonl"
    with pytest.raises(ToolError, match=r"^e\.png: image outside the image folder: e\.png \(resolves to "
                                        r".*secret\.png, outside .*images; .*--skip-bad to skip and count it$"):
        questions_mod.run(_q_args(tiny_bundle, images, out), loaded)
    os.unlink(images / "e.png")
    with pytest.raises(ToolError, match=r"^sub/c\.png: extreme aspect ratio: .*sub/c\.png \(1x40000 = aspect "
                                        r"ratio 40,000:1"):
        questions_mod.run(_q_args(tiny_bundle, images, out), loaded)
    os.symlink(secret, images / "e.png")
    s = questions_mod.run(_q_args(tiny_bundle, images, out, "--skip-bad"), loaded)
    assert s["written"] == 3 and [r["image"] for r in _read(out)] == ["a.png", "b.jpg", "sub/d.PNG"]
    assert s["skipped"] == [{"image": "e.png", "reason": "image outside the image folder"},
                            {"image": "sub/c.png", "reason": "extreme aspect ratio"}]


def test_answers_name_or_skip_a_thin_image_and_a_path_out_of_the_folder(tiny_bundle, loaded, images, tmp_path):  # noqa: F811
    write_thin_png(images / "b.jpg")  # a PNG misnamed .jpg, as data often is
    secret = tmp_path / "secret.png"
    Image.new("RGB", (20, 20), (9, 9, 9)).save(secret)
    qfile = tmp_path / "questions.jsonl"
    recs = [{"image": "a.png", "questions": ["What is it?"], "question_ids": ["a#0"]},
            {"image": "b.jpg", "questions": ["Where?"], "question_ids": ["b#0"]},
            {"image": "../secret.png", "questions": ["Whose?"], "question_ids": ["s#0"]},
            {"image": str(secret), "questions": ["Whose?"], "question_ids": ["s#1"]}]
    qfile.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "a.jsonl"
    with pytest.raises(ToolError, match=r"questions\.jsonl, line 3 \(question 's#0'\): image outside the image "
                                        r"folder: \.\./secret\.png \(resolves to .*--skip-bad"):
        answers_mod.run(_a_args(tiny_bundle, images, qfile, out), loaded)
    qfile.write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))
    with pytest.raises(ToolError, match=r"questions\.jsonl, line 2 \(question 'b#0'\): extreme aspect ratio: "
                                        r".*b\.jpg \(1x40000 = .*--skip-bad"):
        answers_mod.run(_a_args(tiny_bundle, images, qfile, out), loaded)
    qfile.write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = answers_mod.run(_a_args(tiny_bundle, images, qfile, out, "--skip-bad"), loaded)
    assert [r["question_id"] for r in _read(out)] == ["a#0"]
    assert s["skipped"] == [{"question_id": "s#0", "image": "../secret.png", "reason": "image outside the image folder"},
                            {"question_id": "s#1", "image": str(secret), "reason": "image outside the image folder"},
                            {"question_id": "b#0", "image": "b.jpg", "reason": "extreme aspect ratio"}]

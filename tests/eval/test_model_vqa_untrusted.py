"""eval.model_vqa with untrusted question files (issue 21): a thin image (tiny on disk, gigapixels
once padded) and image paths that leave --image-folder are named, or skipped and counted."""
import json
import os

import pytest
from bad_files import write_thin_png
from PIL import Image
from test_model_vqa import _args, vqa  # noqa: F401 (fixtures)

from stllava.eval.model_vqa import run
from stllava.tooling import ToolError


def test_a_thin_image_is_named_or_a_counted_skip(tiny_bundle, loaded, vqa):  # noqa: F811
    write_thin_png(vqa["folder"] / "img3.png")  # questions 103 and 108: 1 x 40000, padded 40000 x 40000
    out = vqa["tmp"] / "a.jsonl"
    with pytest.raises(ToolError, match=r"line 4 \(question_id 103\): extreme aspect ratio: .*img3\.png "
                                        r"\(1x40000 = aspect ratio 40,000:1, over the limit of 50:1 .*--skip-bad"):
        run(_args(tiny_bundle, vqa, out), loaded)
    s = run(_args(tiny_bundle, vqa, out, "--skip-bad", "--batch-size", "4"), loaded)
    assert s["answered"] == 8 and s["skipped_bad"] == 2
    assert s["skipped"] == [{"question_id": 103, "image": "img3.png", "reason": "extreme aspect ratio"},
                            {"question_id": 108, "image": "img3.png", "reason": "extreme aspect ratio"}]


def test_an_image_path_outside_the_folder_is_named_or_a_counted_skip(tiny_bundle, loaded, vqa):  # noqa: F811
    secret = vqa["tmp"] / "secret.png"
    Image.new("RGB", (20, 20), (9, 9, 9)).save(secret)
    os.symlink(secret, vqa["folder"] / "link.png")
    qs = vqa["questions"]
    qs[1]["image"], qs[4]["image"], qs[6]["image"] = "../secret.png", str(secret), "link.png"
    vqa["qfile"].write_text("".join(json.dumps(q) + "\n" for q in qs))
    out = vqa["tmp"] / "a.jsonl"
    with pytest.raises(ToolError, match=r"^" + r"\S*questions\.jsonl, line 2 \(question_id 101\): image outside the "
                                        r"image folder: \.\./secret\.png \(resolves to .*secret\.png, outside "
                                        r".*images; give a path inside the image folder .*\); fix the record, or "
                                        r"pass --skip-bad to skip and count it$"):
        run(_args(tiny_bundle, vqa, out), loaded)
    assert not out.exists() or out.read_text() == ""  # refused before anything ran
    s = run(_args(tiny_bundle, vqa, out, "--skip-bad"), loaded)
    assert s["answered"] == 7 and s["skipped_bad"] == 3
    assert s["skipped"] == [{"question_id": q, "image": qs[q - 100]["image"], "reason": "image outside the image folder"}
                            for q in (101, 104, 106)]


def test_convert_refuses_benchmark_image_paths_outside_the_image_folder(tmp_path):
    """eval.convert checks a benchmark's images against --image-folder: a path leaving it is named."""
    from stllava.eval import convert
    from stllava.eval.convert import ConvertError

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "synpic1.jpg").write_bytes(b"x")
    (tmp_path / "secret.jpg").write_bytes(b"x")
    records = [{"qid": q, "image_name": image, "question": f"Question {q}?", "answer": "Yes", "answer_type": "CLOSED",
                "phrase_type": "test_para", "qid_linked_id": "x"}
               for q, image in ((1, "synpic1.jpg"), (2, "../secret.jpg"), (3, str(tmp_path / "secret.jpg")))]
    src = tmp_path / "t.json"
    src.write_text(json.dumps(records))
    with pytest.raises(ConvertError, match=r"^" + r"\S*images: 2 image paths lead outside it \(first: '\.\./secret\.jpg'"
                                           r", resolves to \S*secret\.jpg, outside \S*images; give a path inside the "
                                           r"image folder"):
        convert.convert("vqa_rad", src, image_folder=tmp_path / "images")

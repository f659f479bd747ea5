"""Images and image paths from untrusted records (issue 21): preprocessing is bounded by what it
allocates (a thin image, tiny on disk, is not padded to a gigapixel square), and a record's path
cannot leave its image folder. The shared checks (stllava.data.images), data.verify and training's
dataset; the other tools have their own tests (docs/BadInputs.md lists them)."""
import json
import os
import re
import subprocess
import sys

import pytest
from bad_files import THIN_SIDE, write_thin_png
from PIL import Image

from stllava.data.images import (
    EXTREME_ASPECT,
    MAX_ASPECT_ENV,
    MAX_ASPECT_RATIO,
    MAX_PIXELS_ENV,
    OUTSIDE_FOLDER,
    TOO_LARGE,
    ImageLoadError,
    ImageSettingError,
    check_image,
    image_path,
    load_image,
)
from stllava.data.verify import main as verify_main
from stllava.data.verify import verify_records

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
THIN_DETAIL = (f"1x{THIN_SIDE} = aspect ratio {THIN_SIDE:,}:1, over the limit of 50:1 (padded to a square it would "
               f"be {THIN_SIDE ** 2:,} pixels); set STLLAVA_MAX_IMAGE_ASPECT to accept thinner images")
MB = 2 ** 20

# Runs in a child process: PIL's buffers are invisible to tracemalloc, so the peak resident set
# (VmHWM, reset after the imports) is what is measured. The address space is capped 2 GiB above
# what the imports mapped, so code that would allocate the 40000x40000 canvas (4.8 GB) fails
# there with a MemoryError instead of taking the machine's memory.
CHILD = r"""
import json, resource, sys
from PIL import Image
from stllava.data.images import ImageLoadError, load_image
from stllava.mm_utils import process_images
from stllava.model.tiny import tiny_image_processor

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

processor = tiny_image_processor(336)
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + 2 * 2 ** 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
base = status("VmRSS")
outcome = {}
try:
    load_image(sys.argv[1], record="record 7")
    outcome["load"] = "loaded"
except ImageLoadError as e:
    outcome["load"] = str(e)
except MemoryError:
    outcome["load"] = "MemoryError"
thin = Image.new("RGB", (1, 40000))  # an image that reached preprocessing some other way
for ratio in ("pad", "square"):
    try:
        process_images([thin], processor, {"image_aspect_ratio": ratio})
        outcome[ratio] = "processed"
    except ValueError as e:
        outcome[ratio] = str(e)
    except MemoryError:
        outcome[ratio] = "MemoryError"
outcome["peak_mb"] = (status("VmHWM") - base) / 2 ** 20
print(json.dumps(outcome))
"""


@pytest.fixture(autouse=True)
def default_limits(monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    monkeypatch.delenv(MAX_ASPECT_ENV, raising=False)


def test_preprocessing_a_thin_image_stays_small(tmp_path):
    """A 1 x 40000 PNG (a few hundred bytes, 40,000 pixels) was padded to 40000 x 40000 (6.3 GB peak)."""
    thin = tmp_path / "thin.png"
    assert write_thin_png(thin) < 1000
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop(MAX_PIXELS_ENV, None)
    env.pop(MAX_ASPECT_ENV, None)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(thin)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["load"] == (f"record 7: extreme aspect ratio: {thin} ({THIN_DETAIL}). Check the dataset with "
                               "`python -m stllava.data.verify --data_path ... --image_folder ...` and fix or drop "
                               "the record, or train with --on_bad_sample skip")
    # padding and the processor's shortest-edge resize both blow it up
    assert outcome["pad"] == ("process_images: image 0: image too large (1x40000 pads to a 40000x40000 square = "
                              "1,600,000,000 pixels, over the limit of 89,478,485; set STLLAVA_MAX_IMAGE_PIXELS to "
                              "accept larger images)"), outcome
    assert outcome["square"] == f"process_images: image 0: extreme aspect ratio ({THIN_DETAIL})", outcome
    assert outcome["peak_mb"] < 300, outcome


def test_aspect_ratio_and_padded_square_limits(tmp_path, monkeypatch):
    def png(name, w, h):
        Image.new("L", (w, h), 7).save(tmp_path / name)
        return str(tmp_path / name)

    assert MAX_ASPECT_RATIO == 50
    assert check_image(png("fifty.png", 50, 1)) is None  # exactly 50:1 is accepted
    assert check_image(png("wide.png", 51, 1)) == (EXTREME_ASPECT, (
        "51x1 = aspect ratio 51:1, over the limit of 50:1 (padded to a square it would be 2,601 pixels); set "
        "STLLAVA_MAX_IMAGE_ASPECT to accept thinner images"))
    monkeypatch.setenv(MAX_ASPECT_ENV, "60")
    assert check_image(str(tmp_path / "wide.png")) is None and load_image(str(tmp_path / "wide.png")).size == (51, 1)
    for bad in ("wide", "0", "-3", "0.5"):
        monkeypatch.setenv(MAX_ASPECT_ENV, bad)
        with pytest.raises(ImageSettingError, match=f"{MAX_ASPECT_ENV}={bad!r} is not a number ≥ 1"):
            check_image(str(tmp_path / "wide.png"))
    monkeypatch.delenv(MAX_ASPECT_ENV)
    # the square padding allocates, not the file: 40x30 = 1,200 pixels fits a limit of 1,500; 40x40 does not
    monkeypatch.setenv(MAX_PIXELS_ENV, "1500")
    assert check_image(png("rect.png", 40, 30)) == (TOO_LARGE, (
        "40x30 pads to a 40x40 square = 1,600 pixels, over the limit of 1,500; set STLLAVA_MAX_IMAGE_PIXELS "
        "to accept larger images"))
    monkeypatch.setenv(MAX_PIXELS_ENV, "1600")
    assert check_image(str(tmp_path / "rect.png")) is None


def _qa():
    return [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A lung."}]


def _escaping_folder(root):
    """An image folder, a secret image outside it, a link inside it pointing out. Returns (folder, secret)."""
    folder = root / "img"
    folder.mkdir()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(folder / "good.png")
    secret = root / "secret.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(secret)
    os.symlink(secret, folder / "link.png")
    (folder / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "sub" / "inner.png")
    return folder, secret


def test_image_path_refuses_paths_that_leave_the_folder(tmp_path):
    folder, secret = _escaping_folder(tmp_path)
    assert image_path(str(folder), "good.png") == str(folder / "good.png")
    assert image_path(str(folder), "sub/../sub/inner.png") == str(folder / "sub/../sub/inner.png")
    assert image_path(str(folder), str(folder / "good.png")) == str(folder / "good.png")  # absolute, inside
    assert image_path(None, str(secret)) == str(secret)  # no folder given: nothing to stay inside
    for bad in ("../secret.png", str(secret), "link.png", "sub/../../secret.png"):
        with pytest.raises(ImageLoadError) as e:
            image_path(str(folder), bad, record="record 2 (id 'x')")
        assert e.value.kind == OUTSIDE_FOLDER
        assert str(e.value).startswith(f"record 2 (id 'x'): image outside the image folder: {bad} (resolves to "
                                       f"{secret}, outside {folder}; give a path inside the image folder")
    # a folder given through a link is the folder it links to
    os.symlink(folder, tmp_path / "alias")
    assert image_path(str(tmp_path / "alias"), "good.png") == str(tmp_path / "alias" / "good.png")


def test_verify_names_file_and_record(tmp_path, capsys):
    folder, secret = _escaping_folder(tmp_path)
    write_thin_png(folder / "thin.png")
    recs = [{"id": "ok", "image": "good.png", "conversations": _qa()},
            {"id": "thin", "image": "thin.png", "conversations": _qa()},
            {"id": "up", "image": "../secret.png", "conversations": _qa()},
            {"id": "abs", "image": str(secret), "conversations": _qa()},
            {"id": "link", "image": "link.png", "conversations": _qa()}]
    report = verify_records(recs, str(folder))
    got = {p.index: (p.record_id, p.kind) for p in report.problems}
    assert got == {1: ("thin", EXTREME_ASPECT), 2: ("up", OUTSIDE_FOLDER), 3: ("abs", OUTSIDE_FOLDER),
                   4: ("link", OUTSIDE_FOLDER)}
    assert str(report.problems[0]) == f"record 1 (id 'thin'): extreme aspect ratio: {folder / 'thin.png'} ({THIN_DETAIL})"
    assert str(report.problems[1]).startswith(f"record 2 (id 'up'): image outside the image folder: ../secret.png "
                                              f"(resolves to {secret}, outside {folder}")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(recs))
    assert verify_main(["--data_path", str(data), "--image_folder", str(folder)]) == 1
    out = capsys.readouterr().out
    assert out.strip().endswith("5 records checked, 4 bad (extreme aspect ratio: 1, image outside the image folder: 3)")


def test_training_dataset_names_file_and_record(tmp_path):
    """A record that reaches the dataset without the start-up check (or whose file changed since)."""
    from stllava.data.sft import LazySupervisedDataset
    from stllava.model.tiny import tiny_image_processor

    folder, secret = _escaping_folder(tmp_path)
    write_thin_png(folder / "thin.png")
    recs = [{"id": "thin", "image": "thin.png", "conversations": _qa()},
            {"id": "up", "image": "../secret.png", "conversations": _qa()}]
    ds = LazySupervisedDataset(recs, None, tiny_image_processor(32), image_folder=str(folder), version="v1",
                               indices=[4, 9])
    with pytest.raises(ImageLoadError, match="^" + re.escape(f"record 4 (id 'thin'): extreme aspect ratio: "
                                                             f"{folder / 'thin.png'} ({THIN_DETAIL})")):
        ds.record_image(recs[0], 4)
    with pytest.raises(ImageLoadError, match="^" + re.escape(f"record 9 (id 'up'): image outside the image folder: "
                                                             f"../secret.png (resolves to {secret}")):
        ds.record_image(recs[1], 9)

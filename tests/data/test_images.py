"""The shared image loader (stllava.data.images): the pixel limit (one setting) and 16-bit images."""
import io
import subprocess
import sys

import numpy as np
import pytest
from bad_files import write_bomb_png, write_png16
from PIL import Image

from stllava.data import images
from stllava.data.images import (
    MAX_PIXELS_ENV,
    TOO_LARGE,
    ImageLoadError,
    ImageSettingError,
    ImageTooLarge,
    check_image,
    load_image,
    mode_note,
    open_image,
    to_rgb,
)


def test_bomb_is_refused_from_its_header_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    bomb = tmp_path / "bomb.png"
    assert write_bomb_png(bomb) < 60_000  # 57 KB in the issue; a few tens of KB here
    assert check_image(str(bomb)) == (TOO_LARGE, "225,000,000 pixels, over the limit of 89,478,485; set "
                                                 "STLLAVA_MAX_IMAGE_PIXELS to accept larger images")
    with pytest.raises(ImageLoadError, match=r"record 3: image too large: .*bomb\.png \(225,000,000 pixels") as e:
        load_image(str(bomb), record="record 3")
    assert e.value.kind == TOO_LARGE
    with pytest.raises(ImageTooLarge):
        open_image(io.BytesIO(bomb.read_bytes()))


def test_the_limit_is_one_setting(tmp_path, monkeypatch):
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(small)
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    assert check_image(str(small)) == (TOO_LARGE, "40x30 = 1,200 pixels, over the limit of 1,000; set "
                                                  "STLLAVA_MAX_IMAGE_PIXELS to accept larger images")
    monkeypatch.setenv(MAX_PIXELS_ENV, "1_600")  # exactly the size preprocessing pads it to (40x40): accepted
    assert check_image(str(small)) is None and load_image(str(small)).size == (40, 30)
    for bad in ("lots", "-5", "0", "1e9"):
        monkeypatch.setenv(MAX_PIXELS_ENV, bad)
        with pytest.raises(ImageSettingError, match=f"{MAX_PIXELS_ENV}={bad!r} is not a positive integer"):
            check_image(str(small))  # a bad setting is not reported as a bad image


def test_raising_the_limit_lets_pil_decode_the_large_image(tmp_path):
    """PIL refuses above twice its own limit in Image.open; the setting raises PIL's limit too.
    (A subprocess: decoding 225 megapixels should not stay in the test process's memory.)"""
    bomb = tmp_path / "bomb.png"
    write_bomb_png(bomb)
    code = (f"import os; os.environ[{MAX_PIXELS_ENV!r}] = '225000000'\n"
            "from stllava.data.images import check_image\n"
            f"print(check_image({str(bomb)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stderr


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "ct16.png"
    values = write_png16(path)
    clipped = np.asarray(Image.open(path).convert("RGB"))
    assert clipped.mean() > 254  # what PIL's convert("RGB") gives: almost white (the bug)
    rgb = np.asarray(load_image(str(path)))
    assert rgb.shape == (32, 64, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.array_equal(rgb[..., 0], np.rint(values / 257).astype(np.uint8))
    assert (rgb[0, 0, 0], rgb[-1, -1, 0]) == (0, 255) and abs(rgb.mean() - 127.5) < 0.6
    # hand-checked values: v / 257 rounded (257·k ↦ k; 128 ↦ 0.498 ↦ 0; 129 ↦ 0.502 ↦ 1)
    im = Image.fromarray(np.array([[0, 128, 129, 257, 32896, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(im))[0, :, 0].tolist() == [0, 0, 1, 1, 128, 255]
    im32 = Image.fromarray(np.array([[-5, 65535, 70000]], dtype=np.int32))  # mode "I": clipped to 16 bits
    assert im32.mode == "I" and np.asarray(to_rgb(im32))[0, :, 0].tolist() == [0, 255, 255]


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "1", "CMYK"])
def test_8_bit_modes_convert_exactly_as_before(mode):
    g = np.random.default_rng(0)
    im = Image.fromarray(g.integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert(mode)
    assert np.array_equal(np.asarray(to_rgb(im)), np.asarray(im.convert("RGB")))


def test_mode_notes():
    assert mode_note("RGB") is None and mode_note("L") is None and mode_note("P") is None
    assert mode_note("I;16") == "mode I;16 (16-bit): scaled to 8 bits (value / 257) before RGB"
    assert "convert('RGB')" in mode_note("CMYK") and "convert('RGB')" in mode_note("F")


def test_image_checks_need_no_torch():
    """The judge and the checks import this module; torch is only needed for blank_image."""
    code = "import sys, stllava.data.images; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert images.blank_image.__doc__  # still there, importing torch when called

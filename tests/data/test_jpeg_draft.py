"""JPEGs decoded at reduced size (PIL's draft) the same way in training and inference
(docs/Differences.md#jpeg-draft): the reduction chosen, the pixels each path sees, what is left alone."""
import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from stllava.data import images as images_mod
from stllava.data.images import (
    EXTREME_ASPECT,
    TOO_LARGE,
    DecodeSize,
    ImageTooLarge,
    draft_scale,
    load_image,
    open_image,
)
from stllava.mm_utils import decode_size


def _jpeg(path, w, h, seed=0):
    rng = np.random.default_rng(seed)
    # smooth content (a gradient plus mild noise), like a radiograph more than like white noise
    x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * 0.7
    arr = np.clip(x + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=90)
    return str(path)


@pytest.mark.parametrize("w,h,need,scale", [
    (1000, 800, DecodeSize(336), 2),         # 500 ≥ 336; 1/4 gives 250
    (2321, 1384, DecodeSize(336), 4),        # VQA-RAD synpic100132: 581 x 346
    (2700, 100, DecodeSize(336), 8),         # ceil(2700 / 8) = 338 ≥ 336
    (2680, 100, DecodeSize(336), 4),         # ceil(2680 / 8) = 335 < 336
    (671, 671, DecodeSize(336), 2),          # ceil(671 / 2) = 336, just enough
    (670, 670, DecodeSize(336), 1),          # 335 would be too small
    (336, 336, DecodeSize(336), 1),
    (200, 150, DecodeSize(336), 1),          # already smaller than needed: never reduced
    (1000, 700, DecodeSize(336, padded=False), 2),  # the SHORTER side governs: 350 ≥ 336
    (1400, 600, DecodeSize(336, padded=False), 1),  # 300 < 336 (padded, 1/4 would do: 350)
    (1400, 600, DecodeSize(336), 4),
    (4000, 3, DecodeSize(336), 2),           # no side below 1 pixel: 1/4 and 1/8 need a short side ≥ 4, 8
    (1000, 1000, DecodeSize(112), 8),        # the tiny model's 112 px: 125 ≥ 112
])
def test_draft_scale_hand_worked(w, h, need, scale):
    assert draft_scale(w, h, need) == scale


def test_decoded_jpeg_is_the_largest_reduction_that_keeps_the_needed_size(tmp_path):
    need = DecodeSize(336)
    for i, (w, h) in enumerate([(1000, 800), (2321, 1384), (671, 500), (670, 500), (2700, 60), (500, 1350)]):
        path = _jpeg(tmp_path / f"{i}.jpg", w, h, i)
        im = load_image(path, need=need)
        s = draft_scale(w, h, need)
        assert im.size == (-(-w // s), -(-h // s)) and im.mode == "RGB"
        assert max(im.size) >= 336 or s == 1  # never below the padded square's needed side
    # every size over a grid: the reduced long side stays ≥ 336, and the next reduction would not
    for w, h in itertools.product(range(300, 3000, 37), (40, 333, 700, 1999)):
        s = draft_scale(w, h, need)
        long = max(w, h)
        assert -(-long // s) >= 336 or s == 1
        assert s == 8 or -(-long // (2 * s)) < 336 or min(w, h) < 2 * s


def test_png_and_no_need_and_switch_off_decode_at_full_size(tmp_path, monkeypatch):
    png = tmp_path / "a.png"
    Image.fromarray(np.full((900, 1000, 3), 7, np.uint8)).save(png)
    assert load_image(str(png), need=DecodeSize(112)).size == (1000, 900)
    jpg = _jpeg(tmp_path / "a.jpg", 1000, 900)
    assert load_image(jpg).size == (1000, 900)  # no need given: full size (data.verify, the judge)
    assert load_image(jpg, need=DecodeSize(112)).size == (125, 113)
    monkeypatch.setenv("STLLAVA_JPEG_DRAFT", "0")
    assert load_image(jpg, need=DecodeSize(112)).size == (1000, 900)


def test_size_checks_run_on_the_full_header_before_decoding(tmp_path, monkeypatch):
    """The pixel limit and the thin-image refusal judge the file's own size, before any draft or
    decoding: a reduced decode would fit, the image is still refused."""
    def no_decode(*a, **k):
        raise AssertionError("decoded (or drafted) before the size check")

    thin = _jpeg(tmp_path / "thin.jpg", 2600, 50)  # 52:1, over the 50:1 limit; drafted it would be 325 x 7
    big = _jpeg(tmp_path / "big.jpg", 1000, 1000)
    monkeypatch.setattr(images_mod, "apply_draft", no_decode)
    with pytest.raises(ImageTooLarge) as e:
        open_image(thin, DecodeSize(112))
    assert e.value.kind == EXTREME_ASPECT
    monkeypatch.setenv("STLLAVA_MAX_IMAGE_PIXELS", "500000")  # 1000 x 1000 is over; 125 x 125 would not be
    with pytest.raises(ImageTooLarge) as e:
        open_image(big, DecodeSize(112))
    assert e.value.kind == TOO_LARGE


def test_decode_size_follows_the_processor_and_the_aspect_ratio(pretrained):
    _, model, proc, _ = pretrained
    assert decode_size(proc, model.config) == DecodeSize(112, padded=True)  # the tiny tower's 112 px, pad
    assert decode_size(proc, {"image_aspect_ratio": "square"}) == DecodeSize(112, padded=False)
    assert decode_size(None, model.config) is None


def test_training_and_model_vqa_see_the_same_pixels(pretrained, tmp_path):
    """The same JPEG through training's dataset (LazyLlavaDataset.record_image) and through
    model_vqa's path (ImageSource.for_model + load + prepare_batch): equal pixel tensors, and
    drafted (they differ from a full-size decode)."""
    from stllava.data.lazy import LazyLlavaDataset
    from stllava.generation import prepare_batch
    from stllava.mm_utils import process_images
    from stllava.tooling import ImageSource

    tok, model, proc, _ = pretrained
    _jpeg(tmp_path / "x.jpg", 1000, 700, 3)
    record = {"id": "r", "image": "x.jpg", "conversations": []}
    train = LazyLlavaDataset([record], tok, proc, image_folder=str(tmp_path), version="v1",
                             image_aspect_ratio=model.config.image_aspect_ratio).record_image(record, 0)
    source = ImageSource(str(tmp_path), str, str, lambda rel: {"image": rel})
    source.for_model(proc, model.config)
    kept, pics = source.load(["x.jpg"])
    assert kept == ["x.jpg"] and pics[0].size == (125, 88)
    infer = prepare_batch(tok, proc, model.config, ["<image>\nq"], pics).pixel_values[0]
    assert torch.equal(train, infer)
    full = process_images([load_image(str(tmp_path / "x.jpg"))], proc, model.config)[0]
    assert not torch.equal(train, full)


def test_server_and_chat_cli_decode_as_training_does(pretrained, tmp_path):
    import dataclasses

    from stllava.serve import cli
    from stllava.serve.inputs import ImageLimits, decode_image

    _, model, proc, _ = pretrained
    path = _jpeg(tmp_path / "x.jpg", 1000, 700, 4)
    need = decode_size(proc, model.config)
    want = np.asarray(load_image(path, need=need))
    raw = open(path, "rb").read()
    served = decode_image(raw, dataclasses.replace(ImageLimits(), decode=need), "messages[0]")
    assert np.array_equal(np.asarray(served), want)
    assert np.array_equal(np.asarray(cli.load_image(path, need=need)), want)
    assert decode_image(raw, ImageLimits(), "m").size == (1000, 700)  # no size given: full size
    assert np.array_equal(np.asarray(open_image(io.BytesIO(raw), need)[0]), want)


def test_build_backend_gives_the_server_the_models_decode_size(pretrained):
    from stllava.serve.model_backend import build_backend

    tok, model, proc, ctx = pretrained
    backend = build_backend(tok, model, proc, ctx, name="m", conv_mode="v1")
    assert backend.limits.decode == DecodeSize(112, padded=True)

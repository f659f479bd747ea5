"""tokenizer_image_token, image padding/preprocessing, model names."""
import random
from importlib import resources

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPImageProcessorPil, LlamaTokenizer
from transformers.image_utils import PILImageResampling

from stllava.constants import IMAGE_TOKEN_INDEX
from stllava.mm_utils import (
    _pil_resize_target,
    expand2square,
    get_model_name_from_path,
    process_images,
    tokenizer_image_token,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    from stllava.model.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny_tok")))


def llava_reference_tokenizer_image_token(prompt, tokenizer):
    """LLaVA's algorithm, verbatim in spirit: keep the first chunk's BOS, drop the later ones'."""
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for k, x in enumerate(chunks):
        if k > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(x[offset:])
    return ids


# ---------------------------------------------------------------- tokenizer_image_token
def test_one_image(tiny_tok):
    ids = tokenizer_image_token("<image>\nIs there a mass?", tiny_tok)
    assert ids[:2] == [tiny_tok.bos_token_id, IMAGE_TOKEN_INDEX]
    assert ids[2:] == tiny_tok("\nIs there a mass?", add_special_tokens=False).input_ids
    assert ids.count(tiny_tok.bos_token_id) == 1 and ids.count(IMAGE_TOKEN_INDEX) == 1


def test_two_images_and_bos_once(tiny_tok):
    prompt = "USER: <image> and <image>\nCompare. ASSISTANT:"
    ids = tokenizer_image_token(prompt, tiny_tok)
    a = tiny_tok("USER: ", add_special_tokens=False).input_ids
    b = tiny_tok(" and ", add_special_tokens=False).input_ids
    c = tiny_tok("\nCompare. ASSISTANT:", add_special_tokens=False).input_ids
    assert ids == [1] + a + [IMAGE_TOKEN_INDEX] + b + [IMAGE_TOKEN_INDEX] + c
    assert [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX] == [1 + len(a), 2 + len(a) + len(b)]
    assert ids.count(1) == 1
    assert ids == llava_reference_tokenizer_image_token(prompt, tiny_tok)


def test_no_image_equals_plain_tokenization(tiny_tok):
    prompt = "A chat. USER: Is the liver normal? ASSISTANT: Yes</s>"
    assert tokenizer_image_token(prompt, tiny_tok) == tiny_tok(prompt).input_ids
    assert IMAGE_TOKEN_INDEX not in tokenizer_image_token(prompt, tiny_tok)


def test_image_at_end_and_only_image(tiny_tok):
    assert tokenizer_image_token("<image>", tiny_tok) == [1, IMAGE_TOKEN_INDEX]
    ids = tokenizer_image_token("Look: <image>", tiny_tok)
    assert ids[-1] == IMAGE_TOKEN_INDEX and ids[0] == 1


def test_return_tensors(tiny_tok):
    t = tokenizer_image_token("<image>\nhi", tiny_tok, return_tensors="pt")
    assert t.dtype == torch.long and t.dim() == 1
    assert t.tolist() == tokenizer_image_token("<image>\nhi", tiny_tok)
    with pytest.raises(ValueError, match="return_tensors"):
        tokenizer_image_token("<image>\nhi", tiny_tok, return_tensors="np")


def test_custom_image_index(tiny_tok):
    assert tokenizer_image_token("<image>", tiny_tok, image_token_index=-7) == [1, -7]


def test_real_llama_golden(llama_tokenizer_path):
    # Hand-checked pieces: <s> ▁US ER : ▁ <image> ▁ <0x0A> Is ▁this ▁a ▁CT ?  — the "▁" on both sides of
    # the image is what LLaVA-1.5 was trained with.
    tok = LlamaTokenizer.from_pretrained(str(llama_tokenizer_path.parent), legacy=False, add_bos_token=True)
    prompt = "USER: <image>\nIs this a CT?"
    ids = tokenizer_image_token(prompt, tok)
    assert ids == [1, 3148, 1001, 29901, 29871, IMAGE_TOKEN_INDEX, 29871, 13, 3624, 445, 263, 26637, 29973]
    assert ids == llava_reference_tokenizer_image_token(prompt, tok)


def test_bos_added_even_when_tokenizer_folder_omits_it(llama_tokenizer_path):
    # A bare tokenizer.model folder loads with add_bos_token off in transformers 5.
    tok = LlamaTokenizer.from_pretrained(str(llama_tokenizer_path.parent))
    assert tok("hi").input_ids[0] != 1  # precondition: this tokenizer adds no BOS itself
    assert tokenizer_image_token("<image>\nhi", tok)[:2] == [1, IMAGE_TOKEN_INDEX]


# ---------------------------------------------------------------- expand2square / process_images
RED = (200, 10, 20)
BG = (122, 116, 104)


def test_clip_mean_colour():
    assert tuple(int(x * 255) for x in CLIP_MEAN) == BG


def test_expand2square_wide_centres_vertically():
    img = Image.new("RGB", (60, 30), RED)
    sq = expand2square(img, BG)
    assert sq.size == (60, 60)
    # (60 - 30) // 2 = 15 rows of background above, 15 below.
    assert [sq.getpixel((30, y)) for y in (0, 14, 15, 44, 45, 59)] == [BG, BG, RED, RED, BG, BG]


def test_expand2square_tall_odd_difference():
    img = Image.new("RGB", (2, 5), RED)
    sq = expand2square(img, BG)
    assert sq.size == (5, 5)
    # offset (5 - 2) // 2 = 1: column 0 background, columns 1-2 image, 3-4 background.
    assert [sq.getpixel((x, 2)) for x in range(5)] == [BG, RED, RED, BG, BG]


def test_expand2square_square_is_unchanged():
    img = Image.new("RGB", (7, 7), RED)
    assert expand2square(img, BG) is img


@pytest.fixture(scope="module")
def processor():
    return CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def _rgb255(pixel_values, y, x):
    return [round(float(pixel_values[c, y, x]) * CLIP_STD[c] * 255 + CLIP_MEAN[c] * 255) for c in range(3)]


def test_process_images_pad_uses_mean_colour(processor):
    white = Image.new("RGB", (112, 56), (255, 255, 255))
    out = process_images([white], processor, {"image_aspect_ratio": "pad"})
    assert out.shape == (1, 3, 56, 56)
    # Padded to 112x112 (28 background rows on top), resized to 56: row 0 is background, the centre white.
    assert _rgb255(out[0], 0, 28) == list(BG)
    assert _rgb255(out[0], 28, 28) == [255, 255, 255]


def test_process_images_square_crops_without_padding(processor):
    class Cfg:
        image_aspect_ratio = "square"

    white = Image.new("RGB", (112, 56), (255, 255, 255))
    out = process_images([white, white.convert("L")], processor, Cfg())
    assert out.shape == (2, 3, 56, 56)
    assert _rgb255(out[0], 0, 28) == [255, 255, 255]  # centre crop: no background anywhere
    assert torch.allclose(out[0], out[1])  # grey image converted to RGB first


def test_process_images_pad_on_grey_and_batch(processor):
    imgs = [Image.new("L", (40, 80), 255), Image.new("RGB", (56, 56), RED)]
    out = process_images(imgs, processor, {"image_aspect_ratio": "pad"})
    assert out.shape == (2, 3, 56, 56)
    assert _rgb255(out[0], 28, 0) == list(BG)  # left strip of the tall image is the mean colour
    with pytest.raises(ValueError):
        process_images([], processor, {"image_aspect_ratio": "pad"})


# ------------------------------------------------- the PIL-resize shortcut gives the same pixels
def _processor_alone(images, processor):
    """docs/Method.md#image-preprocessing with the processor doing all the resizing (process_images before its shortcut)."""
    bg = tuple(int(x * 255) for x in processor.image_mean)
    return processor([expand2square(im.convert("RGB"), bg) for im in images], return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def real_images():
    """The 24 embedded VQA-RAD radiographs (JPEG, ~1000 px, mostly not square, as opened: not yet
    RGB-converted), 8 demo phantoms (square PNG-like renders) and odd modes and shapes."""
    from stllava.demo.phantoms import render, sample_phantom

    folder = resources.files("stllava") / "assets" / "vqa_rad" / "images"
    jpegs = []
    for path in sorted(folder.iterdir()):
        with Image.open(path) as im:
            im.load()
            jpegs.append(im)
    rng = random.Random(0)
    phantoms = [render(sample_phantom(rng, f"p{i}"), rng) for i in range(8)]
    odd = [jpegs[0].convert("L"), jpegs[1].convert("RGBA"), jpegs[2].convert("P"), jpegs[3].convert("RGB"),
           Image.new("RGB", (1, 300), RED), Image.new("RGB", (7, 7), RED)]
    assert sum(im.width != im.height for im in jpegs) >= 18  # the padding is exercised
    return jpegs + phantoms + odd


@pytest.mark.parametrize("kwargs,target", [
    (dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}), (336, 336)),  # CLIP ViT-L/14-336
    (dict(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}), (112, 112)),  # the tiny tower
    (dict(size={"height": 200, "width": 200}, do_center_crop=False), (200, 200)),
    (dict(size={"shortest_edge": 64}, crop_size={"height": 50, "width": 48}, resample=PILImageResampling.BILINEAR),
     (64, 64)),
], ids=["clip336", "tiny112", "height-width", "bilinear-crop"])
def test_process_images_pad_equals_the_processor_alone(real_images, kwargs, target):
    proc = CLIPImageProcessorPil(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), **kwargs)
    assert _pil_resize_target(proc) == target  # the shortcut is taken
    got = process_images(real_images, proc, {"image_aspect_ratio": "pad"})
    assert torch.equal(got, _processor_alone(real_images, proc))  # bit for bit


def test_process_images_leaves_resizing_to_a_processor_that_changes_it(real_images):
    class NearestResize(CLIPImageProcessorPil):
        def resize(self, image, size, resample=None, **kwargs):
            return super().resize(image, size, resample=PILImageResampling.NEAREST, **kwargs)

    kw = dict(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    custom, plain = NearestResize(**kw), CLIPImageProcessorPil(**kw)
    assert _pil_resize_target(custom) is None and _pil_resize_target(plain) == (56, 56)
    assert _pil_resize_target(CLIPImageProcessorPil(size={"shortest_edge": 56, "longest_edge": 90})) is None
    images = real_images[:4]
    got = process_images(images, custom, {"image_aspect_ratio": "pad"})
    assert torch.equal(got, _processor_alone(images, custom))
    assert not torch.equal(got, process_images(images, plain, {"image_aspect_ratio": "pad"}))  # it did differ


# ---------------------------------------------------------------- model names
@pytest.mark.parametrize("path,name", [
    ("/ckpt/llava-med-7b", "llava-med-7b"),
    ("/ckpt/llava-med-7b/", "llava-med-7b"),
    ("runs/sft-lora/checkpoint-500", "sft-lora_checkpoint-500"),
    ("stllava-med-7b", "stllava-med-7b"),
])
def test_get_model_name_from_path(path, name):
    assert get_model_name_from_path(path) == name

"""Multimodal helpers shared by training, generation and evaluation (LLaVA's ``mm_utils``).

- :func:`tokenizer_image_token`: prompt → ids with ``IMAGE_TOKEN_INDEX`` where ``<image>`` was.
- :func:`expand2square`, :func:`process_images`: the image preprocessing (docs/Method.md#image-preprocessing),
  identical in training, generation and evaluation.
- :func:`get_model_name_from_path`: LLaVA's model-name rule.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from stllava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from stllava.data.images import DecodeSize, ImageTooLarge, check_aspect, check_padded


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX,
                          return_tensors: str | None = None):
    """Tokenize ``prompt``, putting ``image_token_index`` in place of every ``<image>``.

    The prompt is split on ``<image>`` and each chunk tokenized on its own without special tokens;
    the result is exactly one BOS (when the tokenizer has one), then the chunks joined by the image
    index. This equals LLaVA's version (which keeps the first chunk's BOS and drops the others')
    for a BOS-adding tokenizer, and also gives the BOS when a tokenizer folder forgot
    ``add_bos_token``. Returns a list of ints, or a 1-D ``torch.long`` tensor for
    ``return_tensors="pt"``; any other ``return_tensors`` raises ValueError.
    """
    if return_tensors not in (None, "pt"):
        raise ValueError(f"tokenizer_image_token: unsupported return_tensors {return_tensors!r}; use None or 'pt'")
    input_ids: list[int] = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    for k, chunk in enumerate(prompt.split(DEFAULT_IMAGE_TOKEN)):
        if k > 0:
            input_ids.append(image_token_index)
        if chunk:
            input_ids.extend(tokenizer(chunk, add_special_tokens=False).input_ids)
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    return input_ids


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """Pad ``pil_img`` to a square of side max(w, h), the image centred (offset (side−size)//2),
    the padding filled with ``background_color``. Returns the image itself when already square."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return result


def _aspect_ratio(model_cfg: Any) -> str | None:
    if isinstance(model_cfg, dict):
        return model_cfg.get("image_aspect_ratio")
    return getattr(model_cfg, "image_aspect_ratio", None)


def process_images(images: Sequence[Image.Image], image_processor, model_cfg) -> torch.Tensor:
    """Preprocess PIL images into a ``[N, 3, H, W]`` float tensor (docs/Method.md#image-preprocessing).

    Every image is converted to RGB. With ``model_cfg.image_aspect_ratio == "pad"`` (attribute or
    dict key) each is first padded to a square with the processor's mean colour
    (``int(255 * mean)``, (122, 116, 104) for CLIP); any other value uses the processor alone
    (which resizes the short side and centre-crops). Refuses (ValueError) an empty list and, before
    allocating anything, an image whose padded square has more than
    :func:`stllava.data.images.max_image_pixels` pixels (``pad``) or that is thinner than
    :func:`stllava.data.images.max_image_aspect` (50:1; any other aspect ratio setting).
    """
    if len(images) == 0:
        raise ValueError("process_images: no images given")
    pad = _aspect_ratio(model_cfg) == "pad"
    for i, im in enumerate(images):
        # Padding makes a w x h image max(w, h)² pixels, the processor's shortest-edge resize
        # multiplies a thin image's pixels by its aspect ratio: the loaders refuse such images from
        # their headers, and this refuses what its own step would allocate, whatever path an image
        # took here (docs/BadInputs.md).
        try:
            (check_padded if pad else check_aspect)(im.width, im.height)
        except ImageTooLarge as e:
            raise ValueError(f"process_images: image {i}: {e.kind} ({e})") from None
    # convert() copies even an RGB image; nothing below writes to the images.
    images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
    if pad:
        background = tuple(int(x * 255) for x in image_processor.image_mean)
        images = [expand2square(im, background) for im in images]
        target = _pil_resize_target(image_processor)
        if target is not None:
            # The PIL processor turns each full-size image into a numpy array and back into a PIL
            # image before its PIL resize: two copies of a multi-megabyte image, a third of the
            # preprocessing time (12.1 -> 8.0 ms per embedded VQA-RAD image at 336 px). Resizing
            # the PIL image here the same way gives the same pixels (checked against the processor
            # alone in tests/test_mm_utils.py); the processor then crops, rescales and normalizes.
            images = [im.resize(target, resample=image_processor.resample) for im in images]
            return image_processor(images, do_resize=False, return_tensors="pt")["pixel_values"]
    return image_processor(images, return_tensors="pt")["pixel_values"]


def decode_size(image_processor, model_cfg) -> DecodeSize | None:
    """The smallest decoded image :func:`process_images` needs with ``image_processor`` and
    ``model_cfg.image_aspect_ratio`` (attribute or dict key): the processor's resize size (its
    ``shortest_edge``, else the larger of ``height``/``width``; the crop size when larger), to be
    kept by the padded square's side, i.e. the image's longer side (``pad``), else by its shorter
    side. JPEG loaders decode at the reduction this allows (:func:`stllava.data.images.draft_scale`);
    training and inference both call this, so both decode alike. None (decode at full size) when
    there is no processor or its size cannot be read."""
    if image_processor is None:
        return None

    def get(obj, key):  # a dict (transformers 4) or a SizeDict (transformers 5)
        if obj is None:
            return None
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    size, crop = getattr(image_processor, "size", None), getattr(image_processor, "crop_size", None)
    side = get(size, "shortest_edge") or max(get(size, "height") or 0, get(size, "width") or 0)
    side = max(side or 0, get(crop, "height") or 0, get(crop, "width") or 0)
    if not isinstance(side, int) or side < 1:
        return None
    return DecodeSize(side, padded=_aspect_ratio(model_cfg) == "pad")


def _pil_resize_target(image_processor) -> tuple[int, int] | None:
    """``(width, height)`` that ``image_processor`` resizes a *square* image to, when it is
    transformers' PIL backend resizing with PIL exactly as :meth:`PilBackend.resize` does; None for
    any other processor (torchvision backend, a subclass with its own resize or preprocessing,
    a size rule this does not mirror), which then does all the work itself."""
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # another transformers layout: let the processor resize
        return None
    cls = type(image_processor)
    if (not isinstance(image_processor, PilBackend) or cls.resize is not PilBackend.resize
            or cls._preprocess is not PilBackend._preprocess or not image_processor.do_resize
            or not isinstance(image_processor.resample, int)):
        return None
    size = image_processor.size
    if not all(hasattr(size, k) for k in ("shortest_edge", "longest_edge", "max_height", "height")):
        return None
    if size.shortest_edge:  # a square's short side is its only side
        return None if size.longest_edge else (size.shortest_edge, size.shortest_edge)
    if size.height and size.width and not (size.max_height and size.max_width):
        return size.width, size.height
    return None


def get_model_name_from_path(model_path: str) -> str:
    """LLaVA's rule: the last path component, or ``parent_last`` when the last is ``checkpoint-*``."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]

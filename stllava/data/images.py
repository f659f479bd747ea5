"""Image files of a dataset: where they are, whether they can be read, and loading them.

A record's ``image`` is a path relative to ``--image_folder`` (or absolute). :func:`check_image`
says what is wrong with a file without raising (missing, empty, not an image, truncated);
:func:`load_image` returns it as an RGB PIL image or raises :class:`ImageLoadError` naming the file,
the record and the fix. Preprocessing (``pad`` aspect ratio, CLIP processor) is
:func:`stllava.mm_utils.process_images`, shared with generation and evaluation.
"""
from __future__ import annotations

import os

import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from stllava.errors import StllavaError

# Kinds of image problems, in report order.
MISSING, EMPTY, UNREADABLE, TRUNCATED = "missing image", "empty image file", "unreadable image", "truncated image"
IMAGE_PROBLEMS = (MISSING, EMPTY, UNREADABLE, TRUNCATED)


class ImageLoadError(StllavaError, RuntimeError):
    """An image could not be loaded at training time. ``kind`` is one of :data:`IMAGE_PROBLEMS`."""

    def __init__(self, kind: str, path: str, detail: str = "", record: str = ""):
        self.kind, self.path, self.detail, self.record = kind, path, detail, record
        where = f"{record}: " if record else ""
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"{where}{kind}: {path}{extra}. Check the dataset with `python -m stllava.data.verify "
            f"--data_path ... --image_folder ...` and fix or drop the record, or train with "
            f"--on_bad_sample skip")


def image_path(image_folder: str | None, image: str) -> str:
    """Return the file of a record's ``image`` field: ``image_folder/image`` (or ``image`` when it is
    absolute or no folder is given). Refuses a non-string field (TypeError)."""
    if not isinstance(image, str) or not image:
        raise TypeError(f"a record's 'image' must be a non-empty string (a file name), got {image!r}")
    if image_folder and not os.path.isabs(image):
        return os.path.join(image_folder, image)
    return image


def _open_fully(path: str) -> Image.Image:
    """Open and decode ``path`` completely (a truncated file fails here, not at first use)."""
    # Decoding a truncated JPEG must fail; another library may have set this flag process-wide.
    prev, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = prev


def _classify(path: str) -> tuple[str, str] | None:
    """Return ``(kind, detail)`` of what is wrong with ``path``, or None when it decodes."""
    if not os.path.isfile(path):
        return MISSING, "no such file"
    if os.path.getsize(path) == 0:
        return EMPTY, "0 bytes"
    try:
        im = _open_fully(path)
    except UnidentifiedImageError as e:
        return UNREADABLE, f"not an image PIL can identify: {e}"
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises OSError for cut-short data
        msg = str(e)
        # PIL: "image file is truncated (...)" (PNG), "Truncated File Read" (JPEG).
        if any(w in msg.lower() for w in ("truncat", "premature end", "broken data stream")):
            return TRUNCATED, msg
        return UNREADABLE, msg
    if im.width == 0 or im.height == 0:
        return EMPTY, f"size {im.width}x{im.height}"
    return None


def check_image(path: str) -> tuple[str, str] | None:
    """Return None when ``path`` is a decodable image, else ``(kind, detail)`` with ``kind`` one of
    :data:`IMAGE_PROBLEMS`. Never raises for a bad file (decodes the whole image to find truncation)."""
    return _classify(path)


def load_image(path: str, record: str = "") -> Image.Image:
    """Return the image at ``path`` as RGB; raises :class:`ImageLoadError` (naming ``record``)
    when it is missing, empty, unreadable or truncated — never returns a partial image."""
    problem = None
    try:
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            return _open_fully(path)
    except (OSError, SyntaxError, ValueError):
        pass
    problem = _classify(path) or (UNREADABLE, "could not be decoded")
    raise ImageLoadError(problem[0], path, problem[1], record)


def blank_image(image_processor) -> torch.Tensor:
    """A zero image of the processor's crop size, [3, H, W]: the placeholder LLaVA gives text-only
    samples of a multimodal batch (the model keeps it in the graph with weight 0)."""
    def get(obj, key):  # a dict (transformers 4) or a SizeDict (transformers 5)
        if obj is None:
            return None
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    crop, size = getattr(image_processor, "crop_size", None), getattr(image_processor, "size", None)
    h, w = get(crop, "height"), get(crop, "width")
    if not h or not w:
        h = w = get(size, "shortest_edge") or get(size, "height")
    if not h or not w:
        raise ValueError(f"cannot tell the output size of image processor {type(image_processor).__name__}")
    return torch.zeros(3, int(h), int(w))

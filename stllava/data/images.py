"""Image files of a dataset: where they are, whether they can be read, and loading them.

A record's ``image`` is a path relative to ``--image_folder`` (or absolute, inside it). :func:`image_path`
joins the two and refuses a path that leaves the folder; :func:`check_image`
says what is wrong with a file without raising (missing, empty, not an image, truncated, too
large, too thin); :func:`load_image` returns it as an RGB PIL image or raises :class:`ImageLoadError` naming
the file, the record and the fix. Every tool that reads image files goes through here (training,
``data.verify``, the generating tools, the judge, the chat CLI), so they agree on what a bad image is:

* **Outside the folder.** A record's path that resolves outside ``--image_folder`` (``../``, an
  absolute path elsewhere, a link pointing out) is refused (:data:`OUTSIDE_FOLDER`): records are
  untrusted (a model wrote them, or they were downloaded), and the judge uploads the images it
  reads to a third-party API.
* **Too large.** An image of more than :func:`max_image_pixels` pixels (default PIL's own limit,
  89,478,485 = 1024·1024·1024/4/3; set ``STLLAVA_MAX_IMAGE_PIXELS`` to change it — the one
  size setting) is refused from its header, before decoding: a 57 KB PNG can claim 15000x15000 pixels
  and take gigabytes to decode (PIL calls it a decompression bomb). The limit bounds what
  preprocessing allocates, not only the file: an image whose square padding (the ``pad`` aspect
  ratio pads to a square of side max(w, h)) would exceed it is refused too.
* **Too thin.** An image whose aspect ratio exceeds :data:`MAX_ASPECT_RATIO` (50:1; set
  ``STLLAVA_MAX_IMAGE_ASPECT`` to change it) is refused from its header (:data:`EXTREME_ASPECT`):
  a 1 x 40000 PNG is a few hundred bytes and 40,000 pixels, but padding makes it 40000 x 40000
  (4.8 GB) and the processor's shortest-edge resize 336 x 13,440,000. Preprocessing
  (:func:`stllava.mm_utils.process_images`) also refuses, however an image got there, what its
  own steps would blow up: a padded square over the pixel limit, or (without padding) an aspect
  ratio over the limit.
* **JPEGs are decoded at reduced size** when the caller says what preprocessing needs
  (:class:`DecodeSize`, from :func:`stllava.mm_utils.decode_size`): PIL's ``Image.draft`` makes
  the JPEG decoder itself scale by 1/2, 1/4 or 1/8, and :func:`draft_scale` picks the largest
  reduction that keeps the image at least as large as preprocessing's output (for the ``pad``
  aspect ratio the longer side ≥ the CLIP size, 336). Training (``stllava.data.lazy``), the
  generating tools, the chat CLI and the API server all pass the same size, so they see the same
  pixels (docs/Differences.md#jpeg-draft). The size checks above run on the header first.
  ``STLLAVA_JPEG_DRAFT=0`` decodes every JPEG at full size everywhere.
* **16-bit images** (PIL modes ``I;16*`` and ``I``) are scaled to 8 bits (value / 257, rounded)
  before becoming RGB; PIL's ``convert("RGB")`` clips them instead, which turns an ordinary
  16-bit radiograph almost white. :func:`mode_note` names such unusual modes for ``data.verify``.

Preprocessing (``pad`` aspect ratio, CLIP processor) is :func:`stllava.mm_utils.process_images`,
shared with generation and evaluation.
"""
from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from PIL import Image, ImageFile, UnidentifiedImageError

from stllava.errors import StllavaError

if TYPE_CHECKING:
    import torch

# Kinds of image problems, in report order.
MISSING, EMPTY, UNREADABLE, TRUNCATED = "missing image", "empty image file", "unreadable image", "truncated image"
TOO_LARGE = "image too large"
EXTREME_ASPECT = "extreme aspect ratio"
OUTSIDE_FOLDER = "image outside the image folder"
IMAGE_PROBLEMS = (MISSING, EMPTY, UNREADABLE, TRUNCATED, TOO_LARGE, EXTREME_ASPECT, OUTSIDE_FOLDER)

MAX_PIXELS_ENV = "STLLAVA_MAX_IMAGE_PIXELS"
JPEG_DRAFT_ENV = "STLLAVA_JPEG_DRAFT"  # "0" (or false/no/off): decode JPEGs at full size
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS default (1024 * 1024 * 1024 // 4 // 3)
MAX_ASPECT_ENV = "STLLAVA_MAX_IMAGE_ASPECT"
# Width:height (or height:width) above which an image is refused. Medical images are rarely beyond
# 3:1; 50:1 leaves room for strips and panoramas while keeping padding's blow-up (x ratio) bounded.
MAX_ASPECT_RATIO = 50
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Modes convert("RGB") handles faithfully; any other is named by data.verify.
USUAL_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX")


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


class ImageSettingError(StllavaError):
    """``STLLAVA_MAX_IMAGE_PIXELS`` is not a positive integer, or ``STLLAVA_MAX_IMAGE_ASPECT`` not a
    number ≥ 1. (Not a ValueError, so the image checks, which turn PIL's ValueErrors into
    "unreadable image", let it through.)"""


class ImageTooLarge(Exception):
    """The header announces an image preprocessing would blow up: more pixels than
    :func:`max_image_pixels` itself or once padded to a square (``kind`` :data:`TOO_LARGE`), or an
    aspect ratio over :func:`max_image_aspect` (``kind`` :data:`EXTREME_ASPECT`); the message says
    the size and the setting. Raised by :func:`check_dimensions` and :func:`open_image`."""

    def __init__(self, detail: str, kind: str = TOO_LARGE):
        self.kind = kind
        super().__init__(detail)


def image_path(image_folder: str | None, image: str, record: str = "") -> str:
    """Return the file of a record's ``image`` field: ``image_folder/image`` (``image`` itself when it
    is absolute or no folder is given). With a folder, the path must resolve (``..`` and links
    followed) inside the folder: refuses (:class:`ImageLoadError` of kind :data:`OUTSIDE_FOLDER`,
    naming ``record``) one that does not. Refuses a non-string field (TypeError).

    This is the one place where a record's path meets a folder: every tool that reads a record's
    image calls it (training, ``data.verify``, the generating tools, the judge)."""
    if not isinstance(image, str) or not image:
        raise TypeError(f"a record's 'image' must be a non-empty string (a file name), got {image!r}")
    if not image_folder:
        return image
    path = os.path.join(image_folder, image)  # ``image`` itself when absolute
    root, real = os.path.realpath(image_folder), os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise ImageLoadError(OUTSIDE_FOLDER, image, f"resolves to {real}, outside {image_folder}; give a path "
                             "inside the image folder (no '..', absolute path or link leading out of it)", record)
    return path


def max_image_pixels() -> int:
    """The largest image (width x height) any stllava tool decodes: ``$STLLAVA_MAX_IMAGE_PIXELS``,
    else :data:`DEFAULT_MAX_PIXELS`. A larger setting also raises PIL's own ``Image.MAX_IMAGE_PIXELS``
    (process-wide), so PIL does not refuse it first. Refuses (:class:`ImageSettingError`) a value
    that is not a positive integer."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not raw:
        limit = DEFAULT_MAX_PIXELS
    elif raw.isdigit() and int(raw) > 0:
        limit = int(raw)
    else:
        raise ImageSettingError(f"${MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r} is not a positive integer; "
                                "fix: set it to the largest width x height to accept, e.g. 200000000, or unset it")
    # PIL refuses above twice its own limit inside Image.open, before our check: raise its limit with
    # ours (never lower it: a lower limit is enforced by check_size, other code keeps PIL's default).
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit
    return limit


def max_image_aspect() -> float:
    """The largest aspect ratio (long side / short side) any stllava tool preprocesses:
    ``$STLLAVA_MAX_IMAGE_ASPECT``, else :data:`MAX_ASPECT_RATIO`. Refuses (:class:`ImageSettingError`)
    a value that is not a number ≥ 1."""
    raw = os.environ.get(MAX_ASPECT_ENV, "").strip()
    if not raw:
        return float(MAX_ASPECT_RATIO)
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 1 or value == float("inf"):
        raise ImageSettingError(f"${MAX_ASPECT_ENV}={os.environ[MAX_ASPECT_ENV]!r} is not a number ≥ 1; fix: set it "
                                f"to the largest long side / short side to accept, e.g. 100, or unset it "
                                f"(default {MAX_ASPECT_RATIO})")
    return value


# Images over the limit are refused below with a clear message; PIL's warning about them is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def too_large_detail(width: int, height: int, limit: int) -> str:
    """How :data:`TOO_LARGE` is explained: the size, the limit and the setting that changes it."""
    return (f"{width}x{height} = {width * height:,} pixels, over the limit of {limit:,}; "
            f"set {MAX_PIXELS_ENV} to accept larger images")


def _number(x: float) -> str:
    return f"{x:,.0f}" if x == round(x) else f"{x:,.2f}"


def check_aspect(width: int, height: int) -> None:
    """Raise ``ImageTooLarge`` (kind :data:`EXTREME_ASPECT`) when ``width`` x ``height`` is thinner
    than :func:`max_image_aspect` allows. An empty (0-sided) image passes: it is reported as empty."""
    short, long = sorted((width, height))
    limit = max_image_aspect()
    if short > 0 and long > short * limit:
        raise ImageTooLarge(f"{width}x{height} = aspect ratio {_number(long / short)}:1, over the limit of "
                            f"{_number(limit)}:1 "
                            f"(padded to a square it would be {long * long:,} pixels); set {MAX_ASPECT_ENV} to "
                            "accept thinner images", EXTREME_ASPECT)


def check_dimensions(width: int, height: int, limit: int | None = None) -> None:
    """Raise ``ImageTooLarge`` when preprocessing a ``width`` x ``height`` image would allocate more
    than ``limit`` pixels (default :func:`max_image_pixels`): the image itself, or the square of side
    max(w, h) the ``pad`` aspect ratio makes of it (kind :data:`TOO_LARGE`); or when it is thinner
    than :func:`max_image_aspect` (kind :data:`EXTREME_ASPECT`). The one check of an image's size,
    used by every loader and by the API server (with its own ``limit``)."""
    limit = max_image_pixels() if limit is None else limit
    if width * height > limit:
        raise ImageTooLarge(too_large_detail(width, height, limit))
    check_aspect(width, height)
    check_padded(width, height, limit)


def check_padded(width: int, height: int, limit: int | None = None) -> None:
    """Raise ``ImageTooLarge`` (kind :data:`TOO_LARGE`) when the square of side max(w, h) that the
    ``pad`` aspect ratio makes of a ``width`` x ``height`` image has more than ``limit`` pixels
    (default :func:`max_image_pixels`)."""
    limit = max_image_pixels() if limit is None else limit
    side = max(width, height)
    if side * side > limit:
        raise ImageTooLarge(f"{width}x{height} pads to a {side}x{side} square = {side * side:,} pixels, over the limit "
                            f"of {limit:,}; set {MAX_PIXELS_ENV} to accept larger images")


def check_size(im: Image.Image, limit: int | None = None) -> None:
    """:func:`check_dimensions` of ``im`` (opened, not yet decoded)."""
    check_dimensions(im.width, im.height, limit)


def mode_note(mode: str) -> str | None:
    """A note on PIL image mode ``mode`` when it is unusual (not in :data:`USUAL_MODES`): what
    :func:`to_rgb` does with it. None for the usual modes."""
    if mode in USUAL_MODES:
        return None
    if mode in SIXTEEN_BIT_MODES:
        return f"mode {mode} (16-bit): scaled to 8 bits (value / 257) before RGB"
    return f"mode {mode}: converted with PIL's convert('RGB'); check that the image looks right"


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as an 8-bit RGB image. 16-bit modes (:data:`SIXTEEN_BIT_MODES`) are scaled to 8 bits
    (value / 257, rounded; ``I`` values clipped to 0..65535) instead of PIL's clipping; every
    other mode is ``im.convert("RGB")`` (the same bits as before for RGB, L, P, ...)."""
    if im.mode not in SIXTEEN_BIT_MODES:
        return im.convert("RGB")
    import numpy as np

    arr = np.asarray(im, dtype=np.float64)
    arr = np.rint(np.clip(arr, 0, 65535) / 257.0).astype(np.uint8)
    return Image.fromarray(arr, mode="L").convert("RGB")


def open_checked(src: str | IO[bytes]) -> Image.Image:
    """``Image.open(src)`` (header read, nothing decoded yet) after checking its size: raises
    :class:`ImageTooLarge` for an image over :func:`max_image_pixels` (itself or padded to a square)
    or over :func:`max_image_aspect`, and PIL's errors
    (UnidentifiedImageError, OSError, ...) for anything it cannot open. Close the result."""
    limit = max_image_pixels()
    try:
        im = Image.open(src)
    except Image.DecompressionBombError as e:  # over twice the limit: PIL refuses in open()
        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(m.group(1)):,} pixels" if m else str(e)
        raise ImageTooLarge(f"{size}, over the limit of {limit:,}; set {MAX_PIXELS_ENV} to accept larger "
                            "images") from None
    try:
        check_size(im, limit)
    except ImageTooLarge:
        im.close()
        raise
    return im


@dataclass(frozen=True)
class DecodeSize:
    """The smallest decoded image preprocessing needs: with ``padded`` (the ``pad`` aspect ratio,
    which pads to a square before resizing) the LONGER side must stay ≥ ``side``; without, the
    SHORTER one (the processor resizes the shortest edge). Made by :func:`stllava.mm_utils.decode_size`."""

    side: int
    padded: bool = True


def jpeg_draft_enabled() -> bool:
    """False when ``$STLLAVA_JPEG_DRAFT`` is ``0``, ``false``, ``no`` or ``off``: every JPEG is then
    decoded at full size. Read at each load, so one setting covers training and inference."""
    return os.environ.get(JPEG_DRAFT_ENV, "").strip().lower() not in ("0", "false", "no", "off")


def draft_scale(width: int, height: int, need: DecodeSize) -> int:
    """The largest JPEG decoder reduction (8, 4, 2, else 1) after which a ``width`` x ``height``
    image still meets ``need``: PIL's reduced size is ceil(w / s) x ceil(h / s), and the longer
    (``need.padded``) or shorter side of it must stay ≥ ``need.side``. Never reduces a side below
    1 pixel (the shorter side must be ≥ s)."""
    long, short = max(width, height), min(width, height)
    governing = long if need.padded else short
    for s in (8, 4, 2):
        if short >= s and -(-governing // s) >= need.side:
            return s
    return 1


def apply_draft(im: Image.Image, need: DecodeSize | None) -> int:
    """Ask the JPEG decoder of ``im`` (opened, not yet decoded) for the reduction
    :func:`draft_scale` allows; returns the scale applied (1: none). Only JPEGs (PIL's ``draft``
    does nothing for other formats), only with ``need`` and only while :func:`jpeg_draft_enabled`."""
    if need is None or im.format != "JPEG" or not jpeg_draft_enabled():
        return 1
    s = draft_scale(im.width, im.height, need)
    if s > 1:
        # PIL picks the largest of 8, 4, 2, 1 not above min(w // rw, h // rh): asking for
        # (w // s, h // s) gives exactly s (w // (w // s) is in [s, 2s)).
        im.draft(im.mode, (im.width // s, im.height // s))
    return s


def open_image(src: str | IO[bytes], need: DecodeSize | None = None) -> tuple[Image.Image, str]:
    """Decode ``src`` (a path or a binary file object) completely; returns ``(RGB image, original
    mode)``. A JPEG is decoded at the reduced size ``need`` allows (:func:`apply_draft`; full size
    when ``need`` is None). Raises :class:`ImageTooLarge` before decoding an image
    :func:`check_dimensions` refuses (from its full header size), and PIL's errors
    (UnidentifiedImageError, OSError, ...) for anything else it cannot decode."""
    # Decoding a truncated JPEG must fail; another library may have set this flag process-wide.
    prev, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with open_checked(src) as im:
            apply_draft(im, need)
            im.load()
            return to_rgb(im), im.mode
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = prev


def _classify(path: str) -> tuple[str, str] | None:
    """Return ``(kind, detail)`` of what is wrong with ``path``, or None when it decodes."""
    if not os.path.isfile(path):
        return MISSING, "no such file"
    if os.path.getsize(path) == 0:
        return EMPTY, "0 bytes"
    try:
        im, _ = open_image(path)
    except ImageTooLarge as e:
        return e.kind, str(e)
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
    :data:`IMAGE_PROBLEMS`. Never raises for a bad file (decodes the whole image to find truncation;
    an image :func:`check_dimensions` refuses is reported from its header, never decoded)."""
    return _classify(path)


def image_mode(path: str) -> str | None:
    """The PIL mode of the image at ``path`` read from its header (no decoding), or None when it
    cannot be opened (:func:`check_image` says why)."""
    try:
        with Image.open(path) as im:
            return im.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def load_image(path: str, record: str = "", need: DecodeSize | None = None) -> Image.Image:
    """Return the image at ``path`` as RGB (:func:`to_rgb`), a JPEG decoded at the reduced size
    ``need`` allows (:func:`open_image`); raises :class:`ImageLoadError` (naming ``record``) when it
    is missing, empty, unreadable, truncated, too large or too thin — never returns a partial image."""
    try:
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            return open_image(path, need)[0]
    except (OSError, SyntaxError, ValueError, ImageTooLarge):
        pass
    problem = _classify(path) or (UNREADABLE, "could not be decoded")
    raise ImageLoadError(problem[0], path, problem[1], record)


def blank_image(image_processor) -> torch.Tensor:
    """A zero image of the processor's crop size, [3, H, W]: the placeholder LLaVA gives text-only
    samples of a multimodal batch (the model keeps it in the graph with weight 0)."""
    import torch  # here: the image checks above are used by tools that need no torch

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


# Image formats an OpenAI-compatible API takes as they are (others are sent as PNG).
API_IMAGE_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}


def encode_image(data: bytes) -> tuple[str, bytes]:
    """(MIME type, bytes to send) for image file bytes, the type read from the bytes by PIL.

    JPEG/PNG/GIF/WEBP are sent unchanged; other formats PIL reads are re-encoded as PNG.
    Refuses (ValueError, its message naming no Python internals) bytes that are not a readable
    image, and an image every stllava tool refuses (:func:`stllava.data.images.check_dimensions`:
    over the pixel limit, itself or padded to a square, or thinner than the aspect-ratio limit).
    """
    try:
        with open_checked(io.BytesIO(data)) as img:
            fmt = img.format
            img.verify()
        if fmt in API_IMAGE_FORMATS:
            return API_IMAGE_FORMATS[fmt], data
        with Image.open(io.BytesIO(data)) as img:
            buf = io.BytesIO()
            img.convert("RGBA" if "A" in img.getbands() else "RGB").save(buf, format="PNG")
        return "image/png", buf.getvalue()
    except ImageTooLarge as e:
        raise ValueError(f"{e.kind}: {e}") from None
    except UnidentifiedImageError:  # its message is the repr of our BytesIO
        raise ValueError("not a readable image (not an image format PIL can identify)") from None
    except (OSError, SyntaxError, ValueError) as e:
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the image", str(e)) or type(e).__name__
        raise ValueError(f"not a readable image ({detail})") from None

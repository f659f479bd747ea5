"""Chat messages → the model's prompt and images, refusing what the model cannot take (HTTP 400).

The prompt is rendered exactly as ``stllava.eval.model_vqa`` renders a question: the user turn that
holds the image becomes ``"<image>\\n" + text`` (:func:`stllava.generation.image_prompt_text`), the
conversation goes through the checkpoint's template with the assistant slot open
(:func:`stllava.generation.render_prompt`), so a greedy answer equals ``model_vqa``'s. Message
text is plain text: control strings typed in it (``</s>``, ``<image>``, ...) are neutralized
(:mod:`stllava.control_text`), and text too long for any prompt is refused before it is tokenized.

Images come as base64 ``data:`` URLs (http(s) URLs only with ``allow_remote``). They are decoded
here, before the request is queued, against byte and pixel limits (a decompression bomb is refused
from its header, before its pixels are allocated) and a list of formats PIL decodes itself.
No error message repeats URL contents: they may hold image bytes.
"""
from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from stllava.constants import DEFAULT_IMAGE_TOKEN
from stllava.control_text import neutralize
from stllava.conversation import get_conv_template
from stllava.data.images import DecodeSize, ImageTooLarge, apply_draft, check_dimensions, to_rgb
from stllava.generation import image_prompt_text, render_prompt
from stllava.serve.protocol import APIError, Message, TextPart

# Formats decoded in-process by PIL; others (e.g. EPS, which runs Ghostscript) are refused.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass(frozen=True)
class ImageLimits:
    """What an image may be: ``max_bytes`` encoded, ``max_pixels`` decoded, ``max_images`` per
    conversation (LLaVA-style templates hold one ``<image>``), http(s) URLs only when
    ``allow_remote`` (fetched with ``remote_timeout`` seconds). ``decode``: the reduced size JPEGs
    are decoded at, as training decodes them (:func:`stllava.mm_utils.decode_size`; None: full size)."""

    max_bytes: int = 20 * 2 ** 20
    max_pixels: int = 40_000_000
    max_images: int = 1
    allow_remote: bool = False
    remote_timeout: float = 10.0
    decode: DecodeSize | None = None


def _fetch(url: str, limits: ImageLimits, where: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_timeout) as r:  # noqa: S310 (opted in)
            data = r.read(limits.max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise APIError(400, f"{where}: fetching the image URL failed with HTTP {e.code}", param=where) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise APIError(400, f"{where}: fetching the image URL failed ({reason})", param=where) from None
    if len(data) > limits.max_bytes:
        raise APIError(400, f"{where}: image is larger than {limits.max_bytes} bytes", param=where)
    return data


def image_bytes(url: str, limits: ImageLimits, where: str) -> bytes:
    """The encoded image of an ``image_url``; APIError 400 for another scheme, bad base64, too many
    bytes, or an http(s) URL without ``limits.allow_remote``."""
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote:
            raise APIError(400, f"{where}: http(s) image URLs are refused by this server (it was started "
                           "without --allow-remote-images); send the image as a base64 data URL", param=where)
        return _fetch(url, limits, where)
    head, sep, data = url.partition(",")
    if not (url.startswith("data:") and head.endswith(";base64") and sep):
        raise APIError(400, f"{where}: image_url must be a base64 data URL ('data:image/png;base64,...')",
                       param=where)
    if len(data) * 3 // 4 > limits.max_bytes + 2:  # refuse before decoding
        raise APIError(400, f"{where}: image is larger than {limits.max_bytes} bytes", param=where)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: image data URL is not valid base64", param=where) from None
    if len(raw) > limits.max_bytes:
        raise APIError(400, f"{where}: image is larger than {limits.max_bytes} bytes", param=where)
    return raw


def decode_image(raw: bytes, limits: ImageLimits, where: str) -> Image.Image:
    """``raw`` decoded completely as an RGB image; APIError 400 when it is not an image of
    :data:`IMAGE_FORMATS`, is truncated or corrupt, or has more than ``limits.max_pixels`` pixels
    (checked from the header, before decoding)."""
    try:
        im = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise APIError(400, f"{where}: image has more than {limits.max_pixels} pixels", param=where) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise APIError(400, f"{where}: image does not decode (supported formats: {', '.join(IMAGE_FORMATS)})",
                       param=where) from None
    with im:
        w, h = im.size
        if w * h > limits.max_pixels:
            raise APIError(400, f"{where}: image is {w}x{h} pixels, more than the limit of {limits.max_pixels}",
                           param=where)
        try:  # what preprocessing allocates: the padded square, a thin image (every image reader's check)
            check_dimensions(w, h, limits.max_pixels)
        except ImageTooLarge as e:
            raise APIError(400, f"{where}: {e.kind} ({e})", param=where) from None
        if w == 0 or h == 0:
            raise APIError(400, f"{where}: image is empty ({w}x{h})", param=where)
        try:
            apply_draft(im, limits.decode)
            im.load()
            return to_rgb(im)  # 16-bit images scaled to 8 bits, as every stllava tool does
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            kind = "truncated" if "truncat" in str(e).lower() else "corrupt"
            raise APIError(400, f"{where}: image does not decode ({kind} data)", param=where) from None


@dataclass
class ChatPrompt:
    """A rendered prompt and its images (one per ``<image>`` in the prompt, in order)."""

    prompt: str
    images: list[Image.Image]


def check_length(messages: list[Message], max_chars: int | None) -> None:
    """Refuse (APIError 400, ``context_length_exceeded``, naming the message that crosses it) a
    conversation whose text is longer than ``max_chars`` characters in all: such a prompt cannot
    fit the context, and tokenizing megabytes of it first would take seconds."""
    if max_chars is None:
        return
    total = 0
    for i, m in enumerate(messages):
        total += len(m.content) if isinstance(m.content, str) else sum(
            len(p.text) for p in m.content or [] if isinstance(p, TextPart))
        if total > max_chars:
            where = f"messages[{i}].content"
            raise APIError(400, f"{where}: the conversation's text reaches {total:,} characters here, more than "
                           f"the model's context can hold ({max_chars:,} characters); shorten the conversation",
                           param=where, code="context_length_exceeded")


def build_prompt(messages: list[Message], conv_mode: str, limits: ImageLimits,
                 controls: Sequence[str] = (DEFAULT_IMAGE_TOKEN,), max_chars: int | None = None) -> ChatPrompt:
    """Render ``messages`` with template ``conv_mode`` and decode their images.

    An optional first ``system`` (or ``developer``) message replaces the template's system text;
    then user and assistant turns alternate, starting and ending with a user turn. Images may be
    in user turns only, at most ``limits.max_images`` in all. Every message's text is plain text:
    a ``controls`` string typed in it (``<image>``, and the tokenizer's ``</s>``, ``<s>``, ...;
    :func:`stllava.control_text.control_strings`) is neutralized, so only real images become image
    slots and only the template's separators become ``</s>``. APIError 400 otherwise, and for more
    than ``max_chars`` characters of text (checked first, see :func:`check_length`).
    """
    check_length(messages, max_chars)
    system = None
    if messages[0].role in ("system", "developer"):
        if messages[0].image_urls():  # the template has no place for it: refused, never dropped
            raise APIError(400, "messages[0]: images are only accepted in user messages, not in a "
                           f"{messages[0].role} message", param="messages[0]")
        system, messages = neutralize(messages[0].text(), controls), messages[1:]
    turns: list[tuple[int, str]] = []
    images: list[Image.Image] = []
    for i, m in enumerate(messages):
        where = f"messages[{i + (system is not None)}]"
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            raise APIError(400, f"{where}: expected {'a' if want == 'user' else 'an'} {want} message (after an "
                           "optional system message, user "
                           f"and assistant turns alternate, starting with user), got {m.role}", param=where)
        urls = m.image_urls()
        if urls and m.role != "user":
            raise APIError(400, f"{where}: images are only accepted in user messages", param=where)
        if len(images) + len(urls) > limits.max_images:
            raise APIError(400, f"{where}: more images than this model takes ({limits.max_images} per "
                           "conversation: its template has one <image> slot)", param=where)
        for url in urls:
            images.append(decode_image(image_bytes(url, limits, f"{where}.content"), limits, f"{where}.content"))
        text = neutralize(m.text(), controls)
        if not (text.strip() or urls):  # an empty turn would render as an open generation slot
            raise APIError(400, f"{where}: {'an assistant' if m.role == 'assistant' else 'a user'} message needs "
                           "text content" + (" or an image" if m.role == "user" else ""), param=where)
        if len(urls) == 1:
            text = image_prompt_text(text)
        elif urls:
            text = (DEFAULT_IMAGE_TOKEN + "\n") * len(urls) + text.strip()
        turns.append((i % 2, text))
    if not turns or turns[-1][0] != 0:
        raise APIError(400, "the last message must be a user message (the turn to answer)", param="messages")
    turns.append((1, None))
    if system is None:
        return ChatPrompt(render_prompt(conv_mode, turns), images)
    conv = get_conv_template(conv_mode)
    conv.system = system
    for role, text in turns:
        conv.append_message(conv.roles[role], text)
    return ChatPrompt(conv.get_prompt(), images)

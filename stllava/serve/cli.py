"""Chat about one image in the terminal (docs/Checkpoints.md#chatting-with-any-of-them).

    python -m stllava.serve.cli --model-path CKPT [--model-base BASE] --image-file IMG \\
        [--conv-mode v1] [--temperature 0.2] [--max-new-tokens 512] [--device cpu|cuda|mps] \\
        [--load-8bit | --load-4bit] [--allow-url] [--debug]

Loads any checkpoint layout (``stllava.model.builder.load_pretrained_model``), then reads questions
from the terminal: the answer is printed token by token as it is generated; each question continues
the same conversation about the same image (the first carries ``<image>``). An empty line or EOF
(Ctrl-D) ends the chat. A question that would take the prompt past the model's context length
(the image counts as its patches) is refused with the numbers, and the conversation goes on
without it; an answer is never generated past the context. What is typed, and what the model
answered, is plain text in the prompt: a typed ``</s>`` or ``<image>`` is neither the end of a
turn nor a second image (:mod:`stllava.control_text`). ``--image-file`` is a local path,
decoded as every stllava tool does (:mod:`stllava.data.images`: 16-bit images scaled, images over
``$STLLAVA_MAX_IMAGE_PIXELS`` refused); an http(s) URL is fetched only with ``--allow-url``.
The template is ``--conv-mode``, else the ``conv_mode`` training recorded in the checkpoint's
config, else inferred (:func:`infer_conv_mode`); the chat's first line says which and why. A bad
image, template or checkpoint file (missing, not JSON, cut short, pickled code) is reported on one
line. Exit codes as every ``stllava`` command (:mod:`stllava.errors`).
"""
from __future__ import annotations

import argparse
import functools
import io
import logging
import os
import sys
import threading

from PIL import Image

from stllava import logs
from stllava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from stllava.control_text import control_strings, neutralize
from stllava.conversation import SeparatorStyle, conv_templates, get_conv_template
from stllava.errors import EXIT_FAILED, StllavaError, run_cli
from stllava.mm_utils import decode_size, get_model_name_from_path, process_images, tokenizer_image_token
from stllava.tooling import checkpoint_conv_mode

logger = logging.getLogger("stllava.serve.cli")

# Projects whose released checkpoints were trained with the Vicuna v1 template (SQ-LLaVA, STLLaVA-Med).
V1_NAMES = ("stllava", "sqllava", "sq-llava", "sq_llava", "sophon", "med")


class ChatInputError(StllavaError, ValueError):
    """A chat that cannot start: the image or the template given is unusable."""


class PromptTooLongError(StllavaError, ValueError):
    """A question that would take the prompt past the context length; the chat goes on without it."""


def infer_conv_mode(model_path: str) -> tuple[str, str]:
    """``(template, why)``: the conversation template a checkpoint was trained with.

    The ``conv_mode`` training recorded in its ``config.json`` when present (refused with
    ChatInputError when no such template exists); else ``v1`` for our checkpoints (config
    ``model_type`` ``llava_llama``) and for released SQ-LLaVA / STLLaVA-Med ones (by name);
    otherwise LLaVA's name rule: ``llava_v1`` for ``llava*v1*`` names (LLaVA-1.5), ``plain`` for
    pretraining (projector-only) runs, else ``v1``.
    """
    cfg_file = os.path.join(model_path, "config.json")
    recorded = checkpoint_conv_mode(model_path)
    if recorded:
        if recorded not in conv_templates:
            raise ChatInputError(f"{cfg_file} records conv_mode {recorded!r}, which is not a template "
                                 f"({sorted(conv_templates)}); fix: pass --conv-mode")
        return recorded, f"recorded in {cfg_file}"
    mtype = None
    if os.path.isfile(cfg_file):
        from stllava.model.checkpoint_layouts import read_json

        mtype = read_json(cfg_file).get("model_type")  # not JSON: an error naming the file
    if mtype == "llava_llama":
        return "v1", "inferred: a stllava checkpoint that records no conv_mode"
    name = get_model_name_from_path(model_path).lower()
    if any(k in name for k in V1_NAMES):
        return "v1", "inferred from the checkpoint's name (SQ-LLaVA / STLLaVA-Med)"
    if "llava" in name and "v1" in name:
        return "llava_v1", "inferred from the checkpoint's name (LLaVA-1.5)"
    if "pretrain" in name or os.path.isfile(os.path.join(model_path, "mm_projector.bin")):
        return "plain", "inferred: a pretraining (projector-only) checkpoint"
    return "v1", "the default; nothing in the checkpoint names a template"


@functools.lru_cache(maxsize=1)
def _download(url: str) -> bytes:
    """The bytes at ``url``; kept, so the image checked before the model loads and the one decoded
    at the model's size (:func:`_chat`) are one download."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 (explicitly allowed by the user)
        return r.read()


def load_image(src: str, allow_url: bool = False, need=None) -> Image.Image:
    """The RGB image at local path ``src``, or at an http(s) URL when ``allow_url``, decoded as
    every stllava tool decodes images (:func:`stllava.data.images.open_image`; a JPEG at the
    reduced size ``need`` allows, see :func:`stllava.mm_utils.decode_size`).

    Raises ChatInputError for a URL without ``allow_url``, a download that fails, and a file
    that is missing, not an image, truncated or over the pixel limit (naming what is wrong).
    """
    from stllava.data.images import ImageLoadError, ImageTooLarge, open_image
    from stllava.data.images import load_image as load_file

    if src.startswith(("http://", "https://")):
        if not allow_url:
            raise ChatInputError(f"--image-file {src} is a URL; pass --allow-url to download it, or give a local file")
        import urllib.error

        try:
            return open_image(io.BytesIO(_download(src)), need)[0]
        except (urllib.error.URLError, OSError) as e:
            raise ChatInputError(f"--image-file {src}: cannot download or decode it ({e})") from None
        except ImageTooLarge as e:
            raise ChatInputError(f"--image-file {src}: {e.kind} ({e})") from None
    if not os.path.isfile(src):
        raise ChatInputError(f"--image-file {src} does not exist")
    try:
        return load_file(src, need=need)
    except ImageLoadError as e:  # its kind and detail, without training's advice
        raise ChatInputError(f"--image-file {src}: {e.kind} ({e.detail})") from None


def context_length(model) -> int:
    """The context length of ``model`` as the loader reports it: the ``tokenizer_model_max_length``
    training recorded, else ``max_sequence_length``, else 2048 (LLaVA's rule)."""
    cfg = model.config
    return int(getattr(cfg, "tokenizer_model_max_length", None) or getattr(cfg, "max_sequence_length", None) or 2048)


class ChatSession:
    """One conversation about one image; :meth:`ask` streams each answer to ``write``."""

    def __init__(self, model, tokenizer, image_processor, image: Image.Image, conv_mode: str = "v1",
                 temperature: float = 0.2, max_new_tokens: int = 512, debug: bool = False,
                 context_len: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.conv = get_conv_template(conv_mode, "--conv-mode")
        self.pixels = process_images([image], image_processor, model.config)
        self.temperature, self.max_new_tokens, self.debug = temperature, max_new_tokens, debug
        self.context_len = context_len or context_length(model)
        tower = model.get_model().get_vision_tower()
        self.image_positions = tower.num_patches if tower is not None else 1  # the projector keeps the count
        self.controls = control_strings(tokenizer)  # neutralized in questions and answers
        self.first = True

    @property
    def roles(self) -> tuple[str, ...]:
        return self.conv.roles

    def stop_str(self) -> str:
        """The text that ends an answer: ``</s>`` for the v1 templates (LLaVA's rule)."""
        c = self.conv
        return (c.sep2 if c.sep_style is SeparatorStyle.TWO else c.sep2 or c.sep) or ""

    def ask(self, text: str, write=None) -> str:
        """Append ``text`` as the user's turn, generate the answer (its pieces go to ``write`` as
        they come) and return it. Refuses (:class:`PromptTooLongError`, the conversation left as it
        was) a question that takes the prompt to the context length."""
        return self.answer(self.add_question(text), write)

    def add_question(self, text: str) -> tuple:
        """Append ``text`` as the user's turn and an open assistant slot; returns what
        :meth:`answer` needs. Refuses (:class:`PromptTooLongError`, nothing appended) a question
        that leaves no room in the context for an answer: the prompt's positions (text tokens
        plus the image's patches) are counted first. Control strings in ``text`` stay plain text."""
        text = neutralize(text, self.controls)
        self.conv.append_message(self.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + text if self.first else text)
        self.conv.append_message(self.roles[1], None)
        prompt = self.conv.get_prompt()
        device = self.model.get_input_embeddings().weight.device
        ids = tokenizer_image_token(prompt, self.tokenizer, return_tensors="pt")[None].to(device)
        n_images = int((ids == IMAGE_TOKEN_INDEX).sum())
        positions = ids.shape[1] + n_images * (self.image_positions - 1)
        if positions >= self.context_len:  # no room for one answer token: refuse, keep the chat as it was
            del self.conv.messages[-2:]
            raise PromptTooLongError(
                f"this question makes the prompt {positions} positions ({n_images * self.image_positions} of them "
                f"the image, {ids.shape[1] - n_images} text tokens of the conversation so far and the question), "
                f"over the model's context length of {self.context_len}; ask a shorter question, or start a new "
                "chat to drop the earlier turns")
        self.first = False
        return prompt, ids, positions

    def answer(self, question: tuple, write=None) -> str:
        """Generate the answer to the question :meth:`add_question` appended (pieces to ``write``
        as they come), store it in the conversation and return it. The answer stops at the
        context length at the latest."""
        from transformers import TextIteratorStreamer

        prompt, ids, positions = question
        room = self.context_len - positions  # an answer never runs past the context either
        device = ids.device
        pixels = self.pixels.to(device=device, dtype=self.model.dtype)
        stop = self.stop_str()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        sampling = self.temperature > 0
        if room < self.max_new_tokens:
            logger.warning("answer limited to %d new tokens: the prompt takes %d of the %d positions of the context",
                           room, positions, self.context_len)
        kwargs = dict(images=pixels, max_new_tokens=min(self.max_new_tokens, room), do_sample=sampling,
                      streamer=streamer,
                      use_cache=True, pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=self.tokenizer.eos_token_id)
        if stop and stop != self.tokenizer.eos_token:  # e.g. "\n" of `plain`; "</s>" is the EOS token itself
            kwargs.update(stop_strings=[stop], tokenizer=self.tokenizer)
        if sampling:
            kwargs["temperature"] = self.temperature
        errors: list[BaseException] = []

        def run():
            try:
                self.model.generate(ids, **kwargs)
            except BaseException as e:  # surfaced in the main thread below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            if write is not None:
                write(piece)
        thread.join()
        if errors:
            raise errors[0]
        answer = "".join(pieces).strip()
        if stop and answer.endswith(stop):
            answer = answer[: -len(stop)].strip()
        self.conv.messages[-1][-1] = neutralize(answer, self.controls)  # the model's text is plain text too
        if self.debug:
            logger.info("prompt: %r\noutput: %r", prompt, answer)
        return answer


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m stllava.serve.cli", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True, help="checkpoint folder (any layout, see docs/Checkpoints.md)")
    ap.add_argument("--model-base", default=None, help="base folder for LoRA / projector-only checkpoints")
    ap.add_argument("--image-file", required=True, help="the image to chat about (a local path)")
    ap.add_argument("--conv-mode", default=None, choices=sorted(conv_templates),
                    help="conversation template (default: the checkpoint's recorded conv_mode, else inferred)")
    ap.add_argument("--temperature", type=float, default=0.2, help="sampling temperature; 0 = greedy")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="longest answer, in tokens")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda", "mps"],
                    help="where to run (cuda/mps fall back to cpu, with a warning, when unavailable)")
    ap.add_argument("--load-8bit", action="store_true", help="8-bit weights (needs bitsandbytes and CUDA)")
    ap.add_argument("--load-4bit", action="store_true", help="4-bit weights (needs bitsandbytes and CUDA)")
    ap.add_argument("--allow-url", action="store_true", help="allow --image-file to be an http(s) URL")
    ap.add_argument("--debug", action="store_true", help="log prompts and outputs (at least --log-level INFO)")
    logs.add_log_level_arg(ap, default="WARNING")
    return ap


def main(argv=None, read=input, write=None) -> int:
    """Run the chat; returns the exit code: 0, 2 for a bad image, template or checkpoint (one line
    on stderr), 1 when the model cannot be loaded here (e.g. 8-bit without bitsandbytes)."""
    return run_cli(lambda a: _chat(a, read, write), argv)


def _chat(argv, read, write) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(min(logging.INFO, logs.level_number(args.log_level)) if args.debug else args.log_level)
    if write is None:
        def write(s):
            sys.stdout.write(s)
            sys.stdout.flush()
    image = load_image(args.image_file, args.allow_url)  # a bad image is refused before the model loads
    conv_mode, why = (args.conv_mode, "from --conv-mode") if args.conv_mode else infer_conv_mode(args.model_path)
    from stllava.model.builder import load_pretrained_model

    try:
        tokenizer, model, processor, context_len = load_pretrained_model(
            args.model_path, args.model_base, load_8bit=args.load_8bit, load_4bit=args.load_4bit, device=args.device)
    except StllavaError:
        raise
    except (ValueError, OSError) as e:  # an environment that cannot load it (no bitsandbytes, no CUDA)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if processor is None:
        raise ChatInputError(f"{args.model_path} has no vision tower (no mm_vision_tower in its config); it cannot "
                             "chat about an image")
    need = decode_size(processor, model.config)
    if need is not None:  # decoded again, a JPEG at the reduced size training decodes it at
        image = load_image(args.image_file, args.allow_url, need)
    session = ChatSession(model, tokenizer, processor, image, conv_mode, args.temperature, args.max_new_tokens,
                          args.debug, context_len)
    logger.info("conversation template %s (%s)", conv_mode, why)
    write(f"template {conv_mode} ({why})\n")
    write(f"[{args.model_path} | {conv_mode} | {model.device}] empty line or Ctrl-D to quit\n")
    while True:
        try:
            text = read(f"{session.roles[0]}: ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            break
        if not text.strip():
            break
        try:
            question = session.add_question(text.strip())
        except PromptTooLongError as e:  # one line, and the conversation goes on as before
            write(f"error: {e}\n")
            continue
        write(f"{session.roles[1]}: ")
        session.answer(question, write)
        write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One skeleton for the generating tools (``eval.model_vqa``, ``selftrain.questions``,
``selftrain.answers``): their shared flags, the template they use, the share of the work one
process does, and one resumable JSONL loop.

* **Flags** (:func:`add_tool_args`): ``--model-path``, ``--model-base``, ``--conv-mode``,
  ``--device``, ``--batch-size``, ``--seed``, ``--num-chunks``/``--chunk-idx``, ``--skip-bad``,
  ``--overwrite``, ``--allow-empty``, ``--no-progress``, ``--log-level`` — spelled and meaning the same in all three.
  An input with nothing to do (an empty question file, no image in the folder) is an error
  (:func:`refuse_empty`) unless ``--allow-empty``: it is almost always a wrong path.
* **Template** (:func:`resolve_conv_mode`): ``--conv-mode`` when given, else the ``conv_mode``
  that training recorded in the checkpoint's ``config.json``, else the tool's own default;
  logged together with the reason.
* **Sharding** (:func:`chunk_of`): ``--num-chunks N --chunk-idx K`` does chunk K of LLaVA's
  ``split_list`` (consecutive chunks of ceil(len/N) items). No output depends on the chunking
  (sampling is seeded per item; greedy decoding is batch-invariant, see :mod:`stllava.generation`),
  so the chunk files concatenated in chunk order equal one process's output
  (``scripts/run_sharded.sh`` runs one process per GPU and does that).
* **Resume** (:func:`read_done`): every record carries ``settings`` — what decides the output
  (model path, template, decoding, seed). A rerun skips the items already written; a file written
  with other settings is refused naming the difference (the one settings check of
  :mod:`stllava.artifacts`), unless ``--overwrite`` starts it over.
* **Loop** (:func:`run_batches`): pending items in batches; the next batch's images are decoded in
  a background thread while the current one generates; records are appended and flushed as each
  batch finishes, so a killed run loses at most the batch in flight.
* **Opening** (:func:`plan_work`): template, settings, input, chunk, resume and missing images, in
  that order and before any model is loaded, one call in each tool.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from stllava import logs
from stllava.artifacts import check
from stllava.data.images import DecodeSize
from stllava.errors import StllavaError
from stllava.generation import ImageError, batched, load_rgb, prefetch
from stllava.jsonl import JsonlError, JsonlWriter, iter_jsonl

logger = logging.getLogger(__name__)

CONV_MODE_FIELD = "conv_mode"  # the config.json field training writes the template into


class ToolError(StllavaError, ValueError):
    """Bad input, flags or a resume conflict of a generating tool; the message names the file,
    the record and the fix."""


# --- flags ------------------------------------------------------------------------------------
def add_tool_args(parser: argparse.ArgumentParser, *, model_help: str, conv_help: str, batch_size: int,
                  batch_help: str, seed_help: str, underscore_aliases: bool = False) -> None:
    """Add the flags every generating tool shares (see the module docstring) to ``parser``.

    ``underscore_aliases`` also accepts LLaVA's ``--model_path`` style for the flags LLaVA's
    scripts spell that way. ``--skip-missing-images`` and ``--skip-bad-images`` (the tools' older
    names of ``--skip-bad``) still work, hidden from ``--help``. Returns nothing; argparse refuses
    (ArgumentError) a parser that already has one of these flags."""
    def names(flag: str) -> tuple[str, ...]:
        return (flag, "--" + flag[2:].replace("-", "_")) if underscore_aliases else (flag,)

    # Required with the local backend (checked by plan_work): --backend openai needs no checkpoint here.
    parser.add_argument(*names("--model-path"), dest="model_path", default=None,
                        help=model_help + " (required unless --backend openai)")
    parser.add_argument(*names("--model-base"), dest="model_base", default=None,
                        help="base LLM when --model-path is a LoRA adapter")
    parser.add_argument(*names("--conv-mode"), dest="conv_mode", default=None, help=conv_help)
    parser.add_argument("--device", default="cuda", help="cuda (falls back to cpu when absent), cpu, cuda:1, ...")
    parser.add_argument(*names("--batch-size"), dest="batch_size", type=int, default=batch_size, help=batch_help)
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument(*names("--num-chunks"), dest="num_chunks", type=int, default=1,
                        help="split the work into this many chunks (one process each; see scripts/run_sharded.sh)")
    parser.add_argument(*names("--chunk-idx"), dest="chunk_idx", type=int, default=0,
                        help="the chunk this process does, 0-based")
    parser.add_argument("--skip-bad", dest="skip_bad", action="store_true",
                        help="skip and count items whose image is missing or unreadable (listed in the "
                             "summary) instead of stopping at the first")
    parser.add_argument("--skip-missing-images", "--skip-bad-images", dest="skip_bad", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--overwrite", action="store_true",
                        help="start the output file over instead of resuming it")
    parser.add_argument("--allow-empty", dest="allow_empty", action="store_true",
                        help="accept an input with no items (by default an error: usually a wrong or unfinished file)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    logs.add_log_level_arg(parser)


# --- template -------------------------------------------------------------------------------
def checkpoint_conv_mode(model_path: str) -> str | None:
    """The ``conv_mode`` recorded in ``<model_path>/config.json``, or None when the folder, the
    file or the field is absent (a broken config.json is the model loader's to report)."""
    path = os.path.join(os.path.expanduser(model_path), "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get(CONV_MODE_FIELD)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def resolve_conv_mode(requested: str | None, model_path: str, default: str) -> tuple[str, str]:
    """``(template, why)``: ``requested`` (``--conv-mode``) when given, else the checkpoint's
    recorded ``conv_mode``, else ``default``. Refuses (ToolError) a template name that does not
    exist, naming where it came from."""
    from stllava.conversation import get_conv_template

    recorded = None if requested else checkpoint_conv_mode(model_path)
    config = os.path.join(model_path, "config.json")
    if requested:
        mode, source, why = requested, "--conv-mode", "from --conv-mode"
    elif recorded:
        mode, source, why = recorded, config, f"recorded in {config}"
    else:
        mode, source, why = default, "the tool's default", "this tool's default; the checkpoint's config.json " \
                                                             "records no conv_mode"
    try:
        get_conv_template(mode, source)
    except ValueError as e:
        raise ToolError(f"{e}; fix: pass --conv-mode") from None
    return mode, why


def settle_conv_mode(args: argparse.Namespace, default: str) -> str:
    """Resolve ``args.conv_mode`` in place (see :func:`resolve_conv_mode`), log which template is
    used and why, and return it."""
    args.conv_mode, why = resolve_conv_mode(args.conv_mode, args.model_path, default)
    logger.info("conversation template %s (%s)", args.conv_mode, why)
    return args.conv_mode


def refuse_empty(items: Sequence, args: argparse.Namespace, source: str, what: str) -> None:
    """Refuse (ToolError naming ``source``) an input that holds no ``what`` unless ``--allow-empty``
    (``args.allow_empty``); an empty *chunk* of a non-empty input is fine (see :func:`chunk_of`)."""
    if not items and not getattr(args, "allow_empty", False):
        raise ToolError(f"{source} holds no {what}; fix: check the path (or pass --allow-empty when an empty "
                        "input is expected)")


# --- sharding -------------------------------------------------------------------------------
def split_list(items: Sequence, n: int) -> list[list]:
    """LLaVA's ``split_list``: consecutive chunks of ceil(len/n) items (possibly fewer than n)."""
    if n < 1:
        raise ToolError(f"--num-chunks must be ≥ 1, got {n}")
    if not items:
        return []
    size = math.ceil(len(items) / n)
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def chunk_of(items: Sequence, n: int, k: int) -> list:
    """Chunk ``k`` of :func:`split_list` (``[]`` when ``k`` is past the last chunk: 5 items in 4
    chunks make only 3 chunks of 2, where LLaVA raised IndexError). Refuses (ToolError)
    n < 1 and k outside [0, n)."""
    if n < 1 or not 0 <= k < n:
        raise ToolError(f"--chunk-idx must be in [0, --num-chunks) and --num-chunks ≥ 1; got {k} and {n}")
    chunks = split_list(items, n)
    return chunks[k] if k < len(chunks) else []


# --- resume ---------------------------------------------------------------------------------
def model_path_setting(model_path: str | None) -> str | None:
    """The model path as recorded in ``settings``: absolute when it is a local folder, so a rerun
    from another working directory still matches."""
    if model_path is None:
        return None
    expanded = os.path.expanduser(model_path)
    return os.path.abspath(expanded) if os.path.exists(expanded) else model_path


def read_done(path: str | os.PathLike, key: str, settings: dict, *, overwrite: bool = False) -> set[str]:
    """The values (as strings) of field ``key`` in the records of an existing output file; empty
    when it does not exist. With ``overwrite`` the file is removed first (a fresh start).

    A cut-short last line (what a kill leaves) is reported and ignored: its item is redone and the
    line rewritten. Refuses a malformed line elsewhere (ToolError), and a record whose
    ``settings`` differ from ``settings`` (:class:`stllava.artifacts.ArtifactError`): one file
    holds one run's outputs, so the error names what differs and how to go on."""
    path = str(path)
    if overwrite and os.path.exists(path):
        logger.warning("--overwrite: starting %s over", path)
        os.remove(path)
    if not os.path.exists(path):
        return set()
    done: set[str] = set()
    try:
        for line, rec in iter_jsonl(path, allow_truncated_tail=True):
            check(rec.get("settings"), settings, file=path, record=f"line {line}",
                  fix="rerun with the file's settings to resume it, pass --overwrite to start it over, or write "
                      "to another output file")
            done.add(str(rec.get(key)))
    except JsonlError as e:
        raise ToolError(f"{e} (cannot resume: fix the line, pass --overwrite, or write to another output "
                        "file)") from None
    return done


def pending_items(items: Sequence, key_of: Callable[[Any], str], done: set[str], what: str, out: str) -> list:
    """The items whose key is not in ``done``, in order; warns when ``done`` holds keys that are
    not among ``items`` (e.g. another chunk's output given as this chunk's file)."""
    keys = {key_of(it) for it in items}
    foreign = done - keys
    if foreign:
        logger.warning("%s holds %d %s outside this chunk's items (e.g. %s)", out, len(foreign), what,
                       sorted(foreign)[:3])
    return [it for it in items if key_of(it) not in done]


# --- images ---------------------------------------------------------------------------------
@dataclass
class ImageSource:
    """Where the items' images are and what to do with a bad one.

    ``image_of(item)``: the image path relative to ``folder``; ``where(item)``: how an error names
    the item (file, line, id); ``ident(item)``: the fields a skipped item is listed with. With
    ``skip_bad`` a missing or unreadable image, or a path that leaves ``folder``, is logged and
    listed in ``skipped`` (with its ``reason``) instead of raising :class:`ToolError`."""

    folder: str
    image_of: Callable[[Any], str]
    where: Callable[[Any], str]
    ident: Callable[[Any], dict]
    skip_bad: bool = False
    skipped: list[dict] = field(default_factory=list)
    need: DecodeSize | None = None  # the size JPEGs are decoded at (see for_model); None: full size

    def for_model(self, image_processor, model_config) -> None:
        """Decode JPEGs at the reduced size the model's preprocessing allows
        (:func:`stllava.mm_utils.decode_size`), as training decodes them."""
        from stllava.mm_utils import decode_size

        self.need = decode_size(image_processor, model_config)

    def path(self, item) -> str:
        """The item's image file (:func:`stllava.data.images.image_path`); raises :class:`ImageError`
        of kind "image outside the image folder" for a path that leaves ``folder``."""
        from stllava.data.images import ImageLoadError, image_path

        try:
            return image_path(self.folder, self.image_of(item))
        except ImageLoadError as e:
            raise ImageError(e.path, e.kind, e.detail) from None

    def drop_missing(self, items: Sequence) -> list:
        """``items`` without those whose image path leaves the folder or whose image file does not
        exist (checked before any model is loaded). Refuses (ToolError) the first such item unless
        ``skip_bad``."""
        outside, missing = [], []
        for it in items:
            try:
                if not os.path.isfile(self.path(it)):
                    missing.append(it)
            except ImageError as e:
                if not self.skip_bad:
                    raise ToolError(f"{self.where(it)}: {e}; fix the record, or pass --skip-bad to skip and count "
                                    "it") from None
                logger.warning("skipping %s: %s", self.where(it), e)
                outside.append(it)
                self.skipped.append({**self.ident(it), "reason": e.kind})
        if outside:
            gone = {id(it) for it in outside}
            items = [it for it in items if id(it) not in gone]
        if missing and not self.skip_bad:
            it = missing[0]
            raise ToolError(f"{self.where(it)}: image {self.image_of(it)!r} not found in {self.folder or '.'} "
                            f"({len(missing)} of {len(items)} pending items miss their image); fix: "
                            "--image-folder, or pass --skip-bad to skip and count them")
        for it in missing:
            self.skipped.append({**self.ident(it), "reason": "missing image"})
        gone = {id(it) for it in missing}
        return [it for it in items if id(it) not in gone]

    def load(self, items: Iterable) -> tuple[list, list]:
        """``(kept items, their RGB images)``; an image shared by several items is decoded once
        (the same object, so :func:`stllava.generation.prepare_batch` preprocesses it once).
        A bad image raises ToolError naming the item, or with ``skip_bad`` is listed and left out."""
        cache: dict[str, Any] = {}
        kept, images = [], []
        for it in items:
            try:
                path = self.path(it)
                if path not in cache:
                    cache[path] = load_rgb(path, self.need)
            except ImageError as e:
                if not self.skip_bad:
                    raise ToolError(f"{self.where(it)}: {e}; fix the image, or pass --skip-bad to skip and "
                                    "count it") from None
                logger.warning("skipping %s: %s", self.where(it), e)
                self.skipped.append({**self.ident(it), "reason": e.kind})
                continue
            kept.append(it)
            images.append(cache[path])
        return kept, images


# --- model and loop -------------------------------------------------------------------------
def model_name(model_path: str) -> str:
    """The name recorded as ``model``/``model_id`` (LLaVA's rule: the checkpoint folder's name)."""
    from stllava.mm_utils import get_model_name_from_path

    return get_model_name_from_path(os.path.expanduser(model_path))


def load_model(args: argparse.Namespace) -> tuple:
    """(tokenizer, model, image_processor) for ``args.model_path``/``args.model_base`` on
    ``args.device``; the loader's refusals (unknown layout, unsafe pickle) propagate."""
    from stllava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(
        os.path.expanduser(args.model_path), args.model_base, model_name(args.model_path), device=args.device)
    return tokenizer, model, processor


def run_batches(pending: Sequence, batch_size: int, prepare: Callable[[list], Any],
                process: Callable[[list, Any], Iterable[dict]], out: str | os.PathLike, *,
                desc: str, unit: str, progress: bool = True) -> float:
    """For each batch of ``batch_size`` consecutive ``pending`` items: ``prepare(batch)`` in a
    background thread (one batch ahead), then ``process(batch, prepared)``, whose records are
    appended to ``out`` (flushed per record). Returns the seconds taken. Exceptions of either
    callable propagate (records of finished batches stay on disk)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    with JsonlWriter(out) as writer, tqdm(total=len(pending), desc=desc, unit=unit, disable=not progress) as bar:
        for batch, prepared in prefetch(batched(pending, batch_size), prepare):
            for record in process(batch, prepared):
                writer.write(record)
            bar.update(len(batch))
    return round(time.perf_counter() - t0, 3)


def check_batch_size(args: argparse.Namespace) -> None:
    """Refuse (ToolError) ``--batch-size`` < 1."""
    if args.batch_size < 1:
        raise ToolError(f"--batch-size must be ≥ 1, got {args.batch_size}")


# --- the shared opening -----------------------------------------------------------------------
@dataclass
class Work:
    """One process's share of a generating tool's work, settled before any model is loaded
    (:func:`plan_work`)."""

    conv_mode: str | None  # the template used (see :func:`settle_conv_mode`); None: the server's
    settings: dict  # what decides the output: stored in every record, compared on resume
    items: list  # every input item
    chunk: list  # this process's chunk of them (--num-chunks / --chunk-idx)
    already_done: int  # items of the chunk the output file already holds
    pending: list  # the chunk's items still to do, whose image exists (or was refused)


def plan_work(args: argparse.Namespace, *, default_conv_mode: str, settings_of: Callable[[argparse.Namespace], dict],
              read_items: Callable[[], Sequence], source: str, what: str, out: str | os.PathLike, key: str,
              key_of: Callable[[Any], str], done_what: str, images: ImageSource,
              check_template: Callable[[str], Any] | None = None) -> Work:
    """The opening every generating tool shares, in this order: the template (``--conv-mode``, the
    checkpoint's, else ``default_conv_mode``; then ``check_template(template)``, which refuses one
    the tool cannot use; None with ``--backend openai``, whose server has its own; a local run
    without ``--model-path`` is refused), the settings (``settings_of(args)``, with ``args.conv_mode`` settled), the
    input (``read_items()``; ``source`` holding no ``what`` is refused unless ``--allow-empty``), this
    process's chunk, what ``out`` already holds (field ``key`` of its records: resumed, or refused
    when written with other settings; ``--overwrite`` starts it over), the pending items (named by
    ``key_of``; ``done_what`` names them in a warning), and, through ``images``, those whose image
    file is missing (refused, or with ``--skip-bad`` listed in ``images.skipped`` and left out).

    Returns the :class:`Work`; the refusals are :class:`ToolError`s."""
    if getattr(args, "backend", "local") == "local":
        if not args.model_path:
            raise ToolError("--model-path is required (the checkpoint to generate with), unless --backend openai "
                            "sends the requests to a server")
        conv_mode = settle_conv_mode(args, default_conv_mode)
        if check_template is not None:
            check_template(conv_mode)
    else:  # the server applies its own template (stllava.remote_generation)
        conv_mode = None
    settings = settings_of(args)
    items = list(read_items())
    refuse_empty(items, args, source, what)
    chunk = chunk_of(items, args.num_chunks, args.chunk_idx)
    done = read_done(out, key, settings, overwrite=args.overwrite)
    pending = pending_items(chunk, key_of, done, done_what, str(out))
    already_done = len(chunk) - len(pending)
    return Work(conv_mode, settings, items, chunk, already_done, images.drop_missing(pending))

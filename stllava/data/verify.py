"""Check a LLaVA-Med-format dataset before a long run; the same check runs when training starts.

    python -m stllava.data.verify --data_path F --image_folder D [--tokenizer T --model_max_length 2048]

The same command checks SFT files (``{"conversations": [...]}`` records) and DPO preference-pair
files (``chosen_conversations`` / ``reject_conversations``, as ``selftrain.build_pairs`` writes
them); the kind is recognised from the records and printed.

Every bad record is named with its index and ``id``: missing, empty, unreadable, truncated or too
large images (over ``$STLLAVA_MAX_IMAGE_PIXELS``, padded to a square included), images thinner than
``$STLLAVA_MAX_IMAGE_ASPECT`` (50:1), image paths that leave ``--image_folder`` (see
:mod:`stllava.data.images`); a record that is
not ``{"conversations": [...]}``; roles out of order or an empty turn; an ``<image>`` missing where
an image is given (or present where none is); and, given a tokenizer, a conversation too long for
``model_max_length`` once its image is expanded to ``image_tokens`` positions (it would be cut).
Pair files are checked side by side with the same rules, plus: both sides ask the same question.
Images in an unusual mode (16-bit, CMYK, float) are listed as notes (they load, converted).
Prints one line per problem, then a summary; exits 1 when any record is bad (like a linter), 0
otherwise, and 2 with one ``error: ...`` line when the file itself cannot be read (missing, empty,
not UTF-8, cut short, not JSON, not a list) or holds no records (unless ``--allow_empty``).

Training (``stllava.train.train_sft``) calls :func:`verify_records` at start-up and applies
``--on_bad_sample``: ``stop`` (default) raises :class:`BadDataError` carrying this report;
``skip`` drops the bad records and logs how many (:func:`apply_bad_sample_policy`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

from stllava import logs
from stllava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from stllava.data.images import IMAGE_PROBLEMS, ImageLoadError, check_image, image_mode, image_path, mode_note
from stllava.errors import EXIT_FAILED, StllavaError, run_cli

logger = logging.getLogger(__name__)

BAD_RECORD, BAD_TURNS, IMAGE_TOKEN, TOO_LONG = ("malformed record", "bad roles or turns",
                                                "<image> token mismatch", "too long")
ON_BAD_SAMPLE = ("stop", "skip")
DEFAULT_IMAGE_TOKENS = 576  # CLIP ViT-L/14 at 336 px, CLS dropped


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one record."""

    index: int
    record_id: Any
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"record {self.index} (id {self.record_id!r}): {self.kind}: {self.detail}"


@dataclass
class VerifyReport:
    """What :func:`verify_records` found. ``problems`` are in record order."""

    data_path: str
    n_records: int
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)  # not bad: e.g. an unusual image mode
    kind: str = ""  # what was checked, e.g. "preference pairs (DPO)"; shown in the summary

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_indices(self) -> list[int]:
        return sorted({p.index for p in self.problems})

    def counts(self) -> dict[str, int]:
        """Number of bad records per kind of problem."""
        return dict(Counter(k for k, _ in {(p.kind, p.index) for p in self.problems}))

    def summary(self) -> str:
        """One line: the file, what it holds, how many records, how many bad (by kind), notes."""
        what = f" ({self.kind})" if self.kind else ""
        notes = f"; {len(self.notes)} note{'s' * (len(self.notes) != 1)}" if self.notes else ""
        if self.ok:
            return f"{self.data_path}{what}: {self.n_records} records checked, all good{notes}"
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.counts().items()))
        return (f"{self.data_path}{what}: {self.n_records} records checked, {len(self.bad_indices)} bad "
                f"({kinds}){notes}")

    def format(self, limit: int | None = None) -> str:
        """Every problem, then every note (``note: ...``), each on its own line (the first ``limit``
        of each when given), then the summary."""
        lines = []
        for items, prefix, what in ((self.problems, "", "problems"), (self.notes, "note: ", "notes")):
            shown = items if limit is None else items[:limit]
            lines += [f"{prefix}{p}" for p in shown]
            if len(shown) < len(items):
                lines.append(f"... and {len(items) - len(shown)} more {what}")
        lines.append(self.summary())
        return "\n".join(lines)


class BadDataError(StllavaError, ValueError):
    """Training refused a dataset with bad records (``--on_bad_sample stop``); ``report`` says which."""

    def __init__(self, report: VerifyReport, limit: int = 50):
        self.report = report
        super().__init__(
            f"the training data has bad records:\n{report.format(limit)}\n"
            "Fix or drop them (check again with `python -m stllava.data.verify --data_path ... "
            "--image_folder ...`), or pass --on_bad_sample skip to train without them.")


class DataFileError(StllavaError, ValueError):
    """The data file as a whole cannot be read: empty, cut short, not JSON, not a list."""


class DataFileNotFound(StllavaError, FileNotFoundError):
    """``--data_path`` names no file."""


CHOSEN, REJECT = "chosen_conversations", "reject_conversations"  # the two sides of a DPO pair
PAIR_KEYS = (CHOSEN, REJECT)
SFT_KIND, PAIR_KIND = "SFT conversations", "preference pairs (DPO)"


def data_kind(records: Sequence[Any]) -> str:
    """:data:`PAIR_KIND` when any record holds a ``chosen_conversations`` or
    ``reject_conversations`` key (a DPO file: records missing one side are then reported as bad
    pairs), else :data:`SFT_KIND`."""
    pair = any(isinstance(r, dict) and any(k in r for k in PAIR_KEYS) for r in records)
    return PAIR_KIND if pair else SFT_KIND


def load_records(data_path: str) -> list[dict]:
    """Return the records of a JSON list file (LLaVA-Med format) or a JSON Lines file.
    Refuses anything else (:class:`DataFileNotFound`, :class:`DataFileError`, or
    :class:`~stllava.jsonl.JsonlError` for a bad JSONL line) with one message naming the file and the fix."""
    fix = "fix: --data_path must name a JSON list of records with 'id', 'image' and 'conversations'"
    from stllava.jsonl import not_a_file, read_jsonl, read_utf8

    if not os.path.exists(data_path):
        raise DataFileNotFound(f"--data_path {data_path} does not exist; {fix}")
    why = not_a_file(data_path)  # a folder is named as one; a device is never read (/dev/zero never ends)
    if why is not None:
        raise DataFileError(f"--data_path {data_path} {why}; {fix}")

    if data_path.endswith(".jsonl"):
        return read_jsonl(data_path)
    text = read_utf8(data_path)  # EncodingError naming the line and byte when not UTF-8
    if not text.strip():
        raise DataFileError(f"{data_path} is empty; {fix}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and _first_line_is_object(text):
            stem = os.path.splitext(os.path.basename(data_path))[0]
            raise DataFileError(f"{data_path} looks like JSON Lines (one JSON object per line) but is named .json (not "
                                f"valid JSON: {e.msg} at line {e.lineno}, column {e.colno}); fix: rename it to "
                                f"{stem}.jsonl, or make it one JSON list of records") from None
        cut = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated")
        raise DataFileError(f"{data_path} is not valid JSON{' (cut short?)' if cut else ''}: {e.msg} (line "
                            f"{e.lineno}, column {e.colno}); {fix}") from None
    if not isinstance(data, list):
        raise DataFileError(f"{data_path} holds a JSON {type(data).__name__}, expected a list of records; {fix}")
    return data


def _first_line_is_object(text: str) -> bool:
    """Whether the first non-blank line of ``text`` is a JSON object on its own (a JSON Lines file)."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def record_name(record: Any, index: int) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"record {index} (id {rid!r})"


def check_conversation(record: Any, version: str) -> tuple[str, str] | None:
    """Return ``(kind, detail)`` of what is wrong with the record's structure, roles, or
    ``<image>`` placement, or None. The rules are those of
    :func:`stllava.data.preprocess.validate_conversation`, the function training applies."""
    from stllava.data.preprocess import validate_conversation

    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return BAD_RECORD, "expected an object with a 'conversations' list"
    if "image" in record and (not isinstance(record["image"], str) or not record["image"]):
        return BAD_RECORD, f"'image' must be a file name, got {record['image']!r}"
    try:
        validate_conversation(record["conversations"], "image" in record, version, "record")
    except ValueError as e:
        msg = str(e).removeprefix("record: ").removeprefix("record, ")
        return (IMAGE_TOKEN if DEFAULT_IMAGE_TOKEN in msg else BAD_TURNS), msg
    return None


def conversation_length(record: dict, tokenizer, version: str, image_tokens: int,
                        budget: int | None = None) -> int:
    """Length in model positions of the record's longest rendering: for ``v1_sq`` every eligible
    human turn rendered as VUSER (longer), each ``<image>`` counted as ``image_tokens``.

    With ``budget``, an upper bound is returned instead when that bound is within the budget (the
    answer to "is it too long?" is then the same, without tokenizing)."""
    from stllava.conversation import get_conv_template
    from stllava.data.preprocess import render_messages
    from stllava.mm_utils import tokenizer_image_token

    conv = get_conv_template(version)
    has_image = "image" in record
    for role, text in render_messages(record["conversations"], conv, has_image, sq_r=1.0 if version == "v1_sq" else 0.0,
                                      rng=random.Random(0)):
        conv.append_message(role, text)
    prompt = conv.get_prompt()
    n_img = prompt.count(DEFAULT_IMAGE_TOKEN)
    # Cheap bound first: SentencePiece gives at most one token per UTF-8 byte, plus one dummy
    # prefix per chunk and the BOS, so short prompts need no tokenizing.
    bound = len(prompt.encode("utf-8")) + n_img + 2 + n_img * (image_tokens - len(DEFAULT_IMAGE_TOKEN))
    if budget is not None and bound <= budget:
        return bound
    ids = tokenizer_image_token(prompt, tokenizer)
    return len(ids) + sum(1 for t in ids if t == IMAGE_TOKEN_INDEX) * (image_tokens - 1)


def verify_records(records: Sequence[Any], image_folder: str | None, *, data_path: str = "<data>",
                   version: str = "v1_sq", tokenizer=None, model_max_length: int | None = None,
                   image_tokens: int = DEFAULT_IMAGE_TOKENS, workers: int = 8,
                   check_images: bool = True) -> VerifyReport:
    """Check every record; returns a :class:`VerifyReport` (never raises for bad data).

    Images are decoded in full (``workers`` threads; PIL releases the GIL while decoding) so
    truncated files are found. The length check runs only when ``tokenizer`` and
    ``model_max_length`` are given, and only on records whose structure is valid.
    """
    report = VerifyReport(data_path, len(records))
    problems: list[Problem] = []
    rid = [r.get("id") if isinstance(r, dict) else None for r in records]
    structural_ok = []
    for i, rec in enumerate(records):
        p = check_conversation(rec, version)
        if p:
            problems.append(Problem(i, rid[i], *p))
        structural_ok.append(p is None)

    if check_images:
        jobs, outside = _image_jobs(records, image_folder)
        problems += outside
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for (i, path), res in zip(jobs, pool.map(lambda j: check_image(j[1]), jobs)):
                if res:
                    problems.append(Problem(i, rid[i], res[0], f"{path} ({res[1]})"))

    if tokenizer is not None and model_max_length:
        for i, rec in enumerate(records):
            if not structural_ok[i]:
                continue
            n = conversation_length(rec, tokenizer, version, image_tokens, budget=model_max_length)
            if n > model_max_length:
                problems.append(Problem(
                    i, rid[i], TOO_LONG,
                    f"{n} positions (image = {image_tokens}) > model_max_length {model_max_length}; "
                    "it would be cut short"))
    problems.sort(key=lambda p: (p.index, p.kind))
    report.problems = problems
    return report


def _image_jobs(records: Sequence[Any], image_folder: str | None) -> tuple[list[tuple[int, str]], list[Problem]]:
    """``(index, file)`` of every record with an image, and a :data:`~stllava.data.images.OUTSIDE_FOLDER`
    problem for each record whose image path leaves ``image_folder`` (:func:`image_path`)."""
    jobs, outside = [], []
    for i, rec in enumerate(records):
        if isinstance(rec, dict) and isinstance(rec.get("image"), str) and rec["image"]:
            try:
                jobs.append((i, image_path(image_folder, rec["image"])))
            except ImageLoadError as e:
                outside.append(Problem(i, rec.get("id"), e.kind, f"{e.path} ({e.detail})"))
    return jobs, outside


def mode_notes(records: Sequence[Any], image_folder: str | None, workers: int = 8) -> list[Problem]:
    """A note per record whose image is in an unusual PIL mode (:func:`stllava.data.images.mode_note`:
    16-bit, CMYK, float, ...); read from the image headers only. Images that cannot be opened are
    left to :func:`verify_records` to report."""
    jobs, _ = _image_jobs(records, image_folder)
    notes = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for (i, path), mode in zip(jobs, pool.map(lambda j: image_mode(j[1]), jobs)):
            note = mode_note(mode) if mode else None
            if note:
                notes.append(Problem(i, records[i].get("id"), "unusual image mode", f"{path}: {note}"))
    return notes


def apply_bad_sample_policy(records: Sequence[Any], report: VerifyReport, policy: str) -> list[int]:
    """Return the indices of the records to train on.

    ``stop``: all of them when the report is clean, else raises :class:`BadDataError`.
    ``skip``: all but the bad ones; logs how many were skipped and of which kinds.
    """
    if policy not in ON_BAD_SAMPLE:
        raise ValueError(f"--on_bad_sample must be one of {ON_BAD_SAMPLE}, got {policy!r}")
    if report.ok:
        return list(range(len(records)))
    if policy == "stop":
        raise BadDataError(report)
    bad = set(report.bad_indices)
    for p in report.problems[:20]:
        logger.warning("skipping %s", p)
    logger.warning("--on_bad_sample skip: skipped %d of %d records (%s); training on %d",
                   len(bad), len(records), ", ".join(f"{k}: {n}" for k, n in sorted(report.counts().items())),
                   len(records) - len(bad))
    return [i for i in range(len(records)) if i not in bad]


# ---------------------------------------------------------------------------------------------
# Preference pairs (DPO): each side checked with the SFT rules, plus one rule of their own

SIDES = (("chosen", CHOSEN), ("rejected", REJECT))
PROMPT_MISMATCH = "chosen/rejected prompts differ"


def side_view(record: Any, key: str) -> Any:
    """The record as an SFT record holding one side of the pair (``{"id", "image"?, "conversations"}``),
    or the record itself when it is not a dict (the SFT check then reports it as malformed)."""
    if not isinstance(record, dict):
        return record
    view = {k: record[k] for k in ("id", "image") if k in record}
    if key in record:
        view["conversations"] = record[key]
    return view


def _prompts(conversation: Any) -> list | None:
    if not isinstance(conversation, list):
        return None
    return [t.get("value") for t in conversation if isinstance(t, dict) and t.get("from") != "gpt"]


def verify_preference_records(records: Sequence[Any], image_folder: str | None, *, data_path: str = "<data>",
                              version: str = "v1", tokenizer=None, model_max_length: int | None = None,
                              image_tokens: int = 576, workers: int = 8) -> VerifyReport:
    """Check every preference record; returns one :class:`VerifyReport` (never
    raises for bad data). Each side is checked with the SFT rules (images once, on the chosen side);
    the problem detail says which side. A record whose two sides ask different questions is bad too."""
    report = VerifyReport(data_path, len(records))
    problems: list[Problem] = []
    for side, key in SIDES:
        views = [side_view(r, key) for r in records]
        sub = verify_records(views, image_folder, data_path=data_path, version=version, tokenizer=tokenizer,
                             model_max_length=model_max_length, image_tokens=image_tokens, workers=workers,
                             check_images=(key == CHOSEN))
        for p in sub.problems:
            rec = records[p.index]
            if p.kind == BAD_RECORD and isinstance(rec, dict) and not isinstance(rec.get(key), list):
                detail = f"no '{key}' list (a DPO record needs '{CHOSEN}' and '{REJECT}')"
            elif p.kind == BAD_RECORD or p.kind in IMAGE_PROBLEMS:
                detail = p.detail  # about the record or its image, not one side
            else:
                detail = f"{side}: {p.detail}"
            problems.append(Problem(p.index, p.record_id, p.kind, detail))
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            continue
        a, b = _prompts(rec.get(CHOSEN)), _prompts(rec.get(REJECT))
        if a is not None and b is not None and a != b:
            problems.append(Problem(i, rec.get("id"), PROMPT_MISMATCH,
                                    f"chosen asks {a!r}, rejected asks {b!r}; a preference pair compares two "
                                    "answers to the same question"))
    # One line per (record, kind, detail): the image problems are reported once.
    unique = {(p.index, p.kind, p.detail): p for p in problems}
    report.problems = sorted(unique.values(), key=lambda p: (p.index, p.kind))
    return report


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (underscores: they are training's flags)."""
    ap = argparse.ArgumentParser(prog="python -m stllava.data.verify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_path", required=True,
                    help="LLaVA-Med-format JSON list (or .jsonl) of SFT records or of DPO preference pairs")
    ap.add_argument("--image_folder", default=None, help="folder the records' 'image' paths are relative to")
    ap.add_argument("--version", default=None,
                    help="conversation template the data will be trained with (default: v1_sq for SFT files, "
                         "v1 for preference pairs, as the launch scripts use)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer folder (e.g. the model's); enables the too-long check")
    ap.add_argument("--model_max_length", type=int, default=2048, help="training context length")
    ap.add_argument("--image_tokens", type=int, default=DEFAULT_IMAGE_TOKENS,
                    help="positions one image takes (576 for CLIP ViT-L/14-336 'patch')")
    ap.add_argument("--workers", type=int, default=8, help="threads decoding images")
    ap.add_argument("--limit", type=int, default=None, help="print at most this many problems (and notes)")
    ap.add_argument("--allow_empty", action="store_true",
                    help="accept a file with no records (by default an empty list is an error: a wrong file)")
    logs.add_log_level_arg(ap, default="WARNING")
    return ap


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    tokenizer = None
    if args.tokenizer:
        from transformers import LlamaTokenizer

        tokenizer = LlamaTokenizer.from_pretrained(args.tokenizer)
    records = load_records(args.data_path)
    if not records and not args.allow_empty:
        raise DataFileError(f"{args.data_path} holds no records; fix: pass the dataset file (or --allow_empty "
                            "when an empty file is expected)")
    kind = data_kind(records)
    check = verify_preference_records if kind == PAIR_KIND else verify_records
    report = check(records, args.image_folder, data_path=args.data_path,
                   version=args.version or ("v1" if kind == PAIR_KIND else "v1_sq"), tokenizer=tokenizer,
                   model_max_length=args.model_max_length, image_tokens=args.image_tokens, workers=args.workers)
    report.kind = kind
    report.notes = mode_notes(records, args.image_folder, args.workers)
    print(report.format(args.limit))
    return 0 if report.ok else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 (all good), 1 (bad records, listed) or 2 (the file
    itself is unreadable: one line; see stllava.errors)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

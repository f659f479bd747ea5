"""Raw benchmark files → LLaVA-Med evaluation files (docs/Evaluation.md#file-formats).

``python -m stllava.eval.convert {vqa_rad,slake,pvqa} --src FILE --out DIR`` writes into DIR:

* ``test.json`` — a JSON list of ``{"id", "image", "answer_type", "conversations": [
  {"from": "human", "value": "<image>\\n" + question}, {"from": "gpt", "value": answer}]}``
  (the ground truth for :mod:`stllava.eval.metrics`; the human turn follows the LLaVA
  convention of docs/Method.md#separators: the image token on its own first line);
* ``questions.jsonl`` — one ``{"question_id", "image", "text"}`` per question, ``text`` being the
  plain question (the answering model adds the image token itself);
* ``stats.json`` — the benchmark name, source, counts of questions, images, open and closed.

Sources:

* VQA-RAD — the official ``VQA_RAD_Dataset_Public.json`` (test = ``phrase_type`` in
  test_freeform / test_para) or the literature's ``testset.json`` split file (every record is
  a test question); detected by fields, or forced with ``--format public|split``. Both give
  the same 451 questions (179 open / 272 closed, 203 images) in the same order; ids are the
  file's ``qid`` (the two files number them differently).
* SLAKE — its raw ``test.json`` (``img_name, question, answer, answer_type, q_lang, qid``),
  English questions only (``q_lang == "en"``).
* PathVQA — the LXMERT-style ``pvqa_test.json`` (per image ``{img_id, sentf: {pvqa: [...]},
  labelf: {pvqa: [{answer: score}]}}``, image ``<img_id>.jpg``), or a Hugging-Face-style export
  (JSON list or JSONL of ``{image, question, answer}``). ids are the running question index
  (or the record's own ``question_id``/``qid``/``id`` in the HF export); CLOSED iff the answer
  is yes/no.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import pathlib
import sys
from typing import Any, Callable

from stllava import logs
from stllava.constants import DEFAULT_IMAGE_TOKEN
from stllava.data.images import ImageLoadError, image_path
from stllava.errors import StllavaError, run_cli
from stllava.jsonl import JsonlError, iter_jsonl, read_utf8

logger = logging.getLogger(__name__)

OPEN, CLOSED = "OPEN", "CLOSED"
VQA_RAD_TEST_PHRASES = ("test_freeform", "test_para")
BENCHMARKS = ("vqa_rad", "slake", "pvqa")


class ConvertError(StllavaError, ValueError):
    """A raw benchmark file that cannot be converted; the message names record, field and fix."""


# --- reading and validating -----------------------------------------------------------------
def read_records(path: pathlib.Path) -> tuple[list[Any], list[str]]:
    """Return (records, labels) from a JSON list or a JSONL file.

    ``labels[i]`` names record i for error messages: "record i" (0-based list index) for a JSON
    list, "line n" (1-based file line) for JSONL. A file whose text starts with ``[`` is a JSON
    list; otherwise one JSON document, else JSON Lines. Refuses a missing file, a file that is not
    UTF-8, bad JSON (a list cut short says so, with its line and column) and a JSON document that
    is not a list."""
    if not path.is_file():
        raise ConvertError(f"{path}: no such file; fix: pass the raw benchmark file as --src")
    text = read_utf8(path)  # EncodingError naming the line and byte when not UTF-8
    data = None
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):  # a JSON list, not JSON Lines: say what is wrong with it
                cut = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated")
                raise ConvertError(f"{path}: not valid JSON{' (cut short?)' if cut else ''}: "
                                   f"{e.msg.removesuffix(' at')} at line {e.lineno}, column {e.colno}; fix: "
                                   "download or copy the benchmark file again (a JSON list of records)") from None
    if data is None:
        try:
            numbered = list(iter_jsonl(path))
        except JsonlError as exc:
            raise ConvertError(f"{exc}; --src must be a JSON list or a JSONL file") from exc
        return [rec for _, rec in numbered], [f"line {n}" for n, _ in numbered]
    if not isinstance(data, list):
        raise ConvertError(f"{path}: expected a JSON list of records, got {type(data).__name__}; "
                           "fix: pass the raw test file itself")
    return data, [f"record {i}" for i in range(len(data))]


class _Checker:
    """Names the file and record in every complaint."""

    def __init__(self, path: pathlib.Path, labels: list[str], hint: str):
        self.path, self.labels, self.hint = path, labels, hint

    def where(self, i: int) -> str:
        return f"{self.path}: {self.labels[i]}"

    def fail(self, i: int, field: str, problem: str) -> ConvertError:
        return ConvertError(f"{self.where(i)}: field '{field}' {problem}; fix: {self.hint}")

    def obj(self, rec: Any, i: int) -> dict:
        if not isinstance(rec, dict):
            raise ConvertError(f"{self.where(i)}: expected an object, got {type(rec).__name__}; "
                               f"fix: {self.hint}")
        return rec

    def text(self, rec: dict, i: int, field: str, allow_number: bool = False) -> str:
        if field not in rec:
            raise self.fail(i, field, "is missing")
        value = rec[field]
        if allow_number and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # raw VQA-RAD has integer answers (e.g. 4, 12)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(i, field, f"must be a non-empty string, got {value!r}")
        return value

    def answer_type(self, rec: dict, i: int) -> str:
        value = self.text(rec, i, "answer_type")
        norm = value.strip().upper()  # the VQA-RAD release has "CLOSED " twice
        if norm not in (OPEN, CLOSED):
            raise self.fail(i, "answer_type", f"must be OPEN or CLOSED, got {value!r}")
        return norm


def _qid(value: Any) -> Any:
    """Question ids as ints when they are integral (the VQA-RAD release mixes 0 and '0')."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def _item(qid: Any, image: str, question: str, answer: str, answer_type: str) -> dict:
    return {"id": qid, "image": image, "answer_type": answer_type, "conversations": [
        {"from": "human", "value": f"{DEFAULT_IMAGE_TOKEN}\n{question.strip()}"},
        {"from": "gpt", "value": answer}]}


# --- VQA-RAD ----------------------------------------------------------------------------------
def detect_vqa_rad_format(records: list[Any]) -> str:
    """Return "public" (the official release) or "split" (a file holding only test records)."""
    for rec in records:
        if isinstance(rec, dict) and (rec.get("phrase_type") in VQA_RAD_TEST_PHRASES
                                      or "qid_linked_id" in rec):
            return "public"
    return "split"


def convert_vqa_rad(path: pathlib.Path, fmt: str = "auto") -> tuple[list[dict], dict]:
    """Convert VQA-RAD; returns (items, extra stats). ``fmt`` is auto, public or split."""
    records, labels = read_records(path)
    check = _Checker(path, labels, "pass VQA_RAD_Dataset_Public.json or testset.json unmodified")
    if fmt == "auto":
        fmt = detect_vqa_rad_format(records)
        logger.info("%s: detected the %s VQA-RAD format", path, fmt)
    items = []
    for i, raw in enumerate(records):
        rec = check.obj(raw, i)
        if fmt == "public":
            phrase = check.text(rec, i, "phrase_type")
            if phrase not in VQA_RAD_TEST_PHRASES:
                continue
        if "qid" not in rec:
            raise check.fail(i, "qid", "is missing")
        items.append(_item(_qid(rec["qid"]), check.text(rec, i, "image_name"),
                           check.text(rec, i, "question"),
                           check.text(rec, i, "answer", allow_number=True),
                           check.answer_type(rec, i)))
    if not items:
        raise ConvertError(f"{path}: no test questions found (format {fmt}); fix: pass the "
                           "official release or the testset.json split file")
    return items, {"source_format": fmt, "n_source_records": len(records)}


# --- SLAKE ------------------------------------------------------------------------------------
def convert_slake(path: pathlib.Path, fmt: str = "auto") -> tuple[list[dict], dict]:
    """Convert SLAKE's raw test.json, English questions only; returns (items, extra stats)."""
    records, labels = read_records(path)
    check = _Checker(path, labels, "pass SLAKE's raw test.json (Slake1.0/test.json) unmodified")
    items, langs = [], collections.Counter()
    for i, raw in enumerate(records):
        rec = check.obj(raw, i)
        lang = check.text(rec, i, "q_lang")
        langs[lang] += 1
        if lang != "en":
            continue
        if "qid" not in rec:
            raise check.fail(i, "qid", "is missing")
        items.append(_item(_qid(rec["qid"]), check.text(rec, i, "img_name"),
                           check.text(rec, i, "question"),
                           check.text(rec, i, "answer", allow_number=True),
                           check.answer_type(rec, i)))
    logger.info("%s: languages %s; kept %d English questions", path, dict(langs), len(items))
    return items, {"source_format": "slake", "n_source_records": len(records),
                   "languages": dict(langs), "n_skipped_non_english": len(records) - len(items)}


# --- PathVQA ----------------------------------------------------------------------------------
def _pvqa_type(answer: str) -> str:
    return CLOSED if answer.strip().lower() in ("yes", "no") else OPEN


def detect_pvqa_format(records: list[Any]) -> str:
    """Return "lxmert" (``sentf``/``labelf`` per image) or "hf" (one record per question)."""
    first = next((r for r in records if isinstance(r, dict)), {})
    return "lxmert" if "sentf" in first or "labelf" in first else "hf"


def _convert_pvqa_lxmert(records: list[Any], check: _Checker) -> list[dict]:
    items = []
    for i, raw in enumerate(records):
        rec = check.obj(raw, i)
        img_id = check.text(rec, i, "img_id")
        sentf, labelf = rec.get("sentf"), rec.get("labelf")
        questions = sentf.get("pvqa") if isinstance(sentf, dict) else None
        labels = labelf.get("pvqa") if isinstance(labelf, dict) else None
        if not isinstance(questions, list):
            raise check.fail(i, "sentf.pvqa", "must be a list of questions")
        if not isinstance(labels, list) or len(labels) != len(questions):
            raise check.fail(i, "labelf.pvqa", f"must be a list of {len(questions)} answer dicts "
                             "(one per question)")
        for k, (question, label) in enumerate(zip(questions, labels)):
            if not isinstance(question, str) or not question.strip():
                raise check.fail(i, f"sentf.pvqa[{k}]",
                                 f"must be a question string, got {question!r}")
            if not isinstance(label, dict) or not label:
                raise check.fail(i, f"labelf.pvqa[{k}]", f"must be a non-empty {{answer: score}} "
                                 f"dict, got {label!r}")
            answer = str(max(label, key=lambda a: label[a]))  # highest score; ties → first
            items.append(_item(len(items), f"{img_id}.jpg", question, answer, _pvqa_type(answer)))
    return items


def _convert_pvqa_hf(records: list[Any], check: _Checker) -> list[dict]:
    items = []
    for i, raw in enumerate(records):
        rec = check.obj(raw, i)
        image = rec.get("image")
        if isinstance(image, dict):  # a datasets Image feature exported as {"path", "bytes"}
            image = image.get("path")
        if not isinstance(image, str) or not image.strip():
            raise check.fail(i, "image", f"must be an image path or file name, got {image!r} "
                             "(export the images to files and store their names)")
        qid = next((rec[k] for k in ("question_id", "qid", "id") if k in rec), len(items))
        answer = check.text(rec, i, "answer", allow_number=True)
        items.append(_item(_qid(qid), image, check.text(rec, i, "question"), answer,
                           _pvqa_type(answer)))
    return items


def convert_pvqa(path: pathlib.Path, fmt: str = "auto") -> tuple[list[dict], dict]:
    """Convert PathVQA (LXMERT-style or HF-style); returns (items, extra stats)."""
    records, labels = read_records(path)
    if fmt == "auto":
        fmt = detect_pvqa_format(records)
        logger.info("%s: detected the %s PathVQA format", path, fmt)
    if fmt == "lxmert":
        check = _Checker(path, labels, "pass the LXMERT-style pvqa_test.json unmodified")
        items = _convert_pvqa_lxmert(records, check)
    elif fmt == "hf":
        check = _Checker(path, labels, "each record needs 'image', 'question' and 'answer'")
        items = _convert_pvqa_hf(records, check)
    else:
        raise ConvertError(f"unknown PathVQA format {fmt!r}; fix: use auto, lxmert or hf")
    return items, {"source_format": fmt, "n_source_records": len(records)}


CONVERTERS: dict[str, Callable[[pathlib.Path, str], tuple[list[dict], dict]]] = {
    "vqa_rad": convert_vqa_rad, "slake": convert_slake, "pvqa": convert_pvqa}


# --- driver -----------------------------------------------------------------------------------
def compute_stats(items: list[dict]) -> dict:
    """Return counts of questions, distinct images, open and closed questions."""
    types = collections.Counter(item["answer_type"] for item in items)
    return {"n_questions": len(items), "n_images": len({item["image"] for item in items}),
            "n_open": types[OPEN], "n_closed": types[CLOSED]}


def convert(benchmark: str, src: str | pathlib.Path, fmt: str = "auto",
            image_folder: str | pathlib.Path | None = None) -> tuple[list[dict], dict]:
    """Convert one benchmark file; returns (test items, stats).

    Refuses an unknown benchmark, malformed records (naming record and field), duplicate
    question ids, and — when ``image_folder`` is given — image paths that lead outside it and
    images missing from it."""
    if benchmark not in CONVERTERS:
        raise ConvertError(f"unknown benchmark {benchmark!r}; fix: use one of {BENCHMARKS}")
    src = pathlib.Path(src)
    items, extra = CONVERTERS[benchmark](src, fmt)
    dups = [q for q, n in collections.Counter(str(it["id"]) for it in items).items() if n > 1]
    if dups:
        raise ConvertError(f"{src}: {len(dups)} question ids occur more than once (first: "
                           f"{dups[:5]}); fix: ids must be unique for scoring — check the file")
    if image_folder is not None:
        folder = pathlib.Path(image_folder)
        outside = []
        for it in items:
            try:
                image_path(str(folder), it["image"])
            except ImageLoadError as e:
                outside.append(e)
        if outside:
            raise ConvertError(f"{folder}: {len(outside)} image paths lead outside it (first: {outside[0].path!r}, "
                               f"{outside[0].detail})")
        absent = sorted({it["image"] for it in items if not (folder / it["image"]).is_file()})
        if absent:
            raise ConvertError(f"{folder}: {len(absent)} images missing (first: {absent[:5]}); "
                               "fix: point --image-folder at the benchmark's image folder")
    stats = {"benchmark": benchmark, "source": str(src), **extra, **compute_stats(items)}
    return items, stats


def write(items: list[dict], stats: dict, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Write test.json, questions.jsonl and stats.json into ``out_dir``; returns it."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "test.json").write_text(json.dumps(items, indent=1, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    with (out / "questions.jsonl").open("w", encoding="utf-8") as fh:
        for it in items:
            question = it["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
            fh.write(json.dumps({"question_id": it["id"], "image": it["image"], "text": question},
                                ensure_ascii=False) + "\n")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(prog="python -m stllava.eval.convert",
                                     description="Convert a raw VQA benchmark to LLaVA-Med "
                                     "evaluation files (test.json, questions.jsonl, stats.json).")
    parser.add_argument("benchmark", choices=BENCHMARKS, help="which benchmark the raw file holds")
    parser.add_argument("--src", required=True, help="raw benchmark file (see docs/Evaluation.md)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", default="auto",
                        choices=["auto", "public", "split", "lxmert", "hf"],
                        help="source layout: VQA-RAD public|split, PathVQA lxmert|hf (default: "
                        "detected from the fields)")
    parser.add_argument("--image-folder", help="if given, check every image exists in it")
    logs.add_log_level_arg(parser)
    return parser


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(args.log_level)
    valid = {"vqa_rad": ("auto", "public", "split"), "slake": ("auto",),
             "pvqa": ("auto", "lxmert", "hf")}[args.benchmark]
    if args.format not in valid:
        parser.error(f"--format {args.format} does not apply to {args.benchmark}; use {valid}")
    items, stats = convert(args.benchmark, args.src, args.format, args.image_folder)
    write(items, stats, args.out)
    logger.info("%s: %d questions (%d open / %d closed) on %d images → %s", args.benchmark,
                stats["n_questions"], stats["n_open"], stats["n_closed"], stats["n_images"],
                args.out)
    print(json.dumps(stats, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 bad input; see stllava.errors)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

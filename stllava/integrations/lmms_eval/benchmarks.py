"""The local files an lmms-eval stllava task reads (no lmms-eval import; no download).

A benchmark is the folder ``python -m stllava.eval.convert`` writes (``test.json`` +
``questions.jsonl``) plus the benchmark's image folder — the same inputs as
``python -m stllava.eval.model_vqa`` and ``python -m stllava.eval.metrics``. Where they are:

=========  ====================================  ==========================================
benchmark  converted folder (``…_DIR``)           images (``…_IMAGES``)
=========  ====================================  ==========================================
vqa_rad    ``$STLLAVA_LMMS_VQA_RAD_DIR``          ``$STLLAVA_LMMS_VQA_RAD_IMAGES``
slake      ``$STLLAVA_LMMS_SLAKE_DIR``            ``$STLLAVA_LMMS_SLAKE_IMAGES``
pvqa       ``$STLLAVA_LMMS_PVQA_DIR``             ``$STLLAVA_LMMS_PVQA_IMAGES``
=========  ====================================  ==========================================

Unset, they default to ``scripts/eval/run_benchmark.sh``'s layout (relative to the working
directory): ``playground/eval/<benchmark>`` and ``playground/data/vqa_rad/images``,
``playground/data/slake/imgs``, ``playground/data/pvqa/images/test``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping

from stllava.errors import StllavaError
from stllava.eval.metrics import load_gt
from stllava.eval.model_vqa import load_questions


class BenchmarkFilesError(StllavaError, ValueError):
    """Converted benchmark files that are missing or do not belong together; names the fix."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    env: str  # prefix of the two environment variables
    images: str  # default image folder

    @property
    def dir_var(self) -> str:
        return f"{self.env}_DIR"

    @property
    def images_var(self) -> str:
        return f"{self.env}_IMAGES"


BENCHMARKS = {b.name: b for b in (
    Benchmark("vqa_rad", "STLLAVA_LMMS_VQA_RAD", "playground/data/vqa_rad/images"),
    Benchmark("slake", "STLLAVA_LMMS_SLAKE", "playground/data/slake/imgs"),
    Benchmark("pvqa", "STLLAVA_LMMS_PVQA", "playground/data/pvqa/images/test"),
)}


def locate(name: str, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``(converted folder, image folder)`` of benchmark ``name`` from the environment, else the
    defaults above. Refuses (BenchmarkFilesError) an unknown benchmark name."""
    if name not in BENCHMARKS:
        raise BenchmarkFilesError(f"unknown benchmark {name!r} in the task's dataset_kwargs; "
                                  f"fix: one of {sorted(BENCHMARKS)}")
    env = os.environ if environ is None else environ
    bench = BENCHMARKS[name]
    return (env.get(bench.dir_var) or f"playground/eval/{name}", env.get(bench.images_var) or bench.images)


def load_docs(name: str, environ: Mapping[str, str] | None = None) -> list[dict]:
    """The task documents of benchmark ``name``, in ``questions.jsonl`` order (model_vqa's order).

    Each is ``{"question_id", "question", "image", "image_path", "answer_type", "gt"}``, all
    strings: ``question`` as model_vqa asks it, ``image_path`` the image file, ``gt`` the
    ``test.json`` record as JSON (what :func:`stllava.eval.metrics.score` scores against).
    Refuses (BenchmarkFilesError, naming the file and the variable to set) missing files, questions
    and ground truth that do not pair up one to one, and missing images; a bad line in either file
    is refused by the project's readers (ToolError / EvalInputError naming the line)."""
    data_dir, image_dir = locate(name, environ)
    bench = BENCHMARKS[name]
    qfile, gfile = os.path.join(data_dir, "questions.jsonl"), os.path.join(data_dir, "test.json")
    for path in (qfile, gfile):
        if not os.path.isfile(path):
            raise BenchmarkFilesError(f"{path}: not found", fix=f"python -m stllava.eval.convert {name} --src RAW "
                                      f"--out DIR, then export {bench.dir_var}=DIR")
    questions = load_questions(qfile)
    if not questions:
        raise BenchmarkFilesError(f"{qfile}: no questions", fix=f"point {bench.dir_var} at a converted benchmark")
    gt = {}
    for item in load_gt(gfile):
        if isinstance(item, dict) and "id" in item:
            gt[str(item["id"])] = item
    unpaired = [q.key for q in questions if q.key not in gt]
    if unpaired or len(gt) != len(questions):
        raise BenchmarkFilesError(f"{qfile} and {gfile} do not pair up ({len(questions)} questions, {len(gt)} "
                                  f"ground-truth records, first question without one: {unpaired[:1]})",
                                  fix="write both with one run of python -m stllava.eval.convert")
    missing = [q for q in questions if not os.path.isfile(os.path.join(image_dir, q.image))]
    if missing:
        q = missing[0]
        raise BenchmarkFilesError(f"image {q.image!r} not found in {image_dir} ({len(missing)} of {len(questions)} "
                                  "questions miss their image)", file=qfile,
                                  record=f"line {q.line} (question_id {q.question_id!r})",
                                  fix=f"export {bench.images_var}=the benchmark's image folder")
    return [{"question_id": q.key, "question": q.text, "image": q.image,
             "image_path": os.path.abspath(os.path.join(image_dir, q.image)),
             "answer_type": str(gt[q.key].get("answer_type")), "gt": json.dumps(gt[q.key], ensure_ascii=False)}
            for q in questions]

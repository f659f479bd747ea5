"""The benchmark and DPO sources on the Hugging Face hub, and the layouts made from them.

Each source downloads its repository's files at one commit into ``<out>/<source>/`` (checked against
the size and checksum the hub publishes), then writes the layout ``stllava.eval.convert`` and the
eval scripts read by default (docs/Data.md):

* ``vqa_rad`` (``flaviagiammarino/vqa-rad``, parquet) → ``vqa_rad/images/``, ``vqa_rad/testset.json``
  and ``trainset.json`` in the split format (``qid, image_name, question, answer, answer_type``). The
  hub copy has no answer types: CLOSED is written for yes/no answers, OPEN otherwise.
* ``slake`` (``BoKelvin/SLAKE``: ``train/validation/test.json`` + ``imgs.zip``) → ``slake/imgs/``.
* ``pvqa`` (``flaviagiammarino/path-vqa``, parquet) → ``pvqa/images/{train,val,test}/`` and
  ``pvqa/qas/pvqa_{train,val,test}.json`` (JSON lists of ``{qid, image, question, answer}``,
  the converter's HF-style input).
* ``dpo`` (``ZachSun/STLLaVA-Med-DPO``) → the repository's files, records counted.

Images taken out of parquet files are named by content (first 16 hex digits of their SHA-256), so
the same picture is written once. Counts are compared with the numbers each dataset card states.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from stllava.data.fetch import BAD_FILE, ERROR, Failure, Hub, check_file, reject, select
from stllava.data.manifest import PART_SUFFIX, ManifestError, safe_relpath
from stllava.errors import StllavaError

logger = logging.getLogger(__name__)

# repo, revision (a pinned commit, or a branch whose commit the manifest records), files to fetch (None: all).
PARQUET = ("README.md", "data/*.parquet")
HUB_SOURCES: dict[str, tuple[str, str, tuple[str, ...] | None]] = {
    "vqa_rad": ("flaviagiammarino/vqa-rad", "bcf91e7654fb9d51c8ab6a5b82cacf3fafd2fae9", PARQUET),
    "slake": ("BoKelvin/SLAKE", "a9083ce6c34ac3ffb17671a605962924d8a8f9e9", None),
    "pvqa": ("flaviagiammarino/path-vqa", "main", PARQUET),
    "dpo": ("ZachSun/STLLaVA-Med-DPO", "main", None),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PVQA_SPLITS = {"train": "train", "validation": "val", "test": "test"}


class DownloadError(StllavaError):
    """A refused run (bad flag value, missing dependency, offline mode); one line with the fix."""


@dataclass
class Run:
    """What one download run shares: where files go, what was found, and what was counted."""

    out: Path
    eval_root: Path
    store: Any  # fetch.VerifiedStore
    hub: Hub | None = None
    revisions: dict[str, str] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    counts: list[dict] = field(default_factory=list)
    sources: dict[str, dict] = field(default_factory=dict)

    def fail(self, failure: Failure) -> None:
        logger.error("%s", failure)
        self.failures.append(failure)

    def count(self, source: str, what: str, got: int, expected: int | None, basis: str = "") -> None:
        """Record a count; a mismatch with ``expected`` (what ``basis`` states) is logged as a warning."""
        ok = expected is None or got == expected
        self.counts.append({"source": source, "what": what, "got": got, "expected": expected, "basis": basis,
                            "ok": ok})
        (logger.info if ok else logger.warning)("%s: %s: %d%s", source, what, got,
                                                "" if expected is None else f" (expected {expected:,}: {basis})")


def fetch_hub(run: Run, key: str) -> dict[str, Path] | None:
    """Download source ``key``'s repository files; returns {repo file: local path} of those that arrived
    intact (the others are failures), or None when the repository cannot be listed."""
    repo, pinned, patterns = HUB_SOURCES[key]
    revision = run.revisions.get(key, pinned)
    folder = run.out / key
    try:
        commit, files = run.hub.list_files(repo, revision)
    except Exception as e:  # the hub client's errors (not found, network) are reported, the run goes on
        run.fail(Failure(ERROR, f"{key}/", f"cannot list {repo} at {revision} on {run.hub.endpoint}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        return None
    run.sources[key] = {"kind": "hub", "repo": repo, "revision_requested": revision, "revision": commit,
                        "endpoint": run.hub.endpoint}
    logger.info("%s: %s at %s (commit %s)", key, repo, revision, commit)
    good = {}
    for name, expect in sorted(select(files, patterns).items()):
        try:
            rel = f"{key}/{safe_relpath(name, repo)}"
        except ManifestError as e:
            run.fail(Failure(BAD_FILE, f"{key}/{name}", str(e)))
            continue
        if not run.store.current(rel, expect.key()):
            failure = run.hub.download(repo, name, commit, folder, rel)
            sha256 = None
            if failure is None:
                failure, sha256 = check_file(run.out / rel, rel, expect)
                if failure is not None:
                    logger.error("%s: moved to %s", rel, reject(run.out, rel))
            if failure is not None:
                run.fail(failure)
                continue
            run.store.record(rel, sha256, expect.key())
        good[name] = run.out / rel
    return good


# --- images out of parquet files ---------------------------------------------------------------
def parquet_rows(path: Path) -> Iterator[dict]:
    """Rows (``image`` {bytes, path}, ``question``, ``answer``) of a hub parquet file, streamed."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DownloadError(f"{path}: reading parquet files needs pyarrow; fix: pip install 'stllava[data]' "
                            "(or pip install pyarrow)") from None
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256, columns=["image", "question", "answer"]):
        yield from batch.to_pylist()


def image_suffix(data: bytes) -> str:
    """``.jpg`` or ``.png`` from the file's first bytes; another format is named by PIL."""
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return "." + (im.format or "bin").lower()
    except Exception:  # not an image at all: the image check reports it by name
        return ".bin"


def save_image(folder: Path, data: bytes) -> str:
    """Write ``data`` as ``folder/<sha256[:16]><suffix>`` unless there already; returns the file name."""
    name = hashlib.sha256(data).hexdigest()[:16] + image_suffix(data)
    path = folder / name
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(name + PART_SUFFIX)  # never listed in a manifest if a kill leaves it
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return name


def split_files(files: dict[str, Path]) -> dict[str, list[Path]]:
    """``data/<split>-00000-of-00001-<hash>.parquet`` files grouped by split name."""
    out: dict[str, list[Path]] = {}
    for name, path in sorted(files.items()):
        m = re.fullmatch(r"data/([a-z]+)-\d+-of-\d+(?:-[0-9a-f]+)?\.parquet", name)
        if m:
            out.setdefault(m.group(1), []).append(path)
    return out


def rows_from(run: Run, paths: list[Path]) -> Iterator[tuple[int, dict]]:
    """(index, row) over every row of ``paths``, streamed (a split can be GBs of images); a file that
    cannot be read is recorded as a failure and ends the iteration."""
    i = 0
    for path in paths:
        try:
            for row in parquet_rows(path):
                yield i, row
                i += 1
        except DownloadError:
            raise
        except Exception as e:  # pyarrow's errors for a damaged file
            run.fail(Failure(BAD_FILE, str(path.relative_to(run.out)), f"not a readable parquet file: {e}"))
            return


def row_image(run: Run, name: str, i: int, row: dict) -> bytes | None:
    """The image bytes of parquet row ``i`` of ``name``, or None (a failure recorded) when it has none."""
    data = (row.get("image") or {}).get("bytes")
    if not data:
        run.fail(Failure(BAD_FILE, f"{name} row {i}", "no image bytes in the row"))
    return data or None


def _closed(answer: str) -> str:
    return "CLOSED" if answer.strip().lower() in ("yes", "no") else "OPEN"


def prepare_vqa_rad(run: Run, files: dict[str, Path]) -> None:
    """Write ``vqa_rad/images/``, ``testset.json`` and ``trainset.json`` from the parquet splits."""
    total, images = 0, set()
    for split, paths in sorted(split_files(files).items()):
        records, n_failed = [], len(run.failures)
        for i, row in rows_from(run, paths):
            if (data := row_image(run, f"vqa_rad {split}", i, row)) is None:
                continue
            name = save_image(run.out / "vqa_rad" / "images", data)
            images.add(name)
            answer = str(row["answer"])
            records.append({"qid": i, "image_name": name, "question": row["question"], "answer": answer,
                            "answer_type": _closed(answer)})
        if len(run.failures) > n_failed:
            continue  # a split with unreadable rows is not written
        (run.out / "vqa_rad" / f"{split}set.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        total += len(records)
        if split == "test":
            run.count("vqa_rad", "test questions", len(records), 451, "dataset card")
    card = "dataset card: the OSF release's 2,248 QA pairs on 315 images, duplicates dropped"
    run.count("vqa_rad", "question-answer pairs", total, 2244, card)
    run.count("vqa_rad", "distinct images", len(images), 314, card)


def prepare_pvqa(run: Run, files: dict[str, Path]) -> None:
    """Write ``pvqa/images/<split>/`` and ``pvqa/qas/pvqa_<split>.json`` from the parquet splits."""
    total, images = 0, set()
    for split, paths in sorted(split_files(files).items()):
        short = PVQA_SPLITS.get(split, split)
        records, n_failed = [], len(run.failures)
        for i, row in rows_from(run, paths):
            if (data := row_image(run, f"pvqa {split}", i, row)) is None:
                continue
            name = save_image(run.out / "pvqa" / "images" / short, data)
            images.add((short, name))
            records.append({"qid": i, "image": name, "question": row["question"], "answer": str(row["answer"])})
        if len(run.failures) > n_failed:
            continue  # a split with unreadable rows is not written
        qas = run.out / "pvqa" / "qas"
        qas.mkdir(parents=True, exist_ok=True)
        (qas / f"pvqa_{short}.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        total += len(records)
        if split == "test":
            run.count("pvqa", "test questions", len(records), 6719, "dataset card")
    card = "dataset card, duplicates dropped (the paper: 32,799 QA pairs on 4,998 images)"
    run.count("pvqa", "question-answer pairs", total, 32632, card)
    run.count("pvqa", "distinct images", len(images), 4289, card)


def prepare_slake(run: Run, files: dict[str, Path]) -> None:
    """Unpack ``imgs.zip`` into ``slake/imgs/`` (so ``img_name`` such as ``xmlab102/source.jpg``
    resolves) and count the questions of the three splits."""
    archive = files.get("imgs.zip")
    if archive is not None:
        stamp = run.out / ".download" / "unpacked-slake-imgs"  # the zip's SHA-256 when it was last unpacked
        sha = run.store.sha256("slake/imgs.zip")
        if not (stamp.exists() and stamp.read_text().strip() == sha) and unpack_zip(
                run, archive, run.out / "slake" / "imgs", strip="imgs"):
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(sha + "\n")
    n_en = n_all = 0
    for split in ("train", "validation", "test"):
        path = files.get(f"{split}.json")
        if path is None:
            continue
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            run.fail(Failure(BAD_FILE, f"slake/{split}.json", f"not JSON: {e}"))
            continue
        n_all += len(records)
        n_en += sum(1 for r in records if isinstance(r, dict) and r.get("q_lang") == "en")
    run.count("slake", "English question-answer pairs", n_en, 7033,
              "SLAKE paper: 4,919 train + 1,053 validation + 1,061 test")
    run.count("slake", "question-answer pairs", n_all, 14028, "SLAKE paper, English and Chinese")
    imgs = run.out / "slake" / "imgs"
    n_img = sum(1 for d in imgs.iterdir() if (d / "source.jpg").is_file()) if imgs.is_dir() else 0
    run.count("slake", "images (folders with source.jpg)", n_img, 642, "SLAKE paper")


def unpack_zip(run: Run, archive: Path, dest: Path, strip: str = "") -> bool:
    """Extract ``archive`` into ``dest``, dropping a leading ``strip/`` folder; returns whether every
    member was extracted (a member whose path would leave ``dest`` is refused and reported)."""
    name, complete = str(archive.relative_to(run.out)), True
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                parts = PurePosixPath(info.filename).parts
                if strip and strip in parts[:2]:  # imgs/xmlab0/... or <top>/imgs/xmlab0/...
                    parts = parts[parts.index(strip) + 1:]
                if info.is_dir() or not parts or parts[0] == "__MACOSX":
                    continue
                try:
                    rel = safe_relpath("/".join(parts), name)
                except ManifestError as e:
                    run.fail(Failure(BAD_FILE, name, str(e)))
                    complete = False
                    continue
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
    except (zipfile.BadZipFile, OSError) as e:
        run.fail(Failure(BAD_FILE, name, f"cannot unpack: {e}"))
        return False
    return complete


def count_dpo(run: Run, files: dict[str, Path]) -> None:
    """Count the records of the DPO repository's JSON / JSONL files (no published number to compare)."""
    for name, path in sorted(files.items()):
        if path.suffix not in (".json", ".jsonl"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
            n = (len(json.loads(text)) if path.suffix == ".json"
                 else sum(1 for line in text.splitlines() if line.strip() and json.loads(line) is not None))
        except ValueError as e:
            run.fail(Failure(BAD_FILE, f"dpo/{name}", f"not valid JSON: {e}"))
            continue
        run.count("dpo", f"records in {name}", n, None)


PREPARE = {"vqa_rad": prepare_vqa_rad, "slake": prepare_slake, "pvqa": prepare_pvqa, "dpo": count_dpo}

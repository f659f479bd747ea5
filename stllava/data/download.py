"""Get the data, verified: ``python -m stllava.data.download`` (docs/Data.md).

    python -m stllava.data.download [--sources vqa_rad,slake,pvqa,dpo,llava_med] [--out playground/data]
    python -m stllava.data.download --verify playground/data/manifest.json [--folder DIR]

Downloads VQA-RAD, SLAKE, PathVQA and the STLLaVA-Med DPO pairs from their Hugging Face hub copies
(``--hf-endpoint``, default ``$HF_ENDPOINT`` or https://huggingface.co), LLaVA-Med's instruction
data from the URLs its scripts use (``--llava-med-url``) and, with ``--sources ...,llava_med_images``,
the PubMed Central figures it needs (``--pmc-url``). Then:

* every file is checked against the size and checksum its source publishes (the hub's LFS SHA-256 or
  git blob id; LLaVA-Med's LFS pointers), and a rerun skips files already verified, continues partial
  downloads with HTTP ``Range``, and fetches again what failed;
* every image is decoded once (``stllava.data.images.check_image``), the record counts are compared
  with the numbers the datasets' cards and papers state (a mismatch is reported; ``--strict-counts``
  makes it fail the run);
* ``stllava.eval.convert`` turns each benchmark into ``<eval-root>/<benchmark>/`` (``test.json``,
  ``questions.jsonl``, ``stats.json``), the files ``scripts/eval/run_benchmark.sh`` scores;
* ``<out>/manifest.json`` and ``<out>/SHA256SUMS`` list the SHA-256 and size of every file, for
  ``--verify`` (or ``sha256sum -c``) on another machine.

Every file that did not arrive intact is named at the end, grouped by kind (missing, checksum
mismatch, truncated, unreadable, download error) with counts; the run does not stop at the first.
Exit codes (``stllava/errors.py``): 0 all verified; 1 some file failed (or, with ``--strict-counts``, a
count differs), or ``--verify`` found a missing, changed or extra file; 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from stllava import logs
from stllava.data import llava_med, sources
from stllava.data.fetch import BAD_FILE, KINDS, Hub, VerifiedStore, reject
from stllava.data.images import check_image
from stllava.data.manifest import MANIFEST_NAME, list_files, verify_folder, write_manifest
from stllava.data.sources import DownloadError, Failure, Run
from stllava.errors import EXIT_FAILED, EXIT_OK, StllavaError, run_cli

logger = logging.getLogger(__name__)

SOURCES = ("vqa_rad", "slake", "pvqa", "dpo", "llava_med", "llava_med_images")
DEFAULT_SOURCES = ("vqa_rad", "slake", "pvqa", "dpo", "llava_med")
HUB_URL = "https://huggingface.co"
# benchmark: (raw file, image folder, questions the converted test set should hold, what says so)
CONVERT = {"vqa_rad": ("vqa_rad/testset.json", "vqa_rad/images", 451, "VQA-RAD's test split"),
           "slake": ("slake/test.json", "slake/imgs", 1061, "SLAKE's English test questions"),
           "pvqa": ("pvqa/qas/pvqa_test.json", "pvqa/images/test", 6719, "the hub copy's test split")}


def _names(value: str, allowed: Sequence[str], flag: str) -> list[str]:
    names = list(allowed) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise DownloadError(f"{flag} {value!r}: unknown name(s) {unknown}; fix: use 'all' or a comma list of "
                            f"{', '.join(allowed)}")
    return names


def check_images(run: Run, workers: int) -> None:
    """Decode every image under the prepared image folders once (verified ones are skipped)."""
    roots = [r for r in ("vqa_rad/images", "slake/imgs", "pvqa/images", "llava_med/images") if (run.out / r).is_dir()]
    todo = [rel for rel in list_files(run.out, roots)
            if rel.lower().endswith(sources.IMAGE_SUFFIXES) and not run.store.current(rel, "image-ok")]
    logger.info("checking %d images", len(todo))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for rel, problem in zip(todo, pool.map(lambda r: check_image(str(run.out / r)), todo)):
            if problem is None:
                run.store.record(rel, expect="image-ok")
            else:
                run.fail(Failure(BAD_FILE, rel, f"{problem[0]}: {problem[1]}"))
                logger.error("%s: moved to %s", rel, reject(run.out, rel))


def convert_benchmarks(run: Run, names: list[str]) -> None:
    """Run ``stllava.eval.convert`` on each benchmark whose raw file is present."""
    from stllava.eval.convert import convert, write

    for bench in names:
        src, images, expected, basis = CONVERT[bench]
        if not (run.out / src).is_file():
            continue
        try:
            items, stats = convert(bench, run.out / src, image_folder=run.out / images)
        except StllavaError as e:  # the converter's one-line error, e.g. an image missing
            run.fail(Failure(BAD_FILE, src, f"stllava.eval.convert refused it: {e}"))
            continue
        write(items, stats, run.eval_root / bench)
        run.count(bench, "converted test questions", stats["n_questions"], expected, basis)


def report(run: Run, manifest: Path | None, strict: bool) -> int:
    """Print the summary (failures by kind with their names, count mismatches, the manifest); returns
    the exit code."""
    by_kind = Counter(f.kind for f in run.failures)
    kinds = ", ".join(f"{by_kind[k]} {k}" for k in KINDS if by_kind[k])
    print(f"{len(run.failures)} file(s) failed" + (f": {kinds}" if kinds else ""))
    for f in sorted(run.failures, key=lambda f: (KINDS.index(f.kind), f.name)):
        print(f"  {f}")
    bad_counts = [c for c in run.counts if not c["ok"]]
    for c in bad_counts:
        print(f"count differs: {c['source']}: {c['what']}: {c['got']:,}, expected {c['expected']:,} ({c['basis']})")
    if manifest is not None:
        print(f"manifest: {manifest} ({len(json.loads(manifest.read_text())['files'])} files); check another copy "
              f"with: python -m stllava.data.download --verify {manifest}")
    if run.failures:
        print("rerun the same command to resume: verified files are skipped, partial downloads continue")
    (run.out / ".download").mkdir(parents=True, exist_ok=True)
    (run.out / ".download" / "report.json").write_text(json.dumps(
        {"failures": [f.__dict__ for f in run.failures], "counts": run.counts, "sources": run.sources,
         "manifest": str(manifest) if manifest else None}, indent=1) + "\n", encoding="utf-8")
    return EXIT_FAILED if run.failures or (strict and bad_counts) else EXIT_OK


def download(args: argparse.Namespace) -> int:
    """One download run (see the module docstring); returns the exit code."""
    names = _names(args.sources, SOURCES, "--sources")
    files_wanted = _names(args.llava_med_files, list(llava_med.FILES), "--llava-med-files")
    if "llava_med_images" in names and "image_urls" not in files_wanted:
        files_wanted.append("image_urls")
    revisions = {}
    for item in args.revision:
        key, _, rev = item.partition("=")
        if key not in sources.HUB_SOURCES or not rev:
            raise DownloadError(f"--revision {item!r}: fix: use SOURCE=REVISION with SOURCE one of "
                                f"{', '.join(sources.HUB_SOURCES)}")
        revisions[key] = rev
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out=out, eval_root=Path(args.eval_root), store=VerifiedStore(out), revisions=revisions)
    hub_names = [n for n in names if n in sources.HUB_SOURCES]
    if hub_names:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            raise DownloadError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so huggingface_hub refuses every "
                                "request; fix: run with both unset (env -u HF_HUB_OFFLINE -u TRANSFORMERS_OFFLINE "
                                "python -m stllava.data.download ...)")
        run.hub = Hub(args.hf_endpoint)
    try:
        for key in hub_names:
            files = sources.fetch_hub(run, key)
            if files is not None:
                sources.PREPARE[key](run, files)
        if "llava_med" in names or "llava_med_images" in names:
            got = llava_med.get_files(run, files_wanted, args.llava_med_url, args.llava_med_sums)
            if "llava_med_images" in names:
                llava_med.get_images(run, got, files_wanted, args.pmc_url, args.workers)
        check_images(run, args.workers)
        if not args.no_convert:
            convert_benchmarks(run, [n for n in names if n in CONVERT])
    finally:
        run.store.save()
    roots = [n for n in SOURCES if (out / n).is_dir()]  # llava_med_images writes into llava_med/images
    files = {rel: {"sha256": run.store.sha256(rel), "size": (out / rel).stat().st_size}
             for rel in list_files(out, roots)}
    run.store.save()
    try:  # sources fetched by earlier runs keep their record
        known = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8")).get("sources", {})
    except (OSError, ValueError, AttributeError):
        known = {}
    manifest = write_manifest(out, files, {**known, **run.sources})
    return report(run, manifest, args.strict_counts)


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(prog="python -m stllava.data.download",
                                description="Download VQA-RAD, SLAKE, PathVQA, the STLLaVA-Med DPO pairs and "
                                "LLaVA-Med's data, verify every file, convert the benchmarks and write a "
                                "manifest (docs/Data.md).")
    p.add_argument("--sources", default=",".join(DEFAULT_SOURCES),
                   help=f"comma list of {', '.join(SOURCES)}, or all (default: %(default)s; llava_med_images "
                        "fetches one PubMed Central article tarball per figure: tens of GB)")
    p.add_argument("--out", default="playground/data", help="data folder (default: %(default)s)")
    p.add_argument("--eval-root", default="playground/eval",
                   help="where the converted benchmarks go, as scripts/eval/run_benchmark.sh reads them "
                        "(default: %(default)s)")
    p.add_argument("--revision", action="append", default=[], metavar="SOURCE=REV",
                   help="hub revision of a source instead of the pinned one (e.g. slake=main); repeatable")
    p.add_argument("--hf-endpoint", default=os.environ.get("HF_ENDPOINT") or HUB_URL,
                   help="Hugging Face hub endpoint (default: $HF_ENDPOINT, else %s)" % HUB_URL)
    p.add_argument("--llava-med-url", default=os.environ.get("STLLAVA_LLAVA_MED_URL") or llava_med.BASE_URL,
                   help="base URL of LLaVA-Med's files (default: $STLLAVA_LLAVA_MED_URL, else LLaVA-Med's: "
                        "%s)" % llava_med.BASE_URL)
    p.add_argument("--pmc-url", default=os.environ.get("STLLAVA_PMC_URL") or llava_med.PMC_PREFIX,
                   help="replaces the %s prefix of the article tarball URLs (default: $STLLAVA_PMC_URL, else "
                        "that prefix)" % llava_med.PMC_PREFIX)
    p.add_argument("--llava-med-files", default=",".join(llava_med.DEFAULT_FILES),
                   help=f"which LLaVA-Med files: all, or a comma list of {', '.join(llava_med.FILES)} "
                        "(default: %(default)s)")
    p.add_argument("--llava-med-sums", default=None, metavar="FILE",
                   help="sha256sum-format checksums of LLaVA-Med's files (paths relative to --llava-med-url), "
                        "replacing the built-in ones")
    p.add_argument("--workers", type=int, default=8, help="parallel article downloads and image checks "
                   "(default: %(default)s)")
    p.add_argument("--strict-counts", action="store_true",
                   help="fail the run (exit 1) when a record count differs from the published number")
    p.add_argument("--no-convert", action="store_true", help="do not run stllava.eval.convert on the benchmarks")
    p.add_argument("--verify", default=None, metavar="MANIFEST",
                   help="instead of downloading: re-hash a folder against a manifest.json or SHA256SUMS and "
                        "list missing, changed and extra files (exit 1 on any)")
    p.add_argument("--folder", default=None, help="with --verify: the folder to check (default: the manifest's)")
    logs.add_log_level_arg(p)
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    for noisy in ("httpx", "httpx2"):  # one INFO line per HTTP request of huggingface_hub's client
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.verify is not None:
        result = verify_folder(args.verify, args.folder)
        print("\n".join(result.lines()))
        return EXIT_OK if result.ok else EXIT_FAILED
    return download(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 failed files, 2 bad usage)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

"""LLaVA-Med's instruction data and its PubMed Central images, from the URLs LLaVA-Med's own scripts use.

The JSON files come from the base URL of LLaVA-Med's ``download_data.sh`` and README
(``https://hanoverprod.z21.web.core.windows.net/med_llava/``, ``--llava-med-url`` to change). Their
SHA-256 and sizes are the ones LLaVA-Med published as git LFS pointers of the same files
(``data/**`` at commit d406e3fc7c3d1e4c797a7676de18cbfd070b6d2c of microsoft/LLaVA-Med; the sizes
match the README's table); ``--llava-med-sums`` replaces them with a ``sha256sum`` file.

Images: ``llava_med_image_urls.jsonl`` lists ``{pair_id, pmc_tar_url, image_file_path}``; as in
LLaVA-Med's ``llava/data/download_images.py`` each article's ``.tar.gz`` is downloaded, the figure
``image_file_path`` taken out as ``images/<pair_id>.jpg``, and the tarball deleted. Only the images the
downloaded instruction files name are fetched (all of them when none is downloaded). The
``https://ftp.ncbi.nlm.nih.gov/pub/pmc/`` prefix of the tarball URLs is replaced by ``--pmc-url``
(PMC also serves the same paths from its AWS Open Data bucket).
"""
from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stllava.data.fetch import BAD_FILE, MISSING, Expect, Failure, check_file, fetch_url, reject
from stllava.data.images import check_image
from stllava.data.manifest import PART_SUFFIX, read_checksums
from stllava.data.sources import DownloadError, Run

logger = logging.getLogger(__name__)

BASE_URL = "https://hanoverprod.z21.web.core.windows.net/med_llava/"
PMC_PREFIX = "https://ftp.ncbi.nlm.nih.gov/pub/pmc/"
# key: (path under the base URL, size, sha256) — LLaVA-Med's LFS pointers (see the module docstring).
FILES: dict[str, tuple[str, int | None, str | None]] = {
    "alignment_500k": ("alignment/llava_med_alignment_500k.json", 358112840,
                       "007456f3d6c2091466b3fb6cd0573f61a63fd0c937e568f44113d5a1f23e8b93"),
    "instruct_10k": ("instruct/llava_med_instruct_10k.json", 20176754,
                     "84f75c2b83404fe7dd1631212b4ad73228a0dad77bb819ab29c511a535a279c8"),
    "instruct_60k": ("instruct/llava_med_instruct_60k.json", 88758916,
                     "cf84c82fb58e391d6cf198e2657b6fc8584a180509b8813c3604ce46f6275c19"),
    "instruct_60k_inline_mention": ("instruct/llava_med_instruct_60k_inline_mention.json", 87669379,
                                    "b3649f4193a51215aee4519b44d8436a4200e182d6a78a3cb78672d97bea948a"),
    "instruct_fig_captions": ("instruct/llava_med_instruct_fig_captions.json", 169224662,
                              "1d58b7befd2687695cbba04e4f51fd648899b25f4f567815eb49538faf6f07fb"),
    "eval_qa50_qa": ("eval/llava_med_eval_qa50_qa.jsonl", None, None),  # a plain git file there: no pointer
    "eval_qa50_fig_captions": ("eval/llava_med_eval_qa50_fig_captions.json", 53066,
                               "64a4de84f8959a049ab9de68572318c6a299194b24368084159ef1f4a259aa66"),
    "eval_qa50_answers": ("eval/llava_med_qa50_instruct_caption_in_text_cleaned-60k-3epoch.json", 103392,
                          "442b2ea3bda35ddcd57475f350ee6b2e938da02835792232925b01fde0a288ef"),
    "image_urls": ("llava_med_image_urls.jsonl", 128785989,
                   "2604441ec3d1f6324d21846cfd44f92eab29454beed1da42a98d943b41731e44"),
}
DEFAULT_FILES = ("instruct_60k_inline_mention", "image_urls")
SAFE_NAME = re.compile(r"^[\w.\-]+$")


def expectations(sums: str | None) -> dict[str, Expect]:
    """{key: published size and SHA-256}; with ``sums`` (a sha256sum file, paths relative to the base
    URL) its checksums replace the built-in ones, and a file it does not list has none."""
    if sums is None:
        return {k: Expect(size=size, sha256=sha) for k, (_, size, sha) in FILES.items()}
    listed = read_checksums(sums)
    return {k: Expect(sha256=listed.get(rel, {}).get("sha256")) for k, (rel, _, _) in FILES.items()}


def records(path: Path) -> list:
    """The records of a JSON list or a JSONL file (ValueError when it is neither)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"expected a JSON list, got {type(data).__name__}")
    return data


def get_files(run: Run, keys: list[str], base_url: str, sums: str | None) -> dict[str, Path]:
    """Download LLaVA-Med's files ``keys``; returns {key: path} of those that arrived intact."""
    expect = expectations(sums)
    run.sources["llava_med"] = {"kind": "http", "base_url": base_url,
                                "checksums": sums or "LLaVA-Med's git LFS pointers (d406e3f)"}
    good = {}
    for key in keys:
        rel_url = FILES[key][0]
        rel = f"llava_med/{rel_url}"
        if not run.store.current(rel, expect[key].key()):
            failure = fetch_url(base_url.rstrip("/") + "/" + rel_url, run.out / rel, rel)
            sha256 = None
            if failure is None:
                failure, sha256 = check_file(run.out / rel, rel, expect[key])
                if failure is not None:
                    logger.error("%s: moved to %s", rel, reject(run.out, rel))
            if failure is not None:
                run.fail(failure)
                continue
            run.store.record(rel, sha256, expect[key].key())
        try:
            n = len(records(run.out / rel))
        except (ValueError, UnicodeDecodeError) as e:
            run.fail(Failure(BAD_FILE, rel, f"not valid JSON: {e}"))
            continue
        run.count("llava_med", f"records in {rel_url}", n, None)
        good[key] = run.out / rel
    return good


def get_images(run: Run, files: dict[str, Path], selected: list[str], pmc_url: str, workers: int) -> None:
    """Fetch the PMC figures the ``selected`` instruction files name (all, when none is selected) into
    ``llava_med/images/<pair_id>.jpg``; one tarball per article, several articles at once. Skipped
    (the instruction file's failure is reported) while a selected instruction file is not in ``files``."""
    urls_path = files.get("image_urls")
    if urls_path is None:
        raise DownloadError("llava_med_images needs llava_med_image_urls.jsonl; fix: include image_urls in "
                            "--llava-med-files (it is downloaded with the llava_med source)")
    instruct = [k for k in selected if k.startswith("instruct")]
    if any(k not in files for k in instruct):
        logger.error("llava_med_images: skipped until the instruction files arrive (they name the images to fetch)")
        return
    wanted = None  # no instruction file chosen: every image of llava_med_image_urls.jsonl
    for key in instruct:
        wanted = (wanted or set()) | {r["image"] for r in records(files[key])
                                      if isinstance(r, dict) and isinstance(r.get("image"), str)}
    by_tar: dict[str, list[dict]] = {}
    malformed = []
    for n, r in enumerate(records(urls_path), 1):
        if not (isinstance(r, dict) and isinstance(r.get("pmc_tar_url"), str) and "pair_id" in r):
            malformed.append(n)
        elif wanted is None or f"{r['pair_id']}.jpg" in wanted:
            by_tar.setdefault(r["pmc_tar_url"], []).append(r)
    if malformed:
        run.fail(Failure(BAD_FILE, "llava_med/llava_med_image_urls.jsonl", f"{len(malformed)} records without "
                         f"pair_id and pmc_tar_url (lines {malformed[:5]}), skipped"))
    run.sources["llava_med_images"] = {"kind": "http", "pmc_url": pmc_url}
    todo = {url: rs for url, rs in by_tar.items()
            if not all(run.store.current(f"llava_med/images/{r['pair_id']}.jpg", "image-ok") for r in rs)}
    n_images = sum(len(rs) for rs in by_tar.values())
    logger.info("llava_med_images: %d images from %d articles; %d articles to fetch", n_images, len(by_tar), len(todo))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for failures in pool.map(lambda item: fetch_article(run, *item, pmc_url), sorted(todo.items())):
            for f in failures:
                run.fail(f)
    present = sum((run.out / f"llava_med/images/{r['pair_id']}.jpg").is_file() for rs in by_tar.values() for r in rs)
    run.count("llava_med_images", "images present", present, n_images, "the images the instruction files name")


def fetch_article(run: Run, tar_url: str, recs: list[dict], pmc_url: str) -> list[Failure]:
    """Download one article tarball, take out its figures ``recs`` as ``images/<pair_id>.jpg`` (each
    checked to decode), delete the tarball; returns the failures, one per image not delivered."""
    names = [f"llava_med/images/{r.get('pair_id')}.jpg" for r in recs]
    bad = [n for n, r in zip(names, recs) if not SAFE_NAME.match(str(r.get("pair_id", "")))]
    if bad or not SAFE_NAME.match(os.path.basename(tar_url)):
        return [Failure(BAD_FILE, n, f"unsafe pair_id or tarball name in llava_med_image_urls.jsonl ({tar_url})")
                for n in names]
    url = pmc_url.rstrip("/") + "/" + tar_url[len(PMC_PREFIX):] if tar_url.startswith(PMC_PREFIX) else tar_url
    tar_path = run.out / ".download" / "pmc" / os.path.basename(tar_url)
    failure = fetch_url(url, tar_path, names[0])
    if failure is not None:
        return [Failure(failure.kind, n, failure.detail) for n in names]
    failures = []
    try:
        with tarfile.open(tar_path, "r:gz") as tar:
            for name, r in zip(names, recs):
                try:
                    member = tar.extractfile(r["image_file_path"])
                except KeyError:
                    member = None
                if member is None:
                    failures.append(Failure(MISSING, name, f"{r.get('image_file_path')} is not in {url}"))
                    continue
                dest = run.out / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(dest.name + PART_SUFFIX)
                with member, open(tmp, "wb") as f:
                    while block := member.read(1 << 20):
                        f.write(block)
                os.replace(tmp, dest)
                problem = check_image(str(dest))
                if problem is not None:
                    failures.append(Failure(BAD_FILE, name, f"{problem[0]}: {problem[1]}"))
                    logger.error("%s: moved to %s", name, reject(run.out, name))
                else:
                    run.store.record(name, expect="image-ok")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        failures = [Failure(BAD_FILE, n, f"{url} is not a readable .tar.gz ({e}); it is deleted: rerun to fetch "
                            "it again") for n in names if not (run.out / n).is_file()]
    tar_path.unlink(missing_ok=True)
    return failures

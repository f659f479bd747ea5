"""``python -m stllava.data.download`` against local stand-ins of its sources (tests/data/fake_sources.py):
every bad file is named with its kind and counted, a rerun resumes, the manifest verifies elsewhere.
No network beyond 127.0.0.1; huggingface_hub's offline switch is lifted only in the subprocess."""
import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest
from fake_sources import FakeSources, Repo
from PIL import Image

from stllava.data import download
from stllava.data.manifest import ManifestError, git_blob_sha1, read_checksums, verify_folder

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSTRUCT = "/med_llava/instruct/llava_med_instruct_60k_inline_mention.json"
URLS = "/med_llava/llava_med_image_urls.jsonl"
PMC = "https://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/"


def picture(color, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), color).save(buf, fmt)
    return buf.getvalue()


def archive(kind: str, members: dict) -> bytes:
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return buf.getvalue()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue())


def dumps(obj) -> bytes:
    return json.dumps(obj).encode()


def make_sources(faults: bool) -> FakeSources:
    """SLAKE and the DPO pairs on the hub, LLaVA-Med's files and two PMC articles over HTTP. With
    ``faults``: SLAKE's mask.txt is listed but answers 404, the DPO pairs' bytes differ from what the
    listing publishes, and the instruction file is cut short on its first download."""
    def q(qid, img, question, answer, typ, lang="en"):
        return {"qid": qid, "img_name": img, "question": question, "answer": answer, "answer_type": typ,
                "q_lang": lang}

    slake = {"README.md": b"# SLAKE (test copy)\n",
             "train.json": dumps([q(1, "xmlab0/source.jpg", "Is this a CT?", "Yes", "CLOSED"),
                                  q(2, "xmlab0/source.jpg", "这是CT吗?", "是", "CLOSED", "zh")]),
             "validation.json": dumps([q(5, "xmlab1/source.jpg", "Where is the liver?", "Left", "OPEN")]),
             "test.json": dumps([q(10, "xmlab1/source.jpg", "Which organ is shown?", "Liver", "OPEN"),
                                 q(11, "xmlab0/source.jpg", "Is the lung healthy?", "No", "CLOSED"),
                                 q(12, "xmlab0/source.jpg", "肺健康吗?", "否", "CLOSED", "zh")]),
             "imgs.zip": archive("zip", {"imgs/xmlab0/source.jpg": picture("gray"),
                                         "imgs/xmlab0/mask.png": picture("black", "PNG"),
                                         "imgs/xmlab1/source.jpg": picture("white")}),
             "mask.txt": b"0 background\n1 liver\n"}
    pairs = dumps([{"id": "p0", "image": "P1_F1.jpg", "chosen": "a", "rejected": "b"}])
    src = FakeSources(repos={
        "BoKelvin/SLAKE": Repo(files=slake, lfs={"imgs.zip"}),
        "ZachSun/STLLaVA-Med-DPO": Repo(files={"README.md": b"# DPO pairs\n", "pairs.json": pairs}, lfs={"pairs.json"},
                                        published={"pairs.json": pairs.replace(b'"a"', b'"A"')} if faults else {}),
    })
    conv = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A figure."}]
    src.files[INSTRUCT] = dumps([{"id": "a", "image": "P1_F1.jpg", "conversations": conv},
                                 {"id": "b", "image": "P2_F1.jpg", "conversations": conv}] * 20)
    src.files[URLS] = b"".join(dumps({"pair_id": f"P{i}_F1", "pmc_tar_url": f"{PMC}aa/0{i}/PMC{i}.tar.gz",
                                      "image_file_path": f"PMC{i}/fig1.jpg"}) + b"\n" for i in (1, 2, 3))
    for i in (1, 3):
        src.files[f"/pmc/oa_package/aa/0{i}/PMC{i}.tar.gz"] = archive("tar", {f"PMC{i}/fig1.jpg": picture("red"),
                                                                              f"PMC{i}/article.nxml": b"<a/>"})
    if not faults:
        src.files["/pmc/oa_package/aa/02/PMC2.tar.gz"] = archive("tar", {"PMC2/fig1.jpg": picture("blue")})
    else:
        src.missing.add("/mask.txt")
        src.truncate_once.add(INSTRUCT)
    return src


@pytest.fixture
def served(tmp_path):
    def start(faults=True):
        src = make_sources(faults)
        base = src.start()
        sums = tmp_path / "llava_med.sha256"
        sums.write_text("".join(f"{hashlib.sha256(src.files[p]).hexdigest()}  {p[len('/med_llava/'):]}\n"
                                for p in (INSTRUCT, URLS)))
        started.append(src)
        return src, base, sums

    started = []
    yield start
    for src in started:
        src.stop()


def run_download(tmp_path, base, sums, *args, env_extra=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") and "proxy" not in k.lower()}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1,localhost", **(env_extra or {}))
    cmd = [sys.executable, "-m", "stllava.data.download", "--out", str(tmp_path / "data"),
           "--eval-root", str(tmp_path / "eval"), "--hf-endpoint", base, "--llava-med-url", f"{base}/med_llava/",
           "--pmc-url", f"{base}/pmc/", "--llava-med-sums", str(sums), "--workers", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


def failures(tmp_path):
    report = json.loads((tmp_path / "data" / ".download" / "report.json").read_text())
    return {(f["kind"], f["name"]) for f in report["failures"]}


def verify(manifest, *extra):
    return subprocess.run([sys.executable, "-m", "stllava.data.download", "--verify", str(manifest), *extra],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


SOURCES = "--sources=slake,dpo,llava_med,llava_med_images"
INSTRUCT_REL = "llava_med/instruct/llava_med_instruct_60k_inline_mention.json"


def test_each_bad_file_is_named_the_rest_arrives_a_rerun_resumes_and_the_manifest_verifies(tmp_path, served):
    src, base, sums = served()
    data = tmp_path / "data"

    first = run_download(tmp_path, base, sums, SOURCES)
    assert first.returncode == 1, first.stderr
    assert failures(tmp_path) == {("missing", "slake/mask.txt"), ("checksum mismatch", "dpo/pairs.json"),
                                  ("truncated", INSTRUCT_REL)}
    assert "3 file(s) failed: 1 missing, 1 checksum mismatch, 1 truncated" in first.stdout
    for name in ("slake/mask.txt", "dpo/pairs.json", INSTRUCT_REL):
        assert name in first.stdout
    assert "Traceback" not in first.stderr
    # everything else arrived and was converted; the counts differ from SLAKE's paper: reported, not failed
    assert "count differs: slake: English question-answer pairs: 4, expected 7,033" in first.stdout
    converted = json.loads((tmp_path / "eval" / "slake" / "test.json").read_text())
    assert [item["id"] for item in converted] == [10, 11]
    assert (data / "slake" / "imgs" / "xmlab1" / "source.jpg").is_file()
    part = data / (INSTRUCT_REL + ".part")
    assert 0 < part.stat().st_size < len(src.files[INSTRUCT])
    assert (data / ".download" / "rejected" / "dpo" / "pairs.json").is_file() and not (data / "dpo/pairs.json").exists()
    # the manifest lists what arrived intact, and nothing in transit
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["sources"]["slake"]["revision"] == "0123456789abcdef0123456789abcdef01234567"
    listed = set(manifest["files"])
    assert {"slake/test.json", "slake/imgs.zip", "slake/imgs/xmlab0/mask.png", "dpo/README.md"} <= listed
    assert not [r for r in listed if r.endswith(".part") or "/.cache/" in r or r in ("dpo/pairs.json", INSTRUCT_REL)]
    assert read_checksums(data / "SHA256SUMS") == {r: {"sha256": e["sha256"]} for r, e in manifest["files"].items()}
    assert verify(data / "manifest.json").returncode == 0

    # rerun: the cut file continues where it stopped; verified files are not fetched again
    n = len(src.requests)
    second = run_download(tmp_path, base, sums, SOURCES)
    assert second.returncode == 1, second.stderr
    resumed = [r for r in src.requests[n:] if r[1] == INSTRUCT]
    assert resumed == [("GET", INSTRUCT, f"bytes={len(src.files[INSTRUCT]) // 2}-")]
    assert (data / INSTRUCT_REL).read_bytes() == src.files[INSTRUCT] and not part.exists()
    assert not [r for r in src.requests[n:] if r[1].endswith(("/test.json", "/imgs.zip"))]
    # now the images the instruction file names are fetched: P1 arrives, P2's article is gone, P3 is not needed
    assert failures(tmp_path) == {("missing", "slake/mask.txt"), ("checksum mismatch", "dpo/pairs.json"),
                                  ("missing", "llava_med/images/P2_F1.jpg")}
    assert (data / "llava_med" / "images" / "P1_F1.jpg").is_file()
    assert not [r for r in src.requests if "PMC3" in r[1]] and not list((data / ".download" / "pmc").glob("*.gz"))

    ok = verify(data / "manifest.json")
    assert ok.returncode == 0 and "0 missing, 0 changed, 0 extra -> OK" in ok.stdout
    # another machine's copy: one file changed, one gone, one added -> each named, exit 1
    (data / "slake" / "test.json").write_text("[]")
    (data / "dpo" / "README.md").unlink()
    (data / "slake" / "imgs" / "notes.txt").write_text("mine")
    bad = verify(data / "manifest.json")
    assert bad.returncode == 1
    assert {"changed: slake/test.json", "missing: dpo/README.md", "extra: slake/imgs/notes.txt"} <= set(
        bad.stdout.splitlines())
    assert "1 missing, 1 changed, 1 extra -> MISMATCH" in bad.stdout


def test_a_count_mismatch_fails_the_run_only_with_strict_counts(tmp_path, served):
    _, base, sums = served(faults=False)
    loose = run_download(tmp_path, base, sums, "--sources=slake")
    assert loose.returncode == 0, loose.stdout + loose.stderr
    assert "0 file(s) failed" in loose.stdout and "count differs: slake: images" in loose.stdout
    strict = run_download(tmp_path, base, sums, "--sources=slake", "--strict-counts")
    assert strict.returncode == 1 and "count differs" in strict.stdout


def test_parquet_sources_give_the_layout_the_converters_and_eval_scripts_read(tmp_path, served):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    def parquet(rows):
        buf = io.BytesIO()
        pq.write_table(pa.table({"image": [{"bytes": r[0], "path": None} for r in rows],
                                 "question": [r[1] for r in rows], "answer": [r[2] for r in rows]}), buf)
        return buf.getvalue()

    red, blue = picture("red"), picture("blue", "PNG")
    src, base, sums = served(faults=False)
    src.repos["flaviagiammarino/vqa-rad"] = Repo(lfs={"data/train-00000-of-00001-aa.parquet"}, files={
        "README.md": b"# VQA-RAD\n",
        "data/train-00000-of-00001-aa.parquet": parquet([(red, "is this a ct?", "yes")]),
        "data/test-00000-of-00001-bb.parquet": parquet([(red, "is there a fracture?", "no"),
                                                        (blue, "which side?", "left")])})
    src.repos["flaviagiammarino/path-vqa"] = Repo(files={
        "data/test-00000-of-00001.parquet": parquet([(blue, "is this tissue?", "yes"), (red, "what stain?", "h&e")]),
        "data/validation-00000-of-00001.parquet": parquet([(red, "where?", "liver")])})
    done = run_download(tmp_path, base, sums, "--sources=vqa_rad,pvqa")
    assert done.returncode == 0, done.stdout + done.stderr
    test = json.loads((tmp_path / "data" / "vqa_rad" / "testset.json").read_text())
    assert [(r["qid"], r["answer"], r["answer_type"]) for r in test] == [(0, "no", "CLOSED"), (1, "left", "OPEN")]
    assert test[1]["image_name"].endswith(".png") and test[0]["image_name"].endswith(".jpg")
    stats = json.loads((tmp_path / "eval" / "vqa_rad" / "stats.json").read_text())
    assert (stats["n_questions"], stats["n_images"], stats["n_closed"]) == (2, 2, 1)
    assert "count differs: vqa_rad: test questions: 2, expected 451" in done.stdout
    pvqa = json.loads((tmp_path / "eval" / "pvqa" / "test.json").read_text())
    assert [(i["answer_type"], i["conversations"][1]["value"]) for i in pvqa] == [("CLOSED", "yes"), ("OPEN", "h&e")]
    assert (tmp_path / "data" / "pvqa" / "images" / "val").is_dir()
    assert verify(tmp_path / "data" / "manifest.json").returncode == 0


def test_offline_mode_is_refused_in_one_line(tmp_path, capsys):
    # conftest sets HF_HUB_OFFLINE=1 for the test process, as a user's environment might
    assert download.main(["--sources", "slake", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: HF_HUB_OFFLINE") and "fix:" in err and "Traceback" not in err


def test_verify_reads_the_shared_vqa_rad_sha256sums(vqa_rad_dir):
    result = verify_folder(vqa_rad_dir / "SHA256SUMS")
    assert result.ok and result.n_listed == 317  # 315 images and the two JSON files


def test_checksum_files_are_read_strictly(tmp_path):
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{'a' * 64}  ok.txt\n{'b' * 64} *bin.dat\n")
    assert read_checksums(sums) == {"ok.txt": {"sha256": "a" * 64}, "bin.dat": {"sha256": "b" * 64}}
    sums.write_text(f"{'a' * 64}  ../outside.txt\n")
    with pytest.raises(ManifestError, match="leaves the folder"):
        read_checksums(sums)
    sums.write_text(f"{'a' * 64}  ok.txt\nnot a checksum line\n")
    with pytest.raises(ManifestError, match="line 2"):
        read_checksums(sums)
    (tmp_path / "hello").write_bytes(b"hello\n")
    assert git_blob_sha1(tmp_path / "hello") == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object`


def test_every_flag_has_help_and_a_bad_flag_exits_2():
    parser = download.build_parser()
    assert parser.prog == "python -m stllava.data.download"
    assert not [a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    with pytest.raises(SystemExit) as e:
        download.main(["--no-such-flag"])
    assert e.value.code == 2


def test_an_archive_member_cannot_leave_its_folder(tmp_path):
    from stllava.data.fetch import VerifiedStore
    from stllava.data.sources import Run, unpack_zip

    zpath = tmp_path / "out" / "slake" / "imgs.zip"
    zpath.parent.mkdir(parents=True)
    zpath.write_bytes(archive("zip", {"imgs/xmlab0/source.jpg": picture("gray"), "imgs/../../evil.txt": b"x"}))
    run = Run(out=tmp_path / "out", eval_root=tmp_path / "eval", store=VerifiedStore(tmp_path / "out"))
    assert unpack_zip(run, zpath, tmp_path / "out" / "slake" / "imgs", strip="imgs") is False
    assert [(f.kind, f.name) for f in run.failures] == [("bad content", "slake/imgs.zip")]
    assert "leaves the folder" in run.failures[0].detail
    assert (tmp_path / "out" / "slake" / "imgs" / "xmlab0" / "source.jpg").is_file()
    assert not list(tmp_path.rglob("evil.txt"))

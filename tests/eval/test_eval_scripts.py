"""scripts/eval/run_benchmark.sh (and its per-benchmark wrappers) and scripts/run_sharded.sh."""
import json
import os
import pathlib
import stat
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

# A stand-in for `python -m stllava.eval.model_vqa` that answers with the ground truth: it checks
# the script's merging and scoring plumbing without loading a model (the real tool runs below).
FAKE_MODEL_VQA = '''
import argparse, json, math, os, pathlib, sys
p = argparse.ArgumentParser()
for flag in ("--model-path", "--question-file", "--image-folder", "--out"):
    p.add_argument(flag, required=True)
p.add_argument("--num-chunks", type=int, required=True)
p.add_argument("--chunk-idx", type=int, required=True)
p.add_argument("--temperature", type=float, required=True)
p.add_argument("--conv-mode")
a, extra = p.parse_known_args()
if os.environ.get("FAIL_CHUNK") == str(a.chunk_idx):
    raise SystemExit("stand-in model failed")
questions = [json.loads(l) for l in open(a.question_file)]
size = math.ceil(len(questions) / a.num_chunks)
chunk = questions[a.chunk_idx * size:(a.chunk_idx + 1) * size]
truth = {str(t["id"]): t["conversations"][1]["value"]
         for t in json.load(open(pathlib.Path(a.question_file).with_name("test.json")))}
with open(a.out, "w") as f:
    for q in chunk:
        f.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"],
                            "text": truth[str(q["question_id"])], "answer_id": "x",
                            "model_id": a.model_path,
                            "metadata": {"gpu": os.environ["CUDA_VISIBLE_DEVICES"], "conv_mode": a.conv_mode,
                                         "extra": extra}}) + "\\n")
'''


def _fake_python(tmp_path):
    """An interpreter wrapper that logs its arguments to calls.log and runs the stand-in for
    `-m stllava.eval.model_vqa` (everything else runs for real)."""
    (tmp_path / "fake_model_vqa.py").write_text(FAKE_MODEL_VQA)
    wrapper = tmp_path / "python"
    wrapper.write_text(f'''#!/usr/bin/env bash
echo "$*" >> "{tmp_path / 'calls.log'}"
if [ "$1" = "-m" ] && [ "$2" = "stllava.eval.model_vqa" ]; then
    shift 2; exec "{sys.executable}" "{tmp_path / 'fake_model_vqa.py'}" "$@"
fi
exec "{sys.executable}" "$@"
''')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return wrapper


def _synthetic_vqa_rad(tmp_path, images=None):
    """Five VQA-RAD split-file records; returns the scripts' environment."""
    if images is None:
        images = tmp_path / "images"
        images.mkdir()
        for i in range(5):
            (images / f"synpic{i}.jpg").write_bytes(b"jpg")
    names = sorted(p.name for p in images.iterdir())[:5]
    records = [{"qid": 100 + i, "image_name": names[i], "question": f"Q{i}?",
                "answer": ["yes", "no", "left lung", "axial", "Yes"][i],
                "answer_type": ["CLOSED", "CLOSED", "OPEN", "OPEN", "CLOSED"][i], "phrase_type": "freeform"}
               for i in range(5)]
    (tmp_path / "testset.json").write_text(json.dumps(records))
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "3,5", "MODEL_PATH": "ckpt/stllava-test",
            "SRC": str(tmp_path / "testset.json"), "IMAGE_FOLDER": str(images), "EVAL_ROOT": str(tmp_path / "eval")}


def _script(name, env, *args):
    return subprocess.run(["bash", str(REPO / "scripts/eval" / name), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_wrapper_shards_merges_and_scores(tmp_path):
    env = {**_synthetic_vqa_rad(tmp_path), "PYTHON": str(_fake_python(tmp_path)), "CONV_MODE": "v1_sq"}
    proc = _script("vqa_rad.sh", env, "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr
    answers = tmp_path / "eval/vqa_rad/answers/stllava-test"
    merged = [json.loads(line) for line in (answers / "merge.jsonl").read_text().splitlines()]
    assert [m["question_id"] for m in merged] == [100, 101, 102, 103, 104]  # chunks in order
    assert [m["metadata"]["gpu"] for m in merged] == ["3", "3", "3", "5", "5"]  # one process per GPU
    assert {m["metadata"]["conv_mode"] for m in merged} == {"v1_sq"}
    assert {tuple(m["metadata"]["extra"]) for m in merged} == {("--batch-size", "4")}  # flags reach model_vqa
    assert sorted(p.name for p in answers.iterdir()) == ["merge.chunk0of2.jsonl", "merge.chunk1of2.jsonl",
                                                         "merge.jsonl"]
    result = json.loads((tmp_path / "eval/results/stllava-test/vqa_rad/metrics.json").read_text())
    assert result["benchmark"] == "vqa_rad" and result["overall"]["n_scored"] == 5
    assert result["overall"]["closed_acc"] == 100.0 and result["overall"]["open_recall"] == 100.0


def test_template_left_to_the_checkpoint_unless_conv_mode_is_set(tmp_path):
    env = {**_synthetic_vqa_rad(tmp_path), "PYTHON": str(_fake_python(tmp_path))}
    env.pop("CONV_MODE", None)
    assert _script("run_benchmark.sh", env, "vqa_rad").returncode == 0
    merged = (tmp_path / "eval/vqa_rad/answers/stllava-test/merge.jsonl").read_text().splitlines()
    assert {json.loads(line)["metadata"]["conv_mode"] for line in merged} == {None}  # no --conv-mode passed


def test_a_failing_shard_stops_the_run_before_merging(tmp_path):
    env = {**_synthetic_vqa_rad(tmp_path), "PYTHON": str(_fake_python(tmp_path)), "FAIL_CHUNK": "1"}
    proc = _script("vqa_rad.sh", env)
    assert proc.returncode == 1
    assert "chunk 1 of 2 (stllava.eval.model_vqa on GPU 5) failed" in proc.stderr
    assert not (tmp_path / "eval/vqa_rad/answers/stllava-test/merge.jsonl").exists()
    assert not (tmp_path / "eval/results").exists()


@pytest.mark.parametrize("wrapper,bench", [("slake.sh", "slake"), ("pvqa.sh", "pvqa")])
def test_each_wrapper_names_its_benchmark(tmp_path, wrapper, bench):
    env = {**os.environ, "SRC": str(tmp_path / "missing.json"), "EVAL_ROOT": str(tmp_path / "eval"),
           "PYTHON": str(_fake_python(tmp_path))}
    proc = _script(wrapper, env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "missing.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == [f"-m stllava.eval.convert {bench} --src {tmp_path / 'missing.json'} --out "
                     f"{tmp_path / 'eval' / bench} --image-folder {env_default_images(bench)}"]
    proc = _script("run_benchmark.sh", env, "mimic")
    assert proc.returncode == 2 and "usage: bash scripts/eval/run_benchmark.sh vqa_rad|slake|pvqa" in proc.stderr


def env_default_images(bench):
    return {"slake": "playground/data/slake/imgs", "pvqa": "playground/data/pvqa/images/test"}[bench]


def test_scripts_default_to_this_checkouts_venv(tmp_path):
    """From a fresh shell (no venv active) the scripts use .venv/bin/python when it exists."""
    (tmp_path / "whichpython.py").write_text(
        "import argparse, json, sys\np = argparse.ArgumentParser()\np.add_argument('--out')\n"
        "a, _ = p.parse_known_args()\nopen(a.out, 'w').write(json.dumps({'prefix': sys.prefix}) + '\\n')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": "0"}
    env.pop("PYTHON", None)
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = "/usr/bin:/bin"
    venv = REPO / ".venv"
    if not (venv / "bin/python").exists():
        pytest.skip("this checkout has no .venv")
    out = tmp_path / "o.jsonl"
    proc = subprocess.run(["bash", str(REPO / "scripts/run_sharded.sh"), str(out), "whichpython"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert pathlib.Path(json.loads(out.read_text())["prefix"]).resolve() == venv.resolve()


@pytest.mark.slow
def test_real_model_vqa_on_two_cpu_processes_equals_one(tiny_bundle, tmp_path):
    """The real tool, 2 processes with --device cpu: merged answers equal a single-process run's."""
    from importlib import resources

    images = resources.files("stllava") / "assets" / "vqa_rad" / "images"
    env = {**_synthetic_vqa_rad(tmp_path, pathlib.Path(str(images))), "PYTHON": sys.executable,
           "MODEL_PATH": tiny_bundle["model"], "CKPT": "two", "CUDA_VISIBLE_DEVICES": "0,1", "OMP_NUM_THREADS": "1"}
    flags = ("--device", "cpu", "--max-new-tokens", "6", "--min-new-tokens", "6", "--no-progress")
    assert (proc := _script("vqa_rad.sh", env, *flags)).returncode == 0, proc.stderr
    assert (proc := _script("vqa_rad.sh", {**env, "CKPT": "one", "CUDA_VISIBLE_DEVICES": "0"}, *flags)).returncode == 0
    two, one = ([json.loads(line) for line in (tmp_path / f"eval/vqa_rad/answers/{c}/merge.jsonl").open()]
                for c in ("two", "one"))
    assert len(two) == 5 and all(r["text"] for r in two)
    drop = ("answer_id",)  # a fresh uuid per answer, as LLaVA's
    assert [{k: v for k, v in r.items() if k not in drop} for r in two] == \
           [{k: v for k, v in r.items() if k not in drop} for r in one]

"""The benchmark scripts themselves: the GPU check's dry run on CPU, its no-CUDA exit, and the
growth labels of the scaling benchmark."""
import importlib.util
import json
import os
import subprocess

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = os.path.join(REPO, "scripts", "gpu_check.sh")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_on_cpu(tmp_path):
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", GPU_CHECK, "--dry-run"], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for step in ("parity", "sft", "generate", "projector-fp32", "projector-bf16"):
        assert f"=== {step}: done" in res.stdout, step
    assert "all steps done" in res.stdout
    parity = json.load(open(tmp_path / "parity.json"))
    assert parity["ok"] and parity["kernels"] == ["sdpa", "eager"] and parity["rel_l2"] < 1e-4
    sft = json.load(open(tmp_path / "sft.json"))
    assert sft["mode"] == "7b" and sft["tokens_per_s"] > 0 and sft["achieved_tflops"] > 0
    rows = json.load(open(tmp_path / "generate.json"))["rows"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["tokens_per_s"] > 0 for r in rows)
    for log in ("projector-fp32.log", "projector-bf16.log"):
        assert "ratios published / ours" in (tmp_path / log).read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the real check would run")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    res = subprocess.run(["bash", GPU_CHECK], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "GPU_CHECK_OUT": str(tmp_path)})
    assert res.returncode == 0 and "no CUDA device" in res.stdout
    bad = subprocess.run(["bash", GPU_CHECK, "--fast"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_scaling_growth_labels():
    growth = _script("bench_scaling").growth
    xs = [128, 256, 512, 1024]
    assert growth(xs, [1.0 + 0.01 * x for x in xs])["label"] == "linear"
    assert growth(xs, [1.0 + 1e-5 * x * x for x in xs])["label"] == "quadratic"
    assert growth(xs, [5.0, 5.1, 5.05, 5.2])["label"] == "flat"
    mixed = growth(xs, [1.0 + 0.02 * x + 1e-5 * x * x for x in xs])  # x² is 1/3 of the growth at 1024
    assert mixed["label"] == "linear + quadratic" and mixed["c"] == pytest.approx(1e-5)
    f = growth([1, 2, 4, 8, 16, 32], [0.5 + 0.01 * b for b in [1, 2, 4, 8, 16, 32]])
    assert f["label"] == "linear" and f["fixed_share"] == pytest.approx(0.5 / 0.82)

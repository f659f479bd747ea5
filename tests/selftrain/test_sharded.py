"""scripts/run_sharded.sh with the real stage-2 tool: 2 CPU processes write what 1 process writes."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_questions_on_two_processes_merge_to_the_single_process_file(tiny_bundle, tmp_path):
    g = torch.Generator().manual_seed(3)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        arr = (torch.rand(30 + 7 * i, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"img{i}.png")
    args = ["stllava.selftrain.questions", "--model-path", tiny_bundle["model"], "--image-folder", str(folder),
            "--device", "cpu", "--n-questions", "3", "--max-desc-tokens", "8", "--max-question-tokens", "8",
            "--min-new-tokens", "2", "--no-progress"]
    outs = {}
    for name, gpus in (("two", "0,1"), ("one", "0")):
        env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": gpus, "OMP_NUM_THREADS": "1"}
        outs[name] = tmp_path / name / "questions.jsonl"
        proc = subprocess.run(["bash", str(REPO / "scripts/run_sharded.sh"), str(outs[name]), *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
    chunks = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert chunks == ["questions.chunk0of2.jsonl", "questions.chunk1of2.jsonl", "questions.jsonl"]
    assert [len((tmp_path / "two" / c).read_text().splitlines()) for c in chunks] == [3, 2, 5]
    assert outs["two"].read_bytes() == outs["one"].read_bytes()  # merged chunks == one process, byte for byte

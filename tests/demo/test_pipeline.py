"""The demo's data stage depends on --seed and records it (stllava.demo.pipeline.Demo.data)."""
import json

import numpy as np
import pytest
from PIL import Image

from stllava.artifacts import ArtifactError
from stllava.demo.pipeline import Demo, DemoConfig

SMALL = dict(n_labelled=3, n_unlabelled=3, n_val=2, n_test=2)
FIRST = {"unlabelled": "unl_0000.png", "val": "val_0000.png", "test": "test_0000.png"}  # each split's first image


def test_demo_data_records_and_follows_its_seed(tmp_path):
    demo0 = Demo(DemoConfig(workdir=str(tmp_path / "s0"), seed=0, **SMALL))
    demo0.data()
    marker = json.load(open(tmp_path / "s0" / "data" / ".done.json"))
    assert marker["settings"]["seed"] == 0
    # another seed in the same workdir is not silently given seed 0's data: the stage refuses
    with pytest.raises(ArtifactError, match="seed: 0 → 1"):
        Demo(DemoConfig(workdir=str(tmp_path / "s0"), seed=1, **SMALL)).data()
    # in its own workdir, seed 1 has its own phantoms
    Demo(DemoConfig(workdir=str(tmp_path / "s1"), seed=1, **SMALL)).data()
    assert json.load(open(tmp_path / "s1" / "data" / ".done.json"))["settings"]["seed"] == 1
    for split, name in FIRST.items():
        image = f"data/phantoms/{split}/images/{name}"
        a, b = (np.asarray(Image.open(tmp_path / s / image)) for s in ("s0", "s1"))
        assert not np.array_equal(a, b), split

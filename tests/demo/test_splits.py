"""The phantom splits cannot share an image: each split's stream is keyed by its name and seed
(stllava.demo.data), the study checks the rendered images before it trains, and
``python -m stllava.demo.study --splits-only`` lists them."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from stllava.demo.data import build_labelled, build_shared, split_overlaps, stream_key
from stllava.demo.study import main, parse_seeds
from stllava.errors import run_cli

SEEDS = range(10)
SPLITS = ("labelled", "unlabelled", "val", "test")


def pixels(path: str) -> str:
    """A digest of the picture itself (its pixel array), independent of the library's digest."""
    return hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest()


def pngs(folder) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))


def test_every_split_of_seeds_0_to_9_is_disjoint(tmp_path):
    """Every split rendered for every seed 0–9 (the shared ones too, as if each seed were the data
    seed): no picture appears twice. With the old ``seed + offset`` streams, seed 2's labelled
    phantoms were seed 0's test phantoms."""
    splits: dict[str, list[str]] = {}
    for seed in SEEDS:
        build_shared(str(tmp_path / f"shared{seed}"), 4, 4, 4, seed=seed)
        build_labelled(str(tmp_path / f"labelled{seed}"), 4, seed)
        for name in ("unlabelled", "val", "test"):
            splits[f"{name}/{seed}"] = pngs(tmp_path / f"shared{seed}" / "phantoms" / name / "images")
        splits[f"labelled/{seed}"] = pngs(tmp_path / f"labelled{seed}" / "images" / "phantoms")
    every = [pixels(p) for paths in splits.values() for p in paths]
    assert len(every) == 10 * 4 * 4 and len(set(every)) == len(every)
    assert split_overlaps(splits) == []


def test_stream_keys_name_the_split():
    assert stream_key("test", 0) == "test/0" and stream_key("labelled", 2) != stream_key("test", 0)


def test_seeds_take_ranges_and_lists():
    from stllava.errors import StllavaError

    assert parse_seeds("0-9") == tuple(range(10))
    assert parse_seeds("0,2,5-6") == (0, 2, 5, 6)
    for bad in ("a", "1-x", ","):
        with pytest.raises(StllavaError, match="--seeds"):
            parse_seeds(bad)


def test_splits_only_lists_disjoint_splits_for_seeds_0_to_9(tmp_path):
    work = tmp_path / "w"
    assert main(["--splits-only", "--quick", "--seeds", "0-9", "--workdir", str(work)]) == 0
    found = json.load(open(work / "splits.json"))
    assert sorted(found) == sorted(SPLITS)
    for split in SPLITS:
        assert sorted(found[split], key=int) == [str(s) for s in SEEDS]
    assert not os.path.exists(work / "seed0" / "tiny")  # no model: the splits only
    quick_sizes = {"labelled": 24, "unlabelled": 12, "val": 4, "test": 6}
    digests: dict[str, set] = {}  # split (a seed's labelled pool, or a shared split once) → its pictures
    for split in SPLITS:
        for seed in SEEDS:
            paths = found[split][str(seed)]
            assert len(paths) == quick_sizes[split] and all(not os.path.isabs(p) for p in paths)
            if split != "labelled":
                assert paths == found[split]["0"]  # shared by every seed
            key = f"labelled/{seed}" if split == "labelled" else split
            digests.setdefault(key, {pixels(os.path.join(work, p)) for p in paths})
    assert len(digests) == 10 + 3
    every = [d for ds in digests.values() for d in ds]
    assert len(set(every)) == len(every) == 10 * 24 + 12 + 4 + 6
    for seed in SEEDS:  # within a seed, the labelled pool and the unlabelled pool share nothing
        assert not digests[f"labelled/{seed}"] & digests["unlabelled"]


def test_the_study_refuses_splits_that_share_an_image(tmp_path, capsys):
    work = tmp_path / "w"
    argv = ["--splits-only", "--quick", "--seeds", "0,1", "--workdir", str(work)]
    assert main(argv) == 0
    capsys.readouterr()
    # an image of the test split slips into seed 1's labelled pool (the steps are reused as they are)
    shutil.copyfile(work / "data" / "phantoms" / "test" / "images" / "test_0002.png",
                    work / "seed1" / "labelled" / "images" / "phantoms" / "train_0005.png")
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 phantom image(s) appear in two splits" in err[0], err
    assert "train_0005.png (labelled, seed 1) has the pixels of" in err[0] and "test_0002.png (test)" in err[0]

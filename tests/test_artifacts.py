"""stllava.artifacts: the one "made with these settings" marker of every step, tool output and cache."""
import json
from pathlib import Path

import pytest

from stllava import artifacts
from stllava.artifacts import ABSENT, ArtifactError
from stllava.errors import EXIT_BAD_INPUT, StllavaError

# A demo SFT step's settings (stllava.demo.steps.sft) and an awkward dict: tuples, a path, a
# nested dict, None, a non-ASCII string, a bool.
SFT = {"base": "w/tiny/model", "data": "w/labelled/sft.json", "images": "w/data/images", "steps": 150, "lr": 0.0002,
       "sq_r": 0.5, "batch": 8, "procs": 1, "conv": "v1_sq", "seed": 0}
ODD = {"z": (1, 2), "a": {"y": None, "x": 1.5}, "p": Path("/tmp/x"), "u": "é", "b": True}


def test_canonical_form_is_json_with_sorted_keys_and_str_for_the_rest():
    assert json.dumps(artifacts.canonical(ODD)) == '{"a": {"x": 1.5, "y": null}, "b": true, "p": "/tmp/x", ' \
                                                   '"u": "\\u00e9", "z": [1, 2]}'
    assert artifacts.canonical(artifacts.canonical(ODD)) == artifacts.canonical(ODD)  # idempotent


def test_digest_is_the_one_the_demo_named_its_folders_with():
    # Hand-copied from Runner.resolve before stllava.artifacts existed (sha256 of the sorted JSON
    # of the canonical form, first 10 hex digits): existing sft-<digest> folders keep their names.
    assert artifacts.digest(SFT) == "03e7aadd4f"
    assert artifacts.digest(ODD) == "a12d48be41"
    assert artifacts.digest({}) == "44136fa355"
    assert artifacts.digest(dict(reversed(list(SFT.items())))) == "03e7aadd4f"  # key order does not matter
    assert artifacts.digest({**SFT, "seed": 1}) != "03e7aadd4f"
    from stllava.demo.runner import Runner

    assert Runner.resolve("x/sft-{key}", SFT) == "x/sft-03e7aadd4f" and Runner.resolve("x/tiny", SFT) == "x/tiny"


def test_differences_name_each_key_recorded_then_this_run():
    have = {"conv": "v1", "seed": 0, "old": 1, "lr": 0.1}
    want = {"conv": "v1_sq", "seed": 0, "new": (1, 2), "lr": 0.1}
    assert artifacts.differences(have, want) == {"conv": ("v1", "v1_sq"), "new": (ABSENT, [1, 2]),
                                                 "old": (1, ABSENT)}
    assert artifacts.mismatch(have, want) == ("made with other settings (recorded → this run: conv: 'v1' → 'v1_sq', "
                                              "new: absent → [1, 2], old: 1 → absent)")
    # equal once canonical: JSON has no tuples and no paths
    assert artifacts.mismatch({"t": [1, 2], "p": "/a"}, {"t": (1, 2), "p": Path("/a")}) is None
    assert artifacts.mismatch(None, {}) == "made without recorded settings (written by an older version)"
    assert artifacts.mismatch(None, {"seed": 0}).startswith("made without recorded settings")


def test_check_raises_one_error_naming_file_record_keys_and_fix():
    artifacts.check({"a": 1}, {"a": 1}, file="f.jsonl", fix="x")  # matching: nothing
    with pytest.raises(ArtifactError) as e:
        artifacts.check({"a": 1}, {"a": 2}, file="f.jsonl", record="line 3", fix="pass --overwrite")
    assert str(e.value) == ("f.jsonl, line 3: made with other settings (recorded → this run: a: 1 → 2); "
                            "fix: pass --overwrite")
    assert isinstance(e.value, StllavaError) and e.value.exit_code == EXIT_BAD_INPUT
    assert e.value.differences == {"a": (1, 2)} and e.value.reason.startswith("made with other settings")
    assert (e.value.file, e.value.record, e.value.fix) == ("f.jsonl", "line 3", "pass --overwrite")


def test_marker_round_trip_and_its_errors(tmp_path):
    path = tmp_path / "step" / ".done.json"
    assert artifacts.read_marker(path) is None and artifacts.check_marker(path, SFT) is False  # no marker yet
    artifacts.write_marker(path, SFT, step="sft")
    assert json.loads(path.read_text()) == {"step": "sft", "settings": artifacts.canonical(SFT)}
    assert list(json.loads(path.read_text())) == ["step", "settings"]
    assert artifacts.check_marker(path, dict(SFT)) is True
    with pytest.raises(ArtifactError, match=r"step/\.done\.json: made with other settings \(recorded → this run: "
                                            r"seed: 0 → 1\); fix: delete it"):
        artifacts.check_marker(path, {**SFT, "seed": 1}, fix="delete it")
    path.write_text('{"step": "sft", "sett')  # not JSON
    with pytest.raises(ArtifactError, match=r"\.done\.json: unreadable marker \(.*\); fix: delete it"):
        artifacts.check_marker(path, SFT, fix="delete it")


def test_markers_written_before_this_module_are_still_read(tmp_path):
    # the DPO start marker was the settings object itself; the reference cache had "fingerprint"
    start = {"model_name_or_path": "/a", "model_base": None, "dtype": "torch.float32"}
    old_start = tmp_path / "stllava_start_model.json"
    old_start.write_text(json.dumps(start, indent=1))
    assert artifacts.check_marker(old_start, start) is True
    assert artifacts.recorded_settings({"fingerprint": {"a": 1}, "ref_logps": {}}) == {"a": 1}
    assert artifacts.recorded_settings({"settings": {"a": 1}, "step": "x"}) == {"a": 1}
    assert artifacts.recorded_settings([1]) is None


def test_a_step_folder_finished_before_this_module_still_resumes(tmp_path):
    from stllava.demo.runner import MARKER, Runner

    folder = tmp_path / "data"
    folder.mkdir()
    # .done.json exactly as the Runner wrote it before stllava.artifacts (write_json_atomic, indent 2)
    old = '{\n  "step": "data",\n  "settings": {\n    "test": 6,\n    "unlabelled": 12,\n    "val": 4\n  }\n}\n'
    (folder / MARKER).write_text(old)
    runner = Runner(str(tmp_path), echo=False)
    assert runner.done(str(folder), {"unlabelled": 12, "val": 4, "test": 6}) is True
    assert runner.step("data", str(folder), {"unlabelled": 12, "val": 4, "test": 6}, lambda: 1 / 0) is False
    assert (folder / MARKER).read_text() == old  # reused, not rewritten
    with pytest.raises(ArtifactError, match=r"unlabelled: 12 → 13"):
        runner.done(str(folder), {"unlabelled": 13, "val": 4, "test": 6})
    # and a step the Runner finishes now writes those same bytes
    runner.step("data", str(tmp_path / "again"), {"val": 4, "unlabelled": 12, "test": 6}, lambda: None)
    assert (tmp_path / "again" / MARKER).read_text() == old

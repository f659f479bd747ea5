"""stllava.train.ref_cache: the DPO reference log-prob cache is reused only with its fingerprint
(the settings marker of stllava.artifacts) and every record; anything else is recomputed, logged."""
import json
import logging

from stllava.train.ref_cache import read_ref_cache, write_ref_cache

FP = {"data_path": "/d/pairs.json", "data_sha256": "ab" * 32, "version": "v1", "model_max_length": 512,
      "dtype": "torch.float32"}
CACHE = {0: (-1.25, -3.5), 1: (-0.1, -0.2)}


def test_cache_round_trip_in_the_marker_form(tmp_path):
    path = tmp_path / "ref_log_probs.json"
    write_ref_cache(str(path), FP, CACHE)
    raw = json.loads(path.read_text())
    assert raw["settings"] == FP and raw["ref_logps"] == {"0": [-1.25, -3.5], "1": [-0.1, -0.2]}
    assert read_ref_cache(str(path), dict(FP), [0, 1]) == CACHE


def test_stale_short_or_broken_cache_is_recomputed_with_a_log_line(tmp_path, caplog):
    path = tmp_path / "ref_log_probs.json"
    write_ref_cache(str(path), FP, CACHE)
    assert read_ref_cache(None, FP, [0]) is None and read_ref_cache(str(tmp_path / "absent"), FP, [0]) is None
    with caplog.at_level(logging.WARNING, logger="stllava.train.ref_cache"):
        assert read_ref_cache(str(path), {**FP, "version": "llava_v1"}, [0, 1]) is None
        assert ("made with other settings (recorded → this run: version: 'v1' → 'llava_v1'); recomputing"
                in caplog.text)
        assert read_ref_cache(str(path), FP, [0, 1, 2]) is None and "lacks 1 records" in caplog.text
        path.write_text('{"settings": ')
        assert read_ref_cache(str(path), FP, [0]) is None and "unreadable" in caplog.text


def test_a_cache_written_before_the_marker_form_is_still_reused(tmp_path):
    path = tmp_path / "ref_log_probs.json"
    path.write_text(json.dumps({"fingerprint": FP, "ref_logps": {"0": [-1.25, -3.5], "1": [-0.1, -0.2]}}))
    assert read_ref_cache(str(path), FP, [0, 1]) == CACHE
    assert read_ref_cache(str(path), {**FP, "dtype": "torch.bfloat16"}, [0, 1]) is None

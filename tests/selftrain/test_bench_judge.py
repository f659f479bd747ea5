"""scripts/bench_judge.py at tiny sizes: every run judges every item, the printed table agrees with
the returned numbers, and the script's own consistency check stops on a short summary."""
import importlib.util
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_judge", REPO / "scripts" / "bench_judge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_judge_tiny_run_counts_and_ratios(capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "the-callers-key")
    res = _bench().main(["--items", "5", "--waves", "2", "--concurrency", "1", "3", "--latency", "0.02",
                         "--pings", "3", "--images", "2", "--image-size", "32", "--answer-chars", "60"])
    printed = capsys.readouterr().out

    assert res["instant"]["items"] == 5 and res["instant"]["req_per_s"] > 0
    assert [(r["concurrency"], r["items"]) for r in res["slow"]] == [(1, 2), (3, 6)]
    assert res["slow"][0]["speed_up"] == 1.0
    assert res["slow"][1]["speed_up"] == pytest.approx(res["slow"][1]["req_per_s"] / res["slow"][0]["req_per_s"])
    assert res["rebuild"] == {**res["rebuild"], "items": 5, "cache_hits": 5, "output_identical": True}
    assert res["round_trip_ms"] > 0

    rows = re.findall(r"^  (instant|0\.02 s latency) +(\d+) +(\d+) +([\d.]+) +([\d.]+)(?: +([\d.]+)x)?", printed, re.M)
    assert [(r[0], int(r[1]), int(r[2])) for r in rows] == [("instant", 1, 5), ("0.02 s latency", 1, 2),
                                                             ("0.02 s latency", 3, 6)]
    for (_, _, items, seconds, rps, _), want in zip(rows, [res["instant"], *res["slow"]]):
        assert float(seconds) == pytest.approx(want["seconds"], abs=0.006)
        assert float(rps) == pytest.approx(int(items) / want["seconds"], abs=0.06)
    assert [float(r[5]) for r in rows[1:]] == [round(r["speed_up"], 1) for r in res["slow"]]
    assert re.search(r"rebuild from the cache \(--max-requests 0\): 5 items in [\d.]+ s, 5 cache hits, 0 requests, "
                     r"output identical: True", printed)
    assert "bare round trip" in printed
    # the bench lends the judge its own key and gives the caller's back
    assert os.environ["OPENAI_API_KEY"] == "the-callers-key"


def test_bench_judge_stops_on_an_incomplete_run():
    check = _bench().check
    full = {"items": 4, "judged": 4, "complete": True, "status": {"ok": 4}, "paid_requests": 4, "http_requests": 4}
    check(full, 4, 4, "full")
    for broken in ({"judged": 3, "complete": False}, {"status": {"ok": 3, "tie": 1}}, {"paid_requests": 5},
                   {"http_requests": 6}):
        with pytest.raises(SystemExit, match="expected 4 items judged ok with 4 requests"):
            check({**full, **broken}, 4, 4, "broken")

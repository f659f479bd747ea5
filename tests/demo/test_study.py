"""The study's machinery: aggregation and paired statistics on known inputs, and the --quick study
end to end (the test suite checks the machinery, not the effect)."""
import json
import os
import subprocess
import sys

import pytest

from stllava.demo.study import Study, StudyConfig
from stllava.demo.study_report import (
    aggregate,
    aggregate_files,
    render_markdown,
    search_scores,
    write_report,
    write_search,
)
from stllava.errors import StllavaError

KINDS = {"closed": {"presence": 90.0, "side": 60.0}, "open": {"count": 50.0},
         "n_closed": {"presence": 10, "side": 10}, "n_open": {"count": 5}}


def _run(seed, closed):
    """A fake cell: per condition, test closed accuracy ``closed[cond]``, open recall half of it."""
    conds = {c: {"test": {"closed_acc": v, "open_recall": v / 2, "open_f1": 0.0, "per_kind": KINDS}}
             for c, v in closed.items()}
    conds["st"]["heldout_reward_accuracy"] = 0.5 + seed / 10
    pq = {"questions": 10, "status": {"ok": 4}, "identical_rate": 0.5, "tie_rate": 0.1, "pairs": 4,
          "chosen_right_rejected_wrong": 1.0 if seed else None}
    return {"seed": seed, "n_labelled": 100, "conditions": conds,
            "stage2": {"st": {"questions": {"questions": 10, "answerable_rate": 0.8, "novel": 1},
                              "pair_quality": pq}}}


def test_aggregate_pairs_by_seed_on_known_inputs():
    cfg = StudyConfig(seeds=(0, 1, 2), sizes=(100,), splits=("test",), conditions=("sft", "st", "rft"))
    runs = [_run(0, {"sft": 60.0, "st": 64.0, "rft": 61.0}), _run(1, {"sft": 70.0, "st": 73.0, "rft": 70.0}),
            _run(2, {"sft": 80.0, "st": 85.0, "rft": 82.0})]
    study = aggregate(list(reversed(runs)), cfg)
    assert [r["seed"] for r in study["runs"]] == [0, 1, 2]
    sft = study["conditions"]["100"]["sft"]["test"]["closed_acc"]
    assert sft["mean"] == 70.0 and sft["sd"] == 10.0
    d = study["comparisons"]["100"]["st - sft"]["test"]["closed_acc"]
    assert d["diffs"] == [4.0, 3.0, 5.0] and d["mean"] == 4.0 and d["sd"] == 1.0
    assert d["ci95"] == pytest.approx([4.0 - 4.303 / 3 ** 0.5, 4.0 + 4.303 / 3 ** 0.5])
    assert d["significant"]  # 4 - 2.48 > 0, though the seeds' own spread (sd 10) is large
    assert study["comparisons"]["100"]["st - rft"]["test"]["open_recall"]["diffs"] == [1.5, 1.5, 1.5]
    assert "nosq - sft" not in study["comparisons"]["100"]  # conditions that were not run
    assert study["conditions"]["100"]["st"]["heldout_reward_accuracy"]["mean"] == pytest.approx(0.6)
    # a share that only runs with pairs have is averaged over those runs
    assert study["stage2"]["100"]["st"]["chosen_right_rejected_wrong"]["n"] == 2
    assert study["per_kind"]["100"]["sft"]["closed"]["side"]["mean"] == 60.0
    md = render_markdown(study)
    # columns: the primary metric (mean of closed accuracy and open recall), closed, open
    assert "| st − sft | what self-training adds (primary at 100 labelled) | **+3.0 [+1.1, +4.9]** | " \
           "**+4.0 [+1.5, +6.5]** |" in md
    assert "| SFT only | 52.5 ± 7.5 | 70.0 ± 10.0 | 35.0 ± 5.0 | – |" in md


def test_results_survive_as_files_and_aggregate_from_them_alone(tmp_path):
    """Each finished cell writes one file per condition; --aggregate reads only those files and
    gives what aggregating the cells in memory gives; a variant's cells go under "variants"."""
    results = tmp_path / "runs"

    def study(variant="", **changes):
        cfg = StudyConfig(workdir=str(tmp_path / "work"), seeds=(10, 11, 12), sizes=(100,), splits=("test",),
                          conditions=("sft", "st", "rft"), results=str(results), variant=variant)
        cfg.loop = cfg.loop.replace(**changes)
        return Study(cfg)

    runs = [_run(10, {"sft": 60.0, "st": 64.0, "rft": 61.0}), _run(11, {"sft": 70.0, "st": 73.0, "rft": 70.0}),
            _run(12, {"sft": 80.0, "st": 85.0, "rft": 82.0})]
    runs[2]["conditions"]["rft"]["trained"] = False
    main = study()
    for run in runs:
        main.write_results(json.loads(json.dumps(run)))
    names = sorted(os.listdir(results))
    assert names[:3] == ["study-rft-seed10-n100.json", "study-rft-seed11-n100.json", "study-rft-seed12-n100.json"]
    assert len(names) == 9
    noisy = study("flip0.2", judge_flip_rate=0.2)
    noisy.write_results(json.loads(json.dumps(runs[0])))
    noisy.write_results(json.loads(json.dumps(runs[1])))
    assert (results / "study-st-seed10-n100-flip0.2.json").is_file()

    found = aggregate_files(str(results))
    expected = aggregate(json.loads(json.dumps(runs)), found["config"])
    assert {k: v for k, v in found.items() if k != "variants"} == expected
    assert found["config"]["seeds"] == [10, 11, 12] and found["config"]["search_seeds"] == [0, 1]
    assert found["conditions"]["100"]["rft"]["untrained"] == 1
    assert set(found["variants"]) == {"flip0.2"}
    assert found["variants"]["flip0.2"]["config"]["loop"]["judge_flip_rate"] == 0.2
    assert found["variants"]["flip0.2"]["comparisons"]["100"]["st - sft"]["test"]["closed_acc"]["diffs"] == [4.0, 3.0]
    md = render_markdown(found)
    assert "untrained in 1 of 3 runs" in md and "# Variant flip0.2: judge flip rate 0.2" in md

    other = study()
    other.cfg.n_unlabelled = 5  # a cell made with other settings cannot join the main cells
    other.write_results({**json.loads(json.dumps(runs[0])), "seed": 13})
    with pytest.raises(StllavaError, match="made with other settings"):
        aggregate_files(str(results))


def test_a_condition_without_pairs_in_any_run_is_said_identical_in_the_table():
    """nosq_st = nosq when the model asked nothing answerable (0 pairs): said in the rows, not only in a note."""
    runs = []
    for seed, v in ((10, 60.0), (11, 70.0)):
        run = _run(seed, {"sft": v, "st": v + 2, "nosq": v - 5, "nosq_st": v - 5})
        run["conditions"]["nosq_st"]["trained"] = False
        runs.append(run)
    md = render_markdown(aggregate(runs, StudyConfig(seeds=(10, 11), sizes=(100,), splits=("test",))))
    assert "| SFT, self-questioning off + self-training — untrained in 2 of 2 runs (0 pairs, nothing to train on: " \
           "= its SFT model) |" in md
    assert "| nosq_st − nosq | what self-training adds without self-questioning (identical: no pairs in any run, " \
           "no training) |" in md
    assert "| st − sft | what self-training adds (primary at 100 labelled) |" in md  # trained: no note


def test_plans_chunks():
    from stllava.demo.study import plan_configs

    noise = plan_configs("noise", StudyConfig(), seeds=(10, 11))
    assert [c.variant for c in noise] == ["flip0.0", "flip0.1", "flip0.2", "flip0.3"]
    assert [c.loop.judge_flip_rate for c in noise] == [0.0, 0.1, 0.2, 0.3]
    assert all(c.seeds == (10, 11) and c.sizes == (100,) for c in noise)
    assert noise[0].conditions == ("sft", "st", "rft")  # ε = 0: the robust losses are the plain one
    assert noise[2].conditions == ("sft", "st", "rft", "st_cons", "st_robust")
    primary, = plan_configs("primary", StudyConfig())
    assert primary.sizes == (30, 100) and primary.seeds == tuple(range(10, 18)) and primary.variant == ""
    assert set(primary.conditions) == {"sft", "st", "cont", "own", "rft", "oracle", "nosq", "nosq_st"}
    secondary, = plan_configs("secondary", StudyConfig())
    assert secondary.sizes == (300, 1500) and secondary.seeds == tuple(range(10, 15))
    assert secondary.conditions == ("sft", "st")
    rounds, = plan_configs("rounds", StudyConfig())
    assert rounds.rounds == 3 and rounds.sizes == (100,) and rounds.seeds == tuple(range(10, 15))
    graded, = plan_configs("graded", StudyConfig())
    assert graded.loop.graded and graded.variant == "graded" and graded.seeds == (10, 11, 12)
    # the graded data differ (description question): their own workdir, so the documented commands
    # run one after another in the default workdir without a settings clash
    assert graded.workdir == "playground/study-graded" and primary.workdir == "playground/study"
    assert {c.workdir for c in plan_configs("all", StudyConfig(workdir="w"))} == {"w", "w-graded"}
    assert len(plan_configs("all", StudyConfig())) == 8  # primary, secondary, 4 noise, rounds, graded
    with pytest.raises(StllavaError, match="unknown --plan"):
        plan_configs("everything", StudyConfig())


def test_a_study_refuses_the_searchs_seeds(tmp_path):
    cfg = StudyConfig(workdir=str(tmp_path), seeds=(1, 10), sizes=(100,))
    with pytest.raises(StllavaError, match=r"seeds \[1\] chose the study's settings"):
        Study(cfg).run()


def test_search_choice_on_known_inputs(tmp_path):
    """The choice rule: the largest mean of (Δ closed + Δ open) / 2, st − sft, on validation."""
    def run(variant, seed, sft, st):
        val = {c: {"val": {"closed_acc": v[0], "open_recall": v[1]}} for c, v in (("sft", sft), ("st", st))}
        val["rft"] = val["sft"]
        return {"variant": variant, "seed": seed, "n_labelled": 30, "conditions": val,
                "stage2": {"st": {"pair_quality": {"pairs": 5, "identical_rate": 0.5,
                                                   "chosen_right_rejected_wrong": 1.0}}}}
    found = {"variants": {"a": {}, "b": {"dpo_beta": 0.5}},
             "runs": [run("a", 0, (60, 40), (64, 40)), run("a", 1, (70, 50), (70, 48)),  # +2, -1
                      run("b", 0, (60, 40), (61, 42)), run("b", 1, (70, 50), (71, 51))]}  # +1.5, +1
    assert search_scores(found) == {"a": 0.5, "b": 1.25}
    write_search(found, str(tmp_path))
    md = (tmp_path / "search.md").read_text()
    assert "| b (chosen) | +1.25 |" in md and "| a | +0.50 |" in md
    assert "| a | (LoopSettings defaults) | 30 | 65.0 ± 7.1 | 67.0 ± 4.2 |" in md


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    work = tmp_path / "study"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "stllava.demo.study", "--quick", "--workdir", str(work), "--jobs", "2"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    study = json.load(open(work / "study.json"))
    assert sorted((r["seed"], r["n_labelled"]) for r in study["runs"]) == [(10, 24), (11, 24)]
    for run in study["runs"]:
        assert set(run["conditions"]) == {"sft", "st", "cont", "own", "rft", "oracle", "nosq", "nosq_st"}
        assert set(run["stage2"]) == {"st", "nosq_st"}
    assert len(os.listdir(work / "runs")) == 16  # one result file per condition and cell
    comps = study["comparisons"]["24"]
    assert set(comps) == {"st - sft", "cont - sft", "own - sft", "rft - sft", "oracle - sft", "st - cont",
                          "st - own", "st - rft", "st - oracle", "nosq - sft", "nosq_st - nosq"}
    for name, d in comps.items():  # each interval is the one of its own per-seed differences
        a, b = name.split(" - ")
        diffs = [r["conditions"][a]["test"]["closed_acc"] - r["conditions"][b]["test"]["closed_acc"]
                 for r in sorted(study["runs"], key=lambda r: r["seed"])]
        assert d["test"]["closed_acc"]["diffs"] == pytest.approx(diffs)
    assert "## 24 labelled phantoms" in (work / "study.md").read_text()
    for fig in ("study_accuracy.png", "study_effect.png"):
        assert (work / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the result files alone give the same study.json (what --aggregate commits)
    agg = subprocess.run([sys.executable, "-m", "stllava.demo.study", "--aggregate", "--results", str(work / "runs"),
                          "--out", str(tmp_path / "agg")], env=env, capture_output=True, text=True, timeout=600)
    assert agg.returncode == 0, agg.stderr[-3000:]
    assert (tmp_path / "agg" / "study.json").read_bytes() == (work / "study.json").read_bytes()

    # a rerun reuses every finished step and writes the same study.json, byte for byte
    before = (work / "study.json").read_bytes()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (work / "study.json").read_bytes() == before
    assert " → " not in again.stderr  # no step ran again

    # a finished fixed-name step asked for with other settings is refused, naming the folder and
    # the difference; content-named steps (sft-<digest>, ...) get a folder of their own instead
    from stllava.artifacts import ArtifactError
    from stllava.demo.data import STREAMS
    from stllava.demo.runner import Runner

    with pytest.raises(ArtifactError, match=r"data/\.done\.json: made with other settings \(recorded → this run: "
                                            r"unlabelled: 12 → 99\); fix: .*delete .*data"):
        Runner(str(work), echo=False).done(str(work / "data"), {"unlabelled": 99, "val": 4, "test": 6, "seed": 0,
                                                                "streams": STREAMS})
    assert Runner.resolve("x/sft-{key}", {"a": 1}) != Runner.resolve("x/sft-{key}", {"a": 2})


def test_the_graded_probe_the_rounds_and_the_noise_curve_are_aggregated_and_rendered(tmp_path):
    """From result files alone: the description scores (graded probe) with their paired
    differences and examples, the rounds' table, and the noise curve across flip-rate variants."""
    from stllava.demo.study_report import noise_curve

    results = tmp_path / "runs"

    def study(variant="", rounds=1, **changes):
        cfg = StudyConfig(workdir=str(tmp_path / "work"), seeds=(10, 11), sizes=(100,), splits=("test",),
                          conditions=("sft", "st", "rft"), results=str(results), variant=variant, rounds=rounds)
        cfg.loop = cfg.loop.replace(**changes)
        return Study(cfg)

    for seed, bump in ((10, 0.0), (11, 2.0)):
        run = _run(seed, {"sft": 60.0 + bump, "st": 64.0 + bump, "rft": 62.0 + bump})
        study().write_results(json.loads(json.dumps(run)))
        for flip, loss in ((0.0, 0.0), (0.2, 3.0)):  # the judge's noise takes 3 points from DPO
            scores = {"sft": 60.0 + bump, "st": 64.0 + bump - loss, "rft": 62.0 + bump - loss / 3}
            if flip:  # as the plan runs them: the losses for noisy labels only where ε = flip rate > 0
                scores.update(st_cons=63.0 + bump - loss / 2, st_robust=63.0 + bump - loss / 2)
            noisy = _run(seed, scores)
            study(f"flip{flip}", judge_flip_rate=flip).write_results(noisy)
        graded = json.loads(json.dumps(run))
        for c, recall in (("sft", 40.0), ("st", 50.0 + bump), ("rft", 45.0)):
            graded["conditions"][c]["test"]["description"] = {
                "n": 20, "recall": recall, "precision": recall + 10, "exact": 5.0,
                "examples": [["q1", "ct, 2 lesions", "CT, 2 lesions, left, large"]]}
        graded["stage2"]["st"]["questions"]["by_kind"] = {"describe": seed - 7, "side": 5}  # 3 and 4
        graded["stage2"]["st"]["pair_quality"]["pair_kinds"] = {"side": 2}  # no pair on a description
        study("graded", graded=True).write_results(graded)
        rounds = json.loads(json.dumps(run))
        rounds["rounds"] = [{"round": k, "pairs": 100 - 10 * k,
                             "test": {"closed_acc": 64.0 + bump + k, "open_recall": 32.0 + bump / 2 + k}}
                            for k in (1, 2, 3)]
        study("rounds", rounds=3).write_results(rounds)

    found = aggregate_files(str(results))
    assert set(found["variants"]) == {"flip0.0", "flip0.2", "graded", "rounds"}
    desc = found["variants"]["graded"]["description"]["100"]
    assert desc["st"]["recall"]["mean"] == 51.0 and desc["sft"]["precision"]["mean"] == 50.0
    assert desc["st - sft"]["recall"]["diffs"] == [10.0, 12.0]
    assert desc["st - rft"]["exact"]["diffs"] == [0.0, 0.0]
    assert desc["self_asked"]["questions"]["values"] == [3.0, 4.0] and desc["self_asked"]["pairs"]["mean"] == 0.0
    table = found["variants"]["rounds"]["rounds"]["100"]
    assert table["round3"]["closed_acc"]["mean"] == 68.0 and table["round3"]["pairs"]["mean"] == 70.0
    # primary = (closed + open) / 2; round k − round 1 = k − 1 on every seed
    assert table["round3 - round1"]["primary"]["diffs"] == [2.0, 2.0]
    # seed 10: round 1 (65 + 33) / 2 = 49 vs SFT (60 + 30) / 2 = 45; seed 11: (67 + 34) / 2 vs (62 + 31) / 2
    assert table["round1 - sft"]["primary"]["diffs"] == [4.0, 4.0]
    curve = noise_curve(found)
    assert list(curve) == [0.0, 0.2]
    assert curve[0.2]["comparisons"]["st - sft"]["test"]["primary"]["mean"] == pytest.approx(4 * 0.75 - 3 * 0.75)
    assert "st_cons - sft" not in curve[0.0]["comparisons"]

    md = render_markdown(found)
    assert "# Variant graded: the graded-answer probe" in md and "# Variant rounds: iterative self-training, 3 rounds" in md
    assert "# Variant flip0.2: judge flip rate 0.2" in md
    assert "| Δ st − sft | +11.0 [-1.7, +23.7] |" in md  # recall: diffs 10, 12; 12.706 · 1.414 / √2 = 12.7
    assert "(the first three test description questions; references: `CT, 2 lesions, left, large`):" in md
    assert "- seed 10, st (fact recall 50.0): `ct, 2 lesions`" in md and "- seed 11, st (fact recall 52.0):" in md
    assert ("the SFT model asked 4 ± 1 description questions about the unlabelled phantoms (per seed: 3, 4); "
            "0 ± 0 preference") in md
    assert "| 3 | 70 ± 0 | 68.0 ± 1.4 |" in md
    noise = md[md.index("# The noise curve"):]
    assert noise.splitlines()[6].startswith("| 0.0 | 100 | 2 | ") and noise.splitlines()[7].startswith("| 0.2 | 100 | 2 | ")
    write_report(found, str(tmp_path))
    assert (tmp_path / "study_noise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

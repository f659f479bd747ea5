"""README's demo and study blocks are generated from the committed results
(stllava.demo.readme): the committed README agrees with docs/demo/summary.json and
docs/study/study.json, a README that disagrees fails the check, and a study that is not v2 is
never shown as evidence."""
import json
import os
import shutil

import pytest

from stllava.demo import readme

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")


def test_the_committed_readme_agrees_with_the_committed_results():
    text = open(readme.README, encoding="utf-8").read()
    for block in readme.BLOCKS:  # both blocks are there, between their markers
        assert all(m in text for m in readme.markers(block)), block
    doc = open(readme.STUDY_DOC, encoding="utf-8").read()
    assert all(m in doc for m in readme.markers("results"))
    assert os.path.isfile(readme.STUDY_FILE)
    # a block whose file is committed must equal what the file gives (docs/demo/summary.json:
    # written by `python -m stllava.demo --publish` from a fresh `make demo`)
    assert readme.differences() == [], "run: python -m stllava.demo.readme --write"
    assert readme.main(["--check"]) == 0


def test_the_earlier_study_is_never_shown_as_evidence():
    old = json.load(open(os.path.join(os.path.dirname(readme.STUDY_FILE), "earlier", "study.json")))
    assert not readme.is_v2(old)
    block = readme.study_block(old)
    assert "pending" in block and readme.PREREGISTRATION in block
    assert "+3.3" not in block and "63.1" not in block  # none of its numbers


def _v2_study(tmp_path) -> dict:
    """A v2 study.json from result files of three fresh seeds (known numbers)."""
    from stllava.demo.study import Study, StudyConfig
    from stllava.demo.study_report import aggregate_files

    kinds = {"closed": {}, "open": {}, "n_closed": {}, "n_open": {}}
    cfg = StudyConfig(workdir=str(tmp_path / "w"), seeds=(10, 11, 12), sizes=(100,), splits=("test",),
                      results=str(tmp_path / "runs"))
    for seed, (sft, st, rft) in zip((10, 11, 12), ((60, 64, 63), (70, 73, 72), (80, 85, 81))):
        conds = {c: {"test": {"closed_acc": v, "open_recall": v - 10, "open_f1": 0.0, "per_kind": kinds},
                     "trained": True} for c, v in (("sft", sft), ("st", st), ("rft", rft))}
        Study(cfg).write_results({"seed": seed, "n_labelled": 100, "conditions": conds, "stage2": {}})
    return aggregate_files(str(tmp_path / "runs"))


def test_write_then_check_and_a_disagreeing_readme_fails(tmp_path, capsys):
    study = _v2_study(tmp_path)
    assert readme.is_v2(study)
    study_file = tmp_path / "study.json"
    study_file.write_text(json.dumps(study))
    demo_file = tmp_path / "summary.json"
    shutil.copy(os.path.join(FIXTURES, "demo_summary_quick.json"), demo_file)
    page = tmp_path / "README.md"
    page.write_text("# x\n\n" + "\n\n".join(f"{a}\nstale\n{b}" for a, b in map(readme.markers, readme.BLOCKS))
                    + "\n\ntail\n")
    doc = tmp_path / "Study.md"
    doc.write_text("# Study\n\n" + "\n".join(readme.markers("results")) + "\n")
    args = ["--readme", str(page), "--demo", str(demo_file), "--study", str(study_file), "--study-doc", str(doc)]
    assert readme.main(["--check", *args]) == 1
    assert "the demo, study, results block(s) disagree" in capsys.readouterr().err
    assert readme.main(["--write", *args]) == 0
    assert readme.main(["--check", *args]) == 0
    text = page.read_text()
    assert text.startswith("# x\n") and text.endswith("\n\ntail\n")
    # the headline is the primary comparison with its interval: diffs 4, 3, 5 → 4.0 ± 4.303/√3
    assert "DPO − SFT at 100 labelled phantoms, mean of closed accuracy and open recall on test, 3 seeds: " \
           "+4.0 points [95% t interval +1.5, +6.5]" in text
    # three of the eight pre-registered seeds: said to be interim, not the primary result
    assert "**Interim — 3 of the 8 pre-registered seeds (10–17) are in" in text
    assert "Primary comparison (pre-registered" not in text
    # primary = mean of closed and open (open = closed − 10): means over seeds SFT 65.0, DPO 69.0; DPO − RFT: diffs 1, 1, 4
    assert "| 100 | 3 | 65.0 | 69.0 | **+4.0 [+1.5, +6.5]** | **+4.0 [+1.5, +6.5]** | **+4.0 [+1.5, +6.5]** | " \
           "+2.0 [-2.3, +6.3] |" in text
    summary = json.load(open(demo_file))
    dpo = summary["metrics"]["dpo"]["phantom"]["closed_acc"]
    assert f"{dpo:.1f}" in text
    # docs/Study.md's results: every condition with its Δ vs SFT and DPO's Δ against it (primary metric)
    results = doc.read_text()
    assert "**Interim — 3 of the 8 pre-registered seeds" in results
    # RFT 63, 72, 81 (primary = closed − 5); Δ vs SFT 3, 2, 1; DPO − RFT 1, 1, 4
    assert "| control: SFT on the judge's chosen answers (RFT) | 67.0 ± 9.0 | 72.0 ± 9.0 | 62.0 ± 9.0 | " \
           "+2.0 [-0.5, +4.5] | +2.0 [-2.3, +6.3] |" in results
    page.write_text(text.replace("| 100 | 3 | 65.0 |", "| 100 | 3 | 66.0 |"))  # one number edited by hand
    assert readme.differences(str(page), str(demo_file), str(study_file), str(doc)) == ["study"]
    doc.write_text(results.replace("67.0 ± 9.0", "67.5 ± 9.0"))
    assert readme.differences(str(page), str(demo_file), str(study_file), str(doc)) == ["study", "results"]


def test_a_readme_without_the_markers_is_refused(tmp_path):
    from stllava.errors import StllavaError

    page = tmp_path / "README.md"
    page.write_text("# no blocks\n")
    with pytest.raises(StllavaError, match="README has no study block"):
        readme.render(page.read_text(), {"study": "x"}, str(page))


def test_the_headline_is_the_primary_comparison_once_every_preregistered_seed_is_in(tmp_path):
    from stllava.demo.study import Study, StudyConfig
    from stllava.demo.study_report import PRIMARY_SEEDS, aggregate_files

    kinds = {"closed": {}, "open": {}, "n_closed": {}, "n_open": {}}
    cfg = StudyConfig(workdir=str(tmp_path / "w"), sizes=(100,), splits=("test",), results=str(tmp_path / "runs"))
    for seed in PRIMARY_SEEDS:  # DPO 1 point above SFT on odd seeds, 1 below on even ones: no gain
        conds = {c: {"test": {"closed_acc": v, "open_recall": v, "open_f1": 0.0, "per_kind": kinds}, "trained": True}
                 for c, v in (("sft", 60.0), ("st", 60.0 + (1 if seed % 2 else -1)))}
        Study(cfg).write_results({"seed": seed, "n_labelled": 100, "conditions": conds, "stage2": {}})
    block = readme.study_block(aggregate_files(str(tmp_path / "runs")))
    assert block.startswith("**Primary comparison (pre-registered, [docs/Study.md](" + readme.PREREGISTRATION)
    # 2.365 · 1.069 / √8 = 0.89; the interval includes 0: the pre-registered reading says so
    assert "8 seeds: +0.0 points [95% t interval -0.9, +0.9] — no gain shown by the pre-registered reading**" in block
    assert [readme.verdict({"ci95": ci}) for ci in ([0.1, 2.0], [-2.0, -0.1], [-0.1, 0.1])] == \
        ["a gain", "a loss", "no gain shown"]
    assert "Interim" not in block

"""Run comparison report (stllava.eval.report)."""
import csv
import json

import pytest

from stllava.eval import metrics, report
from stllava.eval.report import ReportError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _gt(qid, answer, answer_type):
    return {"id": qid, "image": f"{qid}.jpg", "answer_type": answer_type,
            "conversations": [{"from": "human", "value": f"<image>\nQ{qid}?"},
                              {"from": "gpt", "value": answer}]}


GT = [_gt(1, "left lung", "OPEN"), _gt(2, "yes", "CLOSED"), _gt(3, "no", "CLOSED")]


def _scored(folder, benchmark, texts):
    preds = [{"question_id": i + 1, "text": t} for i, t in enumerate(texts)]
    metrics.write_outputs(metrics.score(GT, preds), folder, {"benchmark": benchmark})
    return folder


def test_report_tables_csv_and_png(tmp_path):
    # run A: one folder holding two benchmarks; run B: a single metrics folder
    _scored(tmp_path / "a" / "vqa_rad", "vqa_rad", ["left left", "yes", "nodule"])
    _scored(tmp_path / "a" / "slake", "slake", ["left lung", "no", "no"])
    _scored(tmp_path / "b", "vqa_rad", ["lung", "Yes.", "No"])
    table = report.build_report([("A", str(tmp_path / "a")), ("B", str(tmp_path / "b"))],
                                tmp_path / "out", paper=True)
    assert list(table) == ["vqa_rad", "slake"]
    # A/vqa_rad: recall 2/3 → 66.67, F1 0.8 → 80.00, closed 2/2 substring, 1/2 strict
    a = table["vqa_rad"]["runs"]["A"]
    assert a["open_recall"] == pytest.approx(200 / 3) and a["closed_acc_strict"] == 50.0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## VQA-RAD" in md and "## SLAKE" in md
    assert "| A | 66.67 | 80.00 | 100.00 | 50.00 |" in md
    # B/vqa_rad: "lung" vs "left lung": P 1, R 1/2, F1 2/3
    assert "| B | 50.00 | 66.67 | 100.00 | 100.00 |" in md
    assert "| STLLaVA-Med-7B (paper) | 37.12 | 10.83 | 60.35 | – |" in md
    assert "| STLLaVA-Med-7B (paper) | 46.69 | 11.46 | 57.69 | – |" in md
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["slake"]["paper"]["closed_acc"] == 57.69
    assert saved["slake"]["runs"]["A"]["closed_acc"] == 50.0
    with (tmp_path / "out" / "per_question.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 9 and {r["run"] for r in rows} == {"A", "B"}
    assert {(r["run"], r["benchmark"]) for r in rows} == {("A", "vqa_rad"), ("A", "slake"),
                                                          ("B", "vqa_rad")}
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 5000
    from PIL import Image
    with Image.open(tmp_path / "out" / "report.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100


def test_report_without_paper_has_no_paper_row(tmp_path):
    _scored(tmp_path / "r", "pvqa", ["left lung", "yes", "no"])
    report.build_report([("R", str(tmp_path / "r"))], tmp_path / "out", make_plot=False)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## PathVQA" in md and "(paper)" not in md
    assert not (tmp_path / "out" / "report.png").exists()


def test_report_refuses_bad_runs(tmp_path, capsys):
    with pytest.raises(ReportError, match="expected NAME=DIR"):
        report.parse_run_arg("just-a-folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no metrics.json"):
        report.load_run(tmp_path / "empty")
    _scored(tmp_path / "r", "vqa_rad", ["a", "b", "c"])
    with pytest.raises(ReportError, match="unique"):
        report.collect([("X", str(tmp_path / "r")), ("X", str(tmp_path / "r"))])
    assert report.main(["--run", f"X={tmp_path / 'empty'}", "--out", str(tmp_path / "o")]) == 2
    assert "no metrics.json" in capsys.readouterr().err

"""Combine scored runs into per-benchmark tables, a per-question CSV and a bar chart.

``python -m stllava.eval.report --run NAME=DIR [--run NAME=DIR ...] --out DIR [--paper]``

Each run DIR is either one ``stllava.eval.metrics --out`` folder (``metrics.json``,
``per_question.csv``) or a folder holding several of them, one per benchmark (e.g.
``DIR/vqa_rad/``, ``DIR/slake/``). Writes into ``--out``: ``report.md`` and ``report.json``
(one table per benchmark: open recall, open F1, both closed accuracies, exact match, counts),
``per_question.csv`` (every run's rows, with ``run`` and ``benchmark`` columns) and
``report.png`` (bars of the paper's three numbers per run). ``--paper`` adds the published
STLLaVA-Med-7B numbers (docs/Method.md#pipeline) beside ours.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import pathlib
import sys

from stllava import logs
from stllava.errors import StllavaError, run_cli
from stllava.eval.metrics import ROW_FIELDS
from stllava.jsonl import read_utf8

logger = logging.getLogger(__name__)

BENCHMARK_NAMES = {"vqa_rad": "VQA-RAD", "slake": "SLAKE", "pvqa": "PathVQA"}
PAPER_NAME = "STLLaVA-Med-7B (paper)"
# STLLaVA-Med-7B, zero-shot, ×100 (docs/Method.md#pipeline). Its "Closed" column is the substring accuracy.
PAPER = {
    "vqa_rad": {"open_recall": 37.12, "open_f1": 10.83, "closed_acc": 60.35},
    "slake": {"open_recall": 46.69, "open_f1": 11.46, "closed_acc": 57.69},
    "pvqa": {"open_recall": 11.92, "open_f1": 2.72, "closed_acc": 52.90},
}
COLUMNS = [  # (key in metrics.json "overall", header)
    ("open_recall", "Open recall"),
    ("open_f1", "Open F1"),
    ("closed_acc", "Closed acc (substring; paper's)"),
    ("closed_acc_strict", "Closed acc (strict: yes/no word)"),
    ("yes_no_acc_run_eval", "Yes/no acc (run_eval.py)"),
    ("exact_match", "Exact match*"),
    ("n_open", "# open"),
    ("n_closed", "# closed"),
    ("n_missing", "# missing"),
]
PLOTTED = [("open_recall", "Open recall"), ("open_f1", "Open F1"), ("closed_acc", "Closed acc")]


class ReportError(StllavaError, ValueError):
    """A run folder that cannot be reported; the message names the folder and the fix."""


def _load_one(folder: pathlib.Path) -> dict:
    path = folder / "metrics.json"
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not JSON ({exc}); fix: re-run stllava.eval.metrics "
                          "--out") from exc
    if not isinstance(data, dict) or not isinstance(data.get("overall"), dict):
        raise ReportError(f"{path}: no 'overall' table; fix: write it with "
                          "stllava.eval.metrics --out")
    return {"benchmark": data.get("benchmark") or folder.name, "overall": data["overall"],
            "per_question": folder / "per_question.csv", "folder": str(folder)}


def load_run(folder: str | pathlib.Path) -> list[dict]:
    """Return the scored benchmarks of one run folder (itself or its sub-folders).

    Refuses a folder with no ``metrics.json`` anywhere and two results for one benchmark."""
    folder = pathlib.Path(folder)
    if (folder / "metrics.json").is_file():
        results = [_load_one(folder)]
    else:
        results = [_load_one(sub.parent) for sub in sorted(folder.glob("*/metrics.json"))]
    if not results:
        raise ReportError(f"{folder}: no metrics.json here or in its sub-folders; fix: run "
                          "python -m stllava.eval.metrics --gt ... --pred ... --out DIR first")
    seen = [r["benchmark"] for r in results]
    dups = sorted({b for b in seen if seen.count(b) > 1})
    if dups:
        raise ReportError(f"{folder}: several results for {dups}; fix: one folder per benchmark")
    return results


def parse_run_arg(text: str) -> tuple[str, str]:
    """Split ``NAME=DIR``; refuses a missing name or folder."""
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise ReportError(f"--run {text!r}: expected NAME=DIR, e.g. --run stllava=runs/eval")
    return name, folder


def collect(runs: list[tuple[str, str]], paper: bool = False) -> dict:
    """Return ``{benchmark: {"runs": {name: overall}, "paper": {...} | None}}`` in benchmark
    order (VQA-RAD, SLAKE, PathVQA, then others). Refuses repeated run names."""
    names = [n for n, _ in runs]
    if len(set(names)) != len(names):
        raise ReportError(f"run names must be unique, got {names}")
    table: dict[str, dict] = {}
    for name, folder in runs:
        for res in load_run(folder):
            entry = table.setdefault(res["benchmark"], {"runs": {}, "sources": {}, "paper": None})
            entry["runs"][name] = res["overall"]
            entry["sources"][name] = res["folder"]
    for bench, entry in table.items():
        if paper and bench in PAPER:
            entry["paper"] = dict(PAPER[bench])
    order = list(BENCHMARK_NAMES) + sorted(b for b in table if b not in BENCHMARK_NAMES)
    return {b: table[b] for b in order if b in table}


def _cell(value) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def render_markdown(table: dict) -> str:
    """Return the markdown report: one table per benchmark, a paper row where requested."""
    lines = ["# Evaluation report", ""]
    for bench, entry in table.items():
        lines += [f"## {BENCHMARK_NAMES.get(bench, bench)}", "",
                  "| Run | " + " | ".join(h for _, h in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]
        rows = list(entry["runs"].items())
        if entry["paper"]:
            rows.append((PAPER_NAME, entry["paper"]))
        for name, values in rows:
            lines.append(f"| {name} | " + " | ".join(_cell(values.get(k)) for k, _ in COLUMNS)
                         + " |")
        lines.append("")
    lines += [
        "Numbers ×100. *Open recall*, *Open F1*: LLaVA-Med token metrics over OPEN questions. "
        "*Closed acc (substring)*: the normalised answer is a substring of the normalised "
        "prediction — LLaVA-Med's batch scorer, the paper's \"Closed\" column. *Yes/no acc "
        "(run_eval.py)*: LLaVA-Med run_eval.py's \"yes/no accuracy\", exactly ('yes' or 'no' as a "
        "substring and the answer; its fixed last version, where every closed question counts). "
        "*Closed acc (strict)*: ours, the answer and the word yes or no. *Exact match: "
        "distinct answer words found ÷ prediction tokens (LLaVA-Med's name). "
        "See docs/Evaluation.md.", ""]
    return "\n".join(lines)


def write_per_question(runs: list[tuple[str, str]], path: pathlib.Path) -> int:
    """Concatenate every run's per_question.csv with run/benchmark columns; returns row count."""
    count = 0
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=["run", "benchmark"] + ROW_FIELDS,
                                extrasaction="ignore")
        writer.writeheader()
        for name, folder in runs:
            for res in load_run(folder):
                if not res["per_question"].is_file():
                    logger.warning("%s: missing; its rows are not in %s", res["per_question"], path)
                    continue
                with res["per_question"].open(newline="", encoding="utf-8") as fh:
                    for row in csv.DictReader(fh):
                        writer.writerow({"run": name, "benchmark": res["benchmark"], **row})
                        count += 1
    return count


def plot(table: dict, path: pathlib.Path) -> None:
    """Save a grouped bar chart (one panel per benchmark) as PNG. Needs matplotlib
    (``pip install 'stllava[report]'``); imported here so the rest works without it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for e in table.values() for n in e["runs"]))
    if any(e["paper"] for e in table.values()):
        names.append(PAPER_NAME)
    colours = {n: f"C{i % 10}" for i, n in enumerate(names)}  # one colour per run in all panels
    fig, axes = plt.subplots(1, len(table), figsize=(4.2 * len(table), 4.0), squeeze=False)
    for ax, (bench, entry) in zip(axes[0], table.items()):
        series = dict(entry["runs"])
        if entry["paper"]:
            series[PAPER_NAME] = entry["paper"]
        width = 0.8 / max(len(series), 1)
        for j, (name, values) in enumerate(series.items()):
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(PLOTTED))]
            ys = [values.get(k) or 0.0 for k, _ in PLOTTED]
            bars = ax.bar(xs, ys, width, label=name, color=colours[name],
                          hatch="//" if name == PAPER_NAME else None)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(PLOTTED)), [label for _, label in PLOTTED])
        ax.set_ylim(0, 108)
        ax.set_title(BENCHMARK_NAMES.get(bench, bench))
        ax.set_ylabel("×100")
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=colours[n],
                             hatch="//" if n == PAPER_NAME else None) for n in names]
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(names) - 1) // 4), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_report(runs: list[tuple[str, str]], out_dir: str | pathlib.Path, paper: bool = False,
                 make_plot: bool = True) -> dict:
    """Write report.md, report.json, per_question.csv (and report.png); returns the table."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = collect(runs, paper)
    (out / "report.md").write_text(render_markdown(table), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    n = write_per_question(runs, out / "per_question.csv")
    logger.info("per_question.csv: %d rows", n)
    if make_plot:
        plot(table, out / "report.png")
    return table


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(prog="python -m stllava.eval.report",
                                     description="Tabulate and plot scored evaluation runs.")
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                        help="a run name and its metrics folder (repeatable)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--paper", action="store_true",
                        help="show the published STLLaVA-Med-7B numbers beside ours")
    parser.add_argument("--no-plot", action="store_true", help="skip report.png (no matplotlib)")
    logs.add_log_level_arg(parser)
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    runs = [parse_run_arg(r) for r in args.run]
    try:
        table = build_report(runs, args.out, args.paper, not args.no_plot)
    except ImportError as exc:
        raise ReportError(f"{exc}; fix: pip install 'stllava[report]' or pass --no-plot") from None
    print(render_markdown(table), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 bad input; see stllava.errors)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

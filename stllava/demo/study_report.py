"""The study's numbers: aggregation over seeds, paired comparisons, the markdown tables, figures."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

from stllava.demo.rounds import summarize
from stllava.demo.stats import fmt_diff, fmt_mean_sd, mean_sd, paired_difference, primary_score
from stllava.jsonl import write_json_atomic

logger = logging.getLogger("stllava.demo")

LABELS = {"sft": "SFT only", "st": "SFT + self-training (DPO)",
          "cont": "control: continued SFT on the labelled set", "own": "control: SFT on own unjudged answers",
          "rft": "control: SFT on the judge's chosen answers (RFT)",
          "oracle": "control: SFT on self-asked questions, true answers (oracle)",
          "nosq": "SFT, self-questioning off", "nosq_st": "SFT, self-questioning off + self-training",
          "st_cons": "conservative DPO (label smoothing ε = flip rate)", "st_robust": "robust DPO (ε = flip rate)"}
# (a, b): the paired difference a − b, and what it answers. The first is the pre-registered primary
# comparison at 100 labelled (docs/Study.md#pre-registration-2026-12-06); every other is secondary.
COMPARISONS = [
    ("st", "sft", "what self-training adds (primary at 100 labelled)"),
    ("cont", "sft", "just more SFT steps on the labelled set"),
    ("own", "sft", "SFT on the model's own unjudged answers"),
    ("rft", "sft", "the judge's chosen answers through SFT"),
    ("oracle", "sft", "true answers to the self-asked questions"),
    ("st", "cont", "DPO vs just more steps"),
    ("st", "own", "DPO vs the model's unjudged answers: the judge's information"),
    ("st", "rft", "DPO vs SFT on the same judged data"),
    ("st", "oracle", "DPO vs the oracle"),
    ("nosq", "sft", "turning self-questioning off (SFT alone)"),
    ("nosq_st", "nosq", "what self-training adds without self-questioning"),
    ("st_cons", "sft", "conservative DPO over SFT"),
    ("st_robust", "sft", "robust DPO over SFT"),
    ("st_cons", "st", "conservative vs plain DPO"),
    ("st_robust", "st", "robust vs plain DPO"),
]
METRICS = ("closed_acc", "open_recall")
# the pre-registered primary metric: the mean of closed accuracy and open recall, and the seeds of
# the primary cells (docs/Study.md#pre-registration-2026-12-06)
PRIMARY_METRIC = "primary"
PRIMARY_SEEDS = tuple(range(10, 18))
REPORTED = (PRIMARY_METRIC, *METRICS)
# the settings search's record, whose seeds a reported study must never reuse
SEARCH_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs",
                           "study", "search.json")
METRIC_NAMES = {"closed_acc": "closed acc", "open_recall": "open recall", PRIMARY_METRIC: "mean (primary)"}
FIGURES = ("study_accuracy.png", "study_effect.png")
NOISE_FIGURE = "study_noise.png"
# the graded-answer probe's description scores (stllava.demo.graded.description_metrics), and the
# paired differences it reports
DESCRIPTION = ("recall", "precision", "exact")
DESCRIPTION_COMPARISONS = (("st", "sft"), ("rft", "sft"), ("st", "rft"))
# the noise curve: each condition's paired difference against SFT, per judge flip rate
NOISE_CONDITIONS = ("st", "rft", "st_cons", "st_robust")


def _mean_sd_known(values: list) -> dict | None:
    """:func:`mean_sd` of the values that are not None (None when all are)."""
    known = [v for v in values if v is not None]
    return mean_sd(known) if known else None


def config_record(cfg) -> dict:
    """The study's settings (a :class:`stllava.demo.study.StudyConfig`) as stored in ``study.json``
    and ``search.json`` (no paths, no timings: bit-identical reruns)."""
    d = dataclasses.asdict(cfg)
    for local in ("workdir", "jobs", "results"):
        d.pop(local, None)
    return d


def cell_settings(cfg) -> dict:
    """What every cell of a chunk shares, as its result files record it: :func:`config_record`
    without the chunk's choice of seeds, sizes and conditions."""
    d = config_record(cfg)
    for chunk in ("seeds", "sizes", "conditions"):
        d.pop(chunk)
    return d


def _with_primary(run: dict, splits) -> dict:
    """``run`` with the primary metric (the mean of closed accuracy and open recall) per condition and split."""
    for cond in run["conditions"].values():
        for split in splits:
            m = cond[split]
            m.setdefault(PRIMARY_METRIC, primary_score(m))
    return run


def aggregate(results: list[dict], cfg) -> dict:
    """``study.json``: settings (``cfg``: a StudyConfig or its record), per-run results, mean ± sd
    per condition (with how many runs had nothing to train on, ``untrained``), paired comparisons,
    per-kind accuracy (test) and stage-2 data quality, per labelled-set size."""
    config = cfg if isinstance(cfg, dict) else config_record(cfg)
    splits = config["splits"]
    runs = [_with_primary(r, splits) for r in sorted(results, key=lambda r: (r["n_labelled"], r["seed"]))]
    sizes = sorted({r["n_labelled"] for r in runs})
    out = {"config": config, "runs": runs, "conditions": {}, "comparisons": {}, "per_kind": {},
           "stage2": {}}
    for n in sizes:
        cell = [r for r in runs if r["n_labelled"] == n]
        key = str(n)
        conds = [c for c in LABELS if all(c in r["conditions"] for r in cell)]
        out["conditions"][key] = {
            c: {split: {m: mean_sd([r["conditions"][c][split][m] for r in cell]) for m in REPORTED}
                for split in splits} for c in conds}
        for c in conds:
            reward = [r["conditions"][c].get("heldout_reward_accuracy") for r in cell]
            if all(x is not None for x in reward):
                out["conditions"][key][c]["heldout_reward_accuracy"] = mean_sd(reward)
            out["conditions"][key][c]["untrained"] = sum(r["conditions"][c].get("trained") is False for r in cell)
            out["conditions"][key][c]["runs"] = len(cell)
        if len(cell) > 1:
            out["comparisons"][key] = {
                f"{a} - {b}": {split: {m: paired_difference([r["conditions"][a][split][m] for r in cell],
                                                            [r["conditions"][b][split][m] for r in cell])
                                       for m in REPORTED} for split in splits}
                for a, b, _ in COMPARISONS if a in conds and b in conds}
        out["per_kind"][key] = {
            c: {form: {k: mean_sd([r["conditions"][c]["test"]["per_kind"][form][k] for r in cell])
                       for k in cell[0]["conditions"][c]["test"]["per_kind"][form]}
                for form in ("closed", "open")} for c in conds}
        description = _description(cell, conds)
        if description:
            out.setdefault("description", {})[key] = description
        out["stage2"][key] = {}
        for tag in sorted({t for r in cell for t in r["stage2"]}):
            if all(tag in r["stage2"] for r in cell):
                q = [r["stage2"][tag]["questions"] for r in cell]
                p = [r["stage2"][tag]["pair_quality"] for r in cell]
                out["stage2"][key][tag] = {
                    "questions": mean_sd([x["questions"] for x in q]),
                    "answerable_rate": _mean_sd_known([x["answerable_rate"] for x in q]),
                    "novel": mean_sd([x["novel"] for x in q]),
                    "identical_rate": _mean_sd_known([x["identical_rate"] for x in p]),
                    "tie_rate": _mean_sd_known([x["tie_rate"] for x in p]),
                    "pairs": mean_sd([x["pairs"] for x in p]),
                    # a run without pairs has no such share: averaged over the runs that have pairs
                    "chosen_right_rejected_wrong": _mean_sd_known([x["chosen_right_rejected_wrong"] for x in p]),
                }
    return out


def _description(cell: list[dict], conds: list[str]) -> dict:
    """The graded probe's description scores on test (mean ± sd per condition, and the paired
    differences of :data:`DESCRIPTION_COMPARISONS` with ≥ 2 seeds), for the conditions whose every
    run scored descriptions; {} when none did (a study without the probe)."""
    found = {c: [r["conditions"][c]["test"].get("description") for r in cell] for c in conds}
    found = {c: v for c, v in found.items() if all(x and x.get("n") for x in v)}
    out: dict = {c: {m: _mean_sd_known([x[m] for x in v]) for m in DESCRIPTION} for c, v in found.items()}
    for a, b in DESCRIPTION_COMPARISONS:
        if a in found and b in found and len(cell) > 1:
            out[f"{a} - {b}"] = {m: paired_difference([x[m] for x in found[a]], [x[m] for x in found[b]])
                                 for m in DESCRIPTION
                                 if all(x[m] is not None for x in found[a] + found[b])}
    asked = [r["stage2"].get("st") for r in cell]
    if out and all(asked):  # how often stage 2 could grade a description at all: the pairs' kind "describe"
        out["self_asked"] = {
            "questions": mean_sd([s["questions"].get("by_kind", {}).get("describe", 0) for s in asked]),
            "pairs": mean_sd([s["pair_quality"].get("pair_kinds", {}).get("describe", 0) for s in asked])}
    return out


def _untrained_note(v: dict) -> str:
    """The row's note when some runs had nothing to train on (no pairs: the condition is its SFT model)."""
    k = v.get("untrained", 0)
    if not k:
        return ""
    return f" — untrained in {k} of {v['runs']} runs (0 pairs, nothing to train on: = its SFT model)"


def render_markdown(study: dict, title: str = "# Self-training study: results") -> str:
    """The study's tables (test set unless said otherwise), as ``study.md`` holds them; the plan's
    variants (the noisy judge) follow, each with its own tables."""
    cfg = study["config"]
    seeds = ", ".join(str(s) for s in cfg["seeds"])
    lines = [title, "",
             f"Seeds {seeds}; unlabelled pool {cfg['n_unlabelled']} phantoms; validation {cfg['n_val']} and test "
             f"{cfg['n_test']} phantoms. LLaVA-Med scores ×100 (closed accuracy = substring variant). Cells: "
             "mean ± sd over seeds. Differences: mean of the per-seed paired differences [95% t interval]; "
             "bold when the interval excludes 0.", ""]
    splits = [x for x in ("test", "val") if x in cfg["splits"]]
    cols = [(x, m) for x in splits for m in REPORTED]
    head = " | ".join(f"{x} {METRIC_NAMES[m]}" for x, m in cols)
    for n, conds in study["conditions"].items():
        lines += [f"## {n} labelled phantoms", "", f"| condition | {head} | held-out reward acc |",
                  "|---|" + "---|" * (len(cols) + 1)]
        for c, v in conds.items():
            reward = fmt_mean_sd(v["heldout_reward_accuracy"], 3) if "heldout_reward_accuracy" in v else "–"
            lines.append(f"| {LABELS[c]}{_untrained_note(v)} | " + " | ".join(fmt_mean_sd(v[x][m]) for x, m in cols)
                         + f" | {reward} |")
        comps = study["comparisons"].get(n, {})
        if comps:
            delta = " | ".join(f"{x} Δ {METRIC_NAMES[m]}" for x, m in cols)
            lines += ["", f"| paired difference | question | {delta} |", "|---|---|" + "---|" * len(cols)]
            for a, b, why in COMPARISONS:
                d = comps.get(f"{a} - {b}")
                if d:
                    base = "nosq" if a == "nosq_st" else "sft"  # the SFT model every other condition starts from
                    same = conds[a].get("untrained") == conds[a].get("runs") and b == base
                    why += " (identical: no pairs in any run, no training)" if same else ""
                    lines.append(f"| {a} − {b} | {why} | " + " | ".join(fmt_diff(d[x][m]) for x, m in cols) + " |")
        kinds = study["per_kind"].get(n, {})
        if kinds:
            closed_kinds = sorted({k for v in kinds.values() for k in v["closed"]})
            open_kinds = sorted({k for v in kinds.values() for k in v["open"]})
            lines += ["", "Per question kind (test; closed accuracy | open recall):", "",
                      "| condition | " + " | ".join(f"closed {k}" for k in closed_kinds) + " | "
                      + " | ".join(f"open {k}" for k in open_kinds) + " |",
                      "|---|" + "---|" * (len(closed_kinds) + len(open_kinds))]
            for c, v in kinds.items():
                cells = [fmt_mean_sd(v["closed"][k]) if k in v["closed"] else "–" for k in closed_kinds]
                cells += [fmt_mean_sd(v["open"][k]) if k in v["open"] else "–" for k in open_kinds]
                lines.append(f"| {c} | " + " | ".join(cells) + " |")
        s2 = study["stage2"].get(n, {})
        if s2:
            lines += ["", "Stage-2 data (per run, mean ± sd; rates as fractions):", "",
                      "| made by | questions | answerable | novel | identical answers | ties | pairs | "
                      "chosen right & rejected wrong |", "|---|---|---|---|---|---|---|---|"]
            def f(stat, digits):
                return "–" if stat is None else fmt_mean_sd(stat, digits)

            for tag, v in s2.items():
                lines.append(f"| {LABELS[tag.replace('_st', '') if tag != 'st' else 'sft']} | "
                             f"{f(v['questions'], 0)} | {f(v['answerable_rate'], 3)} | {f(v['novel'], 0)} | "
                             f"{f(v['identical_rate'], 3)} | {f(v['tie_rate'], 3)} | {f(v['pairs'], 0)} | "
                             f"{f(v['chosen_right_rejected_wrong'], 3)} |")
        lines += _description_lines(study, n) + _rounds_lines(study, n)
        lines.append("")
    lines += _noise_lines(study)
    for variant, sub in study.get("variants", {}).items():
        lines += render_markdown(sub, f"# Variant {variant}: {variant_title(sub['config'])}").splitlines()
        lines.append("")
    return "\n".join(lines) + "\n"


def variant_title(config: dict) -> str:
    """What a variant's settings change, in words (its section title in ``study.md``)."""
    loop = config["loop"]
    if loop.get("graded"):
        return "the graded-answer probe (a description question, a judge grading its facts)"
    if config.get("rounds", 1) > 1:
        return f"iterative self-training, {config['rounds']} rounds"
    return f"judge flip rate {loop.get('judge_flip_rate', 0.0)}"


def _description_lines(study: dict, n: str) -> list[str]:
    """The graded probe's table for labelled-set size ``n`` (none without the probe)."""
    desc = study.get("description", {}).get(n)
    if not desc:
        return []
    lines = ["", "Descriptions (the graded probe; test; facts pooled over answers, ×100):", "",
             "| condition | fact recall | fact precision | all facts right, none wrong |", "|---|---|---|---|"]
    for c in LABELS:
        if c in desc:
            lines.append(f"| {LABELS[c]} | " + " | ".join(fmt_mean_sd(desc[c][m]) if desc[c][m] else "–"
                                                        for m in DESCRIPTION) + " |")
    for a, b in DESCRIPTION_COMPARISONS:
        d = desc.get(f"{a} - {b}")
        if d:
            lines.append(f"| Δ {a} − {b} | " + " | ".join(fmt_diff(d[m]) if m in d else "–" for m in DESCRIPTION)
                         + " |")
    asked = desc.get("self_asked")
    runs = sorted((r for r in study["runs"] if str(r["n_labelled"]) == n), key=lambda r: r["seed"])
    if asked:
        per_seed = ", ".join(f"{q:.0f}" for q in asked["questions"]["values"])
        lines += ["", f"Stage 2 (per run, mean ± sd): the SFT model asked {fmt_mean_sd(asked['questions'], 0)} "
                  f"description questions about the unlabelled phantoms (per seed: {per_seed}); "
                  f"{fmt_mean_sd(asked['pairs'], 0)} preference pairs were made on them."]
    refs = next((got["examples"] for got in (runs[0]["conditions"].get(c, {}).get("test", {}).get("description")
                                             for c in LABELS) if got), [])
    lines += ["", "What the models answered (the first three test description questions; references: "
              + "; ".join(f"`{ref}`" for _, _, ref in refs) + "):", ""]
    for r in runs:  # every seed: the seeds' models can differ in kind, not only in degree
        for c in LABELS:
            got = r["conditions"].get(c, {}).get("test", {}).get("description")
            if got:
                shown = "; ".join(f"`{answer or '(empty)'}`" for _, answer, _ in got["examples"])
                lines.append(f"- seed {r['seed']}, {c} (fact recall {got['recall']:.1f}): {shown}")
    return lines


def _rounds_lines(study: dict, n: str) -> list[str]:
    """Iterative self-training's table for labelled-set size ``n`` (none without rounds)."""
    table = study.get("rounds", {}).get(n)
    if not table:
        return []
    lines = ["", "Rounds of self-training (round 1 = the published method; test, ×100; Δ on the primary metric):",
             "", "| round | pairs | closed acc | open recall | mean (primary) | Δ vs SFT | Δ vs round 1 |",
             "|---|---|---|---|---|---|---|"]
    k = 1
    while f"round{k}" in table:
        row = table[f"round{k}"]
        vs_sft, vs_r1 = table.get(f"round{k} - sft"), table.get(f"round{k} - round1")
        lines.append(f"| {k} | {fmt_mean_sd(row['pairs'], 0)} | {fmt_mean_sd(row['closed_acc'])} | "
                     f"{fmt_mean_sd(row['open_recall'])} | {fmt_mean_sd(row[PRIMARY_METRIC])} | "
                     f"{fmt_diff(vs_sft[PRIMARY_METRIC]) if vs_sft else '–'} | "
                     f"{fmt_diff(vs_r1[PRIMARY_METRIC]) if vs_r1 else '–'} |")
        k += 1
    return lines


def noise_curve(study: dict) -> dict[float, dict]:
    """``{flip rate: {"n": size, "comparisons": {...}}}`` from the variants run with a noisy phantom
    judge (and no other change: not the rounds or graded variants), sorted by flip rate."""
    out = {}
    for sub in study.get("variants", {}).values():
        cfg = sub["config"]
        if cfg["loop"].get("graded") or cfg.get("rounds", 1) > 1 or "judge_flip_rate" not in cfg["loop"]:
            continue
        for n, comps in sub["comparisons"].items():
            out[cfg["loop"]["judge_flip_rate"]] = {"n": n, "comparisons": comps}
    return dict(sorted(out.items()))


def _noise_lines(study: dict) -> list[str]:
    """The noise curve: per flip rate, each condition minus SFT (and DPO − RFT) on the primary
    metric, test set (none when no noise variant was run)."""
    curve = noise_curve(study)
    if not curve:
        return []
    lines = ["# The noise curve", "",
             "The phantom judge reverses a share of its verdicts (seeded per record). Paired differences on the "
             "primary metric (test, ×100) [95% t interval]; conservative and robust DPO use ε = the flip rate "
             "(at 0 they are plain DPO, so they are not run).", "",
             "| flip rate | labelled | seeds | " + " | ".join(f"{c} − sft" for c in NOISE_CONDITIONS)
             + " | st − rft |", "|---" * (4 + len(NOISE_CONDITIONS)) + "|"]
    for flip, v in curve.items():
        comps = v["comparisons"]
        seeds = comps["st - sft"]["test"][PRIMARY_METRIC]["n"] if "st - sft" in comps else "–"
        cells = [fmt_diff(comps[name]["test"][PRIMARY_METRIC]) if name in comps else "–"
                 for name in [f"{c} - sft" for c in NOISE_CONDITIONS] + ["st - rft"]]
        lines.append(f"| {flip} | {v['n']} | {seeds} | " + " | ".join(cells) + " |")
    return lines + [""]


def results_summary(study: dict) -> str:
    """docs/Study.md's results (``python -m stllava.demo.readme --write``): per labelled-set size,
    every condition on test (primary metric, closed, open) with its paired difference against SFT
    and DPO's against it on the primary metric; DPO's gain per question kind; then the noise curve,
    the rounds and the graded probe from their variants. Every cell: ``docs/study/study.md``."""
    lines: list[str] = []
    for n, conds in study["conditions"].items():
        comps = study["comparisons"].get(n, {})
        runs = max(v["runs"] for v in conds.values())
        lines += [f"**{n} labelled phantoms** ({runs} seeds; test, ×100, mean ± sd over seeds; Δ = paired "
                  "difference on the primary metric [95% t interval], bold when it excludes 0):", "",
                  "| condition | primary | closed acc | open recall | Δ vs SFT | DPO − it |",
                  "|---|---|---|---|---|---|"]
        for c, v in conds.items():
            base = "nosq" if c == "nosq_st" else "sft"
            vs_base = comps.get(f"{c} - {base}")
            dpo_minus = comps.get(f"st - {c}")
            lines.append(f"| {LABELS[c]}{_untrained_note(v)} | {fmt_mean_sd(v['test'][PRIMARY_METRIC])} | "
                         f"{fmt_mean_sd(v['test']['closed_acc'])} | {fmt_mean_sd(v['test']['open_recall'])} | "
                         + (f"{fmt_diff(vs_base['test'][PRIMARY_METRIC])}{' (vs nosq)' if base == 'nosq' else ''}"
                            if vs_base else "–")
                         + f" | {fmt_diff(dpo_minus['test'][PRIMARY_METRIC]) if dpo_minus else '–'} |")
        kinds = study["per_kind"].get(n, {})
        if "sft" in kinds and "st" in kinds and any(kinds["sft"][form] for form in ("closed", "open")):
            lines += ["", "Per question kind (test; SFT → DPO, mean over seeds):", "",
                      "| kind | SFT | DPO | DPO − SFT |", "|---|---|---|---|"]
            for form in ("closed", "open"):
                for k in sorted(kinds["sft"][form]):
                    a, b = kinds["sft"][form][k]["mean"], kinds["st"][form][k]["mean"]
                    lines.append(f"| {form} {k} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
        s2 = study["stage2"].get(n, {}).get("st")
        if s2:
            crw = s2["chosen_right_rejected_wrong"]
            lines += ["", f"Stage 2 (per run, mean ± sd): the SFT model asked {fmt_mean_sd(s2['questions'], 0)} "
                      f"questions about the unlabelled phantoms ({fmt_mean_sd(s2['novel'], 0)} not among its training "
                      f"questions); {fmt_mean_sd(s2['pairs'], 0)} preference pairs"
                      + (f", {fmt_mean_sd(crw, 3)} of them with a right chosen and a wrong rejected answer" if crw
                         else "") + "."]
        lines.append("")
    lines += _noise_lines(study)
    for sub in study.get("variants", {}).values():
        for n in sub["conditions"]:
            extra = _rounds_lines(sub, n) + _description_lines(sub, n)
            if extra:
                lines += [f"**{variant_title(sub['config']).capitalize()}**, {n} labelled phantoms, seeds "
                          f"{', '.join(str(x) for x in sub['config']['seeds'])}:"] + extra + [""]
    return "\n".join(lines).strip() + "\n"


def load_results(folder: str, role: str = "study") -> dict[str, list[dict]]:
    """The result files ``<folder>/<role>-*.json`` (:meth:`stllava.demo.study.Study.write_results`)
    as cells ``{"seed", "n_labelled", "conditions", "stage2"}``, per variant ("" = the main cells);
    the second item of each variant is its settings. Refuses (StllavaError) an empty folder and a
    variant whose files were made with different settings (their digests differ)."""
    import glob
    import json

    from stllava.errors import StllavaError

    paths = sorted(glob.glob(os.path.join(folder, f"{role}-*.json")))
    if not paths:
        raise StllavaError(f"no {role} result files in {folder}", file=folder,
                           fix="run a chunk first: python -m stllava.demo.study --plan primary --seeds 10-11")
    cells: dict[str, dict[tuple, dict]] = {}
    settings: dict[str, tuple[str, dict, str]] = {}
    for path in paths:
        with open(path) as f:
            rec = json.load(f)
        variant = rec["variant"]
        seen = settings.setdefault(variant, (rec["settings_digest"], rec["settings"], path))
        if seen[0] != rec["settings_digest"]:
            raise StllavaError(f"made with other settings than {seen[2]} (digest {rec['settings_digest']} ≠ "
                               f"{seen[0]}), in one variant", file=path,
                               fix="move the stale files away, or rerun their cells with the study's settings")
        cell = cells.setdefault(variant, {}).setdefault(
            (rec["seed"], rec["n_labelled"]),
            {"seed": rec["seed"], "n_labelled": rec["n_labelled"], "conditions": {}, "stage2": {}})
        cell["conditions"][rec["condition"]] = rec["result"]
        if rec.get("rounds"):  # iterative self-training: the st file carries every round
            cell["rounds"] = rec["rounds"]
        if rec.get("stage2"):
            cell["stage2"][rec["condition"]] = rec["stage2"]
    return {v: (list(c.values()), settings[v][1]) for v, c in cells.items()}


def search_seeds(path: str = SEARCH_FILE) -> tuple[int, ...]:
    """The seeds the settings search ran on, as its ``search.json`` records them (() without it)."""
    if not os.path.isfile(path):
        return ()
    with open(path) as f:
        return tuple(json.load(f)["config"]["seeds"])


def aggregate_files(folder: str, role: str = "study") -> dict:
    """``study.json`` from the result files in ``folder`` alone (:func:`load_results`): the main
    cells aggregated as :func:`aggregate` does, each variant under ``variants``; the config records
    the cells' seeds and sizes, the conditions found and the settings search's seeds."""
    found = load_results(folder, role)

    def one(cells, settings):
        config = {**settings, "seeds": sorted({c["seed"] for c in cells}),
                  "sizes": sorted({c["n_labelled"] for c in cells}),
                  "conditions": [c for c in LABELS if any(c in cell["conditions"] for cell in cells)],
                  "search_seeds": list(search_seeds())}
        out = aggregate(cells, config)
        rounds = summarize(cells)  # iterative self-training: per-round means and differences
        if rounds:
            out["rounds"] = rounds
        return out

    main = "" if "" in found else sorted(found)[0]
    out = one(*found[main])
    out["variants"] = {v: one(*found[v]) for v in sorted(found) if v != main}
    return out


def _legend_below(fig, ax, ncol: int) -> None:
    """One legend for both panels, under them: inside a panel it covered the 100-labelled points."""
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))


def plot(study: dict, out_dir: str) -> list[str]:
    """``study_accuracy.png`` (accuracy vs labelled phantoms, a line per condition, error bars = sd
    over seeds) and ``study_effect.png`` (paired differences with 95% intervals); returns names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(n) for n in study["conditions"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, metric in zip(axes, METRICS):
        for c in LABELS:
            xs = [n for n in sizes if c in study["conditions"][str(n)]]
            if not xs:
                continue
            stats = [study["conditions"][str(n)][c]["test"][metric] for n in xs]
            ax.errorbar(xs, [s["mean"] for s in stats], yerr=[s["sd"] or 0.0 for s in stats], marker="o",
                        capsize=3, label=LABELS[c])
        ax.set(xscale="log", xlabel="labelled phantoms", ylabel=f"test {METRIC_NAMES[metric]} (×100)",
               title=f"{METRIC_NAMES[metric]} vs labelled data")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()  # a log axis labels its minor ticks too: only the sizes run
    _legend_below(fig, axes[0], ncol=3)
    fig.savefig(os.path.join(out_dir, FIGURES[0]), dpi=110)
    plt.close(fig)

    names = [f"{a} - {b}" for a, b, _ in COMPARISONS]
    present = {n: [c for c in names if c in study["comparisons"].get(str(n), {})] for n in sizes}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, metric in zip(axes, METRICS):
        for k, name in enumerate(names):
            xs = [n for n in sizes if name in present[n]]
            if not xs:
                continue
            ds = [study["comparisons"][str(n)][name]["test"][metric] for n in xs]
            # side by side, centred on the size among the comparisons it has; a colour each (tab10 has too few)
            shift = [n * (1 + 0.03 * (present[n].index(name) - (len(present[n]) - 1) / 2)) for n in xs]
            ax.errorbar(shift, [d["mean"] for d in ds], capsize=3, marker="o", linestyle="",
                        color=plt.get_cmap("tab20")(k % 20),
                        yerr=[[d["mean"] - d["ci95"][0] for d in ds], [d["ci95"][1] - d["mean"] for d in ds]],
                        label=name.replace(" - ", " − "))
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set(xscale="log", xlabel="labelled phantoms", ylabel=f"Δ test {METRIC_NAMES[metric]}",
               title=f"paired differences (95% interval), {METRIC_NAMES[metric]}")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()  # a log axis labels its minor ticks too: only the sizes run
    _legend_below(fig, axes[0], ncol=6)
    fig.savefig(os.path.join(out_dir, FIGURES[1]), dpi=110)
    plt.close(fig)
    return list(FIGURES) + plot_noise(study, out_dir)


def plot_noise(study: dict, out_dir: str) -> list[str]:
    """``study_noise.png``: the noise curve (:func:`noise_curve`), each condition minus SFT on the
    primary metric against the judge's flip rate, with 95% intervals; [] without noise variants."""
    import matplotlib.pyplot as plt

    curve = noise_curve(study)
    if not curve:
        return []
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k, c in enumerate(NOISE_CONDITIONS):
        xs = [f for f, v in curve.items() if f"{c} - sft" in v["comparisons"]]
        if not xs:
            continue
        ds = [curve[f]["comparisons"][f"{c} - sft"]["test"][PRIMARY_METRIC] for f in xs]
        ax.errorbar([f + 0.006 * (k - 1.5) for f in xs], [d["mean"] for d in ds], capsize=3, marker="o",
                    yerr=[[d["mean"] - d["ci95"][0] for d in ds], [d["ci95"][1] - d["mean"] for d in ds]],
                    label=LABELS[c])
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(xlabel="judge flip rate", ylabel="Δ vs SFT, test mean (primary)",
           title="a noisy judge: gain over SFT (95% interval)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, NOISE_FIGURE), dpi=110)
    plt.close(fig)
    return [NOISE_FIGURE]


def write_report(study: dict, workdir: str) -> None:
    """``study.json``, ``study.md`` and the figures in ``workdir``."""
    write_json_atomic(os.path.join(workdir, "study.json"), study, indent=1)
    with open(os.path.join(workdir, "study.md"), "w", encoding="utf-8") as f:
        f.write(render_markdown(study))
    plot(study, workdir)
    logger.info("study report: %s", os.path.join(workdir, "study.md"))


def copy_figures(workdir: str, images_dir: str = "images") -> None:
    """Copy the study's figures into ``images/`` (README shows them)."""
    os.makedirs(images_dir, exist_ok=True)
    for name in (*FIGURES, NOISE_FIGURE):
        if name in FIGURES or os.path.isfile(os.path.join(workdir, name)):
            shutil.copy(os.path.join(workdir, name), os.path.join(images_dir, name))


def write_search(found: dict, workdir: str) -> None:
    """``search.json`` and ``search.md``: per variant and size, validation scores of sft / st / rft
    (mean ± sd over seeds), the paired st − sft difference, and the stage-2 data."""
    write_json_atomic(os.path.join(workdir, "search.json"), found, indent=1)
    lines = ["# Settings search (validation phantoms only)", "",
             "Variants override the loop settings of `stllava.demo.steps.LoopSettings`. Scores ×100 on the "
             "validation set, mean ± sd over seeds; Δ = paired st − sft [95% interval] when there are ≥ 2 seeds.", "",
             "| variant | overrides | labelled | sft closed | st closed | rft closed | sft open | st open | rft open | "
             "Δ closed (st − sft) | Δ open (st − sft) | pairs | identical | chosen right & rejected wrong |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list] = {}
    for run in found["runs"]:
        groups.setdefault((run["variant"], run["n_labelled"]), []).append(run)
    for (variant, n), runs in groups.items():
        def stat(cond, metric, runs=runs):
            vals = [r["conditions"][cond]["val"][metric] for r in runs if cond in r["conditions"]]
            return fmt_mean_sd(mean_sd(vals)) if vals else "–"

        diffs = {}
        for m in METRICS:
            diffs[m] = "–"
            if len(runs) > 1:
                diffs[m] = fmt_diff(paired_difference([r["conditions"]["st"]["val"][m] for r in runs],
                                                      [r["conditions"]["sft"]["val"][m] for r in runs]))
        q = [r["stage2"]["st"]["pair_quality"] for r in runs]
        crw = [x["chosen_right_rejected_wrong"] for x in q if x["chosen_right_rejected_wrong"] is not None]
        over = ", ".join(f"{k}={v}" for k, v in found["variants"][variant].items()) or "(LoopSettings defaults)"
        lines.append(f"| {variant} | {over} | {n} | {stat('sft', 'closed_acc')} | {stat('st', 'closed_acc')} | "
                     f"{stat('rft', 'closed_acc')} | {stat('sft', 'open_recall')} | {stat('st', 'open_recall')} | "
                     f"{stat('rft', 'open_recall')} | {diffs['closed_acc']} | {diffs['open_recall']} | "
                     f"{fmt_mean_sd(mean_sd([x['pairs'] for x in q]), 0)} | "
                     f"{fmt_mean_sd(mean_sd([x['identical_rate'] or 0.0 for x in q]), 3)} | "
                     f"{fmt_mean_sd(mean_sd(crw), 3) if crw else '–'} |")
    scores = search_scores(found)
    best = max(scores, key=scores.get)
    lines += ["", "Choice rule: the variant with the largest mean validation gain of self-training over SFT, "
              "(Δ closed + Δ open) / 2 averaged over runs (every size and seed):", "",
              "| variant | mean gain |", "|---|---|"]
    lines += [f"| {v}{' (chosen)' if v == best else ''} | {g:+.2f} |" for v, g in scores.items()]
    with open(os.path.join(workdir, "search.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def search_scores(found: dict) -> dict[str, float]:
    """Per variant: the mean over its runs of (Δ closed + Δ open) / 2, st − sft, validation set."""
    gains: dict[str, list[float]] = {}
    for run in found["runs"]:
        c = run["conditions"]
        gains.setdefault(run["variant"], []).append(
            sum(c["st"]["val"][m] - c["sft"]["val"][m] for m in METRICS) / len(METRICS))
    return {v: sum(g) / len(g) for v, g in gains.items()}

"""The demo's report folder: scores, the self-training effect with the study's interval, the
self-made data and its quality, curves, examples. ``summary.json`` holds only results (no times),
so the same seed gives the same file; stage times are in ``timings.json`` beside the workdir's."""
from __future__ import annotations

import json
import logging
import os

from stllava.demo.quality import pair_stats, per_kind, question_stats
from stllava.jsonl import write_json_atomic

logger = logging.getLogger("stllava.demo")

MODELS = [("start", "start (random-init tiny)"), ("sft", "stage 1: self-questioning SFT"),
          ("dpo", "stage 3: DPO on self-made pairs")]
STUDY_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "docs", "study", "study.json")


def log_history(folder: str) -> list[dict]:
    """The Trainer's ``log_history`` from ``folder/trainer_state.json`` ([] when absent)."""
    path = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)["log_history"]


def plot_curves(demo, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sft = [h for h in log_history(demo.path("sft", "train")) if "loss" in h]
    if sft:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([h["step"] for h in sft], [h["loss"] for h in sft])
        ax.set(xlabel="step", ylabel="loss", title="Stage 1 (SFT) training loss")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "sft_loss.png"), dpi=110)
        plt.close(fig)
        written.append("sft_loss.png")
    dpo = [h for h in log_history(demo.path("dpo", "train")) if "rewards/margins" in h]
    if dpo:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        steps = [h["step"] for h in dpo]
        axes[0].plot(steps, [h["loss"] for h in dpo], label="loss")
        axes[0].plot(steps, [h["rewards/margins"] for h in dpo], label="reward margin")
        axes[0].set(xlabel="step", title="Stage 3 (DPO)")
        axes[0].legend()
        axes[1].plot(steps, [h["rewards/accuracies"] for h in dpo])
        axes[1].set(xlabel="step", ylabel="reward accuracy", ylim=(0, 1.05), title="DPO reward accuracy (train)")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "dpo_rewards.png"), dpi=110)
        plt.close(fig)
        written.append("dpo_rewards.png")
    return written


def metrics(demo) -> dict:
    """``{model: {bench: overall metrics}}`` of the evaluation stage, plus the phantom per-kind split."""
    data = {}
    for key, _ in MODELS:
        for bench in ("phantom", "vqa_rad"):
            f = demo.path("eval", key, bench, "metrics.json")
            if os.path.isfile(f):
                with open(f) as fh:
                    m = json.load(fh)["overall"]
                data.setdefault(key, {})[bench] = {k: m[k] for k in ("closed_acc", "open_recall", "open_f1",
                                                                     "n_closed", "n_open")}
        if key in data and "phantom" in data[key]:
            data[key]["phantom"]["per_kind"] = per_kind(demo.path("eval", key, "phantom"),
                                                        demo.path("data", "eval_test"))
    return data


def _cell(m: dict, bench: str, k: str) -> str:
    v = m.get(bench, {}).get(k)
    return "–" if v is None else f"{v:.1f}"


def study_line(n_labelled: int, study_file: str = STUDY_FILE) -> str | None:
    """The study's self-training effect at ``n_labelled`` labelled phantoms, as a sentence (None when
    the study has no such size, its results are not in this checkout, or it is not a v2 study: the
    earlier one is superseded, stllava.demo.readme.is_v2)."""
    from stllava.demo.readme import is_v2

    if not os.path.isfile(study_file):
        return None
    with open(study_file) as f:
        study = json.load(f)
    if not is_v2(study):
        return None
    comp = study.get("comparisons", {}).get(str(n_labelled), {}).get("st - sft")
    if not comp:
        return None
    seeds = len(study["config"]["seeds"])
    parts = []
    for metric, name in (("closed_acc", "closed accuracy"), ("open_recall", "open recall")):
        d = comp["test"][metric]
        parts.append(f"{d['mean']:+.1f} {name} points [95% interval {d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]")
    return (f"The study (`python -m stllava.demo.study`, {seeds} seeds, {n_labelled} labelled phantoms) measured "
            f"self-training over SFT: {'; '.join(parts)} on its test phantoms.")


def write_report(demo) -> str:
    """Write ``<workdir>/report/{README.md, summary.json, *.png}``; returns the folder."""
    c = demo.cfg
    out = demo.path("report")
    os.makedirs(out, exist_ok=True)
    data = metrics(demo)
    facts = demo.path("data", "phantoms", "unlabelled", "facts.json")
    from stllava.demo.data import training_questions

    with open(demo.path("labelled", f"sft_{c.n_labelled}.json")) as f:
        asked_in_training = training_questions(json.load(f))
    qstats = question_stats(demo.path("selftrain", "questions", "questions.jsonl"), facts, asked_in_training)
    pairs_dir = demo.path("selftrain", "pairs")
    pstats = pair_stats(demo.path("selftrain", "judged", "judged.jsonl"),
                        [os.path.join(pairs_dir, "dpo_train.json"), os.path.join(pairs_dir, "dpo_heldout.json")],
                        facts)
    summary = {"settings": {"n_labelled": c.n_labelled, "n_unlabelled": c.n_unlabelled, "seed": c.seed},
               "metrics": data, "self_questions": qstats, "pairs": pstats}
    heldout = demo.path("dpo", "train", "eval_results.json")
    if os.path.isfile(heldout):
        with open(heldout) as f:
            m = json.load(f)
        summary["dpo_heldout"] = {"reward_accuracy": m.get("eval_rewards/accuracies"),
                                  "reward_margin": m.get("eval_rewards/margins")}
    effect = {}
    if "sft" in data and "dpo" in data:
        effect = {k: data["dpo"]["phantom"][k] - data["sft"]["phantom"][k] for k in ("closed_acc", "open_recall")}
        summary["self_training_effect"] = effect
    write_json_atomic(os.path.join(out, "summary.json"), summary, indent=1)

    rows = [f"| {label} | {_cell(data.get(k, {}), 'phantom', 'closed_acc')} | "
            f"{_cell(data.get(k, {}), 'phantom', 'open_recall')} | {_cell(data.get(k, {}), 'phantom', 'open_f1')} | "
            f"{_cell(data.get(k, {}), 'vqa_rad', 'closed_acc')} |" for k, label in MODELS]
    md = ["# STLLaVA-Med embedded demo — report", "",
          f"A tiny random-init LLaVA model is self-question-SFT'd on {c.n_labelled} labelled phantoms (+ the "
          f"embedded VQA-RAD subset), asks and answers its own questions on {c.n_unlabelled} unlabelled phantoms, "
          "a **phantom judge** (a ground-truth scorer behind a local OpenAI-compatible server, standing in for "
          "GPT-4o) picks the better answers, and DPO trains on those pairs.", "",
          "## Scores (LLaVA-Med metrics, ×100; closed accuracy = substring variant)", "",
          "| model | phantom closed acc | phantom open recall | phantom open F1 | VQA-RAD subset closed acc |",
          "|---|---|---|---|---|", *rows, ""]
    if effect:
        md += [f"**Self-training effect in this run (seed {c.seed}):** {effect['closed_acc']:+.1f} closed-accuracy "
               f"and {effect['open_recall']:+.1f} open-recall points over SFT on "
               f"{data['sft']['phantom']['n_closed']} + {data['sft']['phantom']['n_open']} test questions.", ""]
        line = study_line(c.n_labelled)
        md += [line if line else "The study's interval for this setting is not in this checkout "
               "(run `python -m stllava.demo.study`).", ""]
    md += ["VQA-RAD numbers of a model this small are not meaningful; they show the real-data path runs.", "",
           "## Self-made preference data", "",
           f"The SFT model asked {qstats['questions']} questions about {qstats['images']} unlabelled phantoms "
           f"({qstats['distinct']} distinct; {qstats['answerable']} about a fact the phantom judge can check; "
           f"{qstats['novel']} not verbatim among its training questions, {qstats['novel_answerable']} of those "
           "checkable). Examples of novel ones: " + "; ".join(f"“{q}”" for q in qstats["novel_examples"]), "",
           f"Answers judged: {pstats['questions']} questions — {json.dumps(pstats['status'])}; "
           f"**{pstats['pairs']} pairs**, of which {100 * (pstats['chosen_right_rejected_wrong'] or 0):.1f}% have "
           "a right chosen and a wrong rejected answer by the phantoms' ground truth.", ""]
    if "dpo_heldout" in summary:
        h = summary["dpo_heldout"]
        md += [f"DPO reward accuracy on held-out judged pairs (images DPO never saw): {h['reward_accuracy']:.3f} "
               f"(mean margin {h['reward_margin']:.3f}).", ""]
    md += ["## Curves", ""] + [f"![{x}]({x})" for x in plot_curves(demo, out)]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    logger.info("report written to %s", out)
    return out


def phantom_gallery(images: str, facts_file: str, out_png: str, n: int = 6) -> None:
    """The first ``n`` phantoms of a split in a row, each captioned with its modality and lesion count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    with open(facts_file) as f:
        facts = json.load(f)
    names = sorted(facts)[:n]
    fig, axes = plt.subplots(1, len(names), figsize=(1.6 * len(names), 1.9))
    for ax, name in zip(axes, names):
        ax.imshow(Image.open(os.path.join(images, name)).convert("L"), cmap="gray", vmin=0, vmax=255)
        k = facts[name]["count"]
        ax.set_title(f"{facts[name]['modality']}, {k} lesion{'' if k == 1 else 's'}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def copy_figures(demo, images_dir: str = "images") -> list[str]:
    """README's demo pictures from this run: ``images/demo_sft_loss.png``, ``demo_dpo_rewards.png``
    (the report's curves) and ``images/phantoms.png`` (test phantoms); returns the paths written."""
    import shutil

    os.makedirs(images_dir, exist_ok=True)
    written = []
    for name in ("sft_loss.png", "dpo_rewards.png"):
        src = demo.path("report", name)
        if os.path.isfile(src):
            written.append(os.path.join(images_dir, f"demo_{name}"))
            shutil.copy(src, written[-1])
    written.append(os.path.join(images_dir, "phantoms.png"))
    phantom_gallery(demo.path("data", "phantoms", "test", "images"),
                    demo.path("data", "phantoms", "test", "facts.json"), written[-1])
    return written


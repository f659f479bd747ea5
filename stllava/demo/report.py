"""The demo's report folder: summary, metrics table, curves, example self-questions."""
from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger("stllava.demo")

MODELS = [("start", "start (random-init tiny)"), ("sft", "stage 1: SFT"), ("dpo", "stage 3: DPO")]


def log_history(folder: str) -> list[dict]:
    """The Trainer's ``log_history`` from ``folder/trainer_state.json`` (or its last checkpoint)."""
    candidates = [os.path.join(folder, "trainer_state.json")]
    if os.path.isdir(folder):
        ckpts = sorted((d for d in os.listdir(folder) if d.startswith("checkpoint-")),
                       key=lambda d: int(d.split("-")[1]))
        candidates += [os.path.join(folder, d, "trainer_state.json") for d in reversed(ckpts)]
    for c in candidates:
        if os.path.isfile(c):
            return json.load(open(c))["log_history"]
    return []


def plot_curves(p, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sft = [h for h in log_history(p.cfg.path("sft")) if "loss" in h]
    if sft:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([h["step"] for h in sft], [h["loss"] for h in sft])
        ax.set(xlabel="step", ylabel="loss", title="Stage 1 (SFT) training loss")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "sft_loss.png"), dpi=110)
        plt.close(fig)
        written.append("sft_loss.png")
    dpo = [h for h in log_history(p.cfg.path("dpo")) if "rewards/margins" in h]
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


def metrics_table(p) -> tuple[str, dict]:
    rows, data = [], {}
    header = ("| model | phantom closed acc | phantom open recall | phantom open F1 | VQA-RAD closed acc | "
              "VQA-RAD open recall | VQA-RAD open F1 |\n|---|---|---|---|---|---|---|")
    for key, label in MODELS:
        cells = []
        for bench in ("phantom", "vqa_rad"):
            f = p.cfg.path("eval", key, bench, "metrics.json")
            if not os.path.isfile(f):
                cells += ["–"] * 3
                continue
            m = json.load(open(f))
            m = m.get("overall", m)
            data.setdefault(key, {})[bench] = m
            cells += [f"{m[k]:.1f}" if m.get(k) is not None else "–" for k in ("closed_acc", "open_recall", "open_f1")]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return header + "\n" + "\n".join(rows), data


def self_question_examples(p, n: int = 6) -> tuple[str, dict]:
    """Markdown of a few judged pairs and the novelty count of the self-questions."""
    summary = json.load(open(p.cfg.path("data", "summary.json")))
    train_q = {q.strip().lower() for q in summary["training_questions"]}
    questions = [json.loads(line) for line in open(p.cfg.path("selftrain", "questions.jsonl"))]
    asked = [q for r in questions for q in r["questions"]]
    novel = [q for q in asked if q.strip().lower() not in train_q]
    judged = [json.loads(line) for line in open(p.cfg.path("selftrain", "judged.jsonl"))]
    from stllava.demo.phantom_judge import expected_answer

    facts = json.load(open(p.cfg.path("data", "phantoms", "unlabelled", "facts.json")))
    novel_answerable = [q for r in questions for q in r["questions"]
                        if q.strip().lower() not in train_q and expected_answer(q, facts[r["image"]]) is not None]
    stats = {"images": len(questions), "questions": len(asked), "distinct": len({q.lower() for q in asked}),
             "novel": len(novel), "novel_distinct": len({q.lower() for q in novel}),
             "novel_answerable": len(novel_answerable)}
    lines = [f"The SFT model asked **{len(asked)}** questions about {len(questions)} unlabelled phantoms "
             f"({stats['distinct']} distinct); **{len(novel)}** ({stats['novel_distinct']} distinct) are not "
             "verbatim among the training questions; of those, "
             f"{len(novel_answerable)} ask about a fact of the image that the phantom judge can check (the rest "
             "are malformed — a 200k-parameter model samples noise too).", ""]
    lines += ["Examples of self-asked novel questions: " + "; ".join(f"“{q}”" for q in sorted(set(novel))[:8]), ""]
    lines += ["| image | question (asked by the model) | answer 1 | answer 2 | phantom-judge scores | status |",
              "|---|---|---|---|---|---|"]
    ok = [j for j in judged if j["judge"]["status"] == "ok"]
    novel_ok = [j for j in ok if j["question"].strip().lower() not in train_q]
    shown = (novel_ok[: n // 2] + [j for j in ok if j not in novel_ok])[:n]
    shown += [j for j in judged if j["judge"]["status"] == "tie"][:1]
    shown += [j for j in judged if j["judge"]["status"] == "identical"][:1]
    for j in shown:
        a1, a2 = j["answers"]
        scores = " / ".join(f"{s:g}" for s in (j["judge"].get("scores") or [])) or "–"
        lines.append(f"| {j['image']} | {j['question']} | {a1} | {a2} | {scores} | {j['judge']['status']} |")
    return "\n".join(lines), stats


def write_report(p) -> str:
    out = p.cfg.path("report")
    os.makedirs(out, exist_ok=True)
    table, data = metrics_table(p)
    plots = plot_curves(p, out)
    examples, qstats = self_question_examples(p)
    extra = {}
    heldout = p.cfg.path("dpo", "eval_results.json")
    if os.path.isfile(heldout):
        m = json.load(open(heldout))
        extra["dpo_heldout"] = {"reward_accuracy": m.get("eval_rewards/accuracies"),
                                "reward_margin": m.get("eval_rewards/margins"), "loss": m.get("eval_loss"),
                                "pairs": len(json.load(open(p.cfg.path("selftrain", "dpo_heldout.json"))))}
    pair_stats = json.load(open(p.cfg.path("selftrain", "dpo_all.stats.json")))
    md = ["# STLLaVA-Med embedded demo — report", "",
          "Everything below was produced by `make demo` on this machine: a tiny random-init LLaVA "
          "model is self-question-SFT'd on synthetic phantoms (+ the embedded VQA-RAD subset), asks "
          "and answers its own questions on unlabelled phantoms, a **phantom judge** (ground-truth "
          "scorer behind a local OpenAI-compatible server, standing in for GPT-4o) picks the better "
          "answers, and DPO trains on those pairs.", "",
          "## Scores (LLaVA-Med metrics, ×100; closed accuracy = substring variant)", "", table, "",
          "VQA-RAD numbers of a model this small are not meaningful; they show the real-data path runs.", "",
          "## Self-made preference data", "", examples, "",
          f"Judged pairs kept: {pair_stats.get('pairs')}, ties skipped: {pair_stats.get('tie')}, "
          f"unparsable: {pair_stats.get('unparsable')}, identical answers: {pair_stats.get('identical')}.", ""]
    if "dpo_heldout" in extra:
        h = extra["dpo_heldout"]
        md += ["## DPO on held-out judged pairs", "",
               f"Reward accuracy {h['reward_accuracy']:.3f}, mean margin {h['reward_margin']:.3f} on "
               f"{h['pairs']} pairs from images DPO never saw (reference = the SFT model).", ""]
    md += ["## Curves", ""] + [f"![{x}]({x})" for x in plots] + ["", "## Stage timings (s)", "",
           "| stage | seconds |", "|---|---|"] + [f"| {k} | {v} |" for k, v in p.timings.items()]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    json.dump({"metrics": data, "self_questions": qstats, "pairs": pair_stats, **extra, "timings": p.timings},
              open(os.path.join(out, "summary.json"), "w"), indent=1)
    logger.info("report written to %s", out)
    return out

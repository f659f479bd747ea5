"""Iterative self-training: stages 2 + 3 repeated, each round starting from the last round's model.

The published method runs one round: the SFT model asks, answers, is judged and is trained with DPO
once. Round k here (docs/Study.md, "Rounds") repeats that with round k−1's merged DPO model in
every role — it asks the questions, samples the answers, and is both DPO's starting point and its
reference (``steps.dpo`` trains fresh adapters on it and uses it with the adapters disabled as the
reference) — on a *fresh* draw of questions about the same unlabelled pool. Round 1 is the
published method exactly (the study's ``st`` condition, its streams seeded by the cell's seed);
round k ≥ 2 draws from its own streams, keyed by name and seed as the data splits are
(``"round2-questions/<seed>"``: :func:`round_seeds`). Each round's folders live under
``<cell>/round<k>/``.

* :func:`run_rounds` — rounds ``first..rounds`` from a model, with optional evaluation per round;
* :func:`study_rounds` — the study's hook: rounds 2..K of a cell after its ``st`` condition;
* :func:`summarize` — per-round means over seeds and paired differences (round k − round 1,
  round k − SFT);
* :func:`rounds_plan` — the planned run (rounds 1–3, 100 labelled × 5 seeds) as study settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable

from stllava.demo import steps
from stllava.demo.data import stream_key
from stllava.demo.quality import pair_stats
from stllava.demo.steps import LoopSettings

METRICS = ("closed_acc", "open_recall")
PRIMARY = "primary"  # the study's primary metric: the mean of the two (stllava.demo.study_report)
SUMMARIZED = (PRIMARY, *METRICS)


@dataclasses.dataclass(frozen=True)
class Pool:
    """The unlabelled pool every round asks about: its images and the phantom judge's facts."""

    images: str
    facts: str


def stream_seed(name: str, seed: int) -> int:
    """A 31-bit integer seed for the tools' ``--seed`` from stream ``name`` under ``seed``
    (the first 4 bytes of SHA-256 of :func:`stllava.demo.data.stream_key`): fixed by name and seed,
    the same in every process."""
    return int.from_bytes(hashlib.sha256(stream_key(name, seed).encode()).digest()[:4], "big") >> 1


def round_seeds(k: int, seed: int) -> dict[str, int]:
    """The seeds of round ``k``'s steps: ``questions``, ``answers`` and ``train`` (judge noise,
    held-out split of the pairs, DPO). Round 1 uses ``seed`` for all three (the one-round method's
    streams); round k ≥ 2 uses :func:`stream_seed` of ``"round<k>-questions"``, ``"round<k>-answers"``
    and ``"round<k>-train"``. Refuses k < 1 (ValueError)."""
    if k < 1:
        raise ValueError(f"rounds are numbered from 1, got {k}")
    if k == 1:
        return {"questions": seed, "answers": seed, "train": seed}
    return {part: stream_seed(f"round{k}-{part}", seed) for part in ("questions", "answers", "train")}


def _count(path: str) -> int:
    with open(path) as f:
        return len(json.load(f))


def run_rounds(r, cell_dir: str, start: str, pool: Pool, s: LoopSettings, seed: int, rounds: int, *,
               first: int = 1, evaluate: Callable[[str, str], dict] | None = None,
               log: str = "rounds") -> list[dict]:
    """Rounds ``first..rounds`` of self-training from ``start`` (round ``first``−1's model: the SFT
    model when ``first`` is 1) on runner ``r``, folders under ``cell_dir/round<k>/``. Each round:
    questions, answers, judge, pairs (:mod:`stllava.demo.steps`) by the current model with
    :func:`round_seeds`, then DPO from and against it. Returns one dict per round: ``round``,
    ``seeds``, ``start`` and ``model`` (paths relative to ``r.root``), ``pairs``, ``pair_quality``,
    ``trained``, ``heldout_reward_accuracy`` and, with ``evaluate(model, log) -> dict``, its
    results merged in. A round without pairs trains nothing: its model is its start (recorded)."""
    model, out = start, []
    for k in range(first, rounds + 1):
        sd, d, lg = round_seeds(k, seed), os.path.join(cell_dir, f"round{k}"), f"{log}_r{k}"
        q = steps.questions(r, os.path.join(d, "questions-{key}"), model, pool.images, s, sd["questions"],
                            log=f"{lg}_q")
        a = steps.answers(r, os.path.join(d, "answers-{key}"), model, q, pool.images, s, sd["answers"],
                          log=f"{lg}_a")
        j = steps.judge(r, os.path.join(d, "judged-{key}"), a, pool.images, pool.facts, s, sd["train"],
                        log=f"{lg}_judge")
        train, held = steps.pairs(r, os.path.join(d, "pairs-{key}"), j, s, sd["train"], log=f"{lg}_pairs")
        res = {"round": k, "seeds": sd, "start": os.path.relpath(model, r.root), "pairs": _count(train),
               "pair_quality": pair_stats(j, [train, held], pool.facts), "trained": bool(_count(train)),
               "heldout_reward_accuracy": None}
        if res["trained"]:
            model = steps.dpo(r, os.path.join(d, "dpo-{key}"), model, train, held, pool.images, s, sd["train"],
                              log=f"{lg}_dpo")
            heldout = os.path.join(os.path.dirname(model), "train", "eval_results.json")
            if os.path.isfile(heldout):
                with open(heldout) as f:
                    res["heldout_reward_accuracy"] = json.load(f).get("eval_rewards/accuracies")
        res["model"] = os.path.relpath(model, r.root)
        if evaluate is not None:
            res.update(evaluate(model, lg))
        out.append(res)
    return out


def study_rounds(study, cell: str, round1_model: str, round1: dict, s: LoopSettings, seed: int,
                 log: str) -> list[dict]:
    """The study's hook (``Study.run_cell``, after the ``st`` condition, when ``study.cfg.rounds`` > 1):
    round 1 is ``st`` (``round1_model``, results ``round1``), rounds 2..``study.cfg.rounds`` run from
    it with :func:`run_rounds`, evaluated by ``study._evaluate(model, s, log)``. Uses only
    ``study.r``, ``study.path(*parts)``, ``study.cfg.rounds`` and ``study._evaluate``. Returns
    the per-round list, round 1 first."""
    pool = Pool(study.path("data", "phantoms", "unlabelled", "images"),
                study.path("data", "phantoms", "unlabelled", "facts.json"))
    first = {"round": 1, "seeds": round_seeds(1, seed), "model": os.path.relpath(round1_model, study.r.root),
             **round1}
    later = run_rounds(study.r, study.path(cell), round1_model, pool, s, seed, study.cfg.rounds, first=2,
                       evaluate=lambda model, lg: study._evaluate(model, s, lg), log=f"{log}_rounds")
    return [first, *later]


def summarize(runs: list[dict], split: str = "test") -> dict:
    """Per-round results over the runs (cells) that carry ``rounds`` (and the ``sft`` condition):
    ``{n_labelled: {"round<k>": {metric: mean ± sd}, "round<k> - round1": {metric: paired diff},
    "round<k> - sft": {...}, "pairs": mean ± sd}}`` on ``split``, for closed accuracy, open recall
    and the study's primary metric (their mean); paired differences need ≥ 2 seeds (fewer: left
    out). Returns {} when no run has rounds."""
    from stllava.demo.stats import mean_sd, paired_difference, primary_score

    def value(scores: dict, m: str) -> float:
        return primary_score(scores) if m == PRIMARY else scores[m]

    by_size: dict[str, list[dict]] = {}
    for run in sorted((x for x in runs if x.get("rounds")), key=lambda x: (x["n_labelled"], x["seed"])):
        by_size.setdefault(str(run["n_labelled"]), []).append(run)
    out: dict = {}
    for size, cells in by_size.items():
        k_max = min(len(c["rounds"]) for c in cells)
        table: dict = {}
        for k in range(1, k_max + 1):
            rows = [c["rounds"][k - 1][split] for c in cells]
            table[f"round{k}"] = {m: mean_sd([value(row, m) for row in rows]) for m in SUMMARIZED}
            table[f"round{k}"]["pairs"] = mean_sd([c["rounds"][k - 1].get("pairs", 0) or 0 for c in cells])
            if len(cells) < 2:
                continue
            sft = [c["conditions"]["sft"][split] for c in cells]
            table[f"round{k} - sft"] = {m: paired_difference([value(row, m) for row in rows],
                                                             [value(x, m) for x in sft]) for m in SUMMARIZED}
            if k > 1:
                r1 = [c["rounds"][0][split] for c in cells]
                table[f"round{k} - round1"] = {m: paired_difference([value(row, m) for row in rows],
                                                                    [value(x, m) for x in r1]) for m in SUMMARIZED}
        out[size] = table
    return out


def rounds_plan() -> dict:
    """The planned rounds run as :class:`stllava.demo.study.StudyConfig` overrides: rounds 1–3 of
    SFT + self-training at 100 labelled × 5 seeds (seeds 10–14, which the settings search never
    used). ``python -m stllava.demo.study --plan rounds``."""
    return {"sizes": (100,), "seeds": (10, 11, 12, 13, 14), "conditions": ("sft", "st"), "rounds": 3,
            "ablation_sizes": None}

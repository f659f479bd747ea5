"""``python -m stllava.demo.study`` — does self-training help? The paper's setting in miniature.

*Little labelled data, many unlabelled images*: for each labelled-set size (``--sizes``) and seed
(``--seeds``), a tiny model is trained and evaluated under these conditions, all on the same
held-out phantom test set (and the validation set the settings were chosen on):

    sft       SFT only — stage 1, self-questioning SFT (v1_sq, sq_r > 0) on the labelled phantoms
    st        SFT + self-training — stages 2 + 3 on the unlabelled pool: self-questions, sampled
              answers, the phantom judge, preference pairs, DPO from the SFT model (the method)
    cont, own, rft, oracle
              the compute-matched controls (stllava.demo.steps.CONTROLS): SFT from the same SFT
              model with DPO's optimizer steps, batch, learning rate, cosine schedule and sq_r, on
              the labelled set again / the model's own unjudged answers / the judge's chosen
              answers / the self-asked questions with their ground-truth answers
    nosq      the ablation's SFT: self-questioning off (sq_r 0; same template and steps)
    nosq_st   nosq + self-training: what stages 2 + 3 gain when the model never learned to ask
    st_cons, st_robust
              DPO with conservative (label smoothing ε) or robust DPO's loss, ε = the judge's flip
              rate (the noise plan)

``--plan`` picks the chunk to run (:data:`PLANS`; docs/Study.md pre-registers them): ``primary``
(30 and 100 labelled × seeds 10–17, every condition), ``secondary`` (300 and 1,500 × 10–14, SFT vs
DPO), ``noise`` (100 labelled × 10–14, the judge's flip rate 0 / 0.1 / 0.2 / 0.3 × DPO, RFT,
conservative and robust DPO), ``all``; ``--seeds`` / ``--sizes`` narrow a plan to a chunk of
under an hour. Every run's key holds its *role* (``study``; the settings search's is ``search``),
and the study refuses the seeds the search chose its settings on (docs/study/search.json).

Each finished cell writes one small file per condition, ``<results>/<role>-<condition>-seed<k>-n<n>
[-<variant>].json`` (metrics, pair and step counts, the settings and their digest; ``--results``,
default docs/study/runs, committed), and ``--aggregate`` builds ``study.json``, ``study.md`` and
the figures from those files alone, so chunks run in different sessions add up.

A seed fixes the labelled set (nested across sizes), the random init and every sampling stream;
conditions sharing a seed and size are paired. ``study.json`` holds per-run results, mean ± sd per
condition, paired differences with 95% intervals, per-kind accuracy and the stage-2 data quality;
``study.md`` the tables; ``--figures`` writes the figures (also into ``images/``). Finished steps
are reused (each step folder has a ``.done.json`` with its settings), so an interrupted study
resumes where it stopped. ``--quick`` is the shortened study the test suite runs.

Before any training the study checks that no two splits (each seed's labelled pool, the unlabelled
pool, validation, test) share a phantom image, and refuses to run otherwise; ``--splits-only``
renders and checks just the splits and writes ``splits.json`` (``{split: {seed: [image paths]}}``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from stllava import logs
from stllava.demo import steps
from stllava.demo.graded import graded_plan
from stllava.demo.quality import pair_stats, per_kind, question_stats
from stllava.demo.rounds import rounds_plan, study_rounds
from stllava.demo.runner import Runner
from stllava.demo.steps import CONTROLS, SEARCH, LoopSettings, chosen_settings
from stllava.demo.study_report import (
    PRIMARY_SEEDS,
    SEARCH_FILE,
    aggregate_files,
    cell_settings,
    config_record,
    copy_figures,
    search_seeds,
    write_report,
    write_search,
)
from stllava.errors import StllavaError, run_cli

logger = logging.getLogger("stllava.demo")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join("docs", "study", "runs")  # the committed per-cell results (relative to the checkout)
PRIMARY = ("sft", "st", *CONTROLS, "nosq", "nosq_st")
NOISY_DPO = ("st_cons", "st_robust")  # DPO with the losses made for noisy labels, ε = the flip rate
CONDITIONS = (*PRIMARY, *NOISY_DPO)
SPLITS = ("val", "test")
FLIP_RATES = (0.0, 0.1, 0.2, 0.3)


@dataclasses.dataclass
class StudyConfig:
    workdir: str = "playground/study"
    sizes: tuple[int, ...] = (30, 100)
    # the reported seeds: never the settings search's (0, 1; docs/study/search.json), never reused
    seeds: tuple[int, ...] = PRIMARY_SEEDS
    conditions: tuple[str, ...] = PRIMARY
    n_unlabelled: int = 1000
    labelled_pool: int = 1500  # labelled phantoms rendered per seed; a size n uses the first n
    # the self-questioning ablation (nosq, nosq_st) runs at these sizes only (None: every size)
    ablation_sizes: tuple[int, ...] | None = None
    n_val: int = 100
    n_test: int = 420  # ≥ 3,000 test questions (about 7.5 a phantom), shared by every seed: paired comparisons
    data_seed: int = 0
    splits: tuple[str, ...] = SPLITS  # evaluation sets: val (settings were chosen on it) and test
    jobs: int = 2
    rounds: int = 1  # rounds of self-training after SFT (stllava.demo.rounds); 1 = the published method
    loop: LoopSettings = dataclasses.field(default_factory=lambda: chosen_settings(heldout_share=0.1))
    role: str = "study"  # part of every run's key: "study" runs never reuse "search" runs
    variant: str = ""  # names a plan's loop-setting variant in the result files ("flip0.1")
    results: str | None = RESULTS  # per-cell result files (None: <workdir>/runs)


# The plans (``--plan``): each a list of chunks, a chunk = StudyConfig overrides (docs/Study.md).
_NOISE_SEEDS = tuple(range(10, 15))
PLANS: dict[str, list[dict]] = {
    "primary": [dict(sizes=(30, 100), seeds=PRIMARY_SEEDS, conditions=PRIMARY)],
    "secondary": [dict(sizes=(300, 1500), seeds=tuple(range(10, 15)), conditions=("sft", "st"))],
    # at flip rate 0, ε = 0 makes the conservative and robust losses the plain one: DPO and RFT only
    "noise": [dict(sizes=(100,), seeds=_NOISE_SEEDS, variant=f"flip{f}", loop_changes={"judge_flip_rate": f},
                   conditions=("sft", "st", "rft", *(NOISY_DPO if f else ()))) for f in FLIP_RATES],
}
# iterative self-training (stllava.demo.rounds) and the graded-answer probe (stllava.demo.graded)
PLANS["rounds"] = [dict(rounds_plan(), variant="rounds")]
PLANS["graded"] = [graded_plan()]
PLANS["all"] = [chunk for name in ("primary", "secondary", "noise", "rounds", "graded") for chunk in PLANS[name]]


def plan_configs(plan: str, base: StudyConfig, seeds: tuple[int, ...] | None = None,
                 sizes: tuple[int, ...] | None = None) -> list[StudyConfig]:
    """The chunks of ``plan`` as configs over ``base`` (``seeds`` / ``sizes`` narrow each chunk); the
    graded probe's chunk works in ``<base.workdir>-graded`` (its own data and labelled sets).
    Refuses (StllavaError) an unknown plan."""
    if plan not in PLANS:
        raise StllavaError(f"unknown --plan {plan!r}", fix=f"choose from {','.join(PLANS)}")
    out = []
    for chunk in PLANS[plan]:
        chunk = dict(chunk)
        loop = base.loop.replace(**chunk.pop("loop_changes", {}))
        cfg = dataclasses.replace(base, loop=loop, **chunk)
        cfg.seeds, cfg.sizes = seeds or cfg.seeds, sizes or cfg.sizes
        if loop.graded:  # its data carry the description question, so its data steps cannot share the study's
            cfg.workdir = f"{base.workdir}-graded"
        out.append(cfg)
    return out


QUICK = dict(sizes=(24,), seeds=(10, 11), n_unlabelled=12, labelled_pool=24, n_val=4, n_test=6, splits=("test",),
             ablation_sizes=None, results=None,
             loop=LoopSettings(sft_steps=40, sft_batch=8, n_questions=3, dpo_batch=4, eval_max_new_tokens=4,
                               heldout_share=0.0))


class Study:
    def __init__(self, cfg: StudyConfig):
        bad = sorted(set(cfg.conditions) - set(CONDITIONS))
        if bad:
            raise StllavaError(f"unknown condition(s) {bad}", fix=f"--conditions from {','.join(CONDITIONS)}")
        self.cfg = cfg
        self.r = Runner(cfg.workdir, threads=1, echo=False, role=cfg.role)  # every step's key holds the role
        self.training_questions: dict[tuple[int, int], list[str]] = {}

    def path(self, *parts: str) -> str:
        return self.r.path(*parts)

    # -- shared inputs -----------------------------------------------------------------------------
    def prepare(self, models: bool = True) -> None:
        """The shared data, then each seed's labelled sets and (with ``models``) tiny model, before the
        parallel runs; refuses (StllavaError) splits that share an image (:meth:`check_splits`)."""
        from stllava.demo.data import STREAMS, build_labelled, build_shared, write_sft_set
        from stllava.demo.graded import data_settings
        from stllava.model.tiny import build_tiny_bundle

        c = self.cfg
        graded = c.loop.graded
        self.r.step("data", self.path("data"), {"unlabelled": c.n_unlabelled, "val": c.n_val, "test": c.n_test,
                                                "seed": c.data_seed, "streams": STREAMS, **data_settings(graded)},
                    lambda: build_shared(self.path("data"), c.n_unlabelled, c.n_val, c.n_test, seed=c.data_seed,
                                         graded=graded))
        pool = max(c.labelled_pool, *c.sizes)
        for seed in c.seeds:
            lab = self.path(f"seed{seed}", "labelled")
            if models:
                self.r.step("bundle", self.path(f"seed{seed}", "tiny"), {"seed": seed},
                            lambda seed=seed: build_tiny_bundle(self.path(f"seed{seed}", "tiny"), seed=seed))
            self.r.step("labelled", lab, {"pool": pool, "seed": seed, "streams": STREAMS, **data_settings(graded)},
                        lambda lab=lab, seed=seed: build_labelled(lab, pool, seed, graded=graded))
            for n in c.sizes:
                _, questions = write_sft_set(lab, n, seed)
                self.training_questions[(seed, n)] = questions
        self.check_splits()

    def split_images(self) -> dict[str, dict[int, list[str]]]:
        """``{split: {seed: [image paths]}}`` for labelled, unlabelled, val and test; the shared
        splits (rendered once, from ``data_seed``) list the same images under every seed."""
        from stllava.demo.data import images_in

        shared = {split: images_in(self.path("data", "phantoms", split, "images"))
                  for split in ("unlabelled", "val", "test")}
        out = {"labelled": {seed: images_in(self.path(f"seed{seed}", "labelled", "images", "phantoms"))
                            for seed in self.cfg.seeds}}
        out.update({split: {seed: paths for seed in self.cfg.seeds} for split, paths in shared.items()})
        return out

    def check_splits(self) -> None:
        """Refuse (StllavaError, one line) to run when any two splits share a phantom image: each
        seed's labelled pool, the unlabelled pool, validation and test (shared splits once)."""
        from stllava.demo.data import check_disjoint

        found = self.split_images()
        splits = {f"labelled, seed {seed}": paths for seed, paths in found.pop("labelled").items()}
        splits.update({split: next(iter(by_seed.values()), []) for split, by_seed in found.items()})
        check_disjoint(splits)

    def write_splits(self) -> str:
        """Render the splits only (no model, no training), check them, and write ``splits.json`` =
        ``{split: {seed: [image paths relative to the workdir]}}``; returns its path."""
        from stllava.jsonl import write_json_atomic

        self.prepare(models=False)
        root = self.cfg.workdir
        rel = {split: {str(seed): [os.path.relpath(p, root) for p in paths] for seed, paths in by_seed.items()}
               for split, by_seed in self.split_images().items()}
        path = self.path("splits.json")
        write_json_atomic(path, rel, indent=1)
        return path

    def eval_sets(self) -> dict[str, tuple[str, str]]:
        return {split: (self.path("data", f"eval_{split}"), self.path("data", "phantoms", split, "images"))
                for split in self.cfg.splits}

    # -- one (seed, size) cell ---------------------------------------------------------------------
    # Step folders are named by a digest of their settings and the run's role ("sft-3fa2...":
    # Runner.resolve, steps.keyed), so the cells of one role share every model they have in common
    # (the noise plan's flip-0 cells are the primary plan's) and no study cell reuses a search run.
    def _evaluate(self, model: str, s: LoopSettings, log: str) -> dict:
        out = {}
        for split, (folder, images) in self.eval_sets().items():
            where = steps.evaluate(self.r, os.path.join(os.path.dirname(model), f"eval_{split}-{{key}}"), model,
                                   folder, images, s, f"phantom_{split}", log=f"{log}_eval_{split}")
            overall = where["overall"]
            out[split] = {"closed_acc": overall["closed_acc"], "open_recall": overall["open_recall"],
                          "open_f1": overall["open_f1"], "per_kind": per_kind(where["folder"], folder)}
            if s.graded:  # the graded-answer probe's fact recall / precision (stllava.demo.graded)
                from stllava.demo.graded import description_metrics

                out[split]["description"] = description_metrics(where["folder"], folder)
        return out

    def _self_train(self, cell: str, sft_model: str, s: LoopSettings, seed: int, n: int, log: str) -> dict:
        """Stage 2 from ``sft_model``; returns the pair files and the data-quality numbers."""
        unl, facts = self.path("data", "phantoms", "unlabelled", "images"), self.path("data", "phantoms",
                                                                                     "unlabelled", "facts.json")
        q = steps.questions(self.r, self.path(cell, "questions-{key}"), sft_model, unl, s, seed, log=f"{log}_q")
        a = steps.answers(self.r, self.path(cell, "answers-{key}"), sft_model, q, unl, s, seed, log=f"{log}_a")
        j = steps.judge(self.r, self.path(cell, "judged-{key}"), a, unl, facts, s, seed, log=f"{log}_judge")
        train, held = steps.pairs(self.r, self.path(cell, "pairs-{key}"), j, s, seed, log=f"{log}_pairs")
        return {"pairs": (train, held), "questions": question_stats(q, facts, self.training_questions[(seed, n)]),
                "pair_quality": pair_stats(j, [train, held], facts), "files": {"questions": q, "answers": a}}

    def _dpo(self, cell: str, sft_model: str, data: dict, s: LoopSettings, seed: int, log: str) -> tuple[str, dict]:
        """DPO on the pairs; with no pairs at all (a model that never learned to ask gives none)
        there is nothing to train on: the SFT model is the result, and that is recorded."""
        train, held = data["pairs"]
        if not _count(train):
            logger.warning("%s: no preference pairs, so no DPO: the SFT model stands", log)
            return sft_model, {"heldout_reward_accuracy": None, "trained": False}
        model = steps.dpo(self.r, self.path(cell, "dpo-{key}"), sft_model, train, held,
                          self.path("data", "phantoms", "unlabelled", "images"), s, seed, log=f"{log}_dpo")
        heldout = os.path.join(os.path.dirname(model), "train", "eval_results.json")
        reward = None
        if os.path.isfile(heldout):
            with open(heldout) as f:
                reward = json.load(f).get("eval_rewards/accuracies")
        return model, {"heldout_reward_accuracy": reward, "trained": True}

    def _control(self, name: str, cell: str, sft_model: str, st: dict, s: LoopSettings, seed: int, n: int,
                 log: str) -> tuple[str | None, dict]:
        """Control ``name`` (:data:`~stllava.demo.steps.CONTROLS`), compute-matched to DPO over this
        cell's pairs; returns ``(model or None, its data counts)``."""
        unl = self.path("data", "phantoms", "unlabelled", "images")
        n_pairs = _count(st["pairs"][0])
        if name == "rft":
            data, records = steps.chosen_data(st["pairs"][0])
            counts, images = {"records": records}, unl
        elif name == "own":
            data, counts = steps.own_data(st["files"]["answers"])
            images = unl
        elif name == "oracle":
            data, counts = steps.oracle_data(st["files"]["questions"],
                                             self.path("data", "phantoms", "unlabelled", "facts.json"))
            images = unl
        else:  # cont: the labelled set again
            data, images = self.path(f"seed{seed}", "labelled", f"sft_{n}.json"), self.path(f"seed{seed}", "labelled",
                                                                                           "images")
            counts = {"records": _count(data)}
        if not counts["records"]:
            return None, counts
        model = steps.control(self.r, self.path(cell, f"{name}-{{key}}"), sft_model, data, images, n_pairs, s, seed,
                              log=f"{log}_{name}")
        return model, counts

    def run_cell(self, seed: int, n: int, s: LoopSettings | None = None, conditions=None) -> dict:
        """The ``conditions`` (default: the study's) of one seed and labelled-set size with loop
        settings ``s`` (default: the study's); returns the cell's results. A condition that has
        nothing to train on (no pairs, hence no DPO step to match) is its SFT model, recorded
        ``"trained": false``."""
        s = s or self.cfg.loop
        want = set(conditions or self.cfg.conditions)
        cell = os.path.join(f"seed{seed}", f"n{n}")
        tiny, lab = self.path(f"seed{seed}", "tiny"), self.path(f"seed{seed}", "labelled")
        data, images = os.path.join(lab, f"sft_{n}.json"), os.path.join(lab, "images")
        res: dict = {"seed": seed, "n_labelled": n, "conditions": {}, "stage2": {}}
        if conditions is None and self.cfg.ablation_sizes is not None and n not in self.cfg.ablation_sizes:
            want -= {"nosq", "nosq_st"}
        # DPO's variants: the method, and the losses made for noisy labels with ε = the judge's flip rate
        dpos = {"st": s, "st_cons": s.replace(dpo_label_smoothing=s.judge_flip_rate),
                "st_robust": s.replace(dpo_loss_type="robust", dpo_label_smoothing=s.judge_flip_rate)}
        for tag, sq_r in (("", s.sq_r), ("nosq", 0.0)):
            names = {"sft": "nosq", "st": "nosq_st"} if tag else {c: c for c in ("sft", *dpos, *CONTROLS)}
            if not want & set(names.values()):
                continue
            log = f"{cell}/{names['sft']}"
            sft_model = steps.sft(self.r, self.path(cell, "sft-{key}"), tiny, data, images, s, seed, sq_r=sq_r,
                                  log=log)
            sft_res = res["conditions"][names["sft"]] = self._evaluate(sft_model, s, log)
            if not want & (set(names.values()) - {names["sft"]}):
                continue
            st = self._self_train(cell, sft_model, s, seed, n, log)
            n_pairs = _count(st["pairs"][0])
            res["stage2"][names["st"]] = {"questions": st["questions"], "pair_quality": st["pair_quality"]}
            for c, ds in dpos.items():
                if names.get(c) not in want:
                    continue
                model, extra = self._dpo(cell, sft_model, st, ds, seed, f"{log}_{c}" if c != "st" else log)
                done = self._evaluate(model, ds, f"{log}_{c}") if extra["trained"] else sft_res
                res["conditions"][names[c]] = {**done, **extra, "pairs": n_pairs,
                                               "steps": steps.dpo_steps(n_pairs, ds)}
                if c == "st" and not tag and self.cfg.rounds > 1:  # iterative self-training (docs/Study.md)
                    # "pairs": DPO's training pairs, as every later round counts them
                    res["rounds"] = study_rounds(self, cell, model, {
                        **res["conditions"]["st"], "pair_quality": st["pair_quality"]}, s, seed, log)
            for c in CONTROLS:
                if names.get(c) not in want:
                    continue
                model, counts = self._control(c, cell, sft_model, st, s, seed, n, log)
                done = self._evaluate(model, s, f"{log}_{c}") if model else sft_res
                res["conditions"][c] = {**done, "trained": model is not None, **counts,
                                        "steps": steps.dpo_steps(n_pairs, s) if model else 0}
        if self.cfg.role == "study":  # the search's cells are recorded in its search.json only
            self.write_results(res)
        return res

    def write_results(self, res: dict) -> list[str]:
        """One file per condition of a finished cell, ``<results>/<role>-<condition>-seed<k>-n<n>
        [-<variant>].json``: its results, the cell's stage-2 numbers (with ``st`` / ``nosq_st``),
        the study's settings and their digest. Returns the paths."""
        from stllava.artifacts import digest
        from stllava.jsonl import write_json_atomic

        folder = self.results_dir()
        os.makedirs(folder, exist_ok=True)
        settings = cell_settings(self.cfg)
        written = []
        for c, result in res["conditions"].items():
            name = f"{self.cfg.role}-{c}-seed{res['seed']}-n{res['n_labelled']}"
            path = os.path.join(folder, name + (f"-{self.cfg.variant}" if self.cfg.variant else "") + ".json")
            write_json_atomic(path, {"role": self.cfg.role, "condition": c, "seed": res["seed"],
                                     "n_labelled": res["n_labelled"], "variant": self.cfg.variant,
                                     "result": result, "stage2": res["stage2"].get(c),
                                     **({"rounds": res["rounds"]} if c == "st" and res.get("rounds") else {}),
                                     "settings_digest": digest(settings), "settings": settings}, indent=1)
            written.append(path)
        return written

    def results_dir(self) -> str:
        return self.cfg.results or self.path("runs")

    def _map(self, jobs: list[tuple]) -> list[dict]:
        """``run_cell(*job)`` for every job, ``cfg.jobs`` at a time; results in job order."""
        t0 = time.time()
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.jobs)) as pool:
            futures = [pool.submit(self.run_cell, *job) for job in jobs]
            results = []
            for fut, job in zip(futures, jobs):
                results.append(fut.result())
                logger.info("seed %d, %d labelled: done (%.0f s since start)", job[0], job[1], time.time() - t0)
        return results

    def run(self) -> list[dict]:
        """Prepare and run every cell (each writes its result files, :meth:`write_results`);
        returns the cells' results. Refuses (StllavaError) a study on seeds the settings search
        ran on (:func:`search_seeds`)."""
        reused = sorted(set(self.cfg.seeds) & set(search_seeds())) if self.cfg.role == "study" else []
        if reused:
            raise StllavaError(f"seeds {reused} chose the study's settings (the search's seeds, {SEARCH_FILE})",
                               fix="report on fresh seeds, e.g. --seeds 10-17")
        self.prepare()
        return self._map([(seed, n) for n in sorted(self.cfg.sizes, reverse=True) for seed in self.cfg.seeds])

    def search(self, variants: dict[str, dict] | None = None) -> dict:
        """The settings search: every variant of :data:`SEARCH` (loop-setting overrides) at every size
        and seed, conditions sft / st / rft, on the *validation* phantoms only; writes and returns
        ``search.json`` (and ``search.md``)."""
        variants = variants or SEARCH
        self.cfg.role = self.r.role = "search"
        self.prepare()
        names = [name for name in variants for _ in sorted(self.cfg.sizes) for _ in self.cfg.seeds]
        # every variant starts from the study's settings with the searched ones at LoopSettings' defaults
        searched = {k for over in variants.values() for k in over}
        base = self.cfg.loop.replace(**{k: getattr(LoopSettings(), k) for k in searched})
        jobs = [(seed, n, base.replace(**over), ("sft", "st", "rft"))
                for over in variants.values() for n in sorted(self.cfg.sizes) for seed in self.cfg.seeds]
        rows = [{"variant": name, "overrides": variants[name], **res} for name, res in zip(names, self._map(jobs))]
        out = {"config": config_record(self.cfg), "variants": variants, "runs": rows}
        write_search(out, self.cfg.workdir)
        return out


def _count(json_list_file: str) -> int:
    with open(json_list_file) as f:
        return len(json.load(f))


def parse_seeds(text: str) -> tuple[int, ...]:
    """Seeds from ``--seeds``: comma-separated integers and ranges ``A-B`` (both ends included),
    e.g. ``0-4,7``. Refuses (StllavaError) anything else and an empty list."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(part)])
        except ValueError:
            raise StllavaError(f"--seeds {text!r}: {part!r} is neither a seed nor a range A-B",
                               fix="pass e.g. --seeds 0,1,2 or --seeds 0-9") from None
    if not seeds:
        raise StllavaError(f"--seeds {text!r} names no seed", fix="pass e.g. --seeds 0,1,2 or --seeds 0-9")
    return tuple(seeds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stllava.demo.study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="where every run writes (default playground/study, "
                    "playground/study-quick with --quick)")
    ap.add_argument("--plan", default="primary", choices=list(PLANS),
                    help="which chunk of the study to run (default primary; docs/Study.md)")
    ap.add_argument("--sizes", default=None, help="labelled-set sizes, comma-separated (default: the plan's)")
    ap.add_argument("--seeds", default=None, help="seeds, comma-separated, or ranges A-B (default: the plan's)")
    ap.add_argument("--conditions", default=None, help=f"subset of {','.join(CONDITIONS)} (default: the plan's)")
    ap.add_argument("--unlabelled", type=int, default=None, help="size of the unlabelled pool (default 1000)")
    ap.add_argument("--jobs", type=int, default=2, help="cells run in parallel, one CPU thread each (default 2)")
    ap.add_argument("--results", default=None, help=f"folder of the per-cell result files (default {RESULTS}; "
                    "<workdir>/runs with --quick)")
    ap.add_argument("--aggregate", action="store_true",
                    help="build study.json, study.md and the figures from the result files alone (no training) "
                    "into --out")
    ap.add_argument("--out", default=None, help="where --aggregate writes (default docs/study; the figures also "
                    "into images/ with --figures)")
    ap.add_argument("--quick", action="store_true", help="a shortened study (minutes) for CI and smoke tests")
    ap.add_argument("--figures", action="store_true", help="also copy the figures into images/ (README's)")
    ap.add_argument("--splits-only", action="store_true",
                    help="only render the splits (labelled per seed, unlabelled, val, test), check that no two share "
                    "an image, and write <workdir>/splits.json = {split: {seed: [image paths]}}; no training")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of self-training (default 1, the published method): round k asks, answers and "
                    "trains DPO from round k-1's model on a fresh draw of questions (stllava.demo.rounds)")
    ap.add_argument("--graded", action="store_true",
                    help="the graded-answer probe: a description question in the data and a judge that grades it "
                    "(stllava.demo.graded)")
    ap.add_argument("--search", default=None, nargs="?", const="all",
                    help="run the settings search on the validation phantoms instead of the study: all variants, "
                    f"or a comma-separated subset of {','.join(SEARCH)}")
    logs.add_log_level_arg(ap)
    args = ap.parse_args(argv)
    logs.setup(args.log_level)
    if args.aggregate:
        results, out = args.results or RESULTS, args.out or os.path.join("docs", "study")
        study = aggregate_files(results)
        write_report(study, out)
        if args.figures:
            copy_figures(out)
        print(f"aggregated {len(study['runs'])} cells from {results}: {os.path.join(out, 'study.md')}")
        return 0
    cfg = StudyConfig(**(QUICK if args.quick else {}))
    cfg.workdir = args.workdir or ("playground/study-quick" if args.quick else cfg.workdir)
    cfg.jobs = args.jobs
    if args.results:
        cfg.results = args.results
    if args.unlabelled:
        cfg.n_unlabelled = args.unlabelled
    seeds = parse_seeds(args.seeds) if args.seeds else None
    sizes = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else None
    if args.rounds:
        cfg.rounds = args.rounds
    if args.graded:
        cfg.loop = cfg.loop.replace(graded=True, eval_max_new_tokens=max(16, cfg.loop.eval_max_new_tokens))
    t0 = time.time()
    if args.splits_only or args.search:
        cfg.seeds, cfg.sizes = seeds or cfg.seeds, sizes or cfg.sizes
    if args.splits_only:
        path = Study(cfg).write_splits()
        print(f"splits rendered and disjoint in {time.time() - t0:.0f} s: {path}")
        return 0
    if args.search:
        cfg.splits = ("val",)
        names = list(SEARCH) if args.search == "all" else args.search.split(",")
        unknown = [x for x in names if x not in SEARCH]
        if unknown:
            raise StllavaError(f"unknown search variant(s) {unknown}", fix=f"choose from {','.join(SEARCH)}")
        found = Study(cfg).search({x: SEARCH[x] for x in names})
        print(f"search finished in {time.time() - t0:.0f} s: {len(found['runs'])} runs; "
              f"{os.path.join(cfg.workdir, 'search.md')}")
        return 0
    chunks = [cfg] if args.quick else plan_configs(args.plan, cfg, seeds, sizes)
    if args.quick:
        cfg.seeds, cfg.sizes = seeds or cfg.seeds, sizes or cfg.sizes
    for chunk in chunks:
        if args.conditions:
            chunk.conditions = tuple(x for x in args.conditions.split(",") if x)
        Study(chunk).run()
    # the workdir's report: every result file in the results folder, finished chunks included
    study = aggregate_files(chunks[0].results or os.path.join(cfg.workdir, "runs"))
    write_report(study, cfg.workdir)
    if args.figures:
        copy_figures(cfg.workdir)
    print(f"study finished in {time.time() - t0:.0f} s: {len(study['runs'])} cells; "
          f"{os.path.join(cfg.workdir, 'study.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

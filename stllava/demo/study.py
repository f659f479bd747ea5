"""``python -m stllava.demo.study`` — does self-training help? The paper's setting in miniature.

*Little labelled data, many unlabelled images*: for each labelled-set size (``--sizes``) and seed
(``--seeds``), a tiny model is trained and evaluated under these conditions, all on the same
held-out phantom test set (and the validation set the settings were chosen on):

    sft       SFT only — stage 1, self-questioning SFT (v1_sq, sq_r > 0) on the labelled phantoms
    st        SFT + self-training — stages 2 + 3 on the unlabelled pool: self-questions, sampled
              answers, the phantom judge, preference pairs, DPO from the SFT model
    rft       the control: SFT + judge-filtered SFT — continue SFT on the same pairs' *chosen*
              answers (rejection-sampling fine-tuning): what the judge's information brings
              without DPO
    nosq      the ablation's SFT: self-questioning off (sq_r 0; same template and steps)
    nosq_st   nosq + self-training: what stages 2 + 3 gain when the model never learned to ask

A seed fixes the labelled set (nested across sizes), the random init and every sampling stream;
conditions sharing a seed and size are paired. ``study.json`` holds per-run results, mean ± sd per
condition, paired differences with 95% intervals, per-kind accuracy and the stage-2 data quality;
``study.md`` the tables; ``--figures`` writes the figures (also into ``images/``). Finished steps
are reused (each step folder has a ``.done.json`` with its settings), so an interrupted study
resumes where it stopped. ``--quick`` is the shortened study the test suite runs.
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

from stllava.demo import steps
from stllava.demo.quality import pair_stats, per_kind, question_stats
from stllava.demo.runner import Runner
from stllava.demo.steps import LoopSettings
from stllava.errors import StllavaError, run_cli
from stllava.jsonl import write_json_atomic

logger = logging.getLogger("stllava.demo")

CONDITIONS = ("sft", "st", "rft", "nosq", "nosq_st")
SPLITS = ("val", "test")


@dataclasses.dataclass
class StudyConfig:
    workdir: str = "playground/study"
    sizes: tuple[int, ...] = (100, 300, 1500)
    seeds: tuple[int, ...] = (0, 1, 2)
    conditions: tuple[str, ...] = CONDITIONS
    n_unlabelled: int = 2000
    n_val: int = 60
    n_test: int = 100
    data_seed: int = 0
    splits: tuple[str, ...] = SPLITS  # evaluation sets: val (settings were chosen on it) and test
    jobs: int = 2
    loop: LoopSettings = dataclasses.field(default_factory=LoopSettings)


QUICK = dict(sizes=(24,), seeds=(0, 1), n_unlabelled=12, n_val=4, n_test=6, splits=("test",),
             loop=LoopSettings(sft_steps=40, sft_batch=8, n_questions=3, dpo_batch=4, eval_max_new_tokens=4,
                               heldout_share=0.0))


class Study:
    def __init__(self, cfg: StudyConfig):
        bad = sorted(set(cfg.conditions) - set(CONDITIONS))
        if bad:
            raise StllavaError(f"unknown condition(s) {bad}", fix=f"--conditions from {','.join(CONDITIONS)}")
        self.cfg = cfg
        self.r = Runner(cfg.workdir, threads=1, echo=False)

    def path(self, *parts: str) -> str:
        return self.r.path(*parts)

    # -- shared inputs -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """The shared data, then each seed's tiny model and labelled sets (before the parallel runs)."""
        from stllava.demo.data import build_labelled, build_shared
        from stllava.model.tiny import build_tiny_bundle

        c = self.cfg
        self.r.step("data", self.path("data"), {"unlabelled": c.n_unlabelled, "val": c.n_val, "test": c.n_test,
                                                "seed": c.data_seed},
                    lambda: build_shared(self.path("data"), c.n_unlabelled, c.n_val, c.n_test, seed=c.data_seed))
        for seed in c.seeds:
            self.r.step("bundle", self.path(f"seed{seed}", "tiny"), {"seed": seed},
                        lambda seed=seed: build_tiny_bundle(self.path(f"seed{seed}", "tiny"), seed=seed))
            self.r.step("labelled", self.path(f"seed{seed}", "labelled"), {"sizes": sorted(c.sizes), "seed": seed},
                        lambda seed=seed: build_labelled(self.path(f"seed{seed}", "labelled"), list(c.sizes), seed))

    def eval_sets(self) -> dict[str, tuple[str, str]]:
        return {split: (self.path("data", f"eval_{split}"), self.path("data", "phantoms", split, "images"))
                for split in self.cfg.splits}

    # -- one (seed, size) cell ---------------------------------------------------------------------
    def _evaluate(self, cell: str, name: str, model: str) -> dict:
        out = {}
        for split, (folder, images) in self.eval_sets().items():
            where = self.path(cell, "eval", name, split)
            overall = steps.evaluate(self.r, where, model, folder, images, self.cfg.loop, f"phantom_{split}",
                                     log=f"{cell}/eval_{name}_{split}")
            out[split] = {"closed_acc": overall["closed_acc"], "open_recall": overall["open_recall"],
                          "open_f1": overall["open_f1"], "per_kind": per_kind(where, folder)}
        return out

    def _self_train(self, cell: str, tag: str, sft_model: str, seed: int, sizes_n: int) -> dict:
        """Stages 2 + 3 from ``sft_model``; returns paths and the data-quality numbers."""
        s, unl = self.cfg.loop, self.path("data", "phantoms", "unlabelled", "images")
        facts = self.path("data", "phantoms", "unlabelled", "facts.json")
        st = self.path(cell, tag)
        q = steps.questions(self.r, os.path.join(st, "questions"), sft_model, unl, s, seed, log=f"{cell}/{tag}_q")
        a = steps.answers(self.r, os.path.join(st, "answers"), sft_model, q, unl, s, seed, log=f"{cell}/{tag}_a")
        j = steps.judge(self.r, os.path.join(st, "judged"), a, unl, facts, log=f"{cell}/{tag}_judge")
        train, held = steps.pairs(self.r, os.path.join(st, "pairs"), j, s, seed, log=f"{cell}/{tag}_pairs")
        with open(self.path(f"seed{seed}", "labelled", "questions.json")) as f:
            asked_in_training = json.load(f)[str(sizes_n)]
        return {"pairs": (train, held), "questions": question_stats(q, facts, asked_in_training),
                "pair_quality": pair_stats(j, [train, held], facts)}

    def _dpo(self, cell: str, tag: str, sft_model: str, data: dict, seed: int) -> tuple[str, dict]:
        """DPO on the pairs; with no pairs at all (a model that never learned to ask gives none)
        there is nothing to train on: the SFT model is the result, and that is recorded."""
        unl = self.path("data", "phantoms", "unlabelled", "images")
        train, held = data["pairs"]
        if not data["pair_quality"]["pairs"] or not _count(train):
            logger.warning("%s/%s: no preference pairs, so no DPO: the SFT model stands", cell, tag)
            return sft_model, {"heldout_reward_accuracy": None, "trained": False}
        folder = self.path(cell, tag, "dpo")
        model = steps.dpo(self.r, folder, sft_model, train, held, unl, self.cfg.loop, seed, log=f"{cell}/{tag}_dpo")
        heldout = os.path.join(folder, "train", "eval_results.json")
        reward = None
        if os.path.isfile(heldout):
            with open(heldout) as f:
                reward = json.load(f).get("eval_rewards/accuracies")
        return model, {"heldout_reward_accuracy": reward, "trained": True}

    def run_cell(self, seed: int, n: int) -> dict:
        """Every condition of one seed and labelled-set size; writes and returns ``<cell>/cell.json``."""
        c, s = self.cfg, self.cfg.loop
        cell = os.path.join(f"seed{seed}", f"n{n}")
        tiny, lab = self.path(f"seed{seed}", "tiny"), self.path(f"seed{seed}", "labelled")
        data, images = os.path.join(lab, f"sft_{n}.json"), os.path.join(lab, "images")
        res: dict = {"seed": seed, "n_labelled": n, "conditions": {}, "stage2": {}}
        want = set(c.conditions)
        if want & {"sft", "st", "rft"}:
            sft_model = steps.sft(self.r, self.path(cell, "sft"), tiny, data, images, s, seed, log=f"{cell}/sft")
            res["conditions"]["sft"] = self._evaluate(cell, "sft", sft_model)
            if want & {"st", "rft"}:
                st = self._self_train(cell, "st", sft_model, seed, n)
                res["stage2"]["st"] = {"questions": st["questions"], "pair_quality": st["pair_quality"]}
                if "st" in want:
                    model, extra = self._dpo(cell, "st", sft_model, st, seed)
                    res["conditions"]["st"] = {**self._evaluate(cell, "st", model), **extra}
                if "rft" in want and not _count(st["pairs"][0]):
                    res["conditions"]["rft"] = {**res["conditions"]["sft"], "trained": False}
                elif "rft" in want:
                    model = steps.rft(self.r, self.path(cell, "rft"), sft_model, st["pairs"][0],
                                      self.path("data", "phantoms", "unlabelled", "images"), s, seed,
                                      log=f"{cell}/rft")
                    res["conditions"]["rft"] = {**self._evaluate(cell, "rft", model), "trained": True}
        if want & {"nosq", "nosq_st"}:
            nosq = steps.sft(self.r, self.path(cell, "nosq"), tiny, data, images, s, seed, sq_r=0.0,
                             log=f"{cell}/nosq")
            res["conditions"]["nosq"] = self._evaluate(cell, "nosq", nosq)
            if "nosq_st" in want:
                st = self._self_train(cell, "nosq_st", nosq, seed, n)
                res["stage2"]["nosq_st"] = {"questions": st["questions"], "pair_quality": st["pair_quality"]}
                model, extra = self._dpo(cell, "nosq_st", nosq, st, seed)
                res["conditions"]["nosq_st"] = {**self._evaluate(cell, "nosq_st", model), **extra}
        write_json_atomic(self.path(cell, "cell.json"), res)
        return res

    def run(self) -> dict:
        """Prepare, run every cell (``jobs`` at a time), aggregate; returns ``study.json``'s content."""
        from stllava.demo.study_report import aggregate, write_report

        self.prepare()
        cells = [(seed, n) for n in sorted(self.cfg.sizes, reverse=True) for seed in self.cfg.seeds]
        t0 = time.time()
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.jobs)) as pool:
            futures = {pool.submit(self.run_cell, seed, n): (seed, n) for seed, n in cells}
            results = []
            for fut, (seed, n) in futures.items():
                results.append(fut.result())
                logger.info("cell seed %d, %d labelled: done (%.0f s since start)", seed, n, time.time() - t0)
        study = aggregate(results, self.cfg)
        write_report(study, self.cfg.workdir)
        return study


def _count(json_list_file: str) -> int:
    with open(json_list_file) as f:
        return len(json.load(f))


def config_record(cfg: StudyConfig) -> dict:
    """The settings as stored in ``study.json`` (no paths, no timings: bit-identical reruns)."""
    d = dataclasses.asdict(cfg)
    d.pop("workdir")
    d.pop("jobs")
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stllava.demo.study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="where every run writes (default playground/study, "
                    "playground/study-quick with --quick)")
    ap.add_argument("--sizes", default=None, help="labelled-set sizes, comma-separated (default 100,300,1500)")
    ap.add_argument("--seeds", default=None, help="seeds, comma-separated (default 0,1,2)")
    ap.add_argument("--conditions", default=None, help=f"subset of {','.join(CONDITIONS)} (default: all)")
    ap.add_argument("--unlabelled", type=int, default=None, help="size of the unlabelled pool (default 2000)")
    ap.add_argument("--jobs", type=int, default=2, help="cells run in parallel, one CPU thread each (default 2)")
    ap.add_argument("--quick", action="store_true", help="a shortened study (minutes) for CI and smoke tests")
    ap.add_argument("--figures", action="store_true", help="also copy the figures into images/ (README's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = StudyConfig(**(QUICK if args.quick else {}))
    cfg.workdir = args.workdir or ("playground/study-quick" if args.quick else cfg.workdir)
    cfg.jobs = args.jobs
    if args.sizes:
        cfg.sizes = tuple(int(x) for x in args.sizes.split(","))
    if args.seeds:
        cfg.seeds = tuple(int(x) for x in args.seeds.split(","))
    if args.conditions:
        cfg.conditions = tuple(x for x in args.conditions.split(",") if x)
    if args.unlabelled:
        cfg.n_unlabelled = args.unlabelled
    t0 = time.time()
    study = Study(cfg).run()
    if args.figures:
        from stllava.demo.study_report import copy_figures

        copy_figures(cfg.workdir)
    print(f"study finished in {time.time() - t0:.0f} s: {len(study['runs'])} runs; "
          f"{os.path.join(cfg.workdir, 'study.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

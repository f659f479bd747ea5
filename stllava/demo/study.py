"""``python -m stllava.demo.study`` — does self-training help? The paper's setting in miniature.

*Little labelled data, many unlabelled images*: for each labelled-set size (``--sizes``) and seed
(``--seeds``), a tiny model is trained and evaluated under these conditions, all on the same
held-out phantom test set (and the validation set the settings were chosen on):

    sft       SFT only — stage 1, self-questioning SFT (v1_sq, sq_r > 0) on the labelled phantoms
    st        SFT + self-training — stages 2 + 3 on the unlabelled pool: self-questions, sampled
              answers, the phantom judge, preference pairs, DPO from the SFT model
    rft       the control: SFT + judge-filtered SFT — continue SFT on the same pairs' *chosen*
              answers (rejection-sampling fine-tuning): what the judge's information brings
              without DPO (at the SFT learning rate)
    rft_lo    the same control at DPO's learning rate (ten times smaller than SFT's)
    nosq      the ablation's SFT: self-questioning off (sq_r 0; same template and steps)
    nosq_st   nosq + self-training: what stages 2 + 3 gain when the model never learned to ask

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

from stllava.demo import steps
from stllava.demo.graded import graded_plan
from stllava.demo.quality import pair_stats, per_kind, question_stats
from stllava.demo.rounds import rounds_plan
from stllava.demo.runner import Runner
from stllava.demo.steps import SEARCH, LoopSettings, chosen_settings
from stllava.errors import StllavaError, run_cli

logger = logging.getLogger("stllava.demo")

CONDITIONS = ("sft", "st", "rft", "rft_lo", "nosq", "nosq_st")  # ("nosq_rft" also exists, outside the default)
SPLITS = ("val", "test")
# Planned studies (``--plan``): StudyConfig overrides, each from the module that owns the question.
PLANS = {"rounds": rounds_plan, "graded": graded_plan}


@dataclasses.dataclass
class StudyConfig:
    workdir: str = "playground/study"
    sizes: tuple[int, ...] = (30, 100, 300, 1500)
    seeds: tuple[int, ...] = (0, 1, 2)
    conditions: tuple[str, ...] = CONDITIONS
    n_unlabelled: int = 1000
    labelled_pool: int = 1500  # labelled phantoms rendered per seed; a size n uses the first n
    # the self-questioning ablation (nosq, nosq_st) runs at these sizes only (None: every size)
    ablation_sizes: tuple[int, ...] | None = (100,)
    n_val: int = 100
    n_test: int = 200
    data_seed: int = 0
    splits: tuple[str, ...] = SPLITS  # evaluation sets: val (settings were chosen on it) and test
    jobs: int = 2
    rounds: int = 1  # rounds of self-training after SFT (stllava.demo.rounds); 1 = the published method
    loop: LoopSettings = dataclasses.field(default_factory=lambda: chosen_settings(heldout_share=0.1))


QUICK = dict(sizes=(24,), seeds=(0, 1), n_unlabelled=12, labelled_pool=24, n_val=4, n_test=6, splits=("test",),
             ablation_sizes=None,
             loop=LoopSettings(sft_steps=40, sft_batch=8, n_questions=3, dpo_batch=4, eval_max_new_tokens=4,
                               heldout_share=0.0))


class Study:
    def __init__(self, cfg: StudyConfig):
        bad = sorted(set(cfg.conditions) - set(CONDITIONS))
        if bad:
            raise StllavaError(f"unknown condition(s) {bad}", fix=f"--conditions from {','.join(CONDITIONS)}")
        self.cfg = cfg
        self.r = Runner(cfg.workdir, threads=1, echo=False)
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
    # Step folders are named by a digest of their settings ("sft-3fa2...": Runner.resolve), so the
    # settings search and the study share every model they have in common.
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
                "pair_quality": pair_stats(j, [train, held], facts)}

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

    def run_cell(self, seed: int, n: int, s: LoopSettings | None = None, conditions=None) -> dict:
        """The ``conditions`` (default: the study's) of one seed and labelled-set size with loop
        settings ``s`` (default: the study's); returns the cell's results."""
        s = s or self.cfg.loop
        want = set(conditions or self.cfg.conditions)
        cell = os.path.join(f"seed{seed}", f"n{n}")
        tiny, lab = self.path(f"seed{seed}", "tiny"), self.path(f"seed{seed}", "labelled")
        data, images = os.path.join(lab, f"sft_{n}.json"), os.path.join(lab, "images")
        res: dict = {"seed": seed, "n_labelled": n, "conditions": {}, "stage2": {}}
        if conditions is None and self.cfg.ablation_sizes is not None and n not in self.cfg.ablation_sizes:
            want -= {"nosq", "nosq_st", "nosq_rft"}
        for tag, sq_r in (("", s.sq_r), ("nosq", 0.0)):
            names = {c: (f"{tag}_{c}" if tag else c) for c in ("sft", "st", "rft", "rft_lo")}
            names["sft"] = tag or "sft"
            if not want & set(names.values()):
                continue
            log = f"{cell}/{names['sft']}"
            sft_model = steps.sft(self.r, self.path(cell, "sft-{key}"), tiny, data, images, s, seed, sq_r=sq_r,
                                  log=log)
            res["conditions"][names["sft"]] = self._evaluate(sft_model, s, log)
            if not want & {names["st"], names["rft"], names["rft_lo"]}:
                continue
            st = self._self_train(cell, sft_model, s, seed, n, log)
            res["stage2"][names["st"]] = {"questions": st["questions"], "pair_quality": st["pair_quality"]}
            if names["st"] in want:
                model, extra = self._dpo(cell, sft_model, st, s, seed, log)
                res["conditions"][names["st"]] = {**self._evaluate(model, s, f"{log}_st"), **extra}
                if self.cfg.rounds > 1 and not tag:  # iterative self-training (stllava.demo.rounds)
                    from stllava.demo.rounds import study_rounds

                    res["rounds"] = study_rounds(self, cell, model, {
                        **res["conditions"]["st"], "pairs": st["pair_quality"]["pairs"],
                        "pair_quality": st["pair_quality"]}, s, seed, log)
            # the control at its own (SFT) learning rate, and at DPO's: a fair control must not lose
            # only because its steps are ten times larger
            controls = ((names["rft"], s, "rft"), (names["rft_lo"], s.replace(rft_lr=s.dpo_lr), "rft_lo"))
            for name, rs, tag_log in controls:
                if name not in want:
                    continue
                if not _count(st["pairs"][0]):
                    res["conditions"][name] = {**res["conditions"][names["sft"]], "trained": False}
                    continue
                model = steps.rft(self.r, self.path(cell, "rft-{key}"), sft_model, st["pairs"][0],
                                  self.path("data", "phantoms", "unlabelled", "images"), rs, seed,
                                  log=f"{log}_{tag_log}")
                res["conditions"][name] = {**self._evaluate(model, rs, f"{log}_{tag_log}"), "trained": True}
        return res

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

    def run(self) -> dict:
        """Prepare, run every cell, aggregate; returns ``study.json``'s content."""
        from stllava.demo.study_report import aggregate, write_report

        self.prepare()
        results = self._map([(seed, n) for n in sorted(self.cfg.sizes, reverse=True) for seed in self.cfg.seeds])
        study = aggregate(results, self.cfg)
        if self.cfg.rounds > 1:
            from stllava.demo.rounds import summarize

            study["rounds"] = summarize(results)
        write_report(study, self.cfg.workdir)
        return study

    def search(self, variants: dict[str, dict] | None = None) -> dict:
        """The settings search: every variant of :data:`SEARCH` (loop-setting overrides) at every size
        and seed, conditions sft / st / rft, on the *validation* phantoms only; writes and returns
        ``search.json`` (and ``search.md``)."""
        from stllava.demo.study_report import write_search

        variants = variants or SEARCH
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


def config_record(cfg: StudyConfig) -> dict:
    """The settings as stored in ``study.json`` (no paths, no timings: bit-identical reruns)."""
    d = dataclasses.asdict(cfg)
    d.pop("workdir")
    d.pop("jobs")
    return d


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
    ap.add_argument("--sizes", default=None, help="labelled-set sizes, comma-separated (default 30,100,300,1500)")
    ap.add_argument("--seeds", default=None, help="seeds, comma-separated, or ranges A-B (default 0,1,2)")
    ap.add_argument("--conditions", default=None, help=f"subset of {','.join(CONDITIONS)} (default: all)")
    ap.add_argument("--unlabelled", type=int, default=None, help="size of the unlabelled pool (default 1000)")
    ap.add_argument("--jobs", type=int, default=2, help="cells run in parallel, one CPU thread each (default 2)")
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
    ap.add_argument("--plan", choices=sorted(PLANS), default=None,
                    help="a planned study: 'rounds' (rounds 1-3, 100 labelled x 5 seeds) or 'graded' (SFT vs DPO vs "
                    "RFT with descriptions, 100 labelled x 3 seeds); other flags override it")
    ap.add_argument("--search", default=None, nargs="?", const="all",
                    help="run the settings search on the validation phantoms instead of the study: all variants, "
                    f"or a comma-separated subset of {','.join(SEARCH)}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # a plan at --quick's sizes keeps the plan's conditions and rounds (a smoke test of the plan)
    cfg = StudyConfig(**{**(PLANS[args.plan]() if args.plan else {}), **(QUICK if args.quick else {})})
    cfg.workdir = args.workdir or ("playground/study-quick" if args.quick else cfg.workdir)
    cfg.jobs = args.jobs
    if args.sizes:
        cfg.sizes = tuple(int(x) for x in args.sizes.split(","))
    if args.seeds:
        cfg.seeds = parse_seeds(args.seeds)
    if args.conditions:
        cfg.conditions = tuple(x for x in args.conditions.split(",") if x)
    if args.unlabelled:
        cfg.n_unlabelled = args.unlabelled
    if args.rounds:
        cfg.rounds = args.rounds
    if args.graded or args.plan == "graded":
        cfg.loop = cfg.loop.replace(graded=True, eval_max_new_tokens=max(16, cfg.loop.eval_max_new_tokens))
    t0 = time.time()
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
    study = Study(cfg).run()
    if args.figures:
        from stllava.demo.study_report import copy_figures

        copy_figures(cfg.workdir)
    print(f"study finished in {time.time() - t0:.0f} s: {len(study['runs'])} runs; "
          f"{os.path.join(cfg.workdir, 'study.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

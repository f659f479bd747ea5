"""The embedded demo: the whole self-training loop once, stage by stage, each stage a real command.

Stages (each a folder under the workdir with a ``.done.json`` marker, so a rerun reuses it):

    bundle     tiny random-init model (the "start" model)                        tiny/
    data       phantoms: labelled set, unlabelled pool, validation and test sets  data/, labelled/
    sft        stage 1: self-questioning SFT (v1_sq, LoRA + ViT-LoRA + projector) sft/
    questions  stage 2a: the SFT model asks questions about the unlabelled pool   selftrain/questions/
    answers    stage 2b: sampled answers per question                             selftrain/answers/
    judge      stage 2c: the phantom judge scores them through the real client    selftrain/judged/
    pairs      stage 2d: preference pairs (a share of images held out)            selftrain/pairs/
    dpo        stage 3: DPO from the SFT model                                    dpo/
    eval       start / SFT / DPO on the phantom test set and the VQA-RAD subset   eval/
    report     markdown summary, metrics table, curves, self-questions            report/
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Callable

from stllava.demo import steps
from stllava.demo.commands import cmd
from stllava.demo.runner import Runner
from stllava.demo.steps import LoopSettings

logger = logging.getLogger("stllava.demo")


@dataclasses.dataclass
class DemoConfig:
    workdir: str = "playground/demo"
    seed: int = 0
    # the study's low-label setting, where it measured what self-training adds (docs/Study.md)
    n_labelled: int = 100
    n_unlabelled: int = 1000
    n_val: int = 40
    n_test: int = 200
    threads: int = 1
    loop: LoopSettings = dataclasses.field(default_factory=lambda: steps.chosen_settings(heldout_share=0.1))


class Demo:
    """One pass of the loop under ``cfg.workdir``; :data:`STAGES` lists what it runs, in order."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.r = Runner(cfg.workdir, threads=cfg.threads, echo=True, role="demo")

    def path(self, *parts: str) -> str:
        return self.r.path(*parts)

    # -- the stages ------------------------------------------------------------------------------
    def bundle(self) -> None:
        from stllava.model.tiny import build_tiny_bundle

        self.r.step("bundle", self.path("tiny"), {"seed": self.cfg.seed},
                    lambda: build_tiny_bundle(self.path("tiny"), seed=self.cfg.seed))

    def data(self) -> None:
        from stllava.demo.data import (
            STREAMS,
            build_labelled,
            build_shared,
            check_disjoint,
            images_in,
            vqa_rad_assets,
            write_sft_set,
        )
        from stllava.demo.graded import data_settings

        c = self.cfg
        graded = c.loop.graded
        # the shared splits are rendered from the demo's seed, so the seed is one of their settings
        self.r.step("data", self.path("data"), {"unlabelled": c.n_unlabelled, "val": c.n_val, "test": c.n_test,
                                                "seed": c.seed, "streams": STREAMS, **data_settings(graded)},
                    lambda: build_shared(self.path("data"), c.n_unlabelled, c.n_val, c.n_test, seed=c.seed,
                                         graded=graded))
        self.r.step("labelled", self.path("labelled"), {"n": c.n_labelled, "seed": c.seed, "streams": STREAMS,
                                                        **data_settings(graded)},
                    lambda: build_labelled(self.path("labelled"), c.n_labelled, c.seed, with_vqa_rad=True,
                                           graded=graded))
        write_sft_set(self.path("labelled"), c.n_labelled, c.seed)
        check_disjoint({"labelled": images_in(self.path("labelled", "images", "phantoms")),
                        **{split: images_in(self.path("data", "phantoms", split, "images"))
                           for split in ("unlabelled", "val", "test")}})
        self.r.step("vqa_rad", self.path("eval_vqa_rad"), {}, lambda: self.r.run(cmd(
            "stllava.eval.convert", benchmark="vqa_rad", src=os.path.join(vqa_rad_assets(), "vqa_rad_subset.json"),
            out=self.path("eval_vqa_rad")), "convert_vqa_rad"))

    def sft(self) -> str:
        c = self.cfg
        return steps.sft(self.r, self.path("sft"), self.path("tiny"), self.path("labelled", f"sft_{c.n_labelled}.json"),
                         self.path("labelled", "images"), c.loop, c.seed)

    def questions(self) -> str:
        return steps.questions(self.r, self.path("selftrain", "questions"), self.sft(), self.unlabelled(),
                               self.cfg.loop, self.cfg.seed)

    def answers(self) -> str:
        return steps.answers(self.r, self.path("selftrain", "answers"), self.sft(), self.questions(),
                             self.unlabelled(), self.cfg.loop, self.cfg.seed)

    def judge(self) -> str:
        return steps.judge(self.r, self.path("selftrain", "judged"), self.answers(), self.unlabelled(),
                           self.path("data", "phantoms", "unlabelled", "facts.json"), self.cfg.loop, self.cfg.seed)

    def pairs(self) -> tuple[str, str]:
        return steps.pairs(self.r, self.path("selftrain", "pairs"), self.judge(), self.cfg.loop, self.cfg.seed)

    def dpo(self) -> str:
        train, held = self.pairs()
        return steps.dpo(self.r, self.path("dpo"), self.sft(), train, held, self.unlabelled(), self.cfg.loop,
                         self.cfg.seed)

    def eval(self) -> None:
        from stllava.demo.data import vqa_rad_assets

        models = {"start": self.path("tiny"), "sft": self.sft(), "dpo": self.dpo()}
        sets = {"phantom": (self.path("data", "eval_test"), self.path("data", "phantoms", "test", "images")),
                "vqa_rad": (self.path("eval_vqa_rad"), os.path.join(vqa_rad_assets(), "images"))}
        for name, model in models.items():
            for bench, (folder, images) in sets.items():
                steps.evaluate(self.r, self.path("eval", name, bench), model, folder, images, self.cfg.loop, bench,
                               log=f"eval_{name}_{bench}")

    def report(self) -> None:
        from stllava.demo.report import write_report

        shutil.rmtree(self.path("report"), ignore_errors=True)
        write_report(self)

    def unlabelled(self) -> str:
        return self.path("data", "phantoms", "unlabelled", "images")

    # -- running -------------------------------------------------------------------------------
    def stage_table(self) -> dict[str, tuple[Callable[[], object], list[str]]]:
        """Stage name → (its function, the folders it owns)."""
        return {
            "bundle": (self.bundle, ["tiny"]),
            "data": (self.data, ["data", "labelled", "eval_vqa_rad"]),
            "sft": (self.sft, ["sft"]),
            "questions": (self.questions, ["selftrain/questions"]),
            "answers": (self.answers, ["selftrain/answers"]),
            "judge": (self.judge, ["selftrain/judged"]),
            "pairs": (self.pairs, ["selftrain/pairs"]),
            "dpo": (self.dpo, ["dpo"]),
            "eval": (self.eval, ["eval"]),
            "report": (self.report, ["report"]),
        }

    def forget(self, stage: str) -> None:
        """Remove ``stage``'s outputs and every later stage's, so they run again."""
        table = self.stage_table()
        names = list(table)
        for later in names[names.index(stage):]:
            for rel in table[later][1]:
                shutil.rmtree(self.path(rel), ignore_errors=True)

    def run_all(self, stages: list[str] | None = None) -> None:
        table = self.stage_table()
        stages = stages or list(table)
        t0 = time.time()
        for i, stage in enumerate(stages, 1):
            logger.info("[%d/%d] %s ...", i, len(stages), stage)
            t = time.time()
            table[stage][0]()
            logger.info("[%d/%d] %s finished in %.1f s (total %.1f s)", i, len(stages), stage, time.time() - t,
                        time.time() - t0)


STAGES = ["bundle", "data", "sft", "questions", "answers", "judge", "pairs", "dpo", "eval", "report"]

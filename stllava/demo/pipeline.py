"""The embedded self-training loop, stage by stage, each stage a real command.

Stages (each writes ``<workdir>/.done/<stage>`` when finished, so a rerun reuses it):

    bundle    tiny random-init model (the "start" model)
    data      phantoms (train / unlabelled / test), SFT set, evaluation sets
    sft       stage 1: self-questioning SFT (v1_sq, LoRA + ViT-LoRA + projector) → merged
    questions stage 2a: the SFT model asks questions about the unlabelled phantoms
    answers   stage 2b: two sampled answers per question
    judge     stage 2c: the phantom judge scores each pair through the real OpenAI client
    pairs     stage 2d: preference pairs (a held-out share kept for reward accuracy)
    dpo       stage 3: DPO from the SFT model → merged
    eval      start / SFT / DPO on the phantom test set and the embedded VQA-RAD subset
    report    markdown summary, metrics table, curves, example self-questions
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

logger = logging.getLogger("stllava.demo")

STAGES = ["bundle", "data", "sft", "questions", "answers", "judge", "pairs", "dpo", "eval", "report"]
# What each stage writes (removed when the stage is redone, since several stages resume).
OUTPUTS = {"bundle": ["tiny"], "data": ["data"], "sft": ["sft", "sft_merged"],
           "questions": ["selftrain/questions.jsonl"], "answers": ["selftrain/answers.jsonl"],
           "judge": ["selftrain/judged.jsonl", "selftrain/judged.cache.jsonl", "selftrain/judged.summary.json"],
           "pairs": ["selftrain/dpo_all.json", "selftrain/dpo_train.json", "selftrain/dpo_heldout.json"],
           "dpo": ["dpo", "dpo_merged"], "eval": ["eval"], "report": ["report"]}


@dataclasses.dataclass
class DemoConfig:
    workdir: str = "playground/demo"
    seed: int = 0
    n_train: int = 1500
    n_unlabelled: int = 500
    n_test: int = 60
    sft_steps: int = 800
    sft_batch: int = 16
    sft_lr: float = 1e-3
    sft_sq_r: float = 0.3  # SPEC's default; the published 7B script uses 0.5
    sft_procs: int = 1  # 2 = two-process DeepSpeed ZeRO-3 (gloo) on CPU
    n_questions: int = 5
    # Sampling for the tiny model: SPEC §5's T=1.2 / top-k 300 (questions) and top-k 100 (answers)
    # suit a 7B model; a 1,000-token, 200k-parameter one needs a sharper distribution.
    q_temperature: float = 0.8
    q_top_k: int = 20
    a_temperature: float = 1.0
    a_top_k: int = 20
    heldout_share: float = 0.25
    dpo_epochs: int = 1
    dpo_batch: int = 8
    dpo_lr: float = 1e-4
    dpo_beta: float = 0.1
    eval_max_new_tokens: int = 8
    threads: int = 1

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)


def run(cmd: list[str], cfg: DemoConfig, log_name: str, env_extra: dict | None = None) -> None:
    """Run one stage command, streaming its output to the console and to ``logs/<log_name>.log``."""
    os.makedirs(cfg.path("logs"), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONWARNINGS="ignore", **(env_extra or {}))
    logger.info("$ %s", " ".join(cmd))
    # Raw bytes pass through so progress bars redraw in place; the log keeps everything.
    with open(cfg.path("logs", log_name + ".log"), "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        while chunk := proc.stdout.read1(4096):
            log.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        rc = proc.wait()
    if rc:
        raise RuntimeError(f"stage command failed (exit {rc}); see {cfg.path('logs', log_name + '.log')}")


def py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class Pipeline:
    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.t0 = time.time()
        self.timings: dict[str, float] = {}
        timing_file = cfg.path("timings.json")
        if os.path.exists(timing_file):
            self.timings = json.load(open(timing_file))

    # -- bookkeeping ---------------------------------------------------------------------------
    def done(self, stage: str) -> bool:
        return os.path.exists(self.cfg.path(".done", stage))

    def mark(self, stage: str, seconds: float) -> None:
        os.makedirs(self.cfg.path(".done"), exist_ok=True)
        open(self.cfg.path(".done", stage), "w").close()
        self.timings[stage] = round(seconds, 1)
        json.dump(self.timings, open(self.cfg.path("timings.json"), "w"), indent=1)

    def forget(self, stage: str) -> None:
        """Forget ``stage`` and every later one: markers and outputs are removed."""
        import shutil

        for later in STAGES[STAGES.index(stage):]:
            for rel in [os.path.join(".done", later)] + OUTPUTS[later]:
                path = self.cfg.path(rel)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)

    def run_all(self, stages: list[str] | None = None) -> None:
        from stllava.demo.stages import STAGE_FUNCS  # the stages import this module

        stages = stages or STAGES
        for i, stage in enumerate(stages, 1):
            if self.done(stage):
                logger.info("[%d/%d] %s: done before, reused (%.1f s then)", i, len(stages), stage,
                            self.timings.get(stage, float("nan")))
                continue
            logger.info("[%d/%d] %s ...", i, len(stages), stage)
            t = time.time()
            STAGE_FUNCS[stage](self)
            self.mark(stage, time.time() - t)
            logger.info("[%d/%d] %s finished in %.1f s (total %.1f s)", i, len(stages), stage,
                        time.time() - t, time.time() - self.t0)
    # the stage functions live in stllava.demo.stages (small files)

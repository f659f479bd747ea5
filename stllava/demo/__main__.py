"""``python -m stllava.demo`` — what ``make demo`` runs.

The whole STLLaVA-Med self-training loop on one CPU machine, on embedded data: a tiny random-init
model → stage-1 self-questioning SFT → self-asked questions about unlabelled phantoms → sampled
answers → phantom judge (through the real OpenAI client) → preference pairs → DPO → evaluation of
start / SFT / DPO on the phantom test set and the embedded VQA-RAD subset → ``<workdir>/report/``.
A rerun reuses finished stages (``--redo STAGE`` redoes that stage and every later one).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time

import torch

from stllava import logs
from stllava.demo.pipeline import STAGES, Demo, DemoConfig
from stllava.demo.steps import LoopSettings
from stllava.errors import run_cli

QUICK = dict(n_labelled=240, n_unlabelled=16, n_val=4, n_test=8,
             loop=LoopSettings(sft_steps=150, sft_batch=8, n_questions=4, dpo_batch=4, eval_max_new_tokens=4))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stllava.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="playground/demo", help="where every stage writes (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data, the model and every sampling stream")
    ap.add_argument("--quick", action="store_true", help="a shortened loop (minutes) for CI and smoke tests")
    ap.add_argument("--sft-procs", type=int, default=None, help="2 = stage 1 on 2-process DeepSpeed ZeRO-3 (gloo)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads per stage command (default 1; 1 and 2 gave bit-identical results here, see "
                    "docs/Study.md)")
    ap.add_argument("--redo", choices=STAGES, help="rerun this stage and all later ones")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in order")
    ap.add_argument("--figures", action="store_true", help="also write README's demo pictures into images/ "
                    "(the report's curves and a row of test phantoms)")
    ap.add_argument("--publish", default=None, nargs="?", const=os.path.join("docs", "demo", "summary.json"),
                    help="also copy report/summary.json to this committed file (default docs/demo/summary.json), "
                    "which README's demo table is generated from (python -m stllava.demo.readme --write)")
    logs.add_log_level_arg(ap)
    args = ap.parse_args(argv)
    logs.setup(args.log_level)
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    cfg = DemoConfig(workdir=args.workdir, seed=args.seed, threads=args.threads, **(QUICK if args.quick else {}))
    if args.sft_procs:
        cfg.loop = dataclasses.replace(cfg.loop, sft_procs=args.sft_procs)
    t0 = time.time()
    demo = Demo(cfg)
    if args.redo:
        demo.forget(args.redo)
    demo.run_all([s for s in args.stages.split(",") if s])
    if args.figures:
        from stllava.demo.report import copy_figures

        for path in copy_figures(demo):
            logging.getLogger("stllava.demo").info("figure: %s", path)
    if args.publish:
        import shutil

        os.makedirs(os.path.dirname(args.publish) or ".", exist_ok=True)
        shutil.copy(demo.path("report", "summary.json"), args.publish)
        logging.getLogger("stllava.demo").info("summary published: %s", args.publish)
    print(f"\ndemo finished in {time.time() - t0:.1f} s; report: {demo.path('report', 'README.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

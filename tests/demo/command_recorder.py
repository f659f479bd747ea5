"""Every command the demo's steps run, recorded instead of run (no model, no server, no subprocess).

``record(name, root)`` drives each step of ``stllava.demo.steps`` (and the demo's benchmark
conversion) with the settings of scenario ``name`` on a runner that records each command and
fakes only the files the steps read back. Used by tests/demo/test_commands.py; it imports nothing
but the steps' public functions, so it also records an older checkout's commands (the golden file
tests/demo/golden_commands.json was written from the commit before the commands were built from
the stages' parsers: ``python tests/demo/command_recorder.py > tests/demo/golden_commands.json``;
its ``rft`` entries were rewritten when the control became compute-matched to DPO: DPO's steps,
batch, learning rate, cosine schedule and ``sq_r``, docs/Study.md#controls).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from unittest import mock

from stllava.demo import steps
from stllava.demo.steps import LoopSettings


def scenarios() -> dict[str, tuple[LoopSettings, int]]:
    """Scenario name -> (the loop's settings, seed): the demo's, the quick demo's and the paper's
    stage 2 (two answers, no pair cap, no held-out pairs) with two-process SFT."""
    from stllava.demo.__main__ import QUICK
    from stllava.demo.pipeline import DemoConfig

    return {"demo": (DemoConfig().loop, 0), "quick": (QUICK["loop"], 1),
            "paper_2procs_no_heldout": (LoopSettings(sft_procs=2, heldout_share=0.0), 2)}


class RecordingRunner:
    """The subset of ``stllava.demo.runner.Runner`` the steps use; ``commands`` holds
    ``(log name, command, extra environment)`` in the order they would run."""

    def __init__(self, root: str):
        self.root = root
        self.commands: list[tuple[str, list[str], dict]] = []

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @staticmethod
    def resolve(folder: str, settings: dict) -> str:
        return folder

    def step(self, name, folder, settings, fn) -> bool:
        os.makedirs(folder, exist_ok=True)
        fn()
        return True

    def run(self, cmd: list[str], log_name: str, env_extra: dict | None = None) -> None:
        self.commands.append((log_name, list(cmd), dict(env_extra or {})))
        out = cmd[cmd.index("--out") + 1] if "--out" in cmd else None
        if "stllava.selftrain.build_pairs" in cmd:  # pairs() reads them back
            turn = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
            with open(out, "w") as f:
                json.dump([{"id": f"p{i}", "image": f"img{i % 8}.png", "chosen_conversations": turn,
                            "rejected_conversations": turn} for i in range(24)], f)
        if "stllava.eval.metrics" in cmd:  # evaluate() reads metrics.json
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "metrics.json"), "w") as f:
                json.dump({"overall": {}}, f)


class _Server:
    base_url = "http://127.0.0.1:9/v1"

    def stop(self) -> None:
        pass


def record(name: str, root: str) -> list[tuple[str, list[str], dict]]:
    """The commands of scenario ``name`` (see :func:`scenarios`), every path under ``root``."""
    s, seed = scenarios()[name]
    r = RecordingRunner(root)
    p = r.path
    with mock.patch("stllava.demo.phantom_judge.serve", lambda facts, images, **noise: _Server()):
        sft = steps.sft(r, p("sft"), p("tiny"), p("labelled", "sft.json"), p("labelled", "images"), s, seed)
        q = steps.questions(r, p("questions"), sft, p("unlabelled"), s, seed)
        a = steps.answers(r, p("answers"), sft, q, p("unlabelled"), s, seed)
        j = steps.judge(r, p("judged"), a, p("unlabelled"), p("facts.json"))
        train, held = steps.pairs(r, p("pairs"), j, s, seed)
        dpo = steps.dpo(r, p("dpo"), sft, train, held, p("unlabelled"), s, seed)
        steps.rft(r, p("rft"), sft, train, p("unlabelled"), s, seed)
        steps.evaluate(r, p("eval"), dpo, p("eval_test"), p("test_images"), s, "phantom")
    _convert(r)
    return r.commands


def _convert(r: RecordingRunner) -> None:
    """The demo's ``data`` stage, its data builders replaced: only the benchmark conversion runs."""
    from stllava.demo import data
    from stllava.demo.pipeline import Demo, DemoConfig

    demo = Demo(DemoConfig(workdir=r.root))
    demo.r = r
    with mock.patch.multiple(data, build_shared=mock.DEFAULT, build_labelled=mock.DEFAULT,
                             write_sft_set=mock.DEFAULT, check_disjoint=mock.DEFAULT, images_in=mock.DEFAULT,
                             vqa_rad_assets=lambda: "/assets"):
        demo.data()


def portable(commands, root: str, repo: str) -> list[tuple[str, list[str], dict]]:
    """``commands`` with the interpreter, ``root`` and ``repo`` written as PYTHON, ROOT and REPO."""
    def one(token: str) -> str:
        if token == sys.executable:
            return "PYTHON"
        return token.replace(root, "ROOT").replace(repo, "REPO")

    return [(log, [one(t) for t in cmd], {k: one(v) for k, v in env.items()}) for log, cmd, env in commands]


def main() -> None:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(steps.__file__))))
    golden = {}
    for name in scenarios():
        with tempfile.TemporaryDirectory() as root:
            golden[name] = portable(record(name, root), root, repo)
    sys.stdout.write("{\n" + ",\n".join(  # one command a line
        f"{json.dumps(name)}: [\n" + ",\n".join(json.dumps(c) for c in cmds) + "\n]" for name, cmds in golden.items())
        + "\n}\n")


if __name__ == "__main__":
    main()

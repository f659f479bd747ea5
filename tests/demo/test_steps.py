"""The loop's steps carry the noisy-judge and noisy-label DPO settings (stllava.demo.steps): the defaults
keep today's settings and commands, anything else is recorded and gets its own folder."""
import json
import os
import random

from stllava.demo import steps
from stllava.demo.phantoms import closed_questions, make_split
from stllava.demo.runner import MARKER, Runner
from stllava.demo.steps import LoopSettings


def marker(folder):
    return json.load(open(os.path.join(folder, MARKER)))["settings"]


def test_judge_step_records_its_noise_and_applies_it(tmp_path):
    phantoms = make_split(str(tmp_path / "ph"), 3, seed="steps-judge/0", prefix="s")
    rng = random.Random(0)
    lines = [{"question_id": f"{ph.name}_{k}", "image": ph.name, "question": q,
              "answers": [a.capitalize() + ".", "No." if a == "yes" else "Yes."]}
             for ph in phantoms for k, (q, a) in enumerate(closed_questions(ph, rng))]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = Runner(str(tmp_path / "run"), echo=False)
    images, facts = str(tmp_path / "ph" / "images"), str(tmp_path / "ph" / "facts.json")

    def run(s, seed):
        out = steps.judge(r, r.path("judged-{key}"), str(answers), images, facts, s, seed)
        return os.path.dirname(out), [json.loads(x)["judge"]["chosen"] for x in open(out)]

    plain, chosen = run(LoopSettings(), 0)
    assert marker(plain) == {"answers": str(answers), "facts": facts}  # the perfect judge: settings as before
    assert chosen == [0] * len(lines)
    noisy, chosen = run(LoopSettings(judge_flip_rate=1.0), 0)
    assert noisy != plain and chosen == [1] * len(lines)  # every verdict reversed
    assert marker(noisy)["noise"] == {"flip_rate": 1.0, "position_bias": 0.0, "noise_seed": 0}
    other_seed, _ = run(LoopSettings(judge_flip_rate=1.0), 1)
    assert other_seed not in (plain, noisy) and marker(other_seed)["noise"]["noise_seed"] == 1


def test_dpo_step_passes_the_loss_and_label_smoothing(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(Runner, "run", lambda self, cmd, log, env=None: commands.append(cmd))
    pairs = tmp_path / "pairs.json"
    pairs.write_text("[]")
    r = Runner(str(tmp_path / "run"), echo=False)

    def run(s):
        commands.clear()
        out = os.path.dirname(steps.dpo(r, r.path("dpo-{key}"), "M", str(pairs), str(pairs), "I", s, 0))
        train = commands[0]
        return out, train[train.index("--dpo_loss_type") + 1], "--label_smoothing" in train, train

    plain, loss, smoothed, _ = run(LoopSettings())
    assert loss == "sigmoid" and not smoothed and not {"loss_type", "label_smoothing"} & set(marker(plain))
    robust, loss, smoothed, cmd = run(LoopSettings(dpo_loss_type="robust", dpo_label_smoothing=0.1))
    assert robust != plain and loss == "robust" and cmd[cmd.index("--label_smoothing") + 1] == "0.1"
    assert marker(robust)["loss_type"] == "robust" and marker(robust)["label_smoothing"] == 0.1

"""The study's controls are compute-matched to DPO (stllava.demo.steps.control): each control's
train_sft command, parsed by train_sft's own parser, has the optimizer steps, batch, learning
rates, schedule, warm-up and sq_r that DPO's command, parsed by train_dpo's, gives over the same
cell's pairs; and the controls' data are what docs/Study.md says they are."""
import json
import math
import os

import pytest

from stllava.demo import commands, steps
from stllava.demo.runner import Runner
from stllava.demo.steps import LoopSettings, chosen_settings

TURN = [{"from": "human", "value": "<image>\nIs there a lesion in this image?"}, {"from": "gpt", "value": "Yes."}]


def _parsed(cmd: list[str]) -> dict:
    """Every field of the training entry point's dataclasses, parsed from ``cmd`` by its own parser."""
    module = cmd[2]
    parsed = commands.stage_parser(module).parse_args_into_dataclasses(args=cmd[3:])
    return {k: v for dc in parsed for k, v in vars(dc).items()}


def _files(tmp_path, n_pairs: int):
    pairs = tmp_path / "pairs" / "dpo_train.json"
    pairs.parent.mkdir()
    pairs.write_text(json.dumps([{"id": f"p{i}", "image": f"u{i % 5}.png", "chosen_conversations": TURN,
                                  "rejected_conversations": TURN} for i in range(n_pairs)]))
    held = tmp_path / "pairs" / "dpo_heldout.json"
    held.write_text("[]")
    answers = tmp_path / "answers" / "answers.jsonl"
    answers.parent.mkdir()
    answers.write_text("".join(json.dumps({"question_id": f"u{i}.png#q0", "image": f"u{i}.png",
                                           "question": "Is there a lesion in this image?",
                                           "answers": ["Yes.", "No."] if i else ["", "No."]}) + "\n"
                               for i in range(4)))
    questions = tmp_path / "questions" / "questions.jsonl"
    questions.parent.mkdir()
    questions.write_text("".join(json.dumps({"image": f"u{i}.png", "questions": [
        "Is there a lesion in this image?", "How many lesions are there?", "What colour is the sky?"]}) + "\n"
        for i in range(2)))
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps({f"u{i}.png": {"modality": "ct", "count": 2,
                                               "lesions": [{"side": "left", "size": "large"}] * 2} for i in range(2)}))
    return str(pairs), str(held), str(answers), str(questions), str(facts)


@pytest.mark.parametrize("n_pairs", [21, 24, 1])
@pytest.mark.parametrize("loop", [chosen_settings(heldout_share=0.1),
                                  LoopSettings(sft_steps=40, sft_batch=8, dpo_batch=4, heldout_share=0.0)])
def test_every_control_matches_dpos_steps_batch_lr_schedule_warmup_and_sq_r(tmp_path, monkeypatch, n_pairs, loop):
    ran = []
    monkeypatch.setattr(Runner, "run", lambda self, cmd, log, env=None: ran.append((log, cmd)))
    pairs, held, answers, questions, facts = _files(tmp_path, n_pairs)
    r = Runner(str(tmp_path / "run"), echo=False, role="study")
    steps.dpo(r, r.path("dpo-{key}"), "SFT", pairs, held, "U", loop, 10, log="dpo")
    data = {"rft": steps.chosen_data(pairs)[0], "own": steps.own_data(answers)[0],
            "oracle": steps.oracle_data(questions, facts)[0], "cont": str(tmp_path / "labelled.json")}
    for name, path in data.items():
        assert steps.control(r, r.path(f"{name}-{{key}}"), "SFT", path, "U", n_pairs, loop, 10, log=name)
    cmds = {log: cmd for log, cmd in ran if not log.endswith("_merge")}
    assert set(cmds) == {"dpo", *steps.CONTROLS}
    dpo = _parsed(cmds["dpo"])
    # the Trainer's count over the pairs (num_train_epochs, one process, no accumulation): HF
    # Trainer.set_initial_training_values, max_steps = ceil(epochs × ceil(records / batch))
    dpo_steps = math.ceil(dpo["num_train_epochs"] * math.ceil(n_pairs / dpo["per_device_train_batch_size"]))
    assert dpo_steps == steps.dpo_steps(n_pairs, loop)
    for name in steps.CONTROLS:
        c = _parsed(cmds[name])
        assert c["max_steps"] == dpo_steps, name
        for field in ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                      "mm_projector_lr", "vision_tower_lr", "lr_scheduler_type", "warmup_ratio", "warmup_steps",
                      "weight_decay", "sq_r", "seed"):
            assert c[field] == dpo[field], (name, field)
        assert c["lr_scheduler_type"] == "cosine"  # a str enum


def test_no_pairs_means_no_step_to_match(tmp_path, monkeypatch):
    monkeypatch.setattr(Runner, "run", lambda *a, **k: pytest.fail("nothing should run"))
    r = Runner(str(tmp_path), echo=False)
    assert steps.dpo_steps(0, LoopSettings()) == 0
    assert steps.control(r, r.path("own-{key}"), "SFT", "d.json", "U", 0, LoopSettings(), 0) is None


def test_control_data(tmp_path):
    pairs, _, answers, questions, facts = _files(tmp_path, 3)
    path, counts = steps.own_data(answers)
    own = json.load(open(path))
    assert counts == {"records": 3, "dropped_empty": 1}  # the first answer of u0 is empty
    assert [x["conversations"][1]["value"] for x in own] == ["Yes."] * 3  # the first answer, never the second
    path, counts = steps.oracle_data(questions, facts)
    oracle = json.load(open(path))
    assert counts == {"records": 4, "dropped_unanswerable": 2}  # "What colour is the sky?" maps to no fact
    assert [x["conversations"][1]["value"] for x in oracle] == ["Yes.", "Two."] * 2  # the labelled set's style
    assert oracle[0]["conversations"][0]["value"] == "<image>\nIs there a lesion in this image?"
    path, n = steps.chosen_data(pairs)
    assert n == 3 and json.load(open(path))[0]["conversations"] == TURN


def test_the_role_is_part_of_every_runs_key(tmp_path, monkeypatch):
    """The same step with the same settings gets another folder, and records its role, per role:
    a study never reuses a settings-search run."""
    monkeypatch.setattr(Runner, "run", lambda *a, **k: None)
    found = {}
    for role in ("search", "study", None):
        r = Runner(str(tmp_path / str(role)), echo=False, role=role)
        out = steps.questions(r, r.path("questions-{key}"), "M", "U", LoopSettings(), 0)
        folder = os.path.dirname(out)
        found[role] = (os.path.basename(folder), json.load(open(os.path.join(folder, ".done.json")))["settings"])
    assert len({name for name, _ in found.values()}) == 3
    assert found["study"][1]["role"] == "study" and found["search"][1]["role"] == "search"
    assert "role" not in found[None][1]  # a runner without a role keeps today's settings


def test_reported_seeds_are_disjoint_from_the_searchs():
    from stllava.demo.study import PLANS, StudyConfig, search_seeds

    searched = set(search_seeds())
    assert searched == {0, 1}  # recorded in the committed docs/study/search.json
    assert set(StudyConfig().seeds) == set(range(10, 18))
    for chunk in PLANS["all"]:
        assert not searched & set(chunk["seeds"]), chunk


def test_the_full_studys_test_set_holds_3000_questions(tmp_path):
    from stllava.demo.data import stream_key
    from stllava.demo.phantoms import make_split, test_records
    from stllava.demo.study import StudyConfig

    cfg = StudyConfig()
    phantoms = make_split(str(tmp_path / "test"), cfg.n_test, stream_key("test", cfg.data_seed), "test")
    assert len(test_records(phantoms, stream_key("test-questions", cfg.data_seed))) >= 3000
    assert os.path.isdir(tmp_path / "test" / "images")

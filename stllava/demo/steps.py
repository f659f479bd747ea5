"""The steps of the self-training loop, each the real command a researcher runs at 7B scale.

Every function takes a :class:`~stllava.demo.runner.Runner`, explicit input paths and settings,
fills one output folder (reused when already finished with the same settings) and returns what
the next step reads. The demo (:mod:`stllava.demo.pipeline`) chains them once; the study
(:mod:`stllava.demo.study`) chains them per labelled-set size, seed and condition. Commands name
their values by the stage's own flag destinations (:mod:`stllava.demo.commands`), so a flag
renamed in a stage fails when the command is built.

Settings shared by the demo and the study live in :class:`LoopSettings`; their values were chosen
on the validation phantoms (docs/Study.md says how).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random

from stllava.demo.commands import cmd, train_cmd
from stllava.demo.runner import Runner
from stllava.jsonl import write_json_atomic

JUDGE_KEY_ENV = "PHANTOM_JUDGE_KEY"


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """Everything that determines a run besides its data and seed."""

    # The tiny model is trained, asked and evaluated with one template: v1_sq (the stage-1 template).
    # A 7B LLaMA generalises across system prompts; a 200k-parameter one does not (measured: the SFT
    # model scored 20% closed accuracy with the plain v1 system prompt, 82% with v1_sq's).
    conv: str = "v1_sq"
    sft_steps: int = 800
    sft_batch: int = 16
    sft_lr: float = 1e-3
    sq_r: float = 0.3  # the training default (docs/Method.md#self-questioning); sqllava_med.sh uses 0.5
    sft_procs: int = 1  # 2 = two-process DeepSpeed ZeRO-3 (gloo) on CPU
    n_questions: int = 5
    # Sampling for the tiny model: the 7B recipe's T=1.2 / top-k 300 (questions) and top-k 100 (answers)
    # suit a 7B model; a 1,000-token, 200k-parameter one needs a sharper distribution.
    q_temperature: float = 0.8
    q_top_k: int = 20
    a_temperature: float = 1.0
    a_top_k: int = 20
    n_answers: int = 2
    max_pairs_per_question: int | None = None  # build_pairs --max-per-question
    heldout_share: float = 0.25
    dpo_epochs: int = 1
    dpo_batch: int = 8
    dpo_lr: float = 1e-4
    dpo_beta: float = 0.1
    dpo_rpo_alpha: float = 0.0  # train_dpo --rpo_alpha (0 = pure DPO, the paper's)
    dpo_loss_type: str = "sigmoid"  # train_dpo --dpo_loss_type (robust: robust DPO)
    dpo_label_smoothing: float = 0.0  # train_dpo --label_smoothing (conservative / robust DPO's ε)
    # A noisy phantom judge (stllava.demo.phantom_judge): share of verdicts reversed, and share of
    # records where Answer 1 wins whatever it says; drawn per record with the run's seed. 0 = perfect.
    judge_flip_rate: float = 0.0
    judge_position_bias: float = 0.0
    # The graded-answer probe (stllava.demo.graded): a description question in the SFT and test
    # records and a judge that grades descriptions by their facts. Off: the data of before the probe.
    graded: bool = False
    # The earlier, unmatched control (SFT learning rate, batch sft_batch, constant schedule, sq_r 0,
    # rft_epochs passes): recorded in the search's settings (docs/study/search.json), superseded by
    # the compute-matched controls of :func:`control` (docs/Study.md#controls); not read by the study.
    rft_epochs: int = 1
    rft_lr: float = 1e-3
    eval_max_new_tokens: int = 8

    def replace(self, **changes) -> "LoopSettings":
        return dataclasses.replace(self, **changes)


# The settings search on the validation phantoms (``python -m stllava.demo.study --search``): each
# variant overrides LoopSettings, whose own defaults are stage 2 as the paper runs it (two answers
# per question, DPO beta 0.1). What was tried and why: docs/Study.md; the results: docs/study/search.md.
_K4 = {"n_answers": 4, "a_temperature": 1.5, "a_top_k": 5}
_CAP = {**_K4, "max_pairs_per_question": 50}
SEARCH: dict[str, dict] = {
    "paper-k2": {},
    "k4-cap-beta0.5": {**_CAP, "dpo_beta": 0.5},
    "k4-cap-beta0.5-rpo1": {**_CAP, "dpo_beta": 0.5, "dpo_rpo_alpha": 1.0},
    # three passes over the judged data, for DPO and for the control alike
    "k4-cap-beta0.5-3ep": {**_CAP, "dpo_beta": 0.5, "dpo_epochs": 3, "rft_epochs": 3},
    "k8-cap-beta0.5": {**_CAP, "n_answers": 8, "dpo_beta": 0.5},
}
# The variant the search chose (its choice rule: docs/study/search.md); the study and the demo run it.
CHOSEN = "k4-cap-beta0.5-3ep"


def chosen_settings(**changes) -> LoopSettings:
    """LoopSettings with the chosen search variant's overrides (and ``changes``)."""
    return LoopSettings(**{**SEARCH[CHOSEN], **changes})


def keyed(r: Runner, settings: dict) -> dict:
    """``settings`` plus the runner's role ("search", "study", "demo") when it has one: the role is
    part of every run's key, so a study never reuses a settings-search run (docs/Study.md)."""
    role = getattr(r, "role", None)
    return {**settings, "role": role} if role else settings


def _trainable_args(lr: float) -> dict:
    """LoRA + ViT-LoRA + projector, one learning rate: the flags shared by SFT, RFT and DPO."""
    return dict(mm_projector_type="cluster", image_aspect_ratio="pad",
                lora_enable=True, lora_r=64, lora_alpha=128,
                vit_lora_enable=True, lora_r_vit=16, lora_alpha_vit=32,
                learning_rate=lr, mm_projector_lr=lr, vision_tower_lr=lr, weight_decay=0.0,
                warmup_ratio=0.03, model_max_length=512, dataloader_num_workers=0,
                report_to="none", disable_tqdm=False)


def merge(r: Runner, adapter: str, base: str, out: str, log: str) -> None:
    """Merge a LoRA output folder into one full checkpoint with the user-facing merge command."""
    r.run(cmd("stllava.model.merge", model_path=adapter, model_base=base, save_model_path=out, dtype="float32"), log)


def sft(r: Runner, folder: str, base: str, data: str, images: str, s: LoopSettings, seed: int, *,
        steps: int | None = None, lr: float | None = None, sq_r: float | None = None, batch: int | None = None,
        schedule: str = "constant_with_warmup", log: str = "sft") -> str:
    """Stage 1 (or continued SFT, or a control): ``train_sft`` from ``base`` on ``data``, LoRA +
    ViT-LoRA + projector, ``steps`` optimizer steps of ``batch`` records (defaults: stage 1's) at
    ``lr`` with the ``schedule``, then merged. Returns the merged model folder ``folder/merged``."""
    steps, lr, batch = steps or s.sft_steps, lr or s.sft_lr, batch or s.sft_batch
    sq_r = s.sq_r if sq_r is None else sq_r
    settings = {"base": base, "data": data, "images": images, "steps": steps, "lr": lr, "sq_r": sq_r,
                "batch": batch, "procs": s.sft_procs, "conv": s.conv, "seed": seed}
    if schedule != "constant_with_warmup":  # stage 1 keeps its settings (and folder names)
        settings["schedule"] = schedule
    settings = keyed(r, settings)
    folder = r.resolve(folder, settings)

    def go():
        env = {"OMP_NUM_THREADS": "1"} if s.sft_procs > 1 else None
        r.run(train_cmd(
            "stllava.train.train_sft", s.sft_procs,
            model_name_or_path=base, version=s.conv, sq_r=sq_r,
            data_path=data, image_folder=images,
            group_by_modality_length=True, lora_dropout_vit=0.0,
            lr_scheduler_type=schedule, max_steps=steps,
            per_device_train_batch_size=batch // s.sft_procs, gradient_accumulation_steps=1,
            logging_steps=10, save_strategy="no", seed=seed,
            output_dir=os.path.join(folder, "train"), **_trainable_args(lr)), log, env)
        merge(r, os.path.join(folder, "train"), base, os.path.join(folder, "merged"), log + "_merge")

    r.step(log, folder, settings, go)
    return os.path.join(folder, "merged")


def questions(r: Runner, folder: str, model: str, images: str, s: LoopSettings, seed: int,
              log: str = "questions") -> str:
    """Stage 2a: the model asks ``n_questions`` questions per unlabelled image. Returns the file."""
    settings = {"model": model, "images": images, "n": s.n_questions, "t": s.q_temperature, "k": s.q_top_k,
                "conv": s.conv, "seed": seed}
    settings = keyed(r, settings)
    folder = r.resolve(folder, settings)
    out = os.path.join(folder, "questions.jsonl")
    r.step(log, folder, settings, lambda: r.run(cmd(
        "stllava.selftrain.questions", model_path=model, image_folder=images, out=out,
        conv_mode=s.conv, n_questions=s.n_questions, max_desc_tokens=24,
        max_question_tokens=24, batch_size=16, temperature=s.q_temperature,
        top_k=s.q_top_k, seed=seed, dedup=True, device="cpu", no_progress=True), log))
    return out


def answers(r: Runner, folder: str, model: str, questions_file: str, images: str, s: LoopSettings, seed: int,
            log: str = "answers") -> str:
    """Stage 2b: ``n_answers`` sampled answers per question. Returns the file."""
    settings = {"model": model, "questions": questions_file, "n": s.n_answers, "t": s.a_temperature,
                "k": s.a_top_k, "conv": s.conv, "seed": seed}
    settings = keyed(r, settings)
    folder = r.resolve(folder, settings)
    out = os.path.join(folder, "answers.jsonl")
    r.step(log, folder, settings, lambda: r.run(cmd(
        "stllava.selftrain.answers", model_path=model, questions=questions_file,
        image_folder=images, out=out, conv_mode=s.conv, max_new_tokens=12,
        temperature=s.a_temperature, top_k=s.a_top_k, batch_size=32,
        seed=seed, device="cpu", no_progress=True,
        n_answers=s.n_answers if s.n_answers != 2 else None), log))
    return out


def judge(r: Runner, folder: str, answers_file: str, images: str, facts: str, s: LoopSettings | None = None,
          seed: int = 0, log: str = "judge") -> str:
    """Stage 2c: the phantom judge scores the answers through the real OpenAI client, noisy as
    ``s.judge_flip_rate`` / ``s.judge_position_bias`` say (per-record draws seeded by ``seed``).
    Returns the file."""
    from stllava.demo.phantom_judge import JUDGE_NAME, serve

    s = s or LoopSettings()
    noise = {"flip_rate": s.judge_flip_rate, "position_bias": s.judge_position_bias, "noise_seed": seed}
    settings = {"answers": answers_file, "facts": facts}
    if s.judge_flip_rate or s.judge_position_bias:  # the perfect judge keeps its settings (and folder names)
        settings["noise"] = noise
    if s.graded:  # likewise the judge of one-word answers
        settings["graded"] = True
    settings = keyed(r, settings)
    folder = r.resolve(folder, settings)
    out = os.path.join(folder, "judged.jsonl")

    def go():
        server = serve(facts, images, **noise, graded=s.graded)
        try:
            r.run(cmd("stllava.selftrain.judge", answers=answers_file, image_folder=images, out=out,
                      base_url=server.base_url, model=JUDGE_NAME, api_key_env=JUDGE_KEY_ENV,
                      concurrency=4, price_in=0, price_out=0),
                  log, {JUDGE_KEY_ENV: "local-phantom-judge"})
        finally:
            server.stop()

    r.step(log, folder, settings, go)
    return out


def pairs(r: Runner, folder: str, judged_file: str, s: LoopSettings, seed: int, log: str = "pairs") -> tuple[str, str]:
    """Stage 2d: preference pairs, with a share of the *images* held out for DPO's reward accuracy.
    Returns ``(train pairs, held-out pairs)``."""
    settings = {"judged": judged_file, "heldout_share": s.heldout_share, "seed": seed,
                "max_per_question": s.max_pairs_per_question}
    settings = keyed(r, settings)
    folder = r.resolve(folder, settings)
    train, held = os.path.join(folder, "dpo_train.json"), os.path.join(folder, "dpo_heldout.json")

    def go():
        everything = os.path.join(folder, "dpo_all.json")
        r.run(cmd("stllava.selftrain.build_pairs", judged=judged_file, out=everything,
                  max_per_question=s.max_pairs_per_question), log)
        with open(everything) as f:
            all_pairs = json.load(f)
        images = sorted({x["image"] for x in all_pairs})
        random.Random(seed).shuffle(images)
        out = set(images[: max(1, int(len(images) * s.heldout_share))]) if s.heldout_share > 0 else set()
        write_json_atomic(train, [x for x in all_pairs if x["image"] not in out], indent=1)
        write_json_atomic(held, [x for x in all_pairs if x["image"] in out], indent=1)

    r.step(log, folder, settings, go)
    return train, held


def dpo(r: Runner, folder: str, model: str, train_pairs: str, heldout_pairs: str, images: str, s: LoopSettings,
        seed: int, log: str = "dpo") -> str:
    """Stage 3: DPO from ``model`` (fresh LoRA + ViT-LoRA + projector; reference = ``model`` with the
    adapters disabled); held-out pairs scored after training. Returns the merged model folder."""
    settings = {"model": model, "pairs": train_pairs, "heldout": heldout_pairs, "epochs": s.dpo_epochs,
                "batch": s.dpo_batch, "lr": s.dpo_lr, "beta": s.dpo_beta, "conv": s.conv, "seed": seed,
                "rpo_alpha": s.dpo_rpo_alpha}
    if s.dpo_loss_type != "sigmoid" or s.dpo_label_smoothing:  # the plain loss keeps its settings (and folder)
        settings.update(loss_type=s.dpo_loss_type, label_smoothing=s.dpo_label_smoothing)
    settings = keyed(r, settings)
    folder = r.resolve(folder, settings)

    def go():
        with open(heldout_pairs) as f:
            held = heldout_pairs if json.load(f) else None
        r.run(cmd(
            "stllava.train.train_dpo",
            model_name_or_path=model, version=s.conv, data_path=train_pairs, eval_data_path=held,
            image_folder=images, lr_scheduler_type="cosine", num_train_epochs=s.dpo_epochs,
            per_device_train_batch_size=s.dpo_batch,
            per_device_eval_batch_size=256,  # one batch: accuracy over pairs, not batch means
            gradient_accumulation_steps=1, dpo_beta=s.dpo_beta, dpo_loss_type=s.dpo_loss_type,
            label_smoothing=s.dpo_label_smoothing or None, rpo_alpha=s.dpo_rpo_alpha,
            ref_model="adapter_disabled", logging_steps=2, save_strategy="no",
            seed=seed, output_dir=os.path.join(folder, "train"), **_trainable_args(s.dpo_lr)), log)
        merge(r, os.path.join(folder, "train"), model, os.path.join(folder, "merged"), log + "_merge")

    r.step(log, folder, settings, go)
    return os.path.join(folder, "merged")


def dpo_steps(n_pairs: int, s: LoopSettings) -> int:
    """The optimizer steps :func:`dpo` takes over ``n_pairs`` training pairs, counted as its Trainer
    counts them (``num_train_epochs``, one process, no accumulation, the last batch kept):
    ``dpo_epochs × ⌈n_pairs / dpo_batch⌉``; 0 without pairs."""
    return s.dpo_epochs * math.ceil(n_pairs / s.dpo_batch)


# The compute-matched controls of the study (docs/Study.md#controls): SFT from the same SFT model,
# with DPO's optimizer steps, batch (a DPO pair counts as one record), learning rate, cosine
# schedule, warm-up and sq_r; only the data differ.
CONTROLS = {
    "cont": "continued SFT on the labelled set (is it just more steps?)",
    "own": "SFT on the model's own unjudged answers, the first sampled one per question (is it the judge?)",
    "rft": "SFT on the judge's chosen answers of the DPO pairs (rejection-sampling fine-tuning)",
    "oracle": "SFT on the self-asked questions with their ground-truth answers (the unlabelled images at best)",
}


def control(r: Runner, folder: str, model: str, data: str, images: str, n_pairs: int, s: LoopSettings, seed: int,
            *, sq_r: float | None = None, log: str = "control") -> str | None:
    """A compute-matched control: :func:`sft` from ``model`` on ``data`` with the optimizer steps
    DPO takes over ``n_pairs`` pairs (:func:`dpo_steps`), DPO's batch, learning rate and cosine
    schedule, and ``sq_r`` (default the loop's, which DPO's command carries too). Returns the merged
    model, or None when DPO has no step to match (no pairs): the SFT model stands."""
    steps = dpo_steps(n_pairs, s)
    if not steps:
        return None
    return sft(r, folder, model, data, images, s, seed, steps=steps, lr=s.dpo_lr, sq_r=sq_r, batch=s.dpo_batch,
               schedule="cosine", log=log)


def _one_turn(rid: str, image: str, question: str, answer: str) -> dict:
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": "<image>\n" + question},
                                                         {"from": "gpt", "value": answer}]}


def chosen_data(train_pairs: str) -> tuple[str, int]:
    """``rft_chosen.json`` beside the pairs: each pair's chosen conversation (one record a pair).
    Returns ``(the file, records)``."""
    with open(train_pairs) as f:
        chosen = [{"id": p["id"], "image": p["image"], "conversations": p["chosen_conversations"]}
                  for p in json.load(f)]
    data = os.path.join(os.path.dirname(train_pairs), "rft_chosen.json")  # derived from the pairs, beside them
    write_json_atomic(data, chosen)
    return data, len(chosen)


def own_data(answers_file: str) -> tuple[str, dict]:
    """``own_first.json`` beside the answers: each question with the model's *first* sampled answer
    (sampled with the run's seed; no judge). Empty answers are dropped and counted. Returns
    ``(the file, {"records", "dropped_empty"})``."""
    with open(answers_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    records = [_one_turn(f"own_{row['question_id']}", row["image"], row["question"], row["answers"][0].strip())
               for row in rows if row["answers"] and row["answers"][0].strip()]
    data = os.path.join(os.path.dirname(answers_file), "own_first.json")
    write_json_atomic(data, records)
    return data, {"records": len(records), "dropped_empty": len(rows) - len(records)}


def oracle_answer(question: str, facts: dict) -> str | None:
    """The ground-truth answer to a self-asked ``question`` about a phantom with ``facts``, written
    as the labelled set writes answers ("Yes.", "Two.", "Left."); None when the phantom judge
    cannot map the question to a fact (unanswerable)."""
    from stllava.demo.phantom_judge import expected_answer
    from stllava.demo.phantoms import NUMBER_WORDS

    found = expected_answer(question, facts)
    if found is None:
        return None
    answer = found[1]
    return (NUMBER_WORDS[int(answer)] if answer.isdigit() else answer).capitalize() + "."


def oracle_data(questions_file: str, facts_file: str) -> tuple[str, dict]:
    """``oracle.json`` beside the questions: every self-asked question with its ground-truth answer
    (:func:`oracle_answer`); unanswerable questions are dropped and counted. Returns
    ``(the file, {"records", "dropped_unanswerable"})``."""
    with open(facts_file) as f:
        facts = json.load(f)
    with open(questions_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    records, dropped = [], 0
    for row in rows:
        for k, q in enumerate(row["questions"]):
            answer = oracle_answer(q, facts[row["image"]]) if row["image"] in facts else None
            if answer is None:
                dropped += 1
                continue
            records.append(_one_turn(f"oracle_{row['image']}#{k}", row["image"], q, answer))
    data = os.path.join(os.path.dirname(questions_file), "oracle.json")
    write_json_atomic(data, records)
    return data, {"records": len(records), "dropped_unanswerable": dropped}


def rft(r: Runner, folder: str, model: str, train_pairs: str, images: str, s: LoopSettings, seed: int,
        log: str = "rft") -> str | None:
    """The RFT control: :func:`control` on the judge's *chosen* answers of the DPO pairs
    (:func:`chosen_data`), compute-matched to DPO over the same pairs. Returns the merged model
    (None without pairs)."""
    data, n_pairs = chosen_data(train_pairs)
    return control(r, folder, model, data, images, n_pairs, s, seed, log=log)


def evaluate(r: Runner, folder: str, model: str, eval_dir: str, images: str, s: LoopSettings, bench: str,
             log: str = "eval") -> dict:
    """Greedy answers to ``eval_dir/questions.jsonl`` and their LLaVA-Med scores; returns
    ``{"overall": metrics.json's overall, "folder": where they are}`` (with ``per_question.csv``)."""
    settings = keyed(r, {"model": model, "eval": eval_dir, "conv": s.conv, "max_new_tokens": s.eval_max_new_tokens})
    folder = r.resolve(folder, settings)

    def go():
        answers_file = os.path.join(folder, "answers.jsonl")
        r.run(cmd("stllava.eval.model_vqa", model_path=model,
                  question_file=os.path.join(eval_dir, "questions.jsonl"), image_folder=images,
                  answers_file=answers_file, conv_mode=s.conv, max_new_tokens=s.eval_max_new_tokens,
                  batch_size=32, device="cpu", no_progress=True), log)
        r.run(cmd("stllava.eval.metrics", gt=os.path.join(eval_dir, "test.json"), pred=answers_file,
                  out=folder, benchmark=bench), log + "_metrics")

    r.step(log, folder, settings, go)
    with open(os.path.join(folder, "metrics.json")) as f:
        return {"overall": json.load(f)["overall"], "folder": folder}

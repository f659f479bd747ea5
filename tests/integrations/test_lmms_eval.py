"""stllava.integrations.lmms_eval: the lmms-eval model and tasks answer and score as model_vqa + metrics.

The project's environment has no lmms-eval (it lives in .venv-lmms, `make lmms-eval`): the prompt,
decoding, answering, document and scoring code is tested here without it; the tests that need
lmms-eval itself skip, saying so, unless it is importable.
"""
import json
import math
import pathlib

import pytest
import torch
from PIL import Image

from stllava.eval import convert, metrics
from stllava.eval.model_vqa import build_parser, run, settings_from_args
from stllava.generation import image_prompt_text, load_rgb, render_prompt
from stllava.integrations.lmms_eval import MODEL_CLASS_PATH, TASKS_DIR
from stllava.integrations.lmms_eval.answering import (
    AdapterError,
    Answerer,
    cut_at_stops,
    load_answerer,
    prompt_for,
    settings_from_gen_kwargs,
)
from stllava.integrations.lmms_eval.benchmarks import BENCHMARKS, BenchmarkFilesError, load_docs, locate
from stllava.integrations.lmms_eval.tasks import utils as task_utils

REPO = pathlib.Path(__file__).resolve().parents[2]
ASSET = REPO / "stllava" / "assets" / "vqa_rad"
NO_LMMS = "lmms-eval is not installed in this environment (it lives in .venv-lmms: make lmms-eval)"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


def _task_yaml(name):
    """A task YAML as a dict, ``!function x`` read as the string ``"!function x"``."""
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))
    cfg = yaml.load((TASKS_DIR / name).read_text(), Loader=Loader)
    if "include" in cfg:
        cfg = {**_task_yaml(cfg.pop("include")), **cfg}
    return cfg


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """The embedded VQA-RAD subset converted as `python -m stllava.eval.convert` writes it."""
    out = tmp_path_factory.mktemp("vqa_rad")
    items, stats = convert.convert("vqa_rad", ASSET / "vqa_rad_subset.json", image_folder=ASSET / "images")
    convert.write(items, stats, out)
    env = {BENCHMARKS["vqa_rad"].dir_var: str(out), BENCHMARKS["vqa_rad"].images_var: str(ASSET / "images")}
    return {"dir": out, "env": env, "gt": metrics.load_gt(out / "test.json")}


# --- prompt and decoding ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["vicuna_v1", "llava_v1", "v1_sq"])
def test_prompt_is_model_vqas(mode):
    question = "<image> Is there a fracture? "
    assert prompt_for(question, mode) == render_prompt(mode, [(0, image_prompt_text(question)), (1, None)])
    if mode == "vicuna_v1":  # the documented rendering (docs/Evaluation.md, "Prompt")
        assert prompt_for("Is there a fracture?", mode) == f"{SYSTEM} USER: <image>\nIs there a fracture? ASSISTANT:"


def test_task_decoding_is_model_vqas_default():
    settings, until = settings_from_gen_kwargs(_task_yaml("stllava_vqa_rad.yaml")["generation_kwargs"])
    default = settings_from_args(build_parser().parse_args(["--model-path", "m", "--question-file", "q",
                                                            "--answers-file", "a"]))
    assert settings == default and until == []
    assert settings_from_gen_kwargs(None) == (default, [])


def test_gen_kwargs_mapping_and_refusals():
    s, until = settings_from_gen_kwargs({"max_new_tokens": 8, "min_new_tokens": 2, "temperature": 0.7,
                                         "top_p": 0.9, "top_k": 5, "do_sample": True, "until": "\n\n"})
    assert (s.max_new_tokens, s.min_new_tokens, s.temperature, s.top_p, s.top_k) == (8, 2, 0.7, 0.9, 5)
    assert s.do_sample and until == ["\n\n"]
    assert settings_from_gen_kwargs({"temperature": 0, "top_p": None, "do_sample": False})[0].do_sample is False
    with pytest.raises(AdapterError, match=r"\['image_aspect_ratio'\] are not supported.*fix"):
        settings_from_gen_kwargs({"image_aspect_ratio": "pad"})
    with pytest.raises(AdapterError, match="do_sample=True with temperature 0"):
        settings_from_gen_kwargs({"do_sample": True, "temperature": 0})
    with pytest.raises(AdapterError, match="invalid generation kwargs.*top_p"):
        settings_from_gen_kwargs({"temperature": 1.0, "top_p": 1.5})
    with pytest.raises(AdapterError, match="invalid generation kwargs.*temperature"):
        settings_from_gen_kwargs({"temperature": "hot"})
    with pytest.raises(AdapterError, match="until"):
        settings_from_gen_kwargs({"until": [3]})


def test_cut_at_stops():
    assert cut_at_stops("yes\n\nmore", ["\n\n"]) == "yes"
    assert cut_at_stops("a. b", ["", "."]) == "a"
    assert cut_at_stops("whole answer", []) == "whole answer"


def test_answerer_refuses_missing_checkpoint_arg():
    with pytest.raises(AdapterError, match="pretrained="):
        load_answerer("")


# --- answering: the adapter's path gives model_vqa's answers -------------------------------------
@pytest.fixture(scope="module")
def loaded(tiny_bundle):
    answerer = load_answerer(tiny_bundle["model"], device="cpu")
    return answerer


@pytest.fixture()
def vqa(tmp_path):
    g = torch.Generator().manual_seed(3)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        arr = (torch.rand(24 + 7 * i, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"img{i}.png")
    qs = [{"question_id": 10 + k, "image": f"img{k % 3}.png", "text": t}
          for k, t in enumerate(["Is there a fracture?", "What organ is shown?", "Where is the lesion?",
                                 "Is it normal?", "What is the modality?", "How many nodules?"])]
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    return {"qfile": qfile, "folder": folder, "questions": qs, "tmp": tmp_path}


def _model_vqa(tiny_bundle, vqa, answerer, *extra):
    out = vqa["tmp"] / f"answers{len(list(vqa['tmp'].glob('answers*')))}.jsonl"
    args = build_parser().parse_args([
        "--model-path", tiny_bundle["model"], "--question-file", str(vqa["qfile"]), "--image-folder",
        str(vqa["folder"]), "--answers-file", str(out), "--device", "cpu", "--no-progress", *extra])
    run(args, (answerer.tokenizer, answerer.model, answerer.image_processor))
    return [json.loads(line)["text"] for line in open(out)]


def _adapter(vqa, answerer, gen_kwargs, batch_size):
    settings, until = settings_from_gen_kwargs(gen_kwargs)
    qs = vqa["questions"]
    out = []
    for i in range(0, len(qs), batch_size):
        batch = qs[i:i + batch_size]
        out += answerer.answer([q["text"] for q in batch], [load_rgb(vqa["folder"] / q["image"]) for q in batch],
                               settings, [str(q["question_id"]) for q in batch])
    return [cut_at_stops(t, until) for t in out]


def test_answers_equal_model_vqas(tiny_bundle, loaded, vqa):
    assert loaded.conv_mode == "vicuna_v1"  # the tiny checkpoint records none: model_vqa's default
    want = _model_vqa(tiny_bundle, vqa, loaded, "--batch-size", "4", "--max-new-tokens", "8", "--min-new-tokens", "8")
    got = _adapter(vqa, loaded, {"max_new_tokens": 8, "min_new_tokens": 8, "temperature": 0, "until": []}, 4)
    assert got == want and len(set(got)) >= 3


def test_sampled_answers_equal_model_vqas(tiny_bundle, loaded, vqa):
    want = _model_vqa(tiny_bundle, vqa, loaded, "--batch-size", "2", "--max-new-tokens", "6", "--temperature", "1.0",
                      "--top-p", "0.9", "--seed", "7")
    sampler = Answerer(loaded.tokenizer, loaded.model, loaded.image_processor, loaded.conv_mode, seed=7)
    got = _adapter(vqa, sampler, {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.9, "do_sample": True}, 3)
    assert got == want


def test_recorded_conv_mode_is_used(tiny_bundle, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = json.loads((pathlib.Path(tiny_bundle["model"]) / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "conv_mode": "v1_sq"}))
    from stllava.tooling import resolve_conv_mode

    assert resolve_conv_mode(None, str(ckpt), "vicuna_v1")[0] == "v1_sq"  # what load_answerer settles on
    from stllava.tooling import ToolError

    with pytest.raises(ToolError, match="--conv-mode"):
        load_answerer(str(ckpt), conv_mode="no_such_template", device="cpu")


# --- documents ------------------------------------------------------------------------------------
def test_docs_are_the_converted_files(subset):
    docs = load_docs("vqa_rad", subset["env"])
    questions = [json.loads(line) for line in open(subset["dir"] / "questions.jsonl")]
    assert [d["question_id"] for d in docs] == [str(q["question_id"]) for q in questions]
    assert [d["question"] for d in docs] == [q["text"] for q in questions]
    assert [json.loads(d["gt"]) for d in docs] == subset["gt"]
    assert all(pathlib.Path(d["image_path"]).is_file() and isinstance(d["image_path"], str) for d in docs)
    assert task_utils.doc_to_target(docs[0]) == str(subset["gt"][0]["conversations"][1]["value"])
    assert task_utils.doc_to_text(docs[0]) == questions[0]["text"]
    assert task_utils.doc_to_visual(docs[0])[0].mode == "RGB"


def test_locate_defaults_to_run_benchmark_layout():
    assert locate("vqa_rad", {}) == ("playground/eval/vqa_rad", "playground/data/vqa_rad/images")
    assert locate("slake", {}) == ("playground/eval/slake", "playground/data/slake/imgs")
    assert locate("pvqa", {"STLLAVA_LMMS_PVQA_DIR": "/x"}) == ("/x", "playground/data/pvqa/images/test")
    with pytest.raises(BenchmarkFilesError, match="unknown benchmark 'mimic'"):
        locate("mimic", {})


def test_doc_refusals_name_the_fix(subset, tmp_path):
    with pytest.raises(BenchmarkFilesError, match=r"questions.jsonl: not found; fix: python -m stllava.eval.convert "
                                                  r"vqa_rad .*STLLAVA_LMMS_VQA_RAD_DIR"):
        load_docs("vqa_rad", {"STLLAVA_LMMS_VQA_RAD_DIR": str(tmp_path)})
    n = len(subset["gt"])
    with pytest.raises(BenchmarkFilesError, match=rf"line 1 \(question_id .*\): image 'synpic.*' not found in "
                                                  rf".*{n} of {n} questions.*STLLAVA_LMMS_VQA_RAD_IMAGES"):
        load_docs("vqa_rad", {**subset["env"], "STLLAVA_LMMS_VQA_RAD_IMAGES": str(tmp_path)})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "questions.jsonl").write_text((subset["dir"] / "questions.jsonl").read_text())
    (bad / "test.json").write_text(json.dumps(subset["gt"][1:]))
    with pytest.raises(BenchmarkFilesError, match=f"do not pair up .*{n} questions, {n - 1}"):
        load_docs("vqa_rad", {**subset["env"], "STLLAVA_LMMS_VQA_RAD_DIR": str(bad)})
    (bad / "questions.jsonl").write_text("")
    with pytest.raises(BenchmarkFilesError, match="questions.jsonl: no questions; fix: point STLLAVA_LMMS_VQA_RAD_DIR"):
        load_docs("vqa_rad", {**subset["env"], "STLLAVA_LMMS_VQA_RAD_DIR": str(bad)})


# --- scoring: the task's numbers are stllava.eval.metrics' ----------------------------------------
def _predictions(gt):
    """Answers of every kind: the reference, yes/no, partial and wrong words, empty."""
    kinds = [lambda a: a, lambda a: "yes", lambda a: "no, it is not", lambda a: f"the {a} left left",
             lambda a: "", lambda a: "left lung. 3.5 cm", lambda a: a.upper() + "."]
    return [kinds[i % len(kinds)](str(g["conversations"][1]["value"])) for i, g in enumerate(gt)]


def test_aggregations_are_the_projects_scores(subset):
    docs = load_docs("vqa_rad", subset["env"])
    preds = _predictions(subset["gt"])
    items = [task_utils.process_results(d, [p]) for d, p in zip(docs, preds)]
    want = metrics.score(subset["gt"], [{"question_id": g["id"], "text": p} for g, p in zip(subset["gt"], preds)])
    cfg = _task_yaml("stllava_vqa_rad.yaml")
    assert [m["metric"] for m in cfg["metric_list"]] == list(task_utils.METRICS)
    for entry in cfg["metric_list"]:
        name = entry["metric"]
        agg = getattr(task_utils, entry["aggregation"].removeprefix("!function utils."))
        assert agg([it[name] for it in items]) == want["overall"][name]  # bit for bit, not approx
    assert 0 < want["overall"]["open_recall"] < 100 and 0 < want["overall"]["closed_acc"] < 100


def test_empty_category_is_nan(subset):
    docs = [d for d in load_docs("vqa_rad", subset["env"]) if d["answer_type"] == "CLOSED"][:5]
    items = [task_utils.process_results(d, ["yes"])["open_recall"] for d in docs]
    assert math.isnan(task_utils.open_recall(items)) and not math.isnan(task_utils.closed_acc(items))


# --- the files lmms-eval reads ----------------------------------------------------------------------
def test_task_yamls_and_registration():
    for name in BENCHMARKS:
        cfg = _task_yaml(f"stllava_{name}.yaml")
        assert cfg["task"] == f"stllava_{name}" and cfg["dataset_kwargs"] == {"benchmark": name}
        assert cfg["class"] == "!function stllava.integrations.lmms_eval.task.LocalVQATask"
        for key in ("doc_to_visual", "doc_to_text", "doc_to_target", "process_results"):
            assert callable(getattr(task_utils, cfg[key].removeprefix("!function utils.")))
    pyproject = (REPO / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; the project supports 3.10)
    assert '[project.entry-points."lmms_eval.models"]\nstllava = "stllava.integrations.lmms_eval:model_manifest"\n' \
        in pyproject
    module, cls = MODEL_CLASS_PATH.rsplit(".", 1)
    source = (REPO / (module.replace(".", "/") + ".py")).read_text()
    assert f"class {cls}(lmms)" in source


# --- with lmms-eval installed (.venv-lmms) -----------------------------------------------------------
class _Request:
    def __init__(self, args):
        self.args = args


def test_lmms_eval_model_and_task(tiny_bundle, subset, monkeypatch, vqa):
    pytest.importorskip("lmms_eval", reason=NO_LMMS)
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager, get_task_dict

    cls = get_model("stllava")  # through this project's entry point
    assert f"{cls.__module__}.{cls.__name__}" == MODEL_CLASS_PATH
    for key, value in subset["env"].items():
        monkeypatch.setenv(key, value)
    task = get_task_dict(["stllava_vqa_rad"], TaskManager(include_path=str(TASKS_DIR)))["stllava_vqa_rad"]
    assert type(task).__name__ == "LocalVQATask"
    docs = list(task.test_docs())
    assert [d["question_id"] for d in docs] == [str(g["id"]) for g in subset["gt"]]
    assert task.doc_to_text(docs[0]) == docs[0]["question"] and task.config.generation_kwargs["until"] == []

    model = cls.create_from_arg_string(f"pretrained={tiny_bundle['model']},device=cpu", {"batch_size": 4})
    docs = [{"question_id": str(q["question_id"]), "image_path": str(vqa["folder"] / q["image"])}
            for q in vqa["questions"]]
    model.task_dict = {"t": {"test": docs}}
    gen = {"max_new_tokens": 8, "min_new_tokens": 8, "temperature": 0, "until": []}
    reqs = [_Request((q["text"], dict(gen), task_utils.doc_to_visual, i, "t", "test"))
            for i, q in enumerate(vqa["questions"])]
    want = _model_vqa(tiny_bundle, vqa, model.answerer, "--batch-size", "4", "--max-new-tokens", "8",
                      "--min-new-tokens", "8")
    assert model.generate_until(reqs) == want
    with pytest.raises(NotImplementedError, match="generate_until tasks only"):
        model.loglikelihood(reqs)


# --- the check behind `make lmms-eval` ---------------------------------------------------------------
def test_check_reads_lmms_eval_output_and_compares(subset, tmp_path):
    from stllava.integrations.lmms_eval import check

    gt = subset["gt"][:4]
    answers = {str(g["id"]): t for g, t in zip(gt, ["yes", "no", "", "left lung"])}
    ours = metrics.score(gt, [{"question_id": q, "text": t} for q, t in answers.items()])["overall"]
    run_dir = tmp_path / "lmms" / "stllava"
    run_dir.mkdir(parents=True)
    values = {f"{m},none": (float("nan") if ours[m] is None else ours[m]) for m in task_utils.METRICS}
    (run_dir / "20260101_results.json").write_text(json.dumps({"results": {check.TASK: values}}))
    (run_dir / f"20260101_samples_{check.TASK}.jsonl").write_text("".join(
        json.dumps({"doc_id": i, "filtered_resps": t, "open_recall": {"gt": json.dumps(g), "prediction": t}}) + "\n"
        for i, (g, t) in enumerate(zip(gt, answers.values()))))
    theirs, their_answers = check.lmms_results(str(tmp_path / "lmms"))
    assert their_answers == answers
    result = check.compare(ours, theirs, answers, their_answers, gt)
    assert result["ok"] and result["answers_identical"] == 4
    assert "| open_recall |" in check.render(result)
    other = dict(their_answers, **{str(gt[0]["id"]): "no"})
    changed = check.compare(ours, theirs, answers, other, gt)
    assert not changed["ok"] and changed["answers_differing"] == [str(gt[0]["id"])]


def test_check_cli_flags(capsys, tmp_path):
    from stllava.integrations.lmms_eval import check

    parser = check.build_parser()
    assert parser.prog == "python -m stllava.integrations.lmms_eval.check"
    assert all(a.help for a in parser._actions)
    assert check.main(["--out", str(tmp_path / "out"), "--src", "/no/such/file.json"]) == 1  # convert fails: named, exit 1
    assert "stllava.eval.convert exited 2" in capsys.readouterr().err

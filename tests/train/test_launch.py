"""stllava.train.launch and the training command lines: start-up, flags, --help, one-line errors."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from stllava.errors import StllavaError
from stllava.train import launch
from stllava.train.arguments import FlagError, LlavaArgumentParser, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("RANK", None)
WORLD = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback applies without CUDA")
def test_cpu_fallback_adds_use_cpu_unless_given():
    assert launch._prepare_argv(["--seed", "1"]) == ["--seed", "1", "--use_cpu", "True"]
    assert launch._prepare_argv(["--use_cpu=False"]) == ["--use_cpu=False"]
    assert launch._prepare_argv(["--use_cpu", "False"]) == ["--use_cpu", "False"]


def test_one_process_world_only_for_deepspeed_without_a_launcher(monkeypatch):
    for k in WORLD:  # setenv first, so that monkeypatch restores (removes) what the call sets
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    launch._single_process_env(["--lora_enable", "True"])
    assert not any(k in os.environ for k in WORLD)  # no --deepspeed: nothing to describe
    launch._single_process_env(["--deepspeed=scripts/zero3.json"])
    assert [os.environ[k] for k in WORLD[:5]] == ["0", "0", "1", "1", "127.0.0.1"]
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    launch._single_process_env(["--deepspeed", "scripts/zero3.json"])
    assert os.environ["RANK"] == "1" and os.environ["MASTER_PORT"] == "29500"  # a launcher's world is kept


@pytest.mark.parametrize("value,expected", [(None, None), ("", None), ("false", None), ("False", None),
                                            ("true", True), ("TRUE", True), ("out/checkpoint-3", "out/checkpoint-3")])
def test_resume_from_checkpoint(value, expected):
    assert launch.resume_from_checkpoint(SimpleNamespace(resume_from_checkpoint=value)) == expected


def test_prepare_run_checks_before_any_process_group_and_seeds(tmp_path):
    data = tmp_path / "d.json"
    data.write_text("[]")
    argv = ["--model_name_or_path", "m", "--data_path", str(data), "--output_dir", str(tmp_path / "o"),
            "--report_to", "none", "--seed", "5"]
    seen = []
    m, d, t = launch.prepare_run(argv, parse_args, check=lambda *a: seen.append(a))
    assert len(seen) == 1 and seen[0][0] is m and seen[0][2] is t and t.seed == 5
    drawn = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(4))  # the run is seeded with --seed
    assert t.use_cpu or torch.cuda.is_available()
    with pytest.raises(FlagError, match=r"--sq_r must be in \[0, 1\], got 2.0"):
        launch.prepare_run(argv + ["--sq_r", "2"], parse_args)
    with pytest.raises(FlagError, match="--data_path .*nope.json does not exist"):
        launch.prepare_run([a.replace("d.json", "nope.json") for a in argv], parse_args)

    def refuse(*_):
        raise FlagError("refused by the entry point")

    with pytest.raises(FlagError, match="refused by the entry point"):
        launch.prepare_run(argv, parse_args, check=refuse)
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


@pytest.mark.parametrize("flags,main,replica", [
    ([], "INFO", "WARNING"),  # transformers' defaults: passive (= INFO here) and warning
    (["--log_level", "debug"], "DEBUG", "WARNING"),
    (["--log-level", "error", "--log_level_replica", "info"], "ERROR", "INFO"),
])
def test_training_logs_at_transformers_log_level_flags(flags, main, replica, tmp_path):
    import logging

    t = parse_args(["--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(tmp_path), *flags])[2]
    names = ("stllava", "transformers.trainer")
    before = {n: logging.getLogger(n).level for n in names}
    try:
        for should_log, want in ((True, main), (False, replica)):
            launch._setup_logging(SimpleNamespace(log_level=t.log_level, log_level_replica=t.log_level_replica,
                                                  should_log=should_log))
            assert logging.getLevelName(logging.getLogger("stllava").level) == want
    finally:
        for n in names:
            logging.getLogger(n).setLevel(before[n])


def test_training_refuses_an_unknown_log_level(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        parse_args(["--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(tmp_path),
                    "--log_level", "TRACE"])
    assert e.value.code == 2 and "invalid choice: 'TRACE'" in capsys.readouterr().err


def test_entry_point_prints_one_line_on_rank_0_only(capsys, monkeypatch):
    def bad(argv):
        raise StllavaError("2 records are bad", file="d.json", fix="pass --on_bad_sample skip")

    monkeypatch.delenv("RANK", raising=False)
    assert launch.run_entry_point(bad, []) == 2
    assert capsys.readouterr().err == "error: d.json: 2 records are bad; fix: pass --on_bad_sample skip\n"
    monkeypatch.setenv("RANK", "1")  # another rank of a launcher: the same error, printed once by rank 0
    with pytest.raises(SystemExit) as e:
        launch.run_entry_point(bad, [])
    assert e.value.code == 2 and capsys.readouterr().err == ""
    got = []
    monkeypatch.setattr(sys, "argv", ["train_sft.py", "--seed", "1"])
    assert launch.run_entry_point(got.extend) == 0 and got == ["--seed", "1"]  # default: sys.argv[1:]
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        launch.run_entry_point(lambda argv: 1 / 0, [])


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_train_sft_help_lists_this_projects_flags_first():
    proc = _run("-m", "stllava.train.train_sft", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("usage: python -m stllava.train.train_sft --model_name_or_path M --data_path F")
    order = [out.index(t) for t in ("\nmodel (stllava)", "\ndata (stllava)", "\ntraining (stllava)",
                                    "\ninherited from transformers.TrainingArguments")]
    assert order == sorted(order)
    ours = out[:order[-1]]
    for flag in ("--version", "--on_bad_sample", "--sq_r", "--lora_r_vit", "--vision_tower_lr", "--mm_projector_lr"):
        assert f"\n  {flag} " in ours, flag
    assert "\n  --learning_rate " in out[order[-1]:]  # a Trainer flag, after ours


def test_train_dpo_help_and_every_flag_has_a_help_text(capsys):
    from stllava.train.arguments import DPOModelArguments, DPOTrainingArguments, parse_dpo_args

    with pytest.raises(SystemExit) as e:
        parse_dpo_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: python -m stllava.train.train_dpo ")
    assert out.index("\nDPO (stllava)") < out.index("\ninherited from transformers.TrainingArguments")
    assert out.count("\ninherited from") == 1 and "\n  --dpo_beta " in out and "\n  --model_base " in out
    from stllava.train.arguments import DataArguments, ModelArguments, TrainingArguments

    for types in ((ModelArguments, DataArguments, TrainingArguments),
                  (DPOModelArguments, DataArguments, DPOTrainingArguments)):
        parser = LlavaArgumentParser(types, "prog")
        no_help = [a.option_strings for a in parser._actions if not (a.help or "").strip()]
        assert not no_help


def _bad_data(tmp_path, tiny_bundle):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 20), "red").save(tmp_path / "img" / "a.png")
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"id": "ok", "image": "a.png", "conversations": conv},
                                {"id": "gone", "image": "missing.png", "conversations": conv}]))
    return ["--model_name_or_path", tiny_bundle["model"], "--data_path", str(data), "--image_folder",
            str(tmp_path / "img"), "--output_dir", str(tmp_path / "out"), "--report_to", "none",
            "--max_steps", "1", "--verify_workers", "1"]


def test_bad_input_is_one_error_line_with_exit_code_2(tmp_path, tiny_bundle):
    """train_sft on bad data, and on a missing data file: the message, no traceback, exit code 2."""
    argv = _bad_data(tmp_path, tiny_bundle)
    proc = _run("-m", "stllava.train.train_sft", *argv)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: the training data has bad records:"]
    assert "record 1 (id 'gone'): missing image" in proc.stderr and "--on_bad_sample skip" in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "adapter_model.safetensors")

    k = argv.index("--data_path")
    argv[k + 1] = str(tmp_path / "nope.json")
    proc = _run("-m", "stllava.train.train_dpo", *argv)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: --data_path {tmp_path / 'nope.json'} does not exist; "
                                                    "give the training data file (a JSON list or JSONL of records)")


@pytest.mark.parametrize("what", ["folder", "device"])
def test_a_data_path_that_is_not_a_file_is_named_before_anything_loads(tmp_path, what, capsys):
    from stllava.train.train_sft import main

    path = str(tmp_path) if what == "folder" else "/dev/zero"
    (tmp_path / "train.json").write_text("[]")
    argv = ["--model_name_or_path", str(tmp_path / "no_model"), "--data_path", path, "--output_dir",
            str(tmp_path / "out"), "--report_to", "none"]
    assert main(argv) == 2
    why = "is a folder, not a file (it holds train.json)" if what == "folder" else \
        "is not a regular file (a character device, which may never end)"
    assert capsys.readouterr().err == (f"error: --data_path {path} {why}; give the training data file (a JSON list "
                                       "or JSONL of records)\n")


def test_data_without_a_usable_record_is_one_line(tmp_path, tiny_bundle, capsys):
    """Before: a ValueError traceback (after the tokenizer and image processor loaded)."""
    from stllava.train.train_sft import main

    data = tmp_path / "empty.json"
    data.write_text("[]")
    assert main(["--model_name_or_path", tiny_bundle["model"], "--data_path", str(data), "--output_dir",
                 str(tmp_path / "out"), "--report_to", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}: no usable records (0 in the file, 0 skipped as bad); nothing to train on.")
    assert err.count("\n") == 1


@pytest.mark.parametrize("script", ["sqllava_med.sh", "dpo_finetune.sh"])
def test_launch_scripts_name_a_missing_input_before_starting_anything(tmp_path, tiny_bundle, script):
    """A MODEL / VISION_TOWER / PROJECTOR / DATA / IMAGES path that does not exist: one line naming the
    variable, exit status 2, before any launcher or Python starts (no hub retries from every rank)."""
    from stllava.toys import write_colour_dataset

    data, images = write_colour_dataset(str(tmp_path / "d"), n=2)
    good = {"MODEL": tiny_bundle["model"], "VISION_TOWER": tiny_bundle["vision_tower"], "PROJECTOR": "",
            "MODEL_BASE": "", "DATA": data, "IMAGES": images, "OUT": str(tmp_path / "out"),
            "LAUNCHER": "python", "PYTHON": "/nonexistent/python"}  # reaching the launcher would fail otherwise
    cases = {"MODEL": str(tmp_path / "no-model"), "VISION_TOWER": "./checkpoints/no-tower",
             "PROJECTOR": str(tmp_path / "mm_projector.bin"), "DATA": str(tmp_path / "no.json"),
             "IMAGES": str(tmp_path / "no-images")}
    if script == "dpo_finetune.sh":
        cases["MODEL_BASE"] = str(tmp_path / "no-base")
    for var, value in cases.items():
        env = {**ENV, **good, var: value, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(["bash", os.path.join(REPO, script)], cwd=str(tmp_path), env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (var, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{script}: error: {var}={value} is not an existing "), lines
        assert proc.stdout == ""
    # a hub id passes the check when the hub may be reached; offline it is refused the same way
    env = {**ENV, **good, "VISION_TOWER": "openai/clip-vit-large-patch14-336", "HF_HUB_OFFLINE": "0"}
    proc = subprocess.run(["bash", os.path.join(REPO, script)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 2 and "/nonexistent/python" in proc.stderr  # it got as far as the launcher

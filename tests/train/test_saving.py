"""Training never loses or destroys weights (issue 21, docs/BadInputs.md): checkpoints are written
aside and renamed when complete, resume skips a checkpoint whose files are cut short, a full disk at
the final save is one line saying what is saved where and how to redo only the save, and an
unusable --output_dir is refused before anything loads."""
import errno
import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from stllava.train import arguments, saving
from stllava.train.finish import train_and_save
from stllava.train.manifest import IncompleteCheckpointError, write_manifest
from stllava.train.saving import STAGING, DiskFullError
from stllava.train.train_sft import main, run_sft


def fake_checkpoint(out, step):
    """A checkpoint-N folder holding real files of each kind a resume reads, and its manifest."""
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.full((64, 64), float(step))}, str(ckpt / "adapter_model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.ones(64, 64)}}}, str(ckpt / "optimizer.pt"))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    write_manifest(str(ckpt))
    return ckpt


def cut(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class StubTrainer:
    """Stops where training would begin, with the checkpoint it was asked to resume from."""

    def __init__(self, out, resume, deepspeed=None, trust=False):
        self.args = SimpleNamespace(output_dir=str(out), resume_from_checkpoint=resume, deepspeed=deepspeed,
                                    trust_resume_checkpoint=trust)

    def train(self, resume_from_checkpoint=None):
        raise StopIteration(resume_from_checkpoint)


def resumed_from(trainer):
    with pytest.raises(StopIteration) as stop:
        train_and_save(trainer, "test")
    return stop.value.args[0]


@pytest.mark.parametrize("deepspeed", [None, "zero3.json"])
@pytest.mark.parametrize("trust", [False, True])
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.pt"])
def test_resume_true_skips_a_cut_short_newest_checkpoint(tmp_path, caplog, deepspeed, trust, name):
    """Before: a traceback from torch/safetensors (with --trust_resume_checkpoint True or without
    DeepSpeed), or a refusal that never looked at the checkpoint before."""
    fake_checkpoint(tmp_path, 1)
    newest = fake_checkpoint(tmp_path, 2)
    cut(newest / name)
    (tmp_path / STAGING / "checkpoint-3").mkdir(parents=True)  # a save that never finished: not a candidate
    with caplog.at_level(logging.WARNING, logger="stllava"):
        got = resumed_from(StubTrainer(tmp_path, "True", deepspeed, trust))
    assert got == str(tmp_path / "checkpoint-1")
    warning = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warning) == 1 and str(newest / name) in warning[0] and "cut short" in warning[0]
    assert f"resuming from {tmp_path / 'checkpoint-1'}" in warning[0]


def test_resume_true_fails_naming_the_file_when_no_checkpoint_is_complete(tmp_path):
    for step in (1, 2):
        cut(fake_checkpoint(tmp_path, step) / "optimizer.pt")
    with pytest.raises(IncompleteCheckpointError) as e:
        train_and_save(StubTrainer(tmp_path, "True", trust=True), "test")
    msg = str(e.value)
    assert str(tmp_path / "checkpoint-2" / "optimizer.pt") in msg and "cut short" in msg and "\n" not in msg
    assert msg.startswith(f"--resume_from_checkpoint True: no complete checkpoint in {tmp_path}")
    assert "fix: start without --resume_from_checkpoint" in msg


def test_an_explicit_cut_short_checkpoint_is_named_with_the_last_complete_one(tmp_path):
    fake_checkpoint(tmp_path, 1)
    newest = fake_checkpoint(tmp_path, 2)
    cut(newest / "adapter_model.safetensors")
    with pytest.raises(IncompleteCheckpointError) as e:
        train_and_save(StubTrainer(tmp_path, str(newest), trust=True), "test")
    msg = str(e.value)
    assert msg.startswith(f"cannot resume from {newest}: {newest / 'adapter_model.safetensors'} is cut short")
    assert f"fix: resume from {tmp_path / 'checkpoint-1'} (the last complete checkpoint)" in msg


def test_a_checkpoint_without_trainer_state_is_incomplete(tmp_path):
    fake_checkpoint(tmp_path, 1)
    newest = fake_checkpoint(tmp_path, 2)
    (newest / "trainer_state.json").unlink()
    assert resumed_from(StubTrainer(tmp_path, "True")) == str(tmp_path / "checkpoint-1")


# ---------------------------------------------------------------------------------------------
# The final save

class SaveStub:
    """What save_final needs of a trainer: a model to size, and the two writes."""

    def __init__(self, out, steps=(4, 4)):
        self.model = torch.nn.Linear(256, 256)  # 263,168 bytes of float32 weights
        self.args = SimpleNamespace(output_dir=str(out), should_save=True, tune_mm_mlp_adapter=False)
        self.state = SimpleNamespace(global_step=steps[0], max_steps=steps[1])
        self.calls = []

    def save_model(self, output_dir):
        self.calls.append(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        (open(os.path.join(output_dir, "model.safetensors"), "wb")).write(b"w" * 100)

    def save_state(self):
        self.calls.append("state")


def test_free_space_is_checked_before_the_final_save(tmp_path, monkeypatch):
    fake_checkpoint(tmp_path, 4)
    monkeypatch.setattr(saving.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=900))
    trainer = SaveStub(tmp_path)
    with pytest.raises(DiskFullError) as e:
        saving.save_final(trainer)
    assert trainer.calls == []  # nothing written
    msg = str(e.value)
    assert msg.startswith(f"not enough free space for the final checkpoint in {tmp_path}: about ")
    assert "to write, 900 B free; nothing was written; the trained weights are safe in " \
        f"{tmp_path / 'checkpoint-4'} (step 4, the last)" in msg
    assert msg.endswith("then run the same command with --resume_from_checkpoint True: it trains nothing and "
                        "redoes only the save") and "\n" not in msg


def test_the_final_save_is_moved_into_place_when_complete(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"old")
    trainer = SaveStub(tmp_path)
    saving.save_final(trainer)
    assert trainer.calls == [str(tmp_path / STAGING / tmp_path.name), "state"]
    assert (tmp_path / "model.safetensors").read_bytes() == b"w" * 100 and not (tmp_path / STAGING).exists()


# ---------------------------------------------------------------------------------------------
# Real runs

def run_args(tiny_bundle, captions, out, *extra):
    return ["--model_name_or_path", tiny_bundle["model"], "--data_path", captions["data"], "--image_folder",
            captions["images"], "--output_dir", str(out), "--report_to", "none", "--version", "v1", "--lora_enable",
            "True", "--lora_r", "4", "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_strategy",
            "steps", "--model_max_length", "256", "--verify_workers", "1", "--logging_steps", "1", *extra]


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    from stllava.toys import write_colour_dataset

    data, images = write_colour_dataset(str(tmp_path_factory.mktemp("captions")), n=8)
    return {"data": data, "images": images}


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_checkpoint_save_cut_by_a_full_disk_leaves_no_checkpoint_and_resume_takes_the_last(
        tiny_bundle, captions, tmp_path, monkeypatch):
    from stllava.train.trainer import LLaVATrainer

    out = tmp_path / "out"
    real = LLaVATrainer._save_optimizer_and_scheduler

    def cut_at_step_2(self, output_dir):
        real(self, output_dir)
        if self.state.global_step == 2:
            cut(__import__("pathlib").Path(output_dir) / "optimizer.pt")
            disk_full()

    monkeypatch.setattr(LLaVATrainer, "_save_optimizer_and_scheduler", cut_at_step_2)
    with pytest.raises(DiskFullError) as e:
        run_sft(run_args(tiny_bundle, captions, out, "--save_steps", "1"))
    msg = str(e.value)
    assert msg.startswith(f"no space left on the disk while saving {out / 'checkpoint-2'}") and "\n" not in msg
    assert f"the last complete checkpoint is {out / 'checkpoint-1'} (step 1 of 2)" in msg
    assert sorted(os.listdir(out)) == ["checkpoint-1"]  # no half checkpoint-2, no staging folder left
    monkeypatch.undo()

    run_sft(run_args(tiny_bundle, captions, out, "--save_steps", "1", "--resume_from_checkpoint", "True"))
    state = json.load(open(out / "trainer_state.json"))
    assert state["global_step"] == 2 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]
    assert os.path.isfile(out / "checkpoint-2" / "stllava_manifest.json")


def test_disk_full_at_the_final_save_is_one_line_and_resume_redoes_only_the_save(
        tiny_bundle, captions, tmp_path, monkeypatch, capsys):
    """Before: a traceback, and the final folder's files half written."""
    import stllava.train.trainer as trainer_module

    out = tmp_path / "out"
    real = trainer_module.save_llava_checkpoint

    def full_at_the_final_save(model, state, output_dir, **kwargs):
        if os.path.basename(os.path.dirname(output_dir)) == STAGING and os.path.basename(output_dir) == "out":
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, "adapter_model.safetensors"), "wb") as f:
                f.write(b"half a file")
            disk_full()
        return real(model, state, output_dir, **kwargs)

    monkeypatch.setattr(trainer_module, "save_llava_checkpoint", full_at_the_final_save)
    argv = run_args(tiny_bundle, captions, out, "--save_steps", "2")
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"error: no space left on the disk while saving the final checkpoint to {out} (")
    assert (f"the partial files were removed; the trained weights are safe in {out / 'checkpoint-2'} (step 2, the "
            "last)") in lines[0]
    assert lines[0].endswith("then run the same command with --resume_from_checkpoint True: it trains nothing and "
                             "redoes only the save")
    assert not os.path.exists(out / "adapter_model.safetensors") and not os.path.exists(out / STAGING)
    monkeypatch.undo()

    assert main(argv + ["--resume_from_checkpoint", "True"]) == 0
    final = load_file(out / "adapter_model.safetensors")
    saved = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in saved)
    state = json.load(open(out / "trainer_state.json"))
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]  # nothing trained again


# ---------------------------------------------------------------------------------------------
# --output_dir

@pytest.mark.parametrize("what", ["file", "read_only", "under_a_file"])
def test_an_unusable_output_dir_is_refused_before_anything_loads(tmp_path, monkeypatch, capsys, what):
    data = tmp_path / "d.json"
    data.write_text("[]")
    out = tmp_path / "out"
    if what == "file":
        out.write_text("not a folder")
    elif what == "under_a_file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "out"
    else:
        out.mkdir()
        out.chmod(0o555)
        if os.geteuid() == 0:  # root writes through permission bits: the file system refuses instead
            def refuse(*args, **kwargs):
                raise PermissionError(errno.EROFS, "Read-only file system")
            monkeypatch.setattr(arguments.tempfile, "TemporaryFile", refuse)
    argv = ["--model_name_or_path", str(tmp_path / "no_model"), "--data_path", str(data), "--output_dir", str(out),
            "--report_to", "none"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    want = {"file": f"error: --output_dir {out} is a file, not a folder; give a folder for the checkpoints\n",
            "under_a_file": f"error: --output_dir {out} cannot be created: {tmp_path / 'f'} is a file, not a folder; "
                            "give a folder you can write to\n"}
    if what in want:
        assert err == want[what]
    else:
        assert err.startswith(f"error: --output_dir {out} cannot be written (") and err.endswith(
            "); give a folder you can write to\n")

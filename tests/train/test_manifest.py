"""The checkpoint manifest: written at every save, checked before a DeepSpeed resume, which
unpickles checkpoint files (a planted file would run its payload)."""
import os
import pickle
from types import SimpleNamespace

import pytest

from stllava.train.finish import train_and_save
from stllava.train.manifest import (
    MANIFEST,
    UntrustedCheckpointError,
    check_manifest,
    verify_resume_checkpoint,
    write_manifest,
)


class Payload:
    """What a planted ``*_model_states.pt`` holds: unpickling it runs code (here: touch a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    (ckpt / "global_step3").mkdir(parents=True)
    (ckpt / "global_step3" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"states" * 100)
    (ckpt / "latest").write_text("global_step3")
    (ckpt / "trainer_state.json").write_text("{}")
    write_manifest(str(ckpt))
    return ckpt


def test_a_saved_checkpoint_matches_its_manifest(tmp_path):
    ckpt = checkpoint(tmp_path)
    assert check_manifest(str(ckpt)) is None
    verify_resume_checkpoint(str(ckpt))  # no error


@pytest.mark.parametrize("tamper,expected", [
    ("plant", "global_step3/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt is not in the checkpoint's manifest"),
    ("replace", "global_step3/zero_pp_rank_0_mp_rank_00_model_states.pt changed since the checkpoint was saved"),
    ("delete", "latest is listed in the manifest but missing"),
    ("no_manifest", f"{MANIFEST} does not exist"),
    ("bad_manifest", f"{MANIFEST} is not a readable manifest"),
])
def test_a_changed_or_unknown_file_is_named_and_never_unpickled(tmp_path, tamper, expected):
    ckpt = checkpoint(tmp_path)
    marker = tmp_path / "payload_ran"
    states = ckpt / "global_step3" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if tamper == "plant":
        (ckpt / "global_step3" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(
            pickle.dumps(Payload(str(marker))))
    elif tamper == "replace":
        states.write_bytes(pickle.dumps(Payload(str(marker))))
    elif tamper == "delete":
        (ckpt / "latest").unlink()
    elif tamper == "no_manifest":
        (ckpt / MANIFEST).unlink()
    else:
        (ckpt / MANIFEST).write_text("{not json")
    assert expected in check_manifest(str(ckpt))
    with pytest.raises(UntrustedCheckpointError) as err:
        verify_resume_checkpoint(str(ckpt))
    msg = str(err.value)
    assert msg.startswith(f"refusing to resume from {ckpt}: ") and expected in msg
    assert "--trust_resume_checkpoint True" in msg and "\n" not in msg
    assert not marker.exists()
    verify_resume_checkpoint(str(ckpt), trust=True)  # the explicit override
    if tamper == "replace":  # what DeepSpeed's torch.load(weights_only=False) would have done
        with open(states, "rb") as f:
            pickle.load(f).close()
        assert marker.exists()


def test_the_run_checks_only_a_deepspeed_resume(tmp_path):
    ckpt = checkpoint(tmp_path)
    (ckpt / "latest").write_text("changed")

    class Trainer:  # stops right where training would begin
        def __init__(self, **args):
            self.args = SimpleNamespace(output_dir=str(tmp_path), trust_resume_checkpoint=False, **args)

        def train(self, resume_from_checkpoint=None):
            raise StopIteration(resume_from_checkpoint)

    with pytest.raises(UntrustedCheckpointError, match="latest changed since"):
        train_and_save(Trainer(deepspeed="zero3.json", resume_from_checkpoint=str(ckpt)), "test")
    with pytest.raises(UntrustedCheckpointError, match="latest changed since"):  # "True": the last checkpoint
        train_and_save(Trainer(deepspeed="zero3.json", resume_from_checkpoint="True"), "test")
    with pytest.raises(StopIteration, match="checkpoint-3"):  # without DeepSpeed the loads are weights_only
        train_and_save(Trainer(deepspeed=None, resume_from_checkpoint=str(ckpt)), "test")
    t = Trainer(deepspeed="zero3.json", resume_from_checkpoint=str(ckpt))
    t.args.trust_resume_checkpoint = True
    with pytest.raises(StopIteration):
        train_and_save(t, "test")
    assert os.path.isfile(ckpt / MANIFEST)

"""Several nodes through the two launch scripts (scripts/launch_common.sh): the commands each launcher
gets, and two torchrun "nodes" on 127.0.0.1 (one rank each, gloo, ZeRO-3) that train exactly like one
node with two ranks — same losses, same saved weights — for sqllava_med.sh and dpo_finetune.sh."""
import json
import os
import shlex
import signal
import socket
import subprocess
import sys

import pytest
import ranks
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
for _k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES",
           "NODE_RANK", "HOSTFILE", "NO_SSH"):
    ENV.pop(_k, None)


def launch_command(env: dict) -> list[str]:
    """The ``launch`` array select_launcher builds under ``env`` (or its error: exit status, stderr)."""
    script = ("set -euo pipefail; NUM_GPUS=${NUM_GPUS:-2}; source ./scripts/launch_common.sh; "
              "select_launcher train_sft; printf '%s\\n' \"${launch[@]}\"")
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env={**ENV, **env}, capture_output=True, text=True,
                          timeout=30)
    if proc.returncode:
        return [f"exit {proc.returncode}", proc.stderr.strip()]
    return proc.stdout.splitlines()


def test_single_node_commands_are_unchanged():
    assert launch_command({"LAUNCHER": "torchrun", "PYTHON": "py"}) == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "stllava/train/train_sft.py"]
    assert launch_command({"LAUNCHER": "deepspeed"}) == ["deepspeed", "--num_gpus", "2", "stllava/train/train_sft.py"]
    assert launch_command({"LAUNCHER": "python", "PYTHON": "py"}) == ["py", "-m", "stllava.train.train_sft"]


def test_torchrun_on_several_nodes():
    cmd = launch_command({"LAUNCHER": "torchrun", "PYTHON": "py", "NNODES": "4", "NODE_RANK": "3",
                          "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600", "NUM_GPUS": "8"})
    assert cmd == ["py", "-m", "torch.distributed.run", "--nnodes", "4", "--node_rank", "3", "--master_addr",
                   "10.0.0.1", "--master_port", "29600", "--nproc_per_node", "8", "stllava/train/train_sft.py"]
    # torchrun itself accepts exactly these options
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(cmd[3:])
    assert (args.nnodes, args.node_rank, args.master_addr, args.master_port, args.nproc_per_node) == \
        ("4", 3, "10.0.0.1", 29600, "8")


def test_deepspeed_on_several_nodes(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    env = {"LAUNCHER": "deepspeed", "NNODES": "2", "MASTER_ADDR": "node-a", "MASTER_PORT": "29600",
           "NUM_GPUS": "8", "HOSTFILE": str(hostfile)}
    over_ssh = launch_command(env)
    assert over_ssh == ["deepspeed", "--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "8",
                        "--master_addr", "node-a", "--master_port", "29600", "stllava/train/train_sft.py"]
    per_node = launch_command({**env, "NO_SSH": "1", "NODE_RANK": "1"})
    assert per_node == over_ssh[:-1] + ["--no_ssh", "--node_rank", "1", "stllava/train/train_sft.py"]
    # DeepSpeed's own launcher parses them as meant
    from deepspeed.launcher.runner import parse_args

    a = parse_args(per_node[1:])
    assert (a.hostfile, a.num_nodes, a.num_gpus, a.master_addr, a.master_port, a.no_ssh, a.node_rank,
            a.user_script) == (str(hostfile), 2, 8, "node-a", 29600, True, 1, "stllava/train/train_sft.py")


@pytest.mark.parametrize("env,message", [
    ({"LAUNCHER": "deepspeed", "NNODES": "2"}, "needs HOSTFILE"),
    ({"LAUNCHER": "torchrun", "NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2 is not in [0, NNODES=2)"),
    ({"LAUNCHER": "torchrun", "NNODES": "two"}, "NNODES=two is not a positive integer"),
    ({"LAUNCHER": "python", "NNODES": "2"}, "LAUNCHER=python runs one process"),
    ({"LAUNCHER": "deepspeed", "HOSTFILE": "/nonexistent/hostfile"}, "HOSTFILE=/nonexistent/hostfile is not"),
    ({"LAUNCHER": "mpirun"}, "LAUNCHER must be deepspeed, torchrun or python"),
])
def test_inconsistent_node_settings_are_one_line(env, message):
    status, err = launch_command(env)
    assert status == "exit 2" and len(err.splitlines()) == 1 and message in err, err


# --- two "nodes" on this machine --------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_nodes(script: str, env: dict, cwd: str, nnodes: int, timeout: float = 900) -> None:
    """Run ``script`` once per node (NODE_RANK 0..nnodes-1, all at once, each in its own process group);
    every node must exit 0. With nnodes=1 it is the plain single-node run."""
    ranks.clear_build_locks()
    port = str(_free_port())
    procs = []
    for rank in range(nnodes):
        node_env = {**ENV, **env, "NNODES": str(nnodes), "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port}
        procs.append(subprocess.Popen(["bash", os.path.join(REPO, script)], cwd=cwd, env=node_env,
                                      start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {rank}: {shlex.join([script])}\n{out[-6000:]}"


def _log_history(out: str) -> list[dict]:
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    return [{k: v for k, v in e.items() if k not in ("train_runtime", "train_samples_per_second",
                                                     "train_steps_per_second", "tokens_per_second",
                                                     "samples_per_second", "mfu")}
            for e in state["log_history"]]


def _weights(out: str) -> dict[str, torch.Tensor]:
    got = {"llm/" + k: v for k, v in load_file(os.path.join(out, "adapter_model.safetensors")).items()}
    got.update({"vit/" + k: v for k, v in load_file(os.path.join(out, "Vit-lora", "adapter_model.safetensors")).items()})
    got.update({"proj/" + k: v for k, v in torch.load(os.path.join(out, "non_lora_trainables.bin"),
                                                      weights_only=True).items()})
    return got


def _same_run(one_node: str, two_nodes: str) -> None:
    la, lb = _log_history(one_node), _log_history(two_nodes)
    assert [e for e in la if "loss" in e] and la == lb
    wa, wb = _weights(one_node), _weights(two_nodes)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def colour(tiny_bundle, tmp_path_factory):
    from checkpoint_factory import save_lora_layout, trained_lora_model

    from stllava.data.preference import write_colour_preference_dataset
    from stllava.data.sft import write_colour_dataset

    root = tmp_path_factory.mktemp("multinode")
    sft_data, sft_images = write_colour_dataset(str(root / "sft"), n=8)
    pairs, pair_images = write_colour_preference_dataset(str(root / "pairs"), n=8)
    stage1 = save_lora_layout(trained_lora_model(tiny_bundle["model"], seed=1), str(root / "stage1"),
                              tiny_bundle["model"])
    return {**tiny_bundle, "sft_data": sft_data, "sft_images": sft_images, "pairs": pairs,
            "pair_images": pair_images, "stage1": stage1}


@pytest.mark.slow
@pytest.mark.parametrize("script", ["sqllava_med.sh", "dpo_finetune.sh"])
def test_two_nodes_train_like_one(colour, tmp_path, shm_comm_op, script):
    """NNODES=2 x 1 rank (two torchrun launchers rendezvousing on 127.0.0.1) against NNODES=1 x 2 ranks:
    ZeRO-3 over gloo, a few steps; identical log history and identical saved LoRA, ViT-LoRA and
    projector weights."""
    c = colour
    common = {"LAUNCHER": "torchrun", "PYTHON": sys.executable, "BATCH": "2", "ACCUM": "1", "MAX_LEN": "512",
              "SAVE_STEPS": "1000", "WORKERS": "0", "REPORT_TO": "none"}
    if script == "sqllava_med.sh":
        common.update({"MODEL": c["model"], "VISION_TOWER": c["vision_tower"], "PROJECTOR": "",
                       "DATA": c["sft_data"], "IMAGES": c["sft_images"], "EPOCHS": "1",
                       "EXTRA": "--max_steps 3 --lora_r 8 --lora_alpha 16 --lora_r_vit 4 --lora_alpha_vit 8"})
    else:
        common.update({"MODEL": c["stage1"], "MODEL_BASE": c["model"], "DATA": c["pairs"], "IMAGES": c["pair_images"],
                       "EXTRA": "--max_steps 3 --lora_r 8 --lora_alpha 16 --lora_r_vit 4"})
    one, two = str(tmp_path / "one_node"), str(tmp_path / "two_nodes")
    _run_nodes(script, {**common, "NUM_GPUS": "2", "OUT": one}, str(tmp_path), nnodes=1)
    _run_nodes(script, {**common, "NUM_GPUS": "1", "OUT": two}, str(tmp_path), nnodes=2)
    _same_run(one, two)

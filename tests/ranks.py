"""Starting DeepSpeed ranks from tests without leaving the machine stuck.

Two ways a killed run used to hang every later one (CI once lost 40 minutes to them): torch's
JIT build of DeepSpeed's CPU comm op takes a lock file in ``$TORCH_EXTENSIONS_DIR`` for every
load, and a rank killed while holding it leaves the file behind, which later loads wait on
forever; and ``subprocess.run``'s timeout kills only the launcher, leaving its ranks running.
"""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clear_build_locks() -> list[str]:
    """Remove torch's build lock files under ``$TORCH_EXTENSIONS_DIR``. Call it only while nothing
    of this session is building: conftest points that folder into this checkout and tests start
    ranks one at a time, so a lock found then was left by a killed process."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        return []
    stale = glob.glob(os.path.join(root, "**", "lock"), recursive=True)
    for path in stale:
        os.remove(path)
        warnings.warn(f"removed a stale torch extension build lock: {path}", stacklevel=2)
    return stale


def run(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in its own process group; at the
    timeout the whole group (launcher and ranks) is killed and its build locks cleared."""
    with subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            clear_build_locks()
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(script: str, argv: list[str], *, env: dict, nproc: int = 2, timeout: float = 600
             ) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node NPROC SCRIPT ARGV`` from the
    checkout (:func:`run`); asserts it exits 0 (the message holds the ends of its output)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script, *argv]
    proc = run(cmd, cwd=REPO, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def build_shm_comm_op(env: dict) -> None:
    """JIT-build DeepSpeed's CPU comm op in one process, before any launcher starts ranks that would
    race to build it (30-90 s the first time in a checkout, then cached)."""
    clear_build_locks()
    code = ("from deepspeed.accelerator import get_accelerator; "
            "get_accelerator().create_op_builder('ShareMemCommBuilder').load()")
    proc = run([sys.executable, "-c", code], cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

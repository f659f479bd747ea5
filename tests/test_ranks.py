"""The test helper that starts ranks: a timeout kills the whole process group, stale locks go."""
import os
import subprocess
import time

import pytest
import ranks


def test_timeout_kills_the_launcher_and_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pid_file}; wait"
    t0 = time.time()
    with pytest.raises(subprocess.TimeoutExpired):
        ranks.run(["bash", "-c", script], timeout=2)
    assert time.time() - t0 < 30
    child = int(pid_file.read_text())
    for _ in range(50):  # the kill is asynchronous; a zombie has left /proc/<pid>/status as "Z"
        try:
            with open(f"/proc/{child}/status") as f:
                if "\nState:\tZ" in f.read():
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child {child} of the timed-out launcher still runs")


def test_stale_build_locks_are_cleared(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_text("kept")
    with pytest.warns(UserWarning, match="stale torch extension build lock"):
        assert ranks.clear_build_locks() == [str(lock)]
    assert not lock.exists() and os.listdir(lock.parent) == ["deepspeed_shm_comm.so"]


def test_run_returns_output_and_status():
    proc = ranks.run(["bash", "-c", "echo out; echo err >&2; exit 3"], timeout=30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")

"""Run the demo's and the study's steps once each: real commands, logged, reused when finished.

A *step* writes into its own folder and, when it finishes, a marker ``<folder>/.done.json`` holding
the settings it ran with (the one marker of :mod:`stllava.artifacts`). Asked again with the same
settings, the step is reused; with different settings it is refused
(:class:`~stllava.artifacts.ArtifactError` naming the marker and what differs), so a result can
never be silently mixed with another setting's. Wall-clock times go to ``<root>/timings.json``,
apart from the results, so that results are bit-identical between runs with the same seed.

Commands run as subprocesses (``python -m stllava....``, exactly what a researcher types), with
``OMP_NUM_THREADS`` set, their output streamed to the console when asked and always to
``<root>/logs/<name>.log``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Callable

from stllava import artifacts
from stllava.errors import StllavaError
from stllava.jsonl import write_json_atomic

logger = logging.getLogger("stllava.demo")

MARKER = ".done.json"


class StepError(StllavaError):
    """A step's command failed."""

    exit_code = 1


def py(module: str, *args: str) -> list[str]:
    """``[python, -m, module, *args]`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


class Runner:
    """Steps under ``root``. ``threads``: OMP/torch threads per command; ``echo``: stream command
    output to the console (the demo) or only to the logs (the study, which runs steps in parallel);
    ``role`` ("demo", "study", "search"): part of every step's key (stllava.demo.steps.keyed)."""

    def __init__(self, root: str, threads: int = 1, echo: bool = True, role: str | None = None):
        self.root = root
        self.role = role
        self.threads = threads
        self.echo = echo
        self._lock = threading.Lock()
        self._folder_locks: dict[str, threading.Lock] = {}
        os.makedirs(os.path.join(root, "logs"), exist_ok=True)

    # -- bookkeeping ---------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def done(self, folder: str, settings: dict | None = None) -> bool:
        """True when ``folder`` finished (with ``settings``, when given); refuses
        (:class:`~stllava.artifacts.ArtifactError`) a finished folder whose marker holds other
        settings or is unreadable."""
        marker = os.path.join(folder, MARKER)
        if settings is None:
            return os.path.isfile(marker)
        return artifacts.check_marker(marker, settings, fix=f"use another --workdir, or delete {folder} (or --redo "
                                                             "its stage) to redo it")

    @staticmethod
    def resolve(folder: str, settings: dict) -> str:
        """``folder`` with ``{key}`` replaced by a short digest of ``settings``: runs that differ in
        any setting get their own folder, runs that agree share one (the study's variants reuse
        each other's models this way)."""
        if "{key}" not in folder:
            return folder
        return folder.replace("{key}", artifacts.digest(settings))

    def step(self, name: str, folder: str, settings: dict, fn: Callable[[], None]) -> bool:
        """Run ``fn`` (which fills ``folder``, already :meth:`resolve`d) unless ``folder`` is done
        with ``settings``; returns True when it ran. A folder left half-written by an interrupted
        run is cleared first."""
        with self._lock:  # one thread runs a given step; others asking for it wait, then reuse it
            lock = self._folder_locks.setdefault(os.path.abspath(folder), threading.Lock())
        with lock:
            return self._step(name, folder, settings, fn)

    def _step(self, name: str, folder: str, settings: dict, fn: Callable[[], None]) -> bool:
        if self.done(folder, settings):
            logger.debug("%s: reused %s", name, folder)
            return False
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.makedirs(folder, exist_ok=True)
        logger.info("%s → %s", name, folder)
        t = time.time()
        fn()
        artifacts.write_marker(os.path.join(folder, MARKER), settings, step=name)
        self.record_time(os.path.relpath(folder, self.root), time.time() - t)
        return True

    def record_time(self, key: str, seconds: float) -> None:
        with self._lock:
            path = self.path("timings.json")
            timings = json.load(open(path)) if os.path.isfile(path) else {}
            timings[key] = round(seconds, 1)
            write_json_atomic(path, timings, indent=1)

    def timings(self) -> dict:
        path = self.path("timings.json")
        return json.load(open(path)) if os.path.isfile(path) else {}

    # -- commands ------------------------------------------------------------------------------
    def run(self, cmd: list[str], log_name: str, env_extra: dict | None = None) -> None:
        """Run one command; raises StepError naming its log when it fails."""
        log_path = self.path("logs", log_name + ".log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
                   **(env_extra or {}))
        logger.info("$ %s", " ".join(cmd))
        # Raw bytes pass through so progress bars redraw in place; the log keeps everything.
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            while chunk := proc.stdout.read1(4096):
                log.write(chunk)
                if self.echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
            rc = proc.wait()
        if rc:
            raise StepError(f"command failed (exit {rc}): {' '.join(cmd[:4])} ...", file=log_path,
                            fix="read the log; rerun to resume (finished steps are reused)")

"""One cluster run through `pvcluster up --json`, as a user starts it, with the memory of its process tree sampled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from bench.procs import MemoryPeak, Sampler


class RunFailed(Exception):
    pass


@attrs.frozen
class UpRun:
    doc: dict[str, Any]  # what `up --json` printed
    memory: MemoryPeak
    wall_s: float  # the whole command, interpreter start-up included

    @property
    def wall_run_s(self) -> float:
        return float(self.doc["wall_run_s"])

    @property
    def vt_ns(self) -> int:
        return int(self.doc["vt_ns"])

    @property
    def windows(self) -> int:
        return int(self.doc["windows"])

    @property
    def slowdown(self) -> float:
        """Wall seconds per virtual second over the windows."""
        return self.wall_run_s / (self.vt_ns * 1e-9) if self.vt_ns else float("inf")


def up(spec_text: str | None, *, timeout_s: float, check: Callable[[Path, dict[str, Any]], None] | None = None,
       sample_s: float = 0.2) -> UpRun:
    """Run ``spec_text`` (None: the embedded default spec) to the end in a fresh run directory. ``check(run_dir,
    doc)`` may inspect the finished run's traces before the directory goes; RunFailed when a domain did not shut
    down cleanly."""
    # A short directory: ipc:// socket paths must stay under ~100 bytes.
    with tempfile.TemporaryDirectory(prefix="pvb-", dir=os.environ.get("PVC_TEST_TMP", "/tmp")) as d:
        run_dir = Path(d) / "run"
        argv = [sys.executable, "-m", "pvcluster.cli", "up", "--json", "--quiet", "--run-dir", str(run_dir),
                "--timeout", str(timeout_s)]
        if spec_text is not None:
            spec = Path(d) / "spec.toml"
            spec.write_text(spec_text)
            argv.insert(4, str(spec))
        doc, memory, wall_s = _run_sampled(argv, timeout_s + 60, sample_s)
        if not doc.get("ok"):
            states = [(x["name"], x["state"], x["shutdown_reason"] or x["crash"]) for x in doc["domains"]]
            raise RunFailed(f"the cluster did not end cleanly: {states}")
        if check is not None:
            check(run_dir, doc)
    return UpRun(doc, memory, wall_s)


def _run_sampled(argv: list[str], timeout_s: float, sample_s: float) -> tuple[dict[str, Any], MemoryPeak, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with Sampler(proc.pid, sample_s) as sampler:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()  # up brings its cluster down on SIGTERM's way out
            proc.communicate()
            raise RunFailed(f"`pvcluster up` did not finish within {timeout_s:.0f} s") from None
    wall_s = time.perf_counter() - start
    try:
        doc: dict[str, Any] = json.loads(out)
    except json.JSONDecodeError:
        raise RunFailed(f"`pvcluster up` exited {proc.returncode} without its JSON document:\n{err[-2000:]}") from None
    return doc, sampler.peak, wall_s

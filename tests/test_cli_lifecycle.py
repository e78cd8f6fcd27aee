"""The toolstack's life-cycle commands through the real CLI, and that no child process outlives the cluster."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvcluster.control import read_hypervisor_info

pytestmark = pytest.mark.timeout(180)

SPEC = """
[cluster]
name = "life"
[[domain]]
name = "spinner"
vcpus = 2
cmdline = "workload=forever"
[[domain]]
name = "quick"
vcpus = 1
cmdline = "shutdown=poweroff"
"""


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pvcluster.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_for(pred, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _cluster_pids(run_dir: Path) -> list[int]:
    info = read_hypervisor_info(run_dir)
    assert info is not None
    dmesg = _cli("dmesg", "--run-dir", str(run_dir)).stdout
    return [info["pid"], *(int(p) for p in re.findall(r"created, process (\d+)", dmesg))]


def test_detached_cluster_list_console_destroy_down(run_dir: Path) -> None:
    spec = run_dir / "life.toml"
    spec.write_text(SPEC)
    rd = str(run_dir / "c")
    up = _cli("up", str(spec), "--run-dir", rd, "--detach")
    assert up.returncode == 0, up.stderr
    _wait_for(lambda: "spinning forever" in _cli("console", "spinner", "--run-dir", rd).stdout)
    listed = json.loads(_cli("list", "--json", "--run-dir", rd).stdout)
    assert [(d["name"], d["vcpus"]) for d in listed] == [("spinner", 2), ("quick", 1)]
    _wait_for(lambda: json.loads(_cli("list", "--json", "--run-dir", rd).stdout)[1]["state"] == "dead")
    assert json.loads(_cli("list", "--json", "--run-dir", rd).stdout)[0]["state"] == "running"
    assert "quick" in _cli("list", "--run-dir", rd).stdout
    pids = _cluster_pids(run_dir / "c")
    assert len(pids) == 3
    destroyed = _cli("destroy", "spinner", "--run-dir", rd)
    assert destroyed.returncode == 0 and "dead" in destroyed.stdout
    assert "destroyed" in _cli("dmesg", "--run-dir", rd).stdout
    bad = _cli("destroy", "nosuch", "--run-dir", rd)
    assert bad.returncode == 1 and "no domain 'nosuch'" in bad.stderr
    assert _cli("down", "--run-dir", rd).returncode == 0
    _wait_for(lambda: not any(_alive(p) for p in pids))
    gone = _cli("list", "--run-dir", rd)
    assert gone.returncode == 1 and "no cluster is running" in gone.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_no_child_outlives_the_toolstack(run_dir: Path, sig: signal.Signals) -> None:
    spec = run_dir / "life.toml"
    spec.write_text(SPEC)
    rd = run_dir / "c"
    up = subprocess.Popen(
        [sys.executable, "-m", "pvcluster.cli", "up", str(spec), "--run-dir", str(rd)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(
            lambda: (
                read_hypervisor_info(rd) is not None
                and "spinning forever" in _cli("console", "spinner", "--run-dir", str(rd)).stdout
            )
        )
        pids = _cluster_pids(rd)
        assert all(_alive(p) for p in pids[:2])
        up.send_signal(sig)  # SIGINT is what Ctrl-C delivers to the foreground toolstack
        up.wait(timeout=60)
        _wait_for(lambda: not any(_alive(p) for p in pids), timeout=30)
        if sig == signal.SIGINT:
            assert "interrupted" in (up.stderr.read() if up.stderr else "")
    finally:
        if up.poll() is None:
            up.kill()

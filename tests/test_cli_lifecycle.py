"""The toolstack's life-cycle commands through the real CLI, and that no child process outlives the cluster."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import alive, run_cli, wait_until

from pvcluster.cluster import RUN_DIR_MARKER, ClusterError, claim_run_dir
from pvcluster.control import read_hypervisor_info

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

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





def _cluster_pids(run_dir: Path) -> list[int]:
    info = read_hypervisor_info(run_dir)
    assert info is not None
    dmesg = run_cli("dmesg", "--run-dir", str(run_dir)).stdout
    return [info["pid"], *(int(p) for p in re.findall(r"created, process (\d+)", dmesg))]


def test_detached_cluster_list_console_destroy_down(run_dir: Path) -> None:
    spec = run_dir / "life.toml"
    spec.write_text(SPEC)
    rd = str(run_dir / "c")
    up = run_cli("up", str(spec), "--run-dir", rd, "--detach")
    assert up.returncode == 0, up.stderr
    wait_until(lambda: "spinning forever" in run_cli("console", "spinner", "--run-dir", rd).stdout)
    listed = json.loads(run_cli("list", "--json", "--run-dir", rd).stdout)
    assert [(d["name"], d["vcpus"]) for d in listed] == [("spinner", 2), ("quick", 1)]
    wait_until(lambda: json.loads(run_cli("list", "--json", "--run-dir", rd).stdout)[1]["state"] == "dead")
    assert json.loads(run_cli("list", "--json", "--run-dir", rd).stdout)[0]["state"] == "running"
    assert "quick" in run_cli("list", "--run-dir", rd).stdout
    pids = _cluster_pids(run_dir / "c")
    assert len(pids) == 3
    # every verb that reports prints exactly one JSON document with --json
    assert any("spinning forever" in line for line in json.loads(run_cli("console", "spinner", "--json",
                                                                         "--run-dir", rd).stdout))
    assert any("created" in line for line in json.loads(run_cli("dmesg", "--json", "--run-dir", rd).stdout))
    paused = json.loads(run_cli("pause", "spinner", "--json", "--run-dir", rd).stdout)
    assert (paused["name"], paused["state"]) == ("spinner", "paused")
    assert json.loads(run_cli("unpause", "spinner", "--json", "--run-dir", rd).stdout)["state"] == "running"
    follow = run_cli("console", "spinner", "--json", "--follow", "--run-dir", rd)
    assert follow.returncode == 2 and "--follow" in follow.stderr
    destroyed = run_cli("destroy", "spinner", "--run-dir", rd)
    assert destroyed.returncode == 0 and "dead" in destroyed.stdout
    assert "destroyed" in run_cli("dmesg", "--run-dir", rd).stdout
    bad = run_cli("destroy", "nosuch", "--run-dir", rd)
    assert bad.returncode == 1 and "no domain 'nosuch'" in bad.stderr
    assert json.loads(run_cli("down", "--json", "--run-dir", rd).stdout) == {"run_dir": rd, "down": True}
    wait_until(lambda: not any(alive(p) for p in pids))
    gone = run_cli("list", "--run-dir", rd)
    assert gone.returncode == 1 and "no cluster is running" in gone.stderr


def test_shutdown_and_reboot_end_domains_with_their_reason(run_dir: Path) -> None:
    spec = run_dir / "two.toml"
    spec.write_text(SPEC.replace('cmdline = "shutdown=poweroff"', 'cmdline = "workload=forever"'))
    rd = str(run_dir / "c")
    assert run_cli("up", str(spec), "--run-dir", rd, "--detach").returncode == 0
    wait_until(lambda: all("spinning forever" in "".join(json.loads(run_cli("console", d, "--json", "--run-dir",
                                                                            rd).stdout)) for d in ("spinner", "quick")))
    down = json.loads(run_cli("shutdown", "spinner", "--json", "--run-dir", rd).stdout)
    assert (down["name"], down["shutdown_reason"]) == ("spinner", "poweroff")
    rebooted = json.loads(run_cli("reboot", "quick", "--json", "--run-dir", rd).stdout)
    assert rebooted["shutdown_reason"] == "reboot"
    again = run_cli("shutdown", "quick", "--run-dir", rd)
    assert again.returncode == 1 and "not running" in again.stderr
    faults = json.loads(run_cli("faults", "--json", "--run-dir", rd).stdout)
    kinds = [(f["kind"], f["params"]["reason"], f["outcome"]) for f in faults["done"]]
    assert kinds == [("shutdown", 0, "shut down (poweroff)"), ("shutdown", 1, "shut down (reboot)")]
    assert run_cli("down", "--run-dir", rd).returncode == 0


def test_create_adds_domains_and_vcpu_pin_pins(run_dir: Path) -> None:
    spec = run_dir / "one.toml"
    spec.write_text(SPEC.split("[[domain]]")[0] + "[[domain]]" + SPEC.split("[[domain]]")[1])  # spinner only
    rd = str(run_dir / "c")
    assert run_cli("up", str(spec), "--run-dir", rd, "--detach").returncode == 0
    extra = run_dir / "extra.toml"
    extra.write_text('[[domain]]\nname = "extra"\nvcpus = 1\ncmdline = "workload=forever"\n')
    created = json.loads(run_cli("create", str(extra), "--json", "--run-dir", rd).stdout)
    assert [d["name"] for d in created] == ["extra"]
    wait_until(lambda: "spinning forever" in run_cli("console", "extra", "--run-dir", rd).stdout)
    assert [d["name"] for d in json.loads(run_cli("list", "--json", "--run-dir", rd).stdout)] == ["spinner", "extra"]
    empty = run_dir / "empty.toml"
    empty.write_text("[cluster]\n")
    refused = run_cli("create", str(empty), "--run-dir", rd)
    assert refused.returncode == 2 and "no [[domain]] table" in refused.stderr
    pinned = json.loads(run_cli("vcpu-pin", "spinner", "1", "0", "--json", "--run-dir", rd).stdout)
    assert (pinned["kind"], pinned["target"], pinned["params"]["pcpu"]) == ("pin", "spinner.1", 0)
    assert pinned["outcome"] == "vcpu 1 pinned to pCPU 0", pinned
    assert run_cli("down", "--run-dir", rd).returncode == 0


def test_sched_shows_and_sets_the_slice(run_dir: Path) -> None:
    spec = run_dir / "one.toml"
    spec.write_text(SPEC.split("[[domain]]")[0] + "[[domain]]" + SPEC.split("[[domain]]")[1])  # spinner only
    rd = str(run_dir / "c")
    assert run_cli("up", str(spec), "--run-dir", rd, "--detach").returncode == 0
    wait_until(lambda: "spinning forever" in run_cli("console", "spinner", "--run-dir", rd).stdout)
    shown = json.loads(run_cli("sched", "--json", "--run-dir", rd).stdout)
    assert (shown["pcpus"], shown["slice_ns"], shown["window_ns"]) == (2, 30000, 10000)
    assert shown["domains"][0]["vcpus"] == [{"vcpu": 0, "affinity": [0, 1], "runstate": shown["domains"][0][
        "vcpus"][0]["runstate"]}, {"vcpu": 1, "affinity": [0, 1], "runstate": shown["domains"][0]["vcpus"][1][
        "runstate"]}]
    assert "slice 30000 ns" in run_cli("sched", "--run-dir", rd).stdout
    short = run_cli("sched", "--slice", "5000", "--run-dir", rd)
    assert short.returncode == 1 and "window_ns (10000)" in short.stderr
    done = run_cli("sched", "--slice", "50000", "--json", "--run-dir", rd)
    changed = json.loads(done.stdout)  # exactly one JSON document
    assert changed["slice_ns"] == 50000 and changed["change"]["outcome"] == "slice 30000 ns -> 50000 ns"
    assert changed["change"]["kind"] == "sched" and changed["change"]["params"] == {"slice_ns": 50000}
    faults = json.loads(run_cli("faults", "--json", "--run-dir", rd).stdout)
    assert [f["kind"] for f in faults["done"]] == ["sched"]  # recorded, so a replay changes it at the same step
    assert "scheduler: slice 30000 ns -> 50000 ns" in run_cli("dmesg", "--run-dir", rd).stdout
    assert run_cli("down", "--run-dir", rd).returncode == 0


def test_version() -> None:
    done = run_cli("--version")
    assert done.returncode == 0 and re.fullmatch(r"pvcluster \d+\.\d+\.\d+\n", done.stdout), done.stdout


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
        # as from a terminal: a suite started in the background (`cmd &` in a script) passes SIGINT on ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 - before exec only
    )
    try:
        wait_until(
            lambda: (
                read_hypervisor_info(rd) is not None
                and "spinning forever" in run_cli("console", "spinner", "--run-dir", str(rd)).stdout
            )
        )
        pids = _cluster_pids(rd)
        assert all(alive(p) for p in pids[:2])
        up.send_signal(sig)  # SIGINT is what Ctrl-C delivers to the foreground toolstack
        # read its output while waiting (a full pipe would block it); bringing a cluster down takes 45 s at worst
        _, err = up.communicate(timeout=120)
        wait_until(lambda: not any(alive(p) for p in pids), timeout=30)
        if sig == signal.SIGINT:  # interrupted while waiting for the cluster, or still creating its domains
            assert up.returncode in (1, 130), (up.returncode, err)
            assert up.returncode == 130 or "interrupted" in err
    finally:
        if up.poll() is None:
            up.kill()


# ----------------------------------------------------------------------------------------- run directory

QUICK_SPEC = """
[cluster]
name = "quick"
[[domain]]
name = "q"
cmdline = "shutdown=poweroff"
"""


def _quick_up(run_dir: Path, rd: Path) -> subprocess.CompletedProcess[str]:
    spec = run_dir / "quick.toml"
    spec.write_text(QUICK_SPEC)
    return run_cli("up", str(spec), "--run-dir", str(rd), "--quiet", "--timeout", "60")


def test_up_refuses_a_non_empty_directory_it_did_not_create(run_dir: Path) -> None:
    project = run_dir / "project"
    (project / "logs").mkdir(parents=True)
    (project / "trace").mkdir()
    (project / "logs" / "keep.txt").write_text("mine")
    (project / "trace" / "x.jsonl").write_text("{}\n")
    up = _quick_up(run_dir, project)
    assert up.returncode != 0
    assert "Traceback" not in up.stderr
    flat = " ".join(up.stderr.split())
    assert str(project) in flat and RUN_DIR_MARKER in flat and "not empty" in flat, up.stderr
    # Nothing was deleted, nothing was added.
    assert (project / "logs" / "keep.txt").read_text() == "mine"
    assert (project / "trace" / "x.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in project.iterdir()) == ["logs", "trace"]


@pytest.mark.slow
def test_up_creates_a_private_marked_run_directory_and_reuses_it(run_dir: Path) -> None:
    rd = run_dir / "new" / "run"
    up = _quick_up(run_dir, rd)
    assert up.returncode == 0, up.stderr
    assert stat.S_IMODE(rd.stat().st_mode) == 0o700
    marker = tomllib.loads((rd / RUN_DIR_MARKER).read_text())
    assert marker["cluster"] == "quick" and "created" in marker
    assert (rd / "trace" / "hypervisor.jsonl").exists()
    (rd / "trace" / "stale.jsonl").write_text("{}\n")
    again = _quick_up(run_dir, rd)
    assert again.returncode == 0, again.stderr
    assert not (rd / "trace" / "stale.jsonl").exists()  # the earlier run's traces were cleared
    assert tomllib.loads((rd / RUN_DIR_MARKER).read_text())["created"] == marker["created"]


@pytest.mark.slow
def test_up_adopts_an_empty_directory(run_dir: Path) -> None:
    rd = run_dir / "empty"
    rd.mkdir()
    assert _quick_up(run_dir, rd).returncode == 0
    assert (rd / RUN_DIR_MARKER).is_file()


def test_claim_creates_missing_parents_and_a_private_directory(run_dir: Path) -> None:
    rd = run_dir / "a" / "b"
    old = os.umask(0)  # 0700 must not depend on the caller's umask
    try:
        claim_run_dir(rd, "c1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(rd.stat().st_mode) == 0o700
    text = (rd / RUN_DIR_MARKER).read_text()
    assert text.startswith("# pvcluster run directory") and tomllib.loads(text)["cluster"] == "c1"


def test_claim_keeps_the_marker_of_an_earlier_run(run_dir: Path) -> None:
    claim_run_dir(run_dir / "r", "first")
    (run_dir / "r" / "logs").mkdir()
    claim_run_dir(run_dir / "r", "second")
    assert tomllib.loads((run_dir / "r" / RUN_DIR_MARKER).read_text())["cluster"] == "first"


def test_claim_refuses_a_file(run_dir: Path) -> None:
    (run_dir / "f").write_text("x")
    with pytest.raises(ClusterError, match="not a directory"):
        claim_run_dir(run_dir / "f", "c")
    assert (run_dir / "f").read_text() == "x"


def test_claim_does_not_take_a_symlink_for_the_marker(run_dir: Path) -> None:
    rd = run_dir / "r"
    (rd / "logs").mkdir(parents=True)
    (run_dir / "elsewhere").write_text("")
    (rd / RUN_DIR_MARKER).symlink_to(run_dir / "elsewhere")
    with pytest.raises(ClusterError, match=RUN_DIR_MARKER):
        claim_run_dir(rd, "c")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_claim_refuses_another_users_directory(run_dir: Path) -> None:
    rd = run_dir / "theirs"
    rd.mkdir()
    os.chown(rd, 65534, 65534)
    with pytest.raises(ClusterError, match="belongs to uid 65534"):
        claim_run_dir(rd, "c")
    assert not any(rd.iterdir())


@pytest.mark.slow
def test_up_json_prints_one_document_with_the_run_measures(run_dir: Path) -> None:
    """Not --quiet: the progress and the summary table are printed too, and must all go to stderr."""
    spec = run_dir / "quick.toml"
    spec.write_text(QUICK_SPEC)
    up = run_cli("up", str(spec), "--run-dir", str(run_dir / "rd"), "--json", "--timeout", "60")
    assert up.returncode == 0, up.stderr
    doc = json.loads(up.stdout)  # the whole of stdout: one document, nothing around it
    assert {"vt_ns", "windows", "wall_run_s", "wall_s", "domains", "run_dir", "ok"} <= doc.keys()
    assert doc["vt_ns"] > 0 and doc["windows"] > 0 and doc["wall_run_s"] > 0 and doc["ok"] is True
    assert [d["state"] for d in doc["domains"]] == ["dead"]
    assert "pvcluster run summary" in up.stderr

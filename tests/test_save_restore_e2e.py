"""Save and restore through real processes (issue 15): run a cluster to virtual time T, save it, let it go on to its
end; restore the file into another run directory and let that go on to its end: the virtual-time traces after T
are identical, file by file (the hypervisor's per domain). Restored into the directory it was saved from, the run's
traces end up exactly the original's. A corrupt or wrong-version file is refused with a clear error."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli

from pvcluster import savefile
from pvcluster.rundiff import HOST_ORDERED, first_divergence, normalize

SPEC = """
[cluster]
name = "saved"
seed = 7
run_dir = "{run_dir}"
[hypervisor]
pcpus = 2
[[domain]]
name = "alpha"
vcpus = 2
backend = "native"
cmdline = "workload=shootdown sdrounds=200 shutdown=poweroff"
[[domain]]
name = "beta"
vcpus = 2
backend = "xen"
cmdline = "workload=shootdown sdrounds=200 shutdown=poweroff"
[[domain]]
name = "gamma"
vcpus = 1
backend = "xen"
cmdline = "workload=timer ticks=12 shutdown=poweroff"
"""
SAVE_AT_NS = 4_000_000
RUN_TIMEOUT_S = 240


def _events(path: Path, offset: int = 0) -> list[dict[str, Any]]:
    """``path``'s events from byte ``offset`` on, each reduced to what two runs must agree on (rundiff); a new
    file's header line (``trace.start``) is no event of the simulation."""
    if not path.exists():
        return []
    out = []
    with open(path, "rb") as fh:
        fh.seek(offset)
        for line in fh:
            e = normalize(json.loads(line))
            if e is not None and e["event"] != "trace.start":
                out.append(e)
    return out


def _streams(name: str, events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """A domain's trace is one stream; the hypervisor's, one per domain (their interleaving is the host's), with the
    host-ordered events (process exits) compared as a set of their own."""
    if name != "hypervisor.jsonl":
        return {name: events}
    out: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        key = "exits" if e["event"] in HOST_ORDERED else f"d{e.get('dom')}"
        out.setdefault(f"{name}:{key}", []).append(e)
    out.get(f"{name}:exits", []).sort(key=lambda e: json.dumps(e, sort_keys=True))
    return out


def traces_after(run_dir: Path, positions: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((run_dir / "trace").glob("*.jsonl")):
        out.update(_streams(path.name, _events(path, positions.get(path.name, 0))))
    return out


def _wait_done(run_dir: Path) -> list[dict[str, Any]]:
    import time

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        listed = run_cli("list", "--run-dir", str(run_dir), "--json")
        assert listed.returncode == 0, listed.stderr
        doms: list[dict[str, Any]] = json.loads(listed.stdout)
        if all(d["state"] in ("dead", "crashed") for d in doms):
            return doms
        assert time.monotonic() < deadline, doms
        time.sleep(0.3)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_restored_cluster_goes_on_with_the_trace_the_saved_one_went_on_with(run_dir: Path) -> None:
    run_a, run_b = run_dir / "a", run_dir / "b"
    spec = run_dir / "spec.toml"
    spec.write_text(SPEC.format(run_dir=run_a))
    save = run_dir / "cluster.pvsave"
    up = run_cli("up", str(spec), "--detach", "--quiet")
    assert up.returncode == 0, up.stderr
    try:
        saved = run_cli("save", str(save), "--at", str(SAVE_AT_NS), "--run-dir", str(run_a), "--json")
        assert saved.returncode == 0, saved.stderr
        info = json.loads(saved.stdout)
        assert info["vt_ns"] >= SAVE_AT_NS and info["domains"] == [1, 2, 3] and info["bytes"] == save.stat().st_size
        # the hypervisor writes no file over one that is not a save file, and wants an absolute path
        (run_dir / "notes.txt").write_text("mine")
        over = run_cli("save", str(run_dir / "notes.txt"), "--run-dir", str(run_a))
        assert over.returncode == 1 and "is not a save file: not overwritten" in over.stderr, over.stderr
        assert (run_dir / "notes.txt").read_text() == "mine"
        doms = _wait_done(run_a)  # the saved cluster goes on to its end: T2
        # (gamma's timer check fails when it shares the pCPUs with the others: it ends in a crash of its own asking,
        # which the restored run must reproduce too)
        ends = [(d["state"], d["shutdown_reason"], d["crash"]) for d in doms]
        assert [e[0] for e in ends[:2]] == ["dead", "dead"], doms
    finally:
        run_cli("down", "--run-dir", str(run_a))
    image = savefile.read(save)
    assert image["vt_ns"] == info["vt_ns"]

    restored = run_cli("restore", str(save), "--run-dir", str(run_b), "--json", "--quiet", timeout=RUN_TIMEOUT_S)
    assert restored.stdout, restored.stderr[-3000:]
    report = json.loads(restored.stdout)
    assert [(d["state"], d["shutdown_reason"], d["crash"]) for d in report["domains"]] == ends, report

    after_a = traces_after(run_a, image["traces"])
    after_b = traces_after(run_b, {})
    assert sorted(after_a) == sorted(after_b)
    for stream in after_a:
        assert after_a[stream] == after_b[stream], stream
    # the continuation did things: every domain ran on after T, the timer domain's ticks included
    assert sum(len(v) for v in after_a.values()) > 1000
    assert all(after_a[f"dom{n}.jsonl"] for n in ("1-alpha", "2-beta", "3-gamma"))

    # Restored where it was saved from, the traces are cut back to T and go on: the whole run is the original's.
    original = run_dir / "original"
    shutil.copytree(run_a / "trace", original / "trace")
    again = run_cli("restore", str(save), "--json", "--quiet", timeout=RUN_TIMEOUT_S)
    assert again.stdout, again.stderr[-3000:]
    assert json.loads(again.stdout)["run_dir"] == str(run_a)
    assert first_divergence(original, run_a, upto_shortest=False) is None


def test_a_corrupt_or_wrong_version_save_file_is_refused_with_a_clear_error(run_dir: Path) -> None:
    good = savefile.encode({
        "format": 1, "vt_ns": 0, "window": 0, "spec": {}, "run_dir": str(run_dir / "r"), "hypervisor": b"",
        "domains": {}, "traces": {}, "faults_bytes": 0,
    })
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    (run_dir / "corrupt.pvsave").write_bytes(bytes(flipped))
    (run_dir / "future.pvsave").write_bytes(good[:8] + struct.pack("<I", 99) + good[12:])
    bad = run_cli("restore", str(run_dir / "corrupt.pvsave"), "--run-dir", str(run_dir / "r"))
    assert bad.returncode == 2
    assert "corrupt: its checksum does not match" in bad.stderr and "Traceback" not in bad.stderr
    future = run_cli("restore", str(run_dir / "future.pvsave"), "--run-dir", str(run_dir / "r"))
    assert future.returncode == 2 and "format version 99: this pvcluster reads version 1" in future.stderr
    assert not (run_dir / "r").exists()  # refused before anything started

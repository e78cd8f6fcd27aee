"""`pvcluster trace` on a real cluster: its numbers checked against what the guests themselves marked.

Three designs share 2 pCPUs (overcommitted), one domain with three vCPUs so a shootdown has two targets, and a vCPU
is preempted by a fault in the middle. Every shootdown the analysis reports must be exactly one request/done pair
of guest marks, with that latency, and a breakdown that sums to it; the targets' flush times must be their own
FLUSH_ACK marks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pvcluster.abi.platform import Mark
from pvcluster.cluster import Cluster
from pvcluster.spec import parse_spec
from pvcluster.trace import load, read_events

pytestmark = pytest.mark.slow

SPEC = """
[cluster]
name = "trace-e2e"
seed = 11
[hypervisor]
pcpus = 2
[[domain]]
name = "nat"
vcpus = 3
backend = "native"
cmdline = "workload=shootdown shutdown=poweroff"
[[domain]]
name = "pv"
vcpus = 2
backend = "xen"
cmdline = "workload=shootdown shutdown=poweroff"
[[domain]]
name = "cr3x"
vcpus = 2
backend = "xen"
cmdline = "workload=shootdown shutdown=poweroff tlbflush=cr3"
[[fault]]
kind = "preempt"
target = "nat.1"
at_ns = 200000
duration_ns = 60000
"""


@pytest.fixture(scope="module")
def run_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pvc-") as d:
        with Cluster.start(parse_spec(SPEC), run_dir=Path(d)) as cluster:
            final = cluster.wait(timeout_s=240)
        assert all(x["shutdown_reason"] == "poweroff" for x in final["domains"]), final
        yield Path(d)


def _marks(run_dir: Path) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for f in (run_dir / "trace").glob("dom*-*.jsonl"):
        for e in read_events(f):
            if e["event"] == "guest.mark":
                out.setdefault(e["dom"], []).append(e)
    return out


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pvcluster.cli", "trace", *args], capture_output=True, text=True,
                          timeout=120)


def test_every_shootdown_is_a_pair_of_guest_marks_with_its_latency(run_dir: Path) -> None:
    analysis = load(run_dir).analyse(keep_shootdowns=True)
    marks = _marks(run_dir)
    expected = set()
    for dom, ms in marks.items():
        req = {m["round"]: m["vt_ns"] for m in ms if m["code"] == Mark.SHOOTDOWN_REQUEST}
        done = {m["round"]: m["vt_ns"] for m in ms if m["code"] == Mark.SHOOTDOWN_DONE}
        expected |= {(dom, r, req[r], done[r]) for r in done}
    got = {(s.dom, s.round, s.start_ns, s.end_ns) for s in analysis.shootdowns}
    assert got == expected and len(got) == 3 * 40
    assert {s.mode for s in analysis.shootdowns} == {"native", "pv", "cr3 (xen)"}


def test_each_breakdown_sums_to_its_latency_and_flushes_are_the_targets_acks(run_dir: Path) -> None:
    analysis = load(run_dir).analyse(keep_shootdowns=True)
    acks = {(m["dom"], m["vcpu"], m["vt_ns"]) for ms in _marks(run_dir).values() for m in ms
            if m["code"] == Mark.FLUSH_ACK}
    for s in analysis.shootdowns:
        assert sum(s.breakdown.values()) == s.latency_ns, s
        assert all(v >= 0 for v in s.breakdown.values()), s
        if s.mode == "pv":
            assert s.breakdown["hypercall"] > 0 and s.critical_target is None
            continue
        assert s.targets == ((1, 2) if s.mode == "native" else (1,))
        for vcpu, vt in s.flushes:  # each target's flush is its own handler's acknowledgement, inside the shootdown
            assert (s.dom, vcpu, vt) in acks and s.start_ns <= vt <= s.end_ns
    # overcommitted 3:2, IPI designs wait for their targets to get a pCPU; the paravirtual flush never does
    bd = analysis.breakdown_ns
    assert bd["native"]["wait_pcpu"] > 0 and bd["cr3 (xen)"]["wait_pcpu"] > 0 and bd["pv"]["wait_pcpu"] == 0


def test_trace_json_keeps_its_shape_and_adds_the_new_tables(run_dir: Path) -> None:
    proc = _cli("--run-dir", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    rows = {r["mode"]: r for r in doc["shootdowns"]}
    for row in rows.values():  # the keys it always had
        assert {"mode", "shootdowns", "p50_us", "p90_us", "p99_us", "max_us", "messages_per_shootdown",
                "preempted_targets"} <= set(row)
        assert row["shootdowns"] == 40 and row["p50_us"] <= row["p99_us"] <= row["p99_9_us"] <= row["max_us"]
    assert doc["stale_reads"] == 0 and doc["hypercalls"]["count"] == sum(r["count"] for r in doc["hypercalls_by_nr"])
    assert {"by_targets", "by_preempted", "breakdown", "slowest", "multicall_batches", "evtchn", "faults",
            "runstates", "trace"} <= set(doc)
    assert {(r["mode"], r["targets"]) for r in doc["by_targets"]} == {("native", 2), ("pv", 1), ("cr3 (xen)", 1)}
    (fault,) = doc["faults"]
    assert (fault["kind"], fault["target"], fault["vt_ns"]) == ("preempt", "nat.1", 200_000) and fault["end_vt_ns"]
    assert len(doc["slowest"]) == 10 and doc["slowest"][0]["vcpu_states"]
    assert doc["trace"]["corrupt_lines"] == {} and doc["trace"]["schema"]["hypervisor.jsonl"] == 2
    # every vCPU's run-state totals cover its domain's whole life: to its shutdown, or to its last change of state
    # when the hypervisor took it off its pCPU at the end of the window the domain shut down in
    hv = list(read_events(run_dir / "trace" / "hypervisor.jsonl"))
    ends = {e["dom"]: e["vt_ns"] for e in hv if e["event"] == "domain.shutdown"}
    last = {(e["dom"], e["vcpu"]): e["vt_ns"] for e in hv if e["event"] == "vcpu.runstate"}
    for r in doc["runstates"]:
        total = sum(r[f"{s}_us"] for s in ("running", "runnable", "blocked", "offline"))
        assert total == pytest.approx(max(ends[r["dom"]], last[r["dom"], r["vcpu"]]) / 1000), r


def test_text_tables_and_compare(run_dir: Path) -> None:
    proc = _cli("--run-dir", str(run_dir), "--slowest", "3")
    assert proc.returncode == 0, proc.stderr
    for needle in ("TLB shootdown latency", "Where the latency went", "Slowest shootdowns", "wait_pcpu",
                   "Hypercalls by number", "Faults injected", "vCPU run states"):
        assert needle in proc.stdout
    proc = _cli("--compare", str(run_dir), str(run_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    cmp = json.loads(proc.stdout)
    for row in cmp["shootdowns"]:
        assert row["p99_us"]["ratio"] == 1.0 and row["p99_us"]["delta"] == 0

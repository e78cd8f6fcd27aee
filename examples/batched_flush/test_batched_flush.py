"""The batched_flush example end to end: build guest.c with the SDK (gcc -m32 against Xen's public headers, the
hypercall number from the extension's registration), run examples/batched_flush/spec.toml through real processes
(the hypervisor loads the extension named in the spec, the domain processes learn its copy-in from Build), and
check the new hypercall's effect in guest code (every check the guest prints passes: completions arrive, no target
reads through a stale TLB entry), in the traces (one batched_flush event per call, the shootdowns analysed beside
the native and pv designs, the extension's own trace table), and that without the flushes the guest notices."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pvcluster import guestsdk
from pvcluster.cluster import Cluster
from pvcluster.spec import parse_spec
from pvcluster.trace import exttables, read_events
from pvcluster.trace.run import load

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

HERE = Path(__file__).resolve().parent
XEN_HEADER = Path("/usr/include/xen/xen.h")
ROUNDS = 20  # guest.c's default
CHECKS = 16  # the pvc_check lines guest.c prints when NR_VCPUS = 3


def build(work: Path) -> Path:
    """guest.c built with the SDK into ``work``, or skip where this machine cannot."""
    if not XEN_HEADER.exists():
        pytest.skip(f"{XEN_HEADER} is absent (install Xen's public headers, e.g. Debian's libxen-dev)")
    if shutil.which("gcc") is None:
        pytest.skip("no gcc on PATH")
    elf = work / "guest.elf"
    cflags = guestsdk.cflags(guestsdk.extension_defines(str(HERE / "spec.toml")))
    res = subprocess.run(["gcc", *cflags, "-Werror", "-o", str(elf), str(HERE / "guest.c"), *guestsdk.ldflags()],
                         capture_output=True, text=True, timeout=120)
    if res.returncode and ("-m32" in res.stderr or "gnu/stubs-32" in res.stderr or "cannot find" in res.stderr):
        pytest.skip(f"gcc cannot build 32-bit code here (gcc-multilib?): {res.stderr.strip()[-300:]}")
    assert res.returncode == 0, res.stderr
    return elf


def run(run_dir: Path, elf: Path, extra: str = "", tail: str = "") -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The example's spec with the guest built here (and ``extra`` lines in the batched domain's table, ``tail``
    tables after it): the final status and every domain's console."""
    text = (HERE / "spec.toml").read_text().replace('kernel = "guest.elf"', f'kernel = "{elf}"{extra}') + tail
    spec = parse_spec(text, base_dir=HERE)  # the extension's path ("." = this directory) as in the example
    with Cluster.start(spec, run_dir=run_dir / "run") as cluster:
        final = cluster.wait(timeout_s=240)
        consoles = {d["name"]: cluster.client.call("console", dom=d["domid"]) for d in final["domains"]}
    return final, consoles


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any], dict[str, list[str]]]]:
    work = tmp_path_factory.mktemp("batched")
    elf = build(work)
    # ipc:// socket paths must stay short: a run directory under /tmp, not pytest's deep tmp_path
    run_dir = Path(os.environ.get("PVC_TEST_TMP", "/tmp")) / f"pvc-bf-{work.name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    final, consoles = run(run_dir, elf)
    yield run_dir / "run", final, consoles
    shutil.rmtree(run_dir, ignore_errors=True)


def test_every_domain_powers_off_and_every_check_in_guest_code_passes(
        example: tuple[Path, dict[str, Any], dict[str, list[str]]]) -> None:
    _, final, consoles = example
    assert {d["name"]: (d["state"], d["shutdown_reason"]) for d in final["domains"]} == {
        "native": ("dead", "poweroff"), "pv": ("dead", "poweroff"), "batched": ("dead", "poweroff")}
    console = consoles["batched"]
    checks = [line for line in console if line.endswith((" ok", "FAIL")) or " FAIL " in line]
    assert len(checks) == CHECKS and all(line.endswith(" ok") for line in checks), console
    assert "a completion event for every batch ok" in console and "no stale read on the targets ok" in console
    assert console[-1] == "batched-flush: 0 failures", console


def test_the_hypercall_and_its_shootdowns_are_in_the_trace(
        example: tuple[Path, dict[str, Any], dict[str, list[str]]]) -> None:
    run_dir, final, _ = example
    dom = next(d["domid"] for d in final["domains"] if d["name"] == "batched")
    events = list(read_events(run_dir / "trace" / "hypervisor.jsonl"))
    calls = [e for e in events if e["event"] == "hypercall" and e.get("dom") == dom and e["nr"] == 50]
    assert calls and {e["name"] for e in calls} == {"batched_flush"}  # named by the extension, not "unknown_50"
    flushes = [e for e in events if e["event"] == "batched_flush" and e["dom"] == dom]
    batched = [e for e in flushes if e["asynchronous"]]
    assert len(batched) == ROUNDS and len(flushes) == ROUNDS + 1  # the rounds and the synchronous one
    assert all(e["requests"] == 4 and e["targets"] == [0, 1, 2] and e["pages"] == 12 for e in batched)
    # each completion is an event on the guest's port, sent when the flush completed and delivered to the domain
    sent = [e for e in events if e["event"] == "event.sent" and e.get("dom") == dom]
    assert [e["vt_ns"] for e in sent] == [e["done_vt_ns"] for e in batched]
    refused = [e for e in events if e["event"] == "batched_flush.denied" and e.get("dom") == dom]
    assert sorted(e["reason"] for e in refused) == sorted(
        ["bad-count", "bad-count", "bad-vcpumask", "bad-vcpumask", "done-port-not-ipi", "requests-unmapped"])


def test_trace_analysis_puts_the_new_design_beside_native_and_pv(
        example: tuple[Path, dict[str, Any], dict[str, list[str]]]) -> None:
    run_dir, _, _ = example
    run = load(run_dir)
    doc = run.analyse(slowest=0).to_json()
    rows = {r["mode"]: r for r in doc["shootdowns"]}
    assert set(rows) == {"native", "pv", "batched"}
    assert all(r["shootdowns"] == ROUNDS for r in rows.values())
    assert rows["batched"]["hypercalls_per_shootdown"] >= 1 and doc["stale_reads"] == 0
    (table,) = exttables.tables(run)
    (row,) = table["rows"]
    assert (row["calls"], row["asynchronous"], row["pages"]) == (ROUNDS + 1, ROUNDS, ROUNDS * 12)


def test_without_the_flushes_the_guest_sees_stale_translations(tmp_path: Path) -> None:
    """The hypervisor bug that skips a domain's flushes (faults = ["skip-flush"]): the targets read the old frames,
    and the guest's own check fails the run."""
    elf = build(tmp_path)
    run_dir = Path(os.environ.get("PVC_TEST_TMP", "/tmp")) / f"pvc-bfs-{tmp_path.name[-12:]}"
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        final, consoles = run(run_dir, elf, '\nfaults = ["skip-flush"]')
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    batched = next(d for d in final["domains"] if d["name"] == "batched")
    assert (batched["state"], batched["shutdown_reason"]) == ("crashed", "crash"), batched
    assert "no stale read on the targets FAIL 160" in consoles["batched"]  # 20 rounds x 2 targets x 4 pages


def test_the_extension_s_own_fault_kind_loses_remote_flushes_and_the_guest_s_check_catches_it(tmp_path: Path) -> None:
    """``batched-flush-lose`` (the extension's fault kind, scheduled by the spec's [[fault]] table like a built-in
    kind): the next 3 batched flushes flush only their caller; the completion still comes (the guest does not hang),
    but the targets read the old frames and the guest's check fails the run; the fault and each lost flush are in
    the trace."""
    elf = build(tmp_path)
    run_dir = Path(os.environ.get("PVC_TEST_TMP", "/tmp")) / f"pvc-bfl-{tmp_path.name[-12:]}"
    shutil.rmtree(run_dir, ignore_errors=True)
    tail = '\n[[fault]]\nkind = "batched-flush-lose"\ntarget = "batched"\nat_ns = 0\ncount = 3\n'
    try:
        final, consoles = run(run_dir, elf, tail=tail)
        events = [e for f in sorted((run_dir / "run" / "trace").glob("*.jsonl")) for e in read_events(f)]
        records = [json.loads(line) for line in (run_dir / "run" / "faults.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    doms = {d["name"]: d for d in final["domains"]}
    assert (doms["batched"]["state"], doms["batched"]["shutdown_reason"]) == ("crashed", "crash"), doms["batched"]
    assert (doms["pv"]["state"], doms["native"]["state"]) == ("dead", "dead")  # the other designs are untouched
    console = consoles["batched"]
    assert any(line.startswith("no stale read on the targets FAIL") for line in console), console
    assert "a completion event for every batch ok" in console  # only the remote flushes were lost
    (inject,) = [e for e in events if e["event"] == "fault.inject"]
    assert (inject["kind"], inject["extension"], inject["params"]) == ("batched-flush-lose", "batched_flush_ext",
                                                                      {"count": 3})
    lost = [e for e in events if e["event"] == "batched_flush.lost"]
    assert [(e["targets"], e["left"]) for e in lost] == [([1, 2], 2), ([1, 2], 1), ([1, 2], 0)]
    assert [(r["kind"], r["outcome"]) for r in records] == [
        ("batched-flush-lose", "the next 3 batched flushes lose their remote targets")]

"""`pvcluster gdb DOM`: the hypervisor's GDB remote-protocol stub, driven by a Python client of the protocol and by
real gdb. Breakpoints, steps and interrupts stop the domain in virtual time; after the debugger detaches the domain
finishes as it would have."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from gdbclient import GdbClient
from helpers import detached_cluster, run_cli, wait_until

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

ROUNDS = 1000
SPEC = f"""
[cluster]
name = "debugged"
[[domain]]
name = "sd"
vcpus = 2
backend = "xen"
cmdline = "workload=shootdown sdrounds={ROUNDS} shutdown=poweroff"
"""


@pytest.fixture
def cluster(run_dir: Path) -> Iterator[Path]:
    with detached_cluster(run_dir, SPEC) as rd:
        yield rd


def symbols(kernel: Path) -> dict[str, int]:
    with kernel.open("rb") as fh:
        table = ELFFile(fh).get_section_by_name(".symtab")
        assert isinstance(table, SymbolTableSection)
        return {s.name: s["st_value"] for s in table.iter_symbols() if s.name}


def start_stub(rd: Path) -> int:
    res = run_cli("gdb", "sd", "--run-dir", str(rd), "--json")
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["host"] == "127.0.0.1" and rec["name"] == "sd"
    return int(rec["port"])


def domain(rd: Path) -> dict[str, object]:
    return dict(json.loads(run_cli("list", "--json", "--run-dir", str(rd)).stdout)[0])


def finishes_normally(rd: Path) -> None:
    wait_until(lambda: domain(rd)["state"] == "dead", timeout=120)
    assert domain(rd)["shutdown_reason"] == "poweroff"
    assert any("stale reads 0" in line for line in json.loads(run_cli("console", "sd", "--json", "--run-dir",
                                                                          str(rd)).stdout))


def gdb_events(rd: Path) -> list[dict[str, object]]:
    lines = (rd / "trace" / "hypervisor.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if str(e["event"]).startswith("gdb.")]


def test_python_client_breaks_steps_reads_and_detaches(cluster: Path) -> None:
    port = start_stub(cluster)
    syms = symbols(cluster / "kernels" / "pvkern.elf")
    target, rounds = syms["xen_flush_tlb_others"], syms["sd_rounds"]
    c = GdbClient("127.0.0.1", port)
    try:
        assert b"swbreak+" in c.cmd(b"qSupported:multiprocess+;swbreak+")
        assert c.cmd(b"?").startswith(b"T05thread:1;")
        assert c.cmd(b"qfThreadInfo") == b"m1,2" and c.cmd(b"qsThreadInfo") == b"l"
        assert c.cmd(b"T2") == b"OK" and c.cmd(b"T3").startswith(b"E")
        regs = c.regs()
        # in the kernel (ring 1), or at a boundary that found it in the hypervisor's trampoline (ring 0, the hole)
        in_kernel = regs["cs"] == 0xE019 and syms["_start"] <= regs["eip"] < max(syms.values())
        assert in_kernel or (regs["cs"] == 0xE008 and regs["eip"] >= 0xFC000000), {k: hex(v) for k, v in regs.items()}
        assert c.u32(rounds) in (40, ROUNDS)  # the default, until the workload reads its command line
        assert c.cmd(b"m0,4") == b"E14"  # nothing is mapped at 0
        # hostile or malformed requests are refused, the session goes on
        for bad in (b"m0,100000", b"mzz,4", b"Z0,,1", b"G00", b"Hgff", b"p99", b"vCont;x"):
            assert c.cmd(bad).startswith(b"E"), bad
        assert c.cmd(b"Xc0000000,1:x") == b""  # binary writes: not offered (gdb then uses M)
        c.sock.sendall(b"$g#00")  # a bad checksum is answered "-"
        assert c._event() == ("ack", b"-")
        assert c.cmd(b"Hg2") == b"OK"  # thread 2 (vCPU 1): its own registers
        assert c.regs()["esp"] != regs["esp"]

        assert c.cmd(b"Z0,%x,1" % target) == b"OK"
        stop = c.cmd(b"c")
        assert stop == b"T05thread:1;swbreak:;", stop  # the initiator, vCPU 0
        assert c.regs()["eip"] == target
        assert c.cmd(b"s") == b"T05thread:1;"
        eip = c.regs()["eip"]
        assert target < eip < target + 16  # one instruction on
        assert c.u32(rounds) == ROUNDS  # a variable the kernel set from its command line
        # writes: memory (the same value back, so the run goes on as before), registers, an unmapped address
        assert c.cmd(b"M%x,4:%s" % (rounds, ROUNDS.to_bytes(4, "little").hex().encode())) == b"OK"
        assert c.cmd(b"M0,1:00") == b"E14"
        assert c.set_regs(c.regs()) == b"OK" and c.regs()["eip"] == eip
        assert c.cmd(b"vCont;c") == b"T05thread:1;swbreak:;"  # the next round's flush: it steps over the last
        assert c.regs()["eip"] == target
        assert c.cmd(b"z0,%x,1" % target) == b"OK"
        c.send(b"c")
        time.sleep(0.3)
        assert c.interrupt().startswith(b"T02thread:")
        assert c.cmd(b"D") == b"OK"
    finally:
        c.close()
    wait_until(lambda: any(e["event"] == "gdb.detach" for e in gdb_events(cluster)))  # the trace is flushed
    events = gdb_events(cluster)
    kinds = [(e["event"], e.get("why")) for e in events]
    assert kinds == [("gdb.attach", None), ("gdb.stop", "breakpoint"), ("gdb.stop", "step"),
                     ("gdb.stop", "breakpoint"), ("gdb.stop", "interrupt"), ("gdb.detach", "detach")]
    stops = [e for e in events if e["event"] == "gdb.stop"]
    assert stops[0]["eip"] == target and stops[0]["vcpu"] == 0
    assert int(str(stops[0]["vt_ns"])) < int(str(stops[1]["vt_ns"])) < int(str(stops[2]["vt_ns"]))
    finishes_normally(cluster)


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed (.ci/run installs it)")
def test_gdb_breaks_at_a_kernel_symbol_steps_and_reads_a_variable(cluster: Path) -> None:
    port = start_stub(cluster)
    kernel = cluster / "kernels" / "pvkern.elf"
    syms = symbols(kernel)
    out = subprocess.run(
        ["gdb", "-nx", "-batch", "-ex", f"target remote 127.0.0.1:{port}", "-ex", "break xen_flush_tlb_others",
         "-ex", "continue", "-ex", "stepi", "-ex", "info registers eip", "-ex", "x/wx &sd_rounds",
         "-ex", "info threads", "-ex", "detach", str(kernel)],
        capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert f"Breakpoint 1, {syms['xen_flush_tlb_others']:#x} in xen_flush_tlb_others ()" in text, text
    assert "eip            0x" in text and "<xen_flush_tlb_others+" in text, text
    assert f"{syms['sd_rounds']:#x} <sd_rounds>:\t{ROUNDS:#010x}" in text, text
    assert "Thread 2 (vCPU 1)" in text, text
    assert "detached" in text, text
    finishes_normally(cluster)


def test_the_stub_only_listens_on_loopback_and_refuses_bad_ports(cluster: Path) -> None:
    bad = run_cli("gdb", "sd", "--port", "70000", "--run-dir", str(cluster))
    assert bad.returncode == 1 and "port" in bad.stderr
    port = start_stub(cluster)
    assert start_stub(cluster) == port  # one stub per domain: asked again, the same one
    info = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout if shutil.which("ss") else ""
    if info:
        assert f"127.0.0.1:{port}" in info and f"0.0.0.0:{port}" not in info
    if os.getuid() == 0 and shutil.which("setpriv"):  # another user's connection is closed unanswered
        code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}))\ns.sendall(b'$?#3f')\n"
                "try:\n    print(repr(s.recv(100)))\nexcept ConnectionResetError:\n    print(repr(b''))")
        other = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                                "-c", code], capture_output=True, text=True, timeout=60)
        assert other.stdout.strip() == "b''", other.stdout + other.stderr
    c = GdbClient("127.0.0.1", port)
    assert c.cmd(b"?").startswith(b"T05")
    c.close()
    # the connection closed without a detach: the cluster was released, and the domain finishes
    finishes_normally(cluster)
    wait_until(lambda: any(e["event"] == "gdb.detach" for e in gdb_events(cluster)))
    events = [e["event"] for e in gdb_events(cluster)]
    refused = ["gdb.refused"] if os.getuid() == 0 and shutil.which("setpriv") else []
    assert events == [*refused, "gdb.attach", "gdb.detach"]

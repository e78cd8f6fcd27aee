"""`pvcluster dump DOM FILE` on a running cluster: an ELF core that pyelftools and gdb read, taken at a window
boundary (the trace shows dump.paused / dump.resumed), never overwriting a file unless --force."""

from __future__ import annotations

import json
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from helpers import detached_cluster, run_cli, wait_until

from pvcluster.coredump import GREGS

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

SPEC = """
[cluster]
name = "dumped"
[[domain]]
name = "spin"
vcpus = 2
backend = "xen"
cmdline = "workload=forever"
"""


@pytest.fixture
def cluster(run_dir: Path) -> Iterator[Path]:
    with detached_cluster(run_dir, SPEC) as rd:
        wait_until(lambda: "spinning forever" in run_cli("console", "spin", "--run-dir", str(rd)).stdout)
        yield rd


def kernel_symbols(kernel: Path) -> dict[str, int]:
    with kernel.open("rb") as fh:
        elf = ELFFile(fh)
        table = elf.get_section_by_name(".symtab")
        assert isinstance(table, SymbolTableSection)
        return {s.name: s["st_value"] for s in table.iter_symbols() if s.name}


def kernel_bytes(kernel: Path, addr: int, n: int) -> bytes:
    with kernel.open("rb") as fh:
        for seg in ELFFile(fh).iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= addr < seg["p_vaddr"] + seg["p_filesz"]:
                return seg.data()[addr - seg["p_vaddr"] : addr - seg["p_vaddr"] + n]
    raise AssertionError(f"{addr:#x} is not in the kernel image")


def core_read(elf: ELFFile, addr: int, n: int) -> bytes:
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= addr and addr + n <= seg["p_vaddr"] + seg["p_memsz"]:
            return seg.data()[addr - seg["p_vaddr"] : addr - seg["p_vaddr"] + n]
    raise AssertionError(f"{addr:#x} is not in the core")


def test_dump_is_a_core_pyelftools_reads(cluster: Path, run_dir: Path) -> None:
    core = run_dir / "spin.core"
    res = run_cli("dump", "spin", str(core), "--run-dir", str(cluster), "--json")
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["path"] == str(core) and rec["vcpus"] == 2 and rec["size"] == core.stat().st_size
    assert stat.S_IMODE(core.stat().st_mode) == 0o600
    kernel = cluster / "kernels" / "pvkern.elf"
    syms = kernel_symbols(kernel)
    text_end = max(syms.values())
    with core.open("rb") as fh:
        elf = ELFFile(fh)
        assert elf["e_type"] == "ET_CORE" and elf["e_machine"] == "EM_386"
        notes = list(next(elf.iter_segments()).iter_notes())
        status = [n["n_desc"] for n in notes if n["n_type"] == "NT_PRSTATUS"]
        assert [struct.unpack_from("<i", s, 24)[0] for s in status] == [1, 2]  # pr_pid: vCPU id + 1
        for s in status:
            regs = dict(zip(GREGS, struct.unpack_from("<17I", s, 72), strict=True))
            # in the kernel, in ring 1 (FLAT_RING1_CS), or in the hypervisor's trampoline (ring 0, in the hole)
            in_kernel = syms["_start"] <= regs["eip"] <= text_end and regs["cs"] == 0xE019
            assert in_kernel or (regs["cs"] == 0xE008 and regs["eip"] >= 0xFC000000), hex(regs["eip"])
            core_read(elf, regs["esp"] - 4, 4)  # the stack is mapped, so it is in the core
        # memory at kernel symbols: a variable the kernel set (the default shootdown round count) and constant text
        assert struct.unpack("<I", core_read(elf, syms["sd_rounds"], 4))[0] == 40
        msg = syms["msg_forever"]
        assert core_read(elf, msg, 16) == kernel_bytes(kernel, msg, 16)
    trace = [json.loads(line) for line in (cluster / "trace" / "hypervisor.jsonl").read_text().splitlines()]
    paused = [e for e in trace if e["event"] == "dump.paused"]
    resumed = [e for e in trace if e["event"] == "dump.resumed"]
    assert len(paused) == len(resumed) == 1 and paused[0]["vt_ns"] == resumed[0]["vt_ns"] == rec["vt_ns"]
    assert resumed[0]["size"] == rec["size"] and resumed[0]["file"] == str(core)
    # the domain runs on after the dump
    vt = json.loads(run_cli("list", "--json", "--run-dir", str(cluster)).stdout)[0]
    assert vt["state"] == "running"


def test_dump_refuses_to_overwrite_without_force_and_resolves_relative_paths(cluster: Path, run_dir: Path) -> None:
    core = run_dir / "rel.core"
    res = subprocess.run([*run_cli_argv(), "dump", "spin", "rel.core", "--run-dir", str(cluster)], cwd=run_dir,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    first = core.read_bytes()
    again = run_cli("dump", "spin", str(core), "--run-dir", str(cluster))
    assert again.returncode == 1 and "exists" in again.stderr and core.read_bytes() == first
    forced = run_cli("dump", "1", str(core), "--run-dir", str(cluster), "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["size"] == core.stat().st_size
    missing = run_cli("dump", "nosuch", str(run_dir / "x.core"), "--run-dir", str(cluster))
    assert missing.returncode == 1 and "no domain" in missing.stderr
    nodir = run_cli("dump", "spin", str(run_dir / "nodir" / "x.core"), "--run-dir", str(cluster))
    assert nodir.returncode == 1 and "directory" in nodir.stderr
    assert not list(run_dir.glob(".*.tmp"))  # nothing left half-written


def run_cli_argv() -> list[str]:
    import sys

    return [sys.executable, "-m", "pvcluster.cli"]


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed (.ci/run installs it)")
def test_gdb_reads_the_dump(cluster: Path, run_dir: Path) -> None:
    core = run_dir / "gdb.core"
    assert run_cli("dump", "spin", str(core), "--run-dir", str(cluster)).returncode == 0
    kernel = cluster / "kernels" / "pvkern.elf"
    syms = kernel_symbols(kernel)
    with core.open("rb") as fh:
        status = [n["n_desc"] for n in next(ELFFile(fh).iter_segments()).iter_notes() if n["n_type"] == "NT_PRSTATUS"]
    regs = dict(zip(GREGS, struct.unpack_from("<17I", status[0], 72), strict=True))
    out = subprocess.run(["gdb", "-nx", "-batch", "-ex", "info registers", "-ex", f"x/4xw {syms['sd_rounds']:#x}",
                          "-ex", "info threads", str(kernel), str(core)],
                         capture_output=True, text=True, timeout=120).stdout
    assert f"eip            {regs['eip']:#x}" in out, out
    assert f"esp            {regs['esp']:#x}" in out, out
    assert "cs             0xe019" in out, out
    assert f"{syms['sd_rounds']:#x} <sd_rounds>:\t0x00000028" in out, out
    assert "LWP 1" in out and "LWP 2" in out, out


def test_a_dump_moves_no_virtual_time(run_dir: Path) -> None:
    """The same spec run twice, once dumped along the way: `pvcluster diff` finds the same virtual-time run."""
    spec = run_dir / "sd.toml"
    spec.write_text(SPEC.replace('name = "dumped"', 'name = "sd"').replace(
        'cmdline = "workload=forever"', 'cmdline = "workload=shootdown sdrounds=600 shutdown=poweroff"'))
    runs = []
    for dumped in (False, True):
        rd = run_dir / f"run-{int(dumped)}"
        assert run_cli("up", str(spec), "--run-dir", str(rd), "--detach").returncode == 0
        try:
            if dumped:
                wait_until(lambda rd=rd: "pvkern" in run_cli("console", "spin", "--run-dir", str(rd)).stdout)
                res = run_cli("dump", "spin", str(run_dir / "mid.core"), "--run-dir", str(rd), "--json")
                assert res.returncode == 0, res.stderr
                assert json.loads(res.stdout)["vt_ns"] > 0
            wait_until(lambda rd=rd: json.loads(run_cli("list", "--json", "--run-dir", str(rd)).stdout)[0]["state"]
                       == "dead", timeout=120)
        finally:
            run_cli("down", "--run-dir", str(rd))
        runs.append(rd)
    diff = run_cli("diff", str(runs[0]), str(runs[1]))
    assert diff.returncode == 0, diff.stdout + diff.stderr


def test_python_api_dumps_and_starts_the_stub(run_dir: Path) -> None:
    from gdbclient import GdbClient

    from pvcluster.cluster import Cluster
    from pvcluster.spec import parse_spec

    with Cluster.start(parse_spec(SPEC), run_dir=run_dir / "run", detach=True) as cluster:
        cluster.wait_for("console", dom="spin")
        rec = cluster.dump("spin", run_dir / "api.core")
        assert rec["size"] == (run_dir / "api.core").stat().st_size and rec["vcpus"] == 2
        port = cluster.gdb("spin")
        client = GdbClient("127.0.0.1", port)
        assert client.cmd(b"qfThreadInfo") == b"m1,2"
        assert client.cmd(b"D") == b"OK"
        client.close()

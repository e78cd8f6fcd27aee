"""kexec through the control plane and xl's life-cycle actions, through real processes: pvkern's workload=kexec is
replaced by its second stage (a new domain, same name, new domid); a hostile C guest's kexec_op calls get Xen's
errnos while a bystander domain runs on; on_reboot = "restart" restarts until the reboot-storm guard stops it;
on_crash = "destroy" destroys a crashed domain."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cguest import (
    C_CONSOLE_SCHED,
    C_ELFNOTE,
    C_HYPERCALLS,
    C_REPORT,
    build_guest,
    c_entry,
    c_finish,
    c_xen_notes,
)
from helpers import run_cli

from hypervisor.core import RESTART_LIMIT
from pvcluster.cluster import Cluster
from pvcluster.rundiff import first_divergence
from pvcluster.spec import parse_spec
from pvcluster.trace import read_events

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

BYSTANDER = '[[domain]]\nname = "bystander"\nvcpus = 1\ncmdline = "workload=timer ticks=20 shutdown=poweroff"\n'


def _run(run_dir: Path, spec_text: str) -> tuple[dict[str, Any], Cluster]:
    spec = parse_spec(f'[cluster]\nname = "kx"\n{spec_text}')
    with Cluster.start(spec, run_dir=run_dir / "run") as cluster:
        final = cluster.wait(timeout_s=180)
        consoles = {d["domid"]: cluster.client.call("console", dom=d["domid"]) for d in final["domains"]}
    final["consoles"] = consoles
    return final, cluster


def _events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return [e for f in sorted((run_dir / "run" / "trace").glob("*.jsonl")) for e in read_events(f)
            if e.get("event") == name]


def _doms(final: dict[str, Any]) -> list[tuple[int, str, str, str | None]]:
    return [(d["domid"], d["name"], d["state"], d["shutdown_reason"]) for d in final["domains"]]


def test_kexec_workload_boots_the_second_stage_as_a_new_domain(run_dir: Path) -> None:
    final, _ = _run(run_dir, '[[domain]]\nname = "k"\nvcpus = 1\ncmdline = "workload=kexec"\n' + BYSTANDER)
    assert _doms(final) == [(1, "k", "dead", "kexec"), (2, "bystander", "dead", "poweroff"),
                            (3, "k", "dead", "poweroff")]
    assert any("second stage loaded" in line for line in final["consoles"][1])
    assert final["consoles"][3] == ["pvkern-kexec2: second stage up, kexec'd by the control plane"]
    (restarted,) = _events(run_dir, "domain.restarted")
    assert (restarted["old_domid"], restarted["new_domid"], restarted["why"]) == (1, 3, "kexec")
    assert [e["reason"] for e in _events(run_dir, "domain.shutdown") if e["dom"] == 1] == ["kexec"]
    (loaded,) = _events(run_dir, "kexec.load")
    assert loaded["dom"] == 1 and loaded["type"] == 0 and loaded["bytes"] > 4096


def test_kdump_boots_the_crash_image_when_the_domain_crashes(run_dir: Path) -> None:
    final, _ = _run(run_dir, '[[domain]]\nname = "k"\nvcpus = 1\ncmdline = "workload=kexec kexec=crash"\n')
    assert _doms(final) == [(1, "k", "dead", "crash"), (2, "k", "dead", "poweroff")]
    assert final["consoles"][2] == ["pvkern-kexec2: second stage up, kexec'd by the control plane"]
    (restarted,) = _events(run_dir, "domain.restarted")
    assert (restarted["old_domid"], restarted["new_domid"], restarted["why"]) == (1, 2, "kdump")
    (loaded,) = _events(run_dir, "kexec.load")
    assert loaded["type"] == 1
    # kdump: the old domain's memory, dumped before its process ended, with its vCPU's registers
    _assert_core_of_old_memory(run_dir / "run" / "dumps" / "k-d1.core", b"workload=kexec kexec=crash")
    (dumped,) = _events(run_dir, "domain.coredump")
    assert dumped["dom"] == 1 and dumped["size"] > 1 << 20


def _assert_core_of_old_memory(core: Path, cmdline: bytes) -> None:
    """An ELF core with one NT_PRSTATUS for the one vCPU, whose memory holds what only the running domain had:
    start_info's magic and command line, written by the domain builder, in no kernel image."""
    from elftools.elf.elffile import ELFFile

    with core.open("rb") as fh:
        elf = ELFFile(fh)
        assert elf["e_type"] == "ET_CORE"
        notes = [n for seg in elf.iter_segments() if seg["p_type"] == "PT_NOTE" for n in seg.iter_notes()]
        assert [n["n_type"] for n in notes].count("NT_PRSTATUS") == 1
        memory = b"".join(seg.data() for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD")
    assert b"xen-3.0-x86_32" in memory and cmdline in memory


def test_on_reboot_restart_until_the_storm_guard(run_dir: Path) -> None:
    final, _ = _run(run_dir, '[[domain]]\nname = "r"\nvcpus = 1\ncmdline = "shutdown=reboot"\n'
                             'on_reboot = "restart"\n')
    doms = _doms(final)
    assert doms == [(i, "r", "dead", "reboot") for i in range(1, RESTART_LIMIT + 2)]
    assert [(e["old_domid"], e["new_domid"]) for e in _events(run_dir, "domain.restarted")] == [
        (i, i + 1) for i in range(1, RESTART_LIMIT + 1)]
    (refused,) = _events(run_dir, "domain.restart_refused")
    assert refused["dom"] == RESTART_LIMIT + 1 and refused["restarts"] == RESTART_LIMIT


def test_on_crash_destroy(run_dir: Path) -> None:
    final, _ = _run(run_dir, '[[domain]]\nname = "c"\nvcpus = 1\ncmdline = "shutdown=crash"\non_crash = "destroy"\n')
    assert _doms(final) == [(1, "c", "dead", "crash")]
    assert _events(run_dir, "domain.destroy")
    assert not (run_dir / "run" / "dumps").exists()


def test_on_crash_coredump_destroy_dumps_then_destroys(run_dir: Path) -> None:
    final, _ = _run(run_dir, '[[domain]]\nname = "c"\nvcpus = 1\ncmdline = "shutdown=crash"\n'
                             'on_crash = "coredump-destroy"\n' + BYSTANDER)
    assert _doms(final) == [(1, "c", "dead", "crash"), (2, "bystander", "dead", "poweroff")]
    _assert_core_of_old_memory(run_dir / "run" / "dumps" / "c-d1.core", b"shutdown=crash")
    assert _events(run_dir, "domain.destroy")


HOSTILE_C = r"""
/* A PV guest that hands kexec_op bad arguments and checks each errno, built against Xen's public headers. */
#define __XEN_INTERFACE_VERSION__ 0x00040400
#include <stdint.h>
#include <xen/xen.h>
#include <xen/sched.h>
#include <xen/elfnote.h>
#include <xen/errno.h>
#include <xen/kexec.h>
""" + C_ELFNOTE + c_xen_notes("mini-kexec") + c_entry() + C_HYPERCALLS + C_CONSOLE_SCHED + r"""
static int HYPERVISOR_kexec_op(unsigned long op, void *arg)
{ return _hypercall2(int, kexec_op, op, arg); }
""" + C_REPORT + r"""
#define UNMAPPED ((void *)0x1000)
#define EM_386 3
static xen_kexec_load_t load;
static xen_kexec_segment_t segs[16];
static xen_kexec_exec_t ex;
static xen_kexec_status_t st;
static xen_kexec_unload_t un;
static char image[256] = "NOT AN ELF";

static int load_one(unsigned long buf, uint64_t size, uint64_t dest, uint64_t dest_size, unsigned int nr)
{
    segs[0].buf.h.p = (void *)buf;
    segs[0].buf_size = size;
    segs[0].dest_maddr = dest;
    segs[0].dest_size = dest_size;
    load.type = KEXEC_TYPE_DEFAULT;
    load.arch = EM_386;
    load.nr_segments = nr;
    set_xen_guest_handle(load.segments.h, segs);
    load.entry_maddr = dest;
    return HYPERVISOR_kexec_op(KEXEC_CMD_kexec_load, &load);
}

void start_kernel(start_info_t *si)
{
    struct sched_shutdown sd;
    (void)si;
    ex.type = KEXEC_TYPE_DEFAULT;
    check("kexec with nothing loaded", HYPERVISOR_kexec_op(KEXEC_CMD_kexec, &ex), -XEN_ENOENT);
    ex.type = KEXEC_TYPE_CRASH;
    check("kexec crash with nothing loaded", HYPERVISOR_kexec_op(KEXEC_CMD_kexec, &ex), -XEN_ENOENT);
    check("kexec with an unmapped argument", HYPERVISOR_kexec_op(KEXEC_CMD_kexec, UNMAPPED), -XEN_EFAULT);
    ex.type = 7;
    check("kexec of no such type", HYPERVISOR_kexec_op(KEXEC_CMD_kexec, &ex), -XEN_EINVAL);
    st.type = KEXEC_TYPE_DEFAULT;
    check("status with nothing loaded", HYPERVISOR_kexec_op(KEXEC_CMD_kexec_status, &st), 0);
    st.type = 9;
    check("status of no such type", HYPERVISOR_kexec_op(KEXEC_CMD_kexec_status, &st), -XEN_EINVAL);
    un.type = KEXEC_TYPE_DEFAULT;
    check("unload with nothing loaded", HYPERVISOR_kexec_op(KEXEC_CMD_kexec_unload, &un), 0);
    check("load with an unmapped struct", HYPERVISOR_kexec_op(KEXEC_CMD_kexec_load, UNMAPPED), -XEN_EFAULT);
    check("load from an unmapped buffer", load_one(0x1000, 64, 0, 4096, 1), -XEN_EFAULT);
    check("load of a huge buffer", load_one((unsigned long)image, 0x7fffffffULL, 0, 0x80000000ULL, 1),
          -XEN_EADDRNOTAVAIL);
    check("load past 4 GiB", load_one((unsigned long)image, 64, 0xfffff000ULL, 0x10000000000ULL, 1),
          -XEN_EADDRNOTAVAIL);
    check("load of more than the image limit", load_one((unsigned long)image, 2 << 20, 0, 2 << 20, 1),
          -XEN_ENOMEM);
    check("load with a buffer larger than its room", load_one((unsigned long)image, 8192, 0, 4096, 1),
          -XEN_EINVAL);
    check("load at an unaligned destination", load_one((unsigned long)image, 64, 12, 4096, 1),
          -XEN_EADDRNOTAVAIL);
    check("load of KEXEC_SEGMENT_MAX segments", load_one((unsigned long)image, 64, 0, 4096, 16), -XEN_EINVAL);
    check("load of no segments", load_one((unsigned long)image, 64, 0, 4096, 0), -XEN_EINVAL);
    load.nr_segments = 1;
    set_xen_guest_handle(load.segments.h, UNMAPPED);
    check("load with an unmapped segment array", HYPERVISOR_kexec_op(KEXEC_CMD_kexec_load, &load), -XEN_EFAULT);
    check("load of something that is not an ELF", load_one((unsigned long)image, 64, 0, 4096, 1), -XEN_EINVAL);
    load.arch = 62; /* EM_X86_64 */
    check("load of another machine's image", HYPERVISOR_kexec_op(KEXEC_CMD_kexec_load, &load), -XEN_EINVAL);
    check("the obsolete v1 load", HYPERVISOR_kexec_op(1, &load), -XEN_EOPNOTSUPP);
    check("kexec_get_range", HYPERVISOR_kexec_op(KEXEC_CMD_kexec_get_range, &load), -XEN_EOPNOTSUPP);
    check("no such command", HYPERVISOR_kexec_op(77, &load), -XEN_EOPNOTSUPP);
    st.type = KEXEC_TYPE_DEFAULT;
    check("still nothing loaded", HYPERVISOR_kexec_op(KEXEC_CMD_kexec_status, &st), 0);
""" + c_finish("mini-kexec")


def test_hostile_kexec_op_gets_errnos_and_harms_nobody(run_dir: Path) -> None:
    elf = build_guest(run_dir / "guest", HOSTILE_C, name="mini-kexec",
                      headers=(Path("/usr/include/xen/kexec.h"),))
    final, _ = _run(run_dir, f'[[domain]]\nname = "h"\nvcpus = 1\nkernel = "{elf}"\n' + BYSTANDER)
    console = final["consoles"][1]
    assert not [line for line in console if "FAIL" in line], console
    assert console[-1] == "mini-kexec: 0 failures", console
    assert len(console) == HOSTILE_C.count('check("') + 1
    assert _doms(final) == [(1, "h", "dead", "poweroff"), (2, "bystander", "dead", "poweroff")]
    assert not _events(run_dir, "domain.restarted")


def test_replay_reproduces_a_sched_slice_change_and_the_restarts(run_dir: Path) -> None:
    """`pvcluster sched --slice` is recorded as a `sched` fault: a replay changes the slice at the same step, and a
    run with kexec and on_reboot restarts replays event for event."""
    a = run_dir / "a"
    spec = parse_spec('[cluster]\nname = "rs"\n[[domain]]\nname = "sd"\nvcpus = 2\n'
                      'cmdline = "workload=shootdown sdrounds=200 shutdown=reboot"\non_reboot = "restart"\n'
                      '[[domain]]\nname = "k"\nvcpus = 1\ncmdline = "workload=timer ticks=3 workload=kexec"\n')
    with Cluster.start(spec, run_dir=a) as cluster:
        cluster.wait_for("shootdown", dom="sd")
        changed = cluster.client.call("sched", timeout_s=20, slice_ns=70_000)
        assert changed["slice_ns"] == 70_000 and changed["change"]["outcome"] == "slice 30000 ns -> 70000 ns"
        final = cluster.wait(timeout_s=180)
    assert [d["name"] for d in final["domains"]].count("sd") == RESTART_LIMIT + 1
    replayed = run_cli("up", "--replay", str(a), "--quiet")
    assert replayed.returncode == 0, replayed.stderr
    b = run_dir / "a-replay-1"
    again = [json.loads(line) for line in (b / "faults.jsonl").read_text().splitlines()]
    assert [(f["kind"], f["outcome"]) for f in again] == [("sched", "slice 30000 ns -> 70000 ns")]
    assert first_divergence(a, b) is None

"""Guests the project did not build boot unchanged: a C guest compiled against Xen's public headers, and an image
whose only Xen metadata is a legacy ``__xen_guest`` section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keystone
import pytest
from cguest import C_ELFNOTE, C_HYPERCALLS, C_PUT, VIRT_BASE, build_guest, c_entry, c_xen_notes

from domains.elf_load import parse_guest_image
from domains.elf_pack import Segment, pack_elf32
from pvcluster.abi.layouts import StartInfo
from pvcluster.abi.xen import HYPERCALL_STUB_SIZE, PAGE_SIZE, ConsoleIO, Hypercall, SchedOp, ShutdownReason
from pvcluster.cluster import Cluster
from pvcluster.spec import parse_spec
from pvcluster.trace import read_events

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

CMDLINE = "hello-from-test"

# ---------------------------------------------------------------------------------------------------------------
# The C guest: everything it knows about the hypervisor comes from <xen/*.h>.

GUEST_C = r"""
/* A minimal PV guest built against Xen's public headers, freestanding. */
#define __XEN_INTERFACE_VERSION__ 0x00030205
#include <stdint.h> /* the Xen headers use the fixed-width types; gcc provides them freestanding */
#include <xen/xen.h>
#include <xen/sched.h>
#include <xen/elfnote.h>

""" + C_ELFNOTE + c_xen_notes("mini-c") + c_entry() + r"""
extern char hypercall_page[4096];
""" + C_HYPERCALLS + r"""
static int HYPERVISOR_console_io(int cmd, int count, const char *str)
{
    return _hypercall3(int, console_io, cmd, count, str);
}

static int HYPERVISOR_sched_op(int cmd, void *arg)
{
    return _hypercall2(int, sched_op, cmd, arg);
}

static char line[256 + MAX_GUEST_CMDLINE];
static unsigned int len;
""" + C_PUT + r"""

void start_kernel(start_info_t *si)
{
    struct sched_shutdown sd;

    put_str("mini-c: hello from a guest built with the Xen headers, nr_pages=");
    put_dec(si->nr_pages);
    put_str(", cmdline=");
    put_str((const char *)si->cmd_line);
    put_str("\n");
    HYPERVISOR_console_io(CONSOLEIO_write, (int)len, line);

    sd.reason = SHUTDOWN_reboot;
    HYPERVISOR_sched_op(SCHEDOP_shutdown, &sd);
    for (;;)
        ;
}
"""


def _run_one(run_dir: Path, kernel: Path, cmdline: str, name: str) -> tuple[dict[str, Any], list[str]]:
    spec = parse_spec(
        f"""
[cluster]
name = "foreign"
[[domain]]
name = "{name}"
vcpus = 1
memory_mib = 4
kernel = "{kernel}"
cmdline = "{cmdline}"
"""
    )
    with Cluster.start(spec, run_dir=run_dir) as cluster:
        final = cluster.wait(timeout_s=120)
        (dom,) = final["domains"]
        console = cluster.client.call("console", dom=dom["domid"])
    return dom, console


def _hypercalls(run_dir: Path, domid: int) -> list[dict[str, Any]]:
    return [
        e
        for e in read_events(run_dir / "trace" / "hypervisor.jsonl")
        if e["event"] == "hypercall" and e.get("dom") == domid
    ]


def test_c_guest_built_with_xen_headers_boots_unchanged(run_dir: Path) -> None:
    work = run_dir / "cguest"
    work.mkdir()
    elf = build_guest(work, GUEST_C)

    image = parse_guest_image(elf.read_bytes(), 4 << 20)
    assert image.metadata_source == "notes"
    assert (image.guest_os, image.xen_version, image.loader) == ("mini-c", "xen-3.0", "generic")
    assert (image.virt_base, image.paddr_offset) == (VIRT_BASE, VIRT_BASE)
    assert image.hypercall_page is not None and image.hypercall_page % PAGE_SIZE == 0
    assert image.hypercall_page == image.symbols["hypercall_page"]
    assert image.entry == image.symbols["_start"]
    assert image.image_start >= VIRT_BASE and image.image_end <= VIRT_BASE + (4 << 20)

    dom, console = _run_one(run_dir / "run", elf, CMDLINE, "minic")
    expected = f"mini-c: hello from a guest built with the Xen headers, nr_pages=1024, cmdline={CMDLINE}"
    assert console == [expected], console
    assert (dom["state"], dom["shutdown_reason"], dom["crash"]) == ("dead", "reboot", ""), dom

    calls = _hypercalls(run_dir / "run", dom["domid"])
    assert [(e["name"], e["args"][0], e["result"]) for e in calls] == [
        ("console_io", ConsoleIO.write, 0),
        ("sched_op", SchedOp.shutdown, 0),
    ]
    assert calls[0]["args"][1] == len(expected) + 1  # the line and its newline, in one write


# ---------------------------------------------------------------------------------------------------------------
# A legacy image: no ELF notes, only `__xen_guest` with HYPERCALL_PAGE as a page number. Pure Python: never skips.

HC_PAGE_NUMBER = 1
HC_PAGE = VIRT_BASE + HC_PAGE_NUMBER * PAGE_SIZE
DATA = VIRT_BASE + 2 * PAGE_SIZE  # message, then struct sched_shutdown
GREETING = b"xguest: hello through __xen_guest, cmdline="
SHUTDOWN_STRUCT = DATA + 0x100
CMD_LINE_OFFSET = StartInfo(nr_pages=0, shared_info=0, cmd_line=b"\x01").pack().index(b"\x01")


def _stub(nr: int) -> int:
    return HC_PAGE + nr * HYPERCALL_STUB_SIZE


def _xen_guest_image() -> bytes:
    source = f"""
        mov ebp, esi
        mov ebx, {ConsoleIO.write}
        mov ecx, {len(GREETING)}
        mov edx, {DATA:#x}
        call {_stub(Hypercall.console_io):#x}
        lea edx, [ebp + {CMD_LINE_OFFSET}]
        xor ecx, ecx
    count:
        cmp byte ptr [edx + ecx], 0
        je counted
        inc ecx
        jmp count
    counted:
        mov byte ptr [edx + ecx], 10
        inc ecx
        mov ebx, {ConsoleIO.write}
        call {_stub(Hypercall.console_io):#x}
        mov dword ptr [{SHUTDOWN_STRUCT:#x}], {ShutdownReason.poweroff}
        mov ebx, {SchedOp.shutdown}
        mov ecx, {SHUTDOWN_STRUCT:#x}
        call {_stub(Hypercall.sched_op):#x}
    spin:
        jmp spin
    """
    encoding, _ = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32).asm(source, VIRT_BASE)
    code = bytes(encoding)
    assert len(code) < PAGE_SIZE
    # page 0: code; page 1: the hypercall page (zeros until the builder fills it); page 2: data
    body = code.ljust(2 * PAGE_SIZE, b"\0") + GREETING
    xen_guest = (
        f"GUEST_OS=xguest,XEN_VER=xen-3.0,VIRT_BASE=0x{VIRT_BASE:X},ELF_PADDR_OFFSET=0x{VIRT_BASE:X},"
        f"HYPERCALL_PAGE={HC_PAGE_NUMBER:X},LOADER=generic,PAE=no"
    )
    return pack_elf32(entry=VIRT_BASE, segments=[Segment(VIRT_BASE, body, memsz=3 * PAGE_SIZE)], xen_guest=xen_guest)


def test_xen_guest_section_only_image_boots(run_dir: Path) -> None:
    data = _xen_guest_image()
    image = parse_guest_image(data, 4 << 20)
    assert image.metadata_source == "xen_guest"
    assert (image.guest_os, image.virt_base, image.hypercall_page, image.entry) == (
        "xguest",
        VIRT_BASE,
        HC_PAGE,
        VIRT_BASE,
    )
    assert image.symbols == {}
    kernel = run_dir / "xguest.elf"
    kernel.write_bytes(data)

    dom, console = _run_one(run_dir / "run", kernel, CMDLINE, "xguest")
    assert console == [f"{GREETING.decode()}{CMDLINE}"], console
    assert (dom["state"], dom["shutdown_reason"], dom["crash"]) == ("dead", "poweroff", ""), dom
    calls = _hypercalls(run_dir / "run", dom["domid"])
    assert [(e["name"], e["result"]) for e in calls] == [("console_io", 0), ("console_io", 0), ("sched_op", 0)]

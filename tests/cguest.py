"""What the tests' C guests built against Xen's public headers (/usr/include/xen, Debian's libxen-dev) share: the C
prelude (the ELFNOTE macro, the standard notes, the entry block, Linux's hypercall-page call macros, the console
helpers) and building a guest with ``gcc -m32``, skipping with the reason where the headers or such a gcc are
missing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pvcluster.cluster import Cluster
from pvcluster.spec import parse_spec

VIRT_BASE = 0xC0000000
XEN_HEADER = Path("/usr/include/xen/xen.h")

CFLAGS = ["-m32", "-ffreestanding", "-fno-pic", "-fno-stack-protector", "-nostdlib", "-static", "-O1", "-no-pie"]
# -Ttext-segment puts the first PT_LOAD (ELF headers and .note.Xen) at VIRT_BASE and .text at VIRT_BASE + 4 KiB;
# a plain -Ttext would leave the header segment at the default 0x08048000, below VIRT_BASE.
LDFLAGS = [f"-Wl,-Ttext-segment={VIRT_BASE:#x}", "-Wl,--build-id=none"]

# The classic ELFNOTE pattern (Linux's include/linux/elfnote.h, assembler flavour), in an allocated .note.Xen.
C_ELFNOTE = r"""
#define STR_(x) #x
#define STR(x) STR_(x)
#define ELFNOTE(type, desc)                                 \
    ".pushsection .note.Xen,\"a\",@note\n"                  \
    ".balign 4\n"                                           \
    ".long 2f - 1f, 4f - 3f, " STR(type) "\n"               \
    "1: .asciz \"Xen\"\n"                                   \
    "2: .balign 4\n"                                        \
    "3: " desc "\n"                                         \
    "4: .balign 4\n"                                        \
    ".popsection\n"
"""


def c_xen_notes(guest_os: str) -> str:
    """The notes of a guest linked at VIRT_BASE that enters at _start and has a hypercall_page (needs C_ELFNOTE)."""
    return rf"""
__asm__(
    ELFNOTE(XEN_ELFNOTE_GUEST_OS, ".asciz \"{guest_os}\"")
    ELFNOTE(XEN_ELFNOTE_XEN_VERSION, ".asciz \"xen-3.0\"")
    ELFNOTE(XEN_ELFNOTE_LOADER, ".asciz \"generic\"")
    ELFNOTE(XEN_ELFNOTE_VIRT_BASE, ".long 0xC0000000")
    ELFNOTE(XEN_ELFNOTE_PADDR_OFFSET, ".long 0xC0000000")
    ELFNOTE(XEN_ELFNOTE_ENTRY, ".long _start")
    ELFNOTE(XEN_ELFNOTE_HYPERCALL_PAGE, ".long hypercall_page")
);
"""


def c_entry(bss_align: int = 16, bss: str = "") -> str:
    """_start (with %esi = start_info, it calls start_kernel(si) on its own stack in .bss), then the hypercall page, a
    page of .text (as in Linux's hypercall_page) that the domain builder fills with the hypervisor's stubs. ``bss``:
    more assembler lines (as C string literals) placed, ``bss_align``-aligned, before the stack."""
    return rf"""
__asm__(
    ".pushsection .text\n"
    ".globl _start\n"
    "_start:\n"
    "    cld\n"
    "    movl $boot_stack_top, %esp\n"
    "    pushl %esi\n"
    "    call start_kernel\n"
    "5:  hlt\n"
    "    jmp 5b\n"
    ".balign 4096\n"
    ".globl hypercall_page\n"
    "hypercall_page:\n"
    "    .skip 4096\n"
    ".popsection\n"
    ".pushsection .bss\n"
    ".balign {bss_align}\n"
{bss}    "boot_stack:\n"
    "    .skip 8192\n"
    "boot_stack_top:\n"
    ".popsection\n"
);
"""


# Linux's _hypercallN on x86-32: call the stub of `name`, arguments in ebx, ecx, edx, esi (needs C_ELFNOTE's STR).
C_HYPERCALLS = r"""
#define _hypercall1(type, name, a1)                                               \
({                                                                               \
    long __res, __ign1;                                                          \
    __asm__ volatile ("call hypercall_page + (" STR(__HYPERVISOR_##name) " * 32)" \
                      : "=a" (__res), "=b" (__ign1)                              \
                      : "1" ((long)(a1))                                         \
                      : "memory");                                               \
    (type)__res;                                                                 \
})
#define _hypercall2(type, name, a1, a2)                                           \
({                                                                               \
    long __res, __ign1, __ign2;                                                  \
    __asm__ volatile ("call hypercall_page + (" STR(__HYPERVISOR_##name) " * 32)" \
                      : "=a" (__res), "=b" (__ign1), "=c" (__ign2)               \
                      : "1" ((long)(a1)), "2" ((long)(a2))                       \
                      : "memory");                                               \
    (type)__res;                                                                 \
})
#define _hypercall3(type, name, a1, a2, a3)                                       \
({                                                                               \
    long __res, __ign1, __ign2, __ign3;                                          \
    __asm__ volatile ("call hypercall_page + (" STR(__HYPERVISOR_##name) " * 32)" \
                      : "=a" (__res), "=b" (__ign1), "=c" (__ign2), "=d" (__ign3) \
                      : "1" ((long)(a1)), "2" ((long)(a2)), "3" ((long)(a3))      \
                      : "memory");                                               \
    (type)__res;                                                                 \
})
#define _hypercall4(type, name, a1, a2, a3, a4)                                   \
({                                                                               \
    long __res, __ign1, __ign2, __ign3, __ign4;                                  \
    __asm__ volatile ("call hypercall_page + (" STR(__HYPERVISOR_##name) " * 32)" \
                      : "=a" (__res), "=b" (__ign1), "=c" (__ign2), "=d" (__ign3), \
                        "=S" (__ign4)                                            \
                      : "1" ((long)(a1)), "2" ((long)(a2)), "3" ((long)(a3)),     \
                        "4" ((long)(a4))                                         \
                      : "memory");                                               \
    (type)__res;                                                                 \
})
"""

# Building a console line: the guest declares `static char line[N]; static unsigned int len;` (or uses C_REPORT).
C_PUT = r"""
static void put_str(const char *s)
{
    while (*s && len < sizeof(line) - 1)
        line[len++] = *s++;
}

static void put_dec(long v)
{
    char digits[12];
    unsigned long u = v < 0 ? -(unsigned long)v : (unsigned long)v;
    int n = 0;
    if (v < 0)
        put_str("-");
    do {
        digits[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    while (n && len < sizeof(line) - 1)
        line[len++] = digits[--n];
}
"""

# check(): one console line, "<what> ok" or "<what> FAIL got <got> want <want>", counting `static int failures`
# (needs C_PUT and HYPERVISOR_console_io).
C_CHECK = r"""
static void check(const char *what, long got, long want)
{
    len = 0;
    put_str(what);
    if (got == want) {
        put_str(" ok\n");
    } else {
        put_str(" FAIL got ");
        put_dec(got);
        put_str(" want ");
        put_dec(want);
        put_str("\n");
        failures++;
    }
    HYPERVISOR_console_io(CONSOLEIO_write, (int)len, line);
}
"""

# The headers every guest includes (interface version 0x0003020a: GNTTABOP_set_version exists from there on).
C_HEAD = r"""
#define __XEN_INTERFACE_VERSION__ 0x0003020a
#include <stdint.h>
#include <xen/xen.h>
#include <xen/sched.h>
#include <xen/elfnote.h>
#include <xen/errno.h>
"""

# console_io and sched_op through the hypercall page (needs C_HYPERCALLS).
C_CONSOLE_SCHED = r"""
static int HYPERVISOR_console_io(int cmd, int count, const char *str)
{ return _hypercall3(int, console_io, cmd, count, str); }
static int HYPERVISOR_sched_op(int cmd, void *arg)
{ return _hypercall2(int, sched_op, cmd, arg); }
"""


def c_finish(name: str) -> str:
    """The end of start_kernel: the line "<name>: N failures", then SCHEDOP_shutdown with poweroff when every check
    passed, crash otherwise (needs C_PUT and C_CHECK's globals, HYPERVISOR_sched_op and a ``struct sched_shutdown
    sd``)."""
    return rf"""
    len = 0;
    put_str("{name}: ");
    put_dec(failures);
    put_str(" failures\n");
    HYPERVISOR_console_io(CONSOLEIO_write, (int)len, line);
    sd.reason = failures ? SHUTDOWN_crash : SHUTDOWN_poweroff;
    HYPERVISOR_sched_op(SCHEDOP_shutdown, &sd);
    for (;;)
        ;
}}
"""


def assert_all_passed(source: str, name: str, dom: dict[str, Any], console: list[str]) -> None:
    """Every check of ``source`` printed " ok", the guest said "<name>: 0 failures" and powered off."""
    assert not [line for line in console if "FAIL" in line], console
    assert console[-1] == f"{name}: 0 failures", console
    assert len(console) == source.count('check("') + 1 and all(line.endswith(" ok") for line in console[:-1])
    assert (dom["state"], dom["shutdown_reason"], dom["crash"]) == ("dead", "poweroff", ""), dom


# The console line, the failure count, put_str/put_dec and check() (needs C_CONSOLE_SCHED's console_io).
C_REPORT = r"""
static char line[256];
static unsigned int len;
static int failures;
""" + C_PUT + C_CHECK

_ABSENT = "{} is absent (install Xen's public headers, e.g. Debian's libxen-dev)"


def gcc(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["gcc", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def require_toolchain(work: Path, headers: tuple[Path, ...] = (XEN_HEADER,), cflags: list[str] = CFLAGS) -> None:
    """Skip unless the Xen headers are here and gcc builds and links 32-bit freestanding code (into ``work``)."""
    for header in headers:
        if not header.exists():
            pytest.skip(_ABSENT.format(header))
    if shutil.which("gcc") is None:
        pytest.skip("no gcc on PATH")
    work.mkdir(parents=True, exist_ok=True)
    (work / "probe.c").write_text("void _start(void) { for (;;) ; }\n")
    res = gcc([*cflags, "-o", "probe.elf", "probe.c"], work)
    if res.returncode != 0:
        pytest.skip(f"gcc cannot build and link 32-bit freestanding code here: {res.stderr.strip()[-400:]}")


def build_guest(work: Path, source: str, *, name: str = "guest", headers: tuple[Path, ...] = (XEN_HEADER,),
                extra_cflags: tuple[str, ...] = ()) -> Path:
    """Compile and link ``source`` (-Wall -Werror) at VIRT_BASE into ``work/<name>.elf``, or skip where this machine
    cannot (see require_toolchain)."""
    cflags = [*CFLAGS, *extra_cflags]
    require_toolchain(work, headers, [*cflags, *LDFLAGS])
    (work / f"{name}.c").write_text(source)
    res = gcc([*cflags, "-Wall", "-Werror", *LDFLAGS, "-o", f"{name}.elf", f"{name}.c"], work)
    assert res.returncode == 0, f"the guest did not compile against the Xen headers:\n{res.stderr}"
    return work / f"{name}.elf"


def run_one(run_dir: Path, name: str, elf: Path) -> tuple[dict[str, Any], list[str]]:
    """Boot ``elf`` as the only domain (1 vCPU, 4 MiB) of a real cluster until it ends: its final status and
    its console lines."""
    spec = parse_spec(f"""
[cluster]
name = "{name}"
[[domain]]
name = "{name}"
vcpus = 1
memory_mib = 4
kernel = "{elf}"
""")
    with Cluster.start(spec, run_dir=run_dir / "run") as cluster:
        final = cluster.wait(timeout_s=120)
        (dom,) = final["domains"]
        console: list[str] = cluster.client.call("console", dom=dom["domid"])
    return dom, console

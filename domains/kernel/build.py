"""Assemble the built-in guest kernel with keystone and pack it as an ELF32 Xen guest image."""

from __future__ import annotations

import functools
import re
from importlib import resources

import keystone

from domains.elf_pack import Segment, pack_elf32
from pvcluster.abi.pvops import PV_OPS
from pvcluster.abi.xen import HYPERCALL_STUB_SIZE, PAGE_SIZE, Hypercall, XenElfNote

VIRT_BASE = 0xC0000000
BUILTIN_KERNELS = ("pvkern",)
_STUBS = PAGE_SIZE // HYPERCALL_STUB_SIZE


class KernelBuildError(Exception):
    pass


def _hypercall_page_asm() -> str:
    """A page-aligned hypercall page with one label per 32-byte stub: `call hc_console_io`."""
    names = {int(h): h.name for h in Hypercall}
    lines = [".align 4096", "hypercall_page:"]
    for nr in range(_STUBS):
        label = f"hc_{names[nr]}" if nr in names else f"hc_slot_{nr}"
        lines.append(f"{label}: .space {HYPERCALL_STUB_SIZE}")
    return "\n".join(lines) + "\n"


# The built-in kernel's source files, assembled as one unit in this order.
KERNEL_FILES = {
    "pvkern": ("pvkern.S", "pvops.S", "backend_xen.S", "backend_vmi.S", "smp.S", "shootdown.S", "opstest.S",
               "mmuhostile.S", "multicall_bench.S", "evtchn_work.S")
}
PVCALL_SITE_LEN = 6  # call dword ptr [disp32]
ENTRY_SYMBOLS = ("_start", "pv_entry_ident", "pv_entry_xen", "pv_entry_vmi", "pv_entry_native")


def kernel_source(name: str) -> str:
    if name not in BUILTIN_KERNELS:
        raise KernelBuildError(f"no built-in kernel named {name!r} (built-ins: {', '.join(BUILTIN_KERNELS)})")
    files = resources.files("domains.kernel")
    parts = [files.joinpath(f).read_text(encoding="utf-8") for f in KERNEL_FILES[name]]
    # pvkern.S holds the shared .equ constants; the other files use them, so they must come after it.
    return "\n".join(parts)


_PVCALL = re.compile(r"^(\s*)PVCALL\s+(\w+)\s*(#.*)?$")


def expand_pvcalls(source: str) -> str:
    """Turn each ``PVCALL op`` into an indirect call through pv_ops and record it in the patch-site table."""
    out: list[str] = []
    sites: list[str] = []
    for line in source.splitlines():
        m = _PVCALL.match(line)
        if not m:
            out.append(line)
            continue
        op = m.group(2)
        if op not in PV_OPS:
            raise KernelBuildError(f"PVCALL of unknown op {op!r} (ops: {', '.join(PV_OPS)})")
        label = f"__pv_site_{len(sites)}"
        out.append(f"{label}:")
        out.append(f"{m.group(1)}call dword ptr [pv_ops + {4 * PV_OPS.index(op)}]")
        sites.append(f"    .long {PV_OPS.index(op)}, {label}, {PVCALL_SITE_LEN}")
    out += [".align 4", "pv_patch_sites:", *sites, "pv_patch_sites_end:"]
    return "\n".join(out) + "\n"


_EQU = re.compile(r"^\s*\.equ\s+([A-Za-z_]\w*)\s*,\s*(.+?)\s*(#.*)?$")


def preprocess(source: str) -> str:
    """Expand ``.equ`` constants textually: keystone mis-resolves an .equ symbol added to a forward label
    inside a memory operand (``[buf + OFFSET]`` assembles as ``[OFFSET]``)."""
    consts: dict[str, str] = {}
    out = []
    for line in source.splitlines():
        m = _EQU.match(line)
        if m:
            consts[m.group(1)] = f"({_substitute(m.group(2), consts)})"
            continue
        out.append(_substitute(line, consts) if consts else line)
    return "\n".join(out) + "\n"


def _substitute(line: str, consts: dict[str, str]) -> str:
    code, hash_, comment = line.partition("#")
    for name, value in consts.items():
        code = re.sub(rf"\b{name}\b", value, code)
    return code + hash_ + comment


def _locate_error(ks: keystone.Ks, source: str, base: int, errno: int) -> str:
    """keystone reports no line numbers: find the shortest prefix of the source that fails the same way."""
    lines = source.splitlines()

    def fails(n: int) -> bool:
        try:
            ks.asm("\n".join(lines[:n]), base)
        except keystone.KsError as exc:
            return bool(exc.errno == errno)
        return False

    lo, hi = 0, len(lines)
    while lo < hi:
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid + 1
    return f" at statement {lines[lo - 1].strip()!r}" if 0 < lo <= len(lines) else ""


def assemble(source: str, base: int) -> tuple[bytes, dict[str, int]]:
    """Assemble ``source`` at ``base``; return the bytes and the addresses of the symbols the loader needs."""
    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)
    symbols: dict[str, int] = {}
    wanted = (*ENTRY_SYMBOLS, "hypercall_page", "pv_patch_sites", "pv_patch_sites_end")
    # keystone cannot report symbol values, so each wanted label is located by assembling a probe that
    # stores the label's address as data at the end of the image.
    probe = (
        expand_pvcalls(preprocess(source))
        + _hypercall_page_asm()
        + "\n.align 4\n__symtab:\n"
        + "".join(f".long {w}\n" for w in wanted)
    )
    try:
        encoding, _ = ks.asm(probe, base)
    except keystone.KsError as exc:
        where = _locate_error(ks, probe, base, exc.errno)
        raise KernelBuildError(f"keystone failed to assemble the kernel: {exc}{where}") from None
    code = bytes(encoding)
    table = code[len(code) - 4 * len(wanted) :]
    for i, w in enumerate(wanted):
        symbols[w] = int.from_bytes(table[4 * i : 4 * i + 4], "little")
    return code, symbols


@functools.lru_cache(maxsize=8)
def build_kernel(name: str = "pvkern") -> bytes:
    """The ELF image of a built-in kernel, with Xen ELF notes and a ``__xen_guest`` section."""
    code, symbols = assemble(kernel_source(name), VIRT_BASE)
    hypercall_page = symbols["hypercall_page"]
    xen_guest = (
        f"GUEST_OS={name},XEN_VER=xen-3.0,VIRT_BASE=0x{VIRT_BASE:x},ELF_PADDR_OFFSET=0x{VIRT_BASE:x},"
        f"HYPERCALL_PAGE=0x{(hypercall_page - VIRT_BASE) // PAGE_SIZE:x},LOADER=generic"
    )
    notes: list[tuple[int, int | bytes | str]] = [
        (XenElfNote.GUEST_OS, name),
        (XenElfNote.GUEST_VERSION, "0.1"),
        (XenElfNote.XEN_VERSION, "xen-3.0"),
        (XenElfNote.LOADER, "generic"),
        (XenElfNote.VIRT_BASE, VIRT_BASE),
        (XenElfNote.PADDR_OFFSET, VIRT_BASE),
        (XenElfNote.ENTRY, symbols["_start"]),
        (XenElfNote.HYPERCALL_PAGE, hypercall_page),
    ]
    return pack_elf32(
        entry=symbols["_start"],
        segments=[Segment(vaddr=VIRT_BASE, data=code)],
        xen_guest=xen_guest,
        notes=notes,
        symbols=symbols,
    )

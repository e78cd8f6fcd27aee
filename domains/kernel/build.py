"""Assemble the built-in guest kernel with keystone and pack it as an ELF32 Xen guest image."""

from __future__ import annotations

import functools
import re
from importlib import resources

import keystone

from domains.elf_pack import Segment, pack_elf32
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


def kernel_source(name: str) -> str:
    if name not in BUILTIN_KERNELS:
        raise KernelBuildError(f"no built-in kernel named {name!r} (built-ins: {', '.join(BUILTIN_KERNELS)})")
    return resources.files("domains.kernel").joinpath(f"{name}.S").read_text(encoding="utf-8")


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


def assemble(source: str, base: int) -> tuple[bytes, dict[str, int]]:
    """Assemble ``source`` at ``base``; return the bytes and the addresses of the symbols the loader needs."""
    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)
    symbols: dict[str, int] = {}
    wanted = ("_start", "hypercall_page")
    # keystone cannot report symbol values, so each wanted label is located by assembling a probe that
    # stores the label's address as data at the end of the image.
    probe = (
        preprocess(source)
        + _hypercall_page_asm()
        + "\n.align 4\n__symtab:\n"
        + "".join(f".long {w}\n" for w in wanted)
    )
    try:
        encoding, _ = ks.asm(probe, base)
    except keystone.KsError as exc:
        raise KernelBuildError(f"keystone failed to assemble the kernel: {exc}") from None
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

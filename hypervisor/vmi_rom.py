"""The VMI ROM: paravirt-op implementations the hypervisor supplies as code in a read-only guest page.

This follows VMware's VMI design from the 2006 paravirt_ops discussion: instead of the guest kernel carrying
the hypervisor-specific code for every paravirt op, the hypervisor maps one page of code (the "ROM") into
the guest, and the guest's ``vmi`` backend looks each op up in the ROM's table and calls into it. The domain
process maps the page read+execute only, at guest virtual address ``VMI_ROM_BASE`` (0xFFFF0000). The code is
position dependent only through the ``base`` it was assembled at (``vmi_rom(base)``); in practice none of the
ops uses an absolute address.

ROM layout (all integers little-endian u32, offsets from the ROM base):

=========  ==================================================================================================
offset     contents
=========  ==================================================================================================
0          magic ``VMI_ROM_MAGIC`` = 0x31494D56 (the bytes ``"VMI1"``)
4          ROM version, 1
8          N = number of op slots = ``len(VMI_OPS)`` (16)
12         reserved, 0
16 + 4*i   entry for op ``VMI_OPS[i]``: offset of that op's code from the ROM base, or 0 (a NULL entry) when
           the ROM leaves the op to the guest's own native code
16 + 4*N   the ops' code, each op 16-byte aligned; the rest of the page is filled with ``int3`` (0xCC)
=========  ==================================================================================================

Op slots, in order (``VMI_OP_INDEX[name]`` is the slot number)::

    0 init   1 set_tss_desc   2 irq_disable   3 irq_enable   4 save_fl   5 restore_fl   6 halt   7 read_cr3
    8 write_cr3   9 set_pte   10 flush_tlb_user   11 flush_tlb_kernel   12 flush_tlb_single
    13 flush_tlb_others   14 send_ipi   15 clock_ns

Calling convention (the same as the guest's own pv ops): arguments in eax, edx, ecx (first, second, third);
the result in eax; an op may clobber ecx and edx (and eax when it returns nothing), and preserves ebx, esi,
edi, ebp, esp and the direction flag. Ops return with ``ret`` (call them with ``call [table entry]``).

What the ROM implements:

* ``init()`` -> eax = ``VMI_INIT_SIGNATURE`` (0x564D4931, ``"1IMV"``): proof that the guest reached the ROM.
* ``irq_disable()``: ``cli``. ``irq_enable()``: ``sti``. ``save_fl()`` -> eax = EFLAGS.
  ``restore_fl(eax = flags)``: EFLAGS = eax.
* ``read_cr3()`` -> eax = cr3, with the native ``mov eax, cr3`` (a read-only ROM cannot cache anything).
* ``write_cr3(eax = machine address of the new page directory)``: ``mmuext_op`` (hypercall 26) with one
  ``MMUEXT_NEW_BASEPTR`` op, arg1 = eax >> 12 (the MFN). -> eax = the hypercall's result.
* ``set_pte(eax = guest VIRTUAL address of the PTE, edx = new PTE value)``: ``mmu_update`` (hypercall 1) with
  one request ``{u64 ptr, u64 val}``, ptr = (eax - ``GUEST_VIRT_BASE``) with the two command bits forced to
  ``MMU_NORMAL_PT_UPDATE`` (0), val = edx. **Assumption:** the guest maps its RAM linearly at
  ``GUEST_VIRT_BASE`` (0xC0000000) and its p2m is the identity, so virtual - 0xC0000000 is the PTE's machine
  address. -> eax = the hypercall's result.
* ``flush_tlb_user()``, ``flush_tlb_kernel()``: ``mmuext_op`` ``MMUEXT_TLB_FLUSH_LOCAL``.
* ``flush_tlb_single(eax = va)``: ``mmuext_op`` ``MMUEXT_INVLPG_LOCAL``, arg1 = va.
* ``flush_tlb_others(eax = pointer to a u32 vCPU bitmap, edx = va or 0xFFFFFFFF)``: ``mmuext_op``
  ``MMUEXT_TLB_FLUSH_MULTI`` (arg1 = 0, arg2 = bitmap pointer) when edx == 0xFFFFFFFF, else
  ``MMUEXT_INVLPG_MULTI`` (arg1 = va, arg2 = bitmap pointer).
* NULL (the guest keeps its native code): ``set_tss_desc``, ``halt``, ``send_ipi``, ``clock_ns``.

Hypercalls are made with ``int 0x82`` directly (the ROM does not depend on the guest's hypercall page):
eax = number, ebx = pointer to the op array / request (built on the guest stack), ecx = count 1,
edx = 0 (no "done" counter), esi = ``DOMID_SELF``. An ``mmuext_op`` is 12 bytes on x86-32:
``{u32 cmd, u32 arg1, u32 arg2}``. The ROM saves and restores ebx, esi, edi and ebp around each hypercall,
so a hypervisor that clobbers argument registers (as Xen debug builds do) cannot break the convention.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable

import keystone

from pvcluster.abi.layouts import MMU_UPDATE, MMUEXT_OP
from pvcluster.abi.platform import VIRT_BASE, VMI_INIT_SIGNATURE, VMI_ROM_BASE, VMI_ROM_HEADER, VMI_ROM_MAGIC
from pvcluster.abi.pvops import PV_OPS, VMI_ROM_SLOTS
from pvcluster.abi.xen import DOMID_SELF, HYPERCALL_VECTOR, PAGE_SHIFT, PAGE_SIZE, Hypercall, MmuCmd, MmuextCmd

# VMI_ROM_BASE, VMI_ROM_MAGIC, VMI_INIT_SIGNATURE and the header layout are the guest kernel's too, so they are
# defined in pvcluster/abi/platform.py (and still importable from here).
VMI_ROM_SIZE = PAGE_SIZE
VMI_ROM_VERSION = 1
GUEST_VIRT_BASE = VIRT_BASE  # set_pte assumes the guest's RAM is mapped linearly here with an identity p2m
VMI_ROM_HEADER_SIZE = VMI_ROM_HEADER.size
VMI_ROM_FILL = 0xCC  # int3
VMI_OP_ALIGN = 16

VMI_OPS: tuple[str, ...] = PV_OPS[:VMI_ROM_SLOTS]
VMI_OP_INDEX: dict[str, int] = {name: i for i, name in enumerate(VMI_OPS)}
VMI_ROM_TABLE_OFFSET = VMI_ROM_HEADER_SIZE  # the op table follows the header

# xen/xen.h: mmu_update command bits (low 2 bits of ptr) and mmuext_op commands.
MMU_NORMAL_PT_UPDATE = MmuCmd.NORMAL_PT_UPDATE
MMUEXT_NEW_BASEPTR = MmuextCmd.NEW_BASEPTR
MMUEXT_TLB_FLUSH_LOCAL = MmuextCmd.TLB_FLUSH_LOCAL
MMUEXT_INVLPG_LOCAL = MmuextCmd.INVLPG_LOCAL
MMUEXT_TLB_FLUSH_MULTI = MmuextCmd.TLB_FLUSH_MULTI
MMUEXT_INVLPG_MULTI = MmuextCmd.INVLPG_MULTI
MMUEXT_OP_SIZE = MMUEXT_OP.size
MMU_UPDATE_SIZE = MMU_UPDATE.size
FLUSH_ALL = 0xFFFFFFFF  # flush_tlb_others' edx for a full flush


class VmiRomError(Exception):
    pass


# -- op sources -------------------------------------------------------------------------------------------

_SAVED = ("ebx", "esi", "edi", "ebp")


def _hypercall_op(nr: int, frame: int, fill: list[str]) -> str:
    """Save the callee-saved registers, build ``frame`` bytes at [esp] with ``fill`` (which may read the op's
    eax/edx arguments), issue hypercall ``nr`` on that one-element array and return its result in eax."""
    lines = [f"push {r}" for r in _SAVED]
    lines.append(f"sub esp, {frame}")
    lines += fill
    lines += [
        "mov ebx, esp",
        "mov ecx, 1",
        "xor edx, edx",
        f"mov esi, {DOMID_SELF:#x}",
        f"mov eax, {int(nr)}",
        f"int {HYPERCALL_VECTOR:#x}",
        f"add esp, {frame}",
    ]
    lines += [f"pop {r}" for r in reversed(_SAVED)]
    lines.append("ret")
    return "\n".join(lines)


def _at_esp(offset: int) -> str:
    return f"dword ptr [esp + {offset}]" if offset else "dword ptr [esp]"


def _mmuext(cmd: int | None, arg1: str, arg2: str) -> list[str]:
    """Fill lines for one ``struct mmuext_op`` at [esp] (``cmd`` None: the caller stores it)."""
    lines = [] if cmd is None else [f"mov {_at_esp(MMUEXT_OP.offset('cmd'))}, {int(cmd)}"]
    return lines + [
        f"mov {_at_esp(MMUEXT_OP.offset('arg1'))}, {arg1}",
        f"mov {_at_esp(MMUEXT_OP.offset('arg2'))}, {arg2}",
    ]


def _mmuext_op(cmd: int, arg1: str = "0", arg2: str = "0", pre: tuple[str, ...] = ()) -> str:
    return _hypercall_op(Hypercall.mmuext_op, MMUEXT_OP_SIZE, [*pre, *_mmuext(cmd, arg1, arg2)])


def _set_pte() -> str:
    assert MMU_NORMAL_PT_UPDATE == 0  # so clearing the command bits selects it
    ptr, val = MMU_UPDATE.offset("ptr"), MMU_UPDATE.offset("val")
    fill = [
        f"sub eax, {GUEST_VIRT_BASE:#x}",  # virtual -> machine (linear map, identity p2m)
        f"and eax, {0xFFFFFFFC:#x}",  # the low two bits of ptr are the command: MMU_NORMAL_PT_UPDATE = 0
        f"mov {_at_esp(ptr)}, eax",
        f"mov {_at_esp(ptr + 4)}, 0",
        f"mov {_at_esp(val)}, edx",
        f"mov {_at_esp(val + 4)}, 0",
    ]
    return _hypercall_op(Hypercall.mmu_update, MMU_UPDATE_SIZE, fill)


def _flush_tlb_others() -> str:
    fill = [
        *_mmuext(MMUEXT_INVLPG_MULTI, "edx", "eax"),
        f"cmp edx, {FLUSH_ALL:#x}",
        "jne vmi_issue",
        f"mov {_at_esp(MMUEXT_OP.offset('cmd'))}, {int(MMUEXT_TLB_FLUSH_MULTI)}",
        f"mov {_at_esp(MMUEXT_OP.offset('arg1'))}, 0",
        "vmi_issue:",
    ]
    return _hypercall_op(Hypercall.mmuext_op, MMUEXT_OP_SIZE, fill)


_SOURCES: dict[str, Callable[[], str]] = {
    "init": lambda: f"mov eax, {VMI_INIT_SIGNATURE:#x}\nret",
    "irq_disable": lambda: "cli\nret",
    "irq_enable": lambda: "sti\nret",
    "save_fl": lambda: "pushfd\npop eax\nret",
    "restore_fl": lambda: "push eax\npopfd\nret",
    "read_cr3": lambda: "mov eax, cr3\nret",
    "write_cr3": lambda: _mmuext_op(MMUEXT_NEW_BASEPTR, arg1="eax", pre=(f"shr eax, {PAGE_SHIFT}",)),
    "set_pte": _set_pte,
    "flush_tlb_user": lambda: _mmuext_op(MMUEXT_TLB_FLUSH_LOCAL),
    "flush_tlb_kernel": lambda: _mmuext_op(MMUEXT_TLB_FLUSH_LOCAL),
    "flush_tlb_single": lambda: _mmuext_op(MMUEXT_INVLPG_LOCAL, arg1="eax"),
    "flush_tlb_others": _flush_tlb_others,
}
VMI_NULL_OPS: frozenset[str] = frozenset(op for op in VMI_OPS if op not in _SOURCES)


def vmi_op_source(name: str) -> str | None:
    """The assembly (keystone Intel syntax) the ROM holds for op ``name``, or None for a NULL entry."""
    if name not in VMI_OP_INDEX:
        raise KeyError(f"no VMI op named {name!r}")
    source = _SOURCES.get(name)
    return None if source is None else source()


# -- the image --------------------------------------------------------------------------------------------


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@functools.lru_cache(maxsize=4)
def _build(base: int) -> tuple[bytes, tuple[int, ...]]:
    if base % PAGE_SIZE or not 0 <= base <= (1 << 32) - PAGE_SIZE:
        raise ValueError(f"VMI ROM base {base:#x} is not a page-aligned 32-bit address")
    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)
    rom = bytearray([VMI_ROM_FILL]) * VMI_ROM_SIZE
    entries = [0] * len(VMI_OPS)
    offset = _align(VMI_ROM_TABLE_OFFSET + 4 * len(VMI_OPS), VMI_OP_ALIGN)
    # Each op is assembled on its own at its final address, so its entry is simply where it was placed.
    for i, name in enumerate(VMI_OPS):
        source = vmi_op_source(name)
        if source is None:
            continue
        try:
            encoding, _ = ks.asm(source, base + offset)
        except keystone.KsError as exc:
            raise VmiRomError(f"keystone failed to assemble VMI op {name!r}: {exc}") from None
        code = bytes(encoding or b"")
        if not code:
            raise VmiRomError(f"VMI op {name!r} assembled to no code")
        if offset + len(code) > VMI_ROM_SIZE:
            raise VmiRomError(
                f"VMI op {name!r} ({len(code)} bytes at offset {offset:#x}) does not fit in the {VMI_ROM_SIZE}-byte ROM"
            )
        rom[offset : offset + len(code)] = code
        entries[i] = offset
        offset = _align(offset + len(code), VMI_OP_ALIGN)
    rom[:VMI_ROM_HEADER_SIZE] = struct.pack("<4I", VMI_ROM_MAGIC, VMI_ROM_VERSION, len(VMI_OPS), 0)
    rom[VMI_ROM_TABLE_OFFSET : VMI_ROM_TABLE_OFFSET + 4 * len(VMI_OPS)] = struct.pack(f"<{len(VMI_OPS)}I", *entries)
    return bytes(rom), tuple(entries)


def vmi_rom(base: int = VMI_ROM_BASE) -> bytes:
    """The 4096-byte ROM image, its code assembled to run at guest virtual address ``base`` (cached)."""
    return _build(base)[0]


def vmi_rom_entries(base: int = VMI_ROM_BASE) -> dict[str, int]:
    """Op name -> offset of its code from the ROM base (0 for a NULL entry), as in the ROM's table."""
    return dict(zip(VMI_OPS, _build(base)[1], strict=True))


def parse_vmi_rom(rom: bytes) -> dict[str, int]:
    """Validate a ROM's header and return its table (op name -> code offset, 0 = NULL), as a guest reads it."""
    if len(rom) != VMI_ROM_SIZE:
        raise VmiRomError(f"VMI ROM is {len(rom)} bytes, expected {VMI_ROM_SIZE}")
    magic, version, count, _ = struct.unpack_from("<4I", rom, 0)
    if magic != VMI_ROM_MAGIC:
        raise VmiRomError(f"bad VMI ROM magic {magic:#010x}")
    if version != VMI_ROM_VERSION:
        raise VmiRomError(f"unsupported VMI ROM version {version}")
    if count != len(VMI_OPS):
        raise VmiRomError(f"VMI ROM has {count} op slots, expected {len(VMI_OPS)}")
    entries = struct.unpack_from(f"<{count}I", rom, VMI_ROM_TABLE_OFFSET)
    for name, entry in zip(VMI_OPS, entries, strict=True):
        if entry and not VMI_ROM_TABLE_OFFSET + 4 * count <= entry < VMI_ROM_SIZE:
            raise VmiRomError(f"VMI op {name!r} entry {entry:#x} points outside the ROM's code area")
    return dict(zip(VMI_OPS, entries, strict=True))

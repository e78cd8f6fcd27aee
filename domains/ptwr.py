"""Writable page tables, the domain process's half: decode a ring-1 write that faulted on a read-only page and send it
to the hypervisor as the one-entry mmu_update it amounts to (``hypervisor/ptwr.py`` checks it is an L1 entry).

As Xen's ptwr emulation (xen/arch/x86/pv/ro-page-fault.c, ptwr_emulated_update): only a naturally aligned store of 1,
2 or 4 bytes inside the faulting page, widened to the whole entry, 32 bits or for a PAE guest 64 (the bytes the guest
did not write are the entry's own: a PAE PTE is written in two 4-byte halves); a
``cmpxchg`` compares against the entry as it is (a page table changes only through the hypervisor, whose updates
this process applies, so the copy here is current) and fails without a hypercall when it differs. The
instructions decoded are the stores page-table code uses: ``mov`` from a register or an immediate, ``xchg`` and
``cmpxchg`` with a 32-bit register (no ``cmpxchg8b``). Anything else, or a write the hypervisor refuses, is the
guest's page fault. A PAE guest's plain 4-byte store to the upper half of an entry goes with ``UPPER_HALF`` as the
trap's fifth argument: the hypervisor then applies Xen's fix-up for an entry the store leaves invalid
(``hypervisor/ptwr.py``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import attrs
import capstone
from capstone import x86 as cx

_GPR32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
_SUB = {  # 16- and 8-bit registers: (32-bit register, shift, width)
    **{r[1:]: (r, 0, 16) for r in _GPR32},
    "al": ("eax", 0, 8), "cl": ("ecx", 0, 8), "dl": ("edx", 0, 8), "bl": ("ebx", 0, 8),
    "ah": ("eax", 8, 8), "ch": ("ecx", 8, 8), "dh": ("edx", 8, 8), "bh": ("ebx", 8, 8),
}
EFLAGS_ZF = 0x40
UPPER_HALF = 1  # the emulated mmu_update's fifth argument: a PAE upper-half store, not a cmpxchg


@attrs.frozen
class Store:
    """One decoded guest store: ``length`` of the instruction, the ``size`` bytes it writes, the value (``source``
    register or ``imm``), and for xchg/cmpxchg the register that gets the old value or is compared."""

    kind: str  # "mov", "xchg" or "cmpxchg"
    length: int
    size: int
    source: str | None
    imm: int


@attrs.frozen
class Pending:
    """An emulated store on its way to the hypervisor: where the vCPU resumes and what the store does to it then."""

    eip: int
    cr2: int
    store: Store
    old_word: int  # the bytes the store replaces (what xchg returns)


def decode(md: capstone.Cs, code: bytes, eip: int) -> Store | None:
    """The store at ``eip``, if it is one this emulation handles (``md``: a capstone decoder with detail on)."""
    for insn in md.disasm(code, eip, 1):
        name = insn.mnemonic.removeprefix("lock ")  # capstone spells a lock prefix into the mnemonic
        ops = list(insn.operands)
        if name not in ("mov", "xchg", "cmpxchg") or len(ops) != 2:
            return None
        mem = [o for o in ops if o.type == cx.X86_OP_MEM]
        other = [o for o in ops if o.type != cx.X86_OP_MEM]
        if len(mem) != 1 or (name == "mov" and ops[0].type != cx.X86_OP_MEM):
            return None
        size = int(mem[0].size)
        if other[0].type == cx.X86_OP_IMM and name == "mov":
            return Store("mov", insn.size, size, None, int(other[0].imm) & 0xFFFFFFFF)
        if other[0].type != cx.X86_OP_REG:
            return None
        reg = md.reg_name(other[0].reg)
        if name != "mov" and reg not in _GPR32:
            return None
        return Store(name, insn.size, size, reg, 0)
    return None


def read_reg(reg: Callable[[str], int], name: str) -> int:
    if name in _GPR32:
        return reg(name)
    full, shift, width = _SUB[name]
    return reg(full) >> shift & ((1 << width) - 1)


def merge(word: int, offset: int, size: int, value: int, width: int = 4) -> int:
    """The ``width``-byte entry ``word`` (4, or 8 for PAE) with ``size`` bytes at byte ``offset`` replaced by
    ``value`` (Xen widens a sub-word store the same way)."""
    mask = ((1 << size * 8) - 1) << offset * 8
    return (word & ~mask | (value << offset * 8) & mask) & ((1 << width * 8) - 1)


def part(word: int, offset: int, size: int) -> int:
    """The ``size`` bytes at byte ``offset`` of an entry."""
    return word >> offset * 8 & ((1 << size * 8) - 1)


def upper_half(width: int, offset: int, store: Store) -> int:
    """``UPPER_HALF`` for a plain 4-byte store to the upper half of a PAE entry, else 0."""
    return UPPER_HALF if width == 8 and offset == 4 and store.size == 4 and store.kind != "cmpxchg" else 0


def request(pte_ma: int, value: int) -> bytes:
    """struct mmu_update {ptr = the entry's machine address | MMU_NORMAL_PT_UPDATE, val}."""
    return struct.pack("<QQ", pte_ma & ~3, value)

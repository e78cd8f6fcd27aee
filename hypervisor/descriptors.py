"""Segment descriptors a 32-bit PV guest hands the hypervisor (set_gdt, update_descriptor): Xen 4.17's
check_descriptor (xen/arch/x86/x86_64/mm.c), for a 32-bit (compat) domain.

A guest kernel runs in ring 1, so no descriptor it installs may grant ring 0: a DPL below the guest kernel's is raised
to it; system descriptors other than call gates (TSS, LDT, interrupt and trap gates, task gates) and 64-bit code
segments are refused; a call gate must target a guest selector (or Xen's flat ring-1 code selector) and is stored
with DPL 0 and the guest's DPL in its selector's RPL, so using it traps to Xen, which emulates it.
"""

from __future__ import annotations

from pvcluster.abi.x86 import (
    CALL_GATE_RESERVED,
    SEG_DPL,
    SEG_DPL_SHIFT,
    SEG_G,
    SEG_L,
    SEG_P,
    SEG_S,
    SEG_TYPE,
    SEG_TYPE_CALL_GATE,
    SELECTOR_RPL,
    SELECTOR_TI,
)
from pvcluster.abi.xen import FIRST_RESERVED_GDT_ENTRY, FLAT_RING1_CS, GUEST_KERNEL_RPL, HYPERVISOR_VIRT_START_NONPAE

_U32 = 0xFFFFFFFF


def fixup_selector(sel: int) -> int:
    """Xen's __fixup_guest_selector: an RPL (or DPL) below the guest kernel's ring is raised to it."""
    return sel if sel & SELECTOR_RPL >= GUEST_KERNEL_RPL else (sel & ~SELECTOR_RPL) | GUEST_KERNEL_RPL


def gate_selector_okay(sel: int) -> bool:
    """Xen's guest_gate_selector_okay: a guest GDT entry, Xen's flat kernel code segment, or an LDT entry."""
    return sel >> 3 < FIRST_RESERVED_GDT_ENTRY or sel == FLAT_RING1_CS or bool(sel & SELECTOR_TI)


def check_descriptor(desc: int) -> int | None:
    """The descriptor as it may be installed (DPL raised, a flat segment widened, a gate's DPL moved into its
    selector), or None where Xen's check_descriptor refuses it."""
    a, b = desc & _U32, desc >> 32 & _U32
    if not b & SEG_P:
        return desc  # a not-present descriptor always faults, so it is safe as it is
    dpl = fixup_selector(b >> SEG_DPL_SHIFT & 3)
    b = (b & ~SEG_DPL) | dpl << SEG_DPL_SHIFT
    if b & SEG_S:
        return _code_or_data(a, b)
    if b & SEG_TYPE == 0:
        return desc  # type 0 is harmless: the second half of a 64-bit call gate
    if b & SEG_TYPE != SEG_TYPE_CALL_GATE:
        return None
    cs = a >> 16
    if not gate_selector_okay(cs):
        return None
    # DPL 0 makes every use of the gate fault into Xen (which emulates it); the guest's DPL rides in the RPL.
    b &= ~SEG_DPL
    a = (a & 0xFFFF) | ((cs & ~SELECTOR_RPL) | dpl) << 16
    if b & CALL_GATE_RESERVED:
        return None
    return a | b << 32


def _code_or_data(a: int, b: int) -> int | None:
    """No base or limit check; a 64-bit code segment is refused to a 32-bit guest. A flat segment reaching into
    the hypervisor's hole is widened to 4 GiB, as Xen widens old PAE guests' segments over the compat M2P."""
    if b & SEG_L:
        return None
    base = (b & 0xFF000000) | (b & 0xFF) << 16 | a >> 16
    limit = ((b & 0xF0000) | (a & 0xFFFF)) + 1  # inclusive limit
    if b & SEG_G:
        limit <<= 12
    if base == 0 and limit > HYPERVISOR_VIRT_START_NONPAE:
        a |= 0x0000FFFF
        b |= 0x000F0000
    return a | b << 32

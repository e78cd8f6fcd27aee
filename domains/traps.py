"""What Xen's entry and exit paths do for a ring-1 vCPU: bounce frames, the virtual IDT, and HYPERVISOR_iret.

The domain process plays this part of Xen because it needs only the vCPU's registers and its own memory: an
exception, a software interrupt or an event upcall is bounced into the guest here, and ``iret`` (hypercall 23)
returns here, without a trip to the hypervisor process. What a guest can change through them (its trap table, its
kernel stack) comes from the hypervisor as effects (set_trap_table, stack_switch).

* **Bounce frame** (``compat_create_bounce_frame``, xen/arch/x86/x86_64/compat/entry.S): from ring 3 the frame goes
  on the kernel stack stack_switch named, with the interrupted ESP and SS at its top; from ring 1 on the current
  stack. Below them: EFLAGS with IF = !saved upcall mask, CS with the saved upcall mask in bits 16-23, EIP, and the
  error code when the vector has one. A bounce that masks events (an event upcall, or a trap-table entry with
  TI_MASK_EVENTS) sets evtchn_upcall_mask; TF, NT, RF and VM are cleared. A frame the guest's stack cannot take,
  or a handler with a null selector, ends the domain (Xen's domain_crash there).
* **Exceptions** (``pv_inject_event``): the trap table's entry for the vector; a page fault also writes the address
  to vcpu_info.arch.cr2 and the virtual CR2. A vector without a handler ends the domain with the fault, as Xen's
  null trap bounce does.
* **Software interrupts** (``do_general_protection``'s INT n path): ``int n`` is delivered when the entry's DPL
  admits the current ring (ring 1 for the kernel, 3 for user code: ``permit_softint``), else it is #GP with error
  code ``n << 3 | 2``. ``int 0x82`` from ring 3 is one of these: only ring 1 makes hypercalls.
* **iret** (``compat_iret``, xen/arch/x86/pv/iret.c): pops EAX, EIP, CS, EFLAGS, and ESP, SS when returning to ring
  3; IOPL cleared, IF set; the upcall mask becomes !EFLAGS.IF. A return to ring 0 or to VM86 mode ends the domain.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import attrs

from domains import events
from pvcluster.abi.xen import GUEST_KERNEL_RPL, TI_DPL_MASK, TI_MASK_EVENTS

if TYPE_CHECKING:
    from domains.vcpu import Vcpu

EFLAGS_IF, EFLAGS_TF, EFLAGS_IOPL = 0x200, 0x100, 0x3000
EFLAGS_NT, EFLAGS_RF, EFLAGS_VM = 0x4000, 0x10000, 0x20000
# Exceptions that push an error code (#DF, #TS, #NP, #SS, #GP, #PF, #AC).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17})
GP_VECTOR, PF_VECTOR, UD_VECTOR = 13, 14, 6
X86_XEC_IDT = 2  # an error code's "this selector names an IDT entry" bit


@attrs.frozen
class TrapEntry:
    """One entry of a vCPU's virtual IDT (struct trap_info)."""

    flags: int
    cs: int
    address: int

    @property
    def dpl(self) -> int:
        return self.flags & TI_DPL_MASK

    @property
    def masks_events(self) -> bool:
        return bool(self.flags & TI_MASK_EVENTS)


@attrs.define
class PvCpu:
    """A ring-1 vCPU's state in Xen's ``struct pv_vcpu``: the virtual IDT, the kernel stack, the upcall's CS."""

    traps: dict[int, TrapEntry] = attrs.Factory(dict)
    kernel_ss: int = 0
    kernel_sp: int = 0
    callback_cs: int = 0

    def set_traps(self, entries: list[list[int]], clear: bool) -> None:
        if clear:
            self.traps.clear()
        for vector, flags, cs, address in entries:
            self.traps[vector & 0xFF] = TrapEntry(flags, cs, address)


class GuestCrash(Exception):
    """The guest made its own delivery impossible: Xen crashes the domain (domain_crash)."""


def bounce(v: Vcpu, cs: int, eip: int, error_code: int | None, mask_events: bool) -> None:
    """Deliver to cs:eip in ring 1 with a bounce frame for the state the vCPU is in now (EIP already where it must
    resume)."""
    if cs & ~3 == 0:
        raise GuestCrash(f"bounce to a null code selector {cs:#x}")
    regs = {name: v.reg(name) for name in ("eip", "esp", "eflags")}
    cur_cs, cur_ss = v.segment("cs"), v.segment("ss")
    if cur_cs & 2:  # from ring 3: the frame goes on the kernel stack, with the user stack at its top
        esp, ss = v.pv_state().kernel_sp, v.pv_state().kernel_ss
        top = [regs["esp"], cur_ss]
    else:
        esp, ss, top = regs["esp"], cur_ss, []
    saved_mask = int(events.upcall_masked(v.ram, v.vid))
    if mask_events:
        events.set_upcall_mask(v.ram, v.vid, True)
    eflags = regs["eflags"] & ~EFLAGS_IF | (0 if saved_mask else EFLAGS_IF)
    words = [regs["eip"], cur_cs | saved_mask << 16, eflags, *top]
    if error_code is not None:
        words.insert(0, error_code)
    esp = (esp - 4 * len(words)) & 0xFFFFFFFF
    if not v.write_virt(esp, struct.pack(f"<{len(words)}I", *words)):
        raise GuestCrash(f"the bounce frame at {esp:#010x} is not writable guest memory")
    new_flags = regs["eflags"] & ~(EFLAGS_TF | EFLAGS_NT | EFLAGS_RF | EFLAGS_VM) | EFLAGS_IF
    v.transfer(eip, cs, new_flags, esp, ss)


def exception(v: Vcpu, vector: int, error_code: int, cr2: int | None = None) -> bool:
    """Bounce a hardware exception to the guest's handler; False if its trap table has none (the caller ends the
    domain with the fault)."""
    entry = v.pv_state().traps.get(vector)
    if entry is None or entry.address == 0:
        return False
    if vector == PF_VECTOR and cr2 is not None:
        v.virt_cr2 = cr2
        events.set_arch_cr2(v.ram, v.vid, cr2)
    bounce(v, entry.cs, entry.address, error_code if vector in ERROR_CODE_VECTORS else None, entry.masks_events)
    return True


def software_interrupt(v: Vcpu, vector: int, insn_len: int) -> bool:
    """``int n`` (EIP after it): delivered if the entry's DPL admits this ring, else #GP(n << 3 | 2) at the
    instruction. False: neither has a handler."""
    entry = v.pv_state().traps.get(vector)
    ring = v.segment("cs") & 3
    if entry is not None and entry.dpl >= max(ring, GUEST_KERNEL_RPL):
        if entry.address == 0:
            return False
        bounce(v, entry.cs, entry.address, None, entry.masks_events)
        return True
    v.set_regs({"eip": v.reg("eip") - insn_len})
    return exception(v, GP_VECTOR, vector << 3 | X86_XEC_IDT)


def iret(v: Vcpu) -> None:
    """HYPERVISOR_iret: the vCPU trapped from Xen's hypercall-page stub (``push eax; mov eax, 23; int 0x82``)."""
    esp = v.reg("esp")
    head = v.read_virt(esp, 16)
    if head is None:
        raise GuestCrash(f"iret frame at {esp:#010x} is not readable")
    eax, eip, cs, eflags = struct.unpack("<4I", head)
    cs &= 0xFFFF
    if eflags & EFLAGS_VM:
        raise GuestCrash("iret to VM86 mode")
    ring = cs & 3
    if ring == 0:
        raise GuestCrash(f"iret to ring 0 (cs {cs:#x})")
    if ring == 1:
        new_esp, ss = esp + 16, v.segment("ss")
    else:
        tail = v.read_virt(esp + 16, 8)
        if tail is None:
            raise GuestCrash(f"iret frame at {esp:#010x} has no readable ESP and SS")
        new_esp, ss = struct.unpack("<2I", tail)
        ss &= 0xFFFF
    events.set_upcall_mask(v.ram, v.vid, not eflags & EFLAGS_IF)
    v.set_regs({"eax": eax})
    v.transfer(eip, cs, eflags & ~EFLAGS_IOPL | EFLAGS_IF, new_esp, ss)

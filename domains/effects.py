"""How a domain process carries out each effect the hypervisor decided: one small function per effect record.

The records are defined in ``pvcluster/bus/effects.py`` and validated by the codec before they get here; these
functions still check what only this process can check (that a vCPU id exists, that an address is inside guest
RAM) and trace what they refuse instead of raising, because a bad effect is a hypervisor bug, never the guest's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from domains import events
from domains.paging import pte_address
from domains.vcpu import Vcpu, VcpuState
from pvcluster.bus.effects import (
    Block,
    ClearPending,
    Effect,
    FlushTlb,
    Invlpg,
    Poll,
    PollTimeout,
    RestartHypercall,
    SetCallback,
    SetClockSkew,
    SetContext,
    SetCr3,
    SetGdt,
    SetKernelStack,
    SetPending,
    SetSpeed,
    SetTrapTable,
    SetTs,
    SetVaPte,
    Unmask,
    VcpuDown,
    VcpuUp,
    WriteMachine,
    kind,
    target_vcpu,
)

if TYPE_CHECKING:
    from domains.runtime import DomainProcess

# The x86 `int imm8` is two bytes: a continuation re-executes it.
INT_INSN_LEN = 2


def apply(proc: DomainProcess, effect: Effect, vt_ns: int, caller: int) -> bool:
    """Carry out ``effect``, decided at (or arriving at) ``vt_ns`` for a hypercall of vCPU ``caller``; False when it
    names no vCPU of this domain (traced, and counted against the hypervisor by the checker)."""
    target = target_vcpu(effect)
    if target is not None and not 0 <= target < len(proc.vcpus):
        proc.trace("domain.bad_effect", vcpu=caller, kind=kind(effect), detail=f"no vCPU {target}")
        return False
    _APPLY[type(effect)](proc, effect, vt_ns, caller)
    return True


def _vcpu(proc: DomainProcess, e: Any) -> Vcpu:
    return proc.vcpus[e.vcpu]


def _set_pending(proc: DomainProcess, e: SetPending, vt_ns: int, caller: int) -> None:
    events.set_pending(proc.memory, e.port, e.vcpu)
    # the other half of the hypervisor's event.sent: the checker pairs them by eid
    proc.trace("event.delivered", vt_ns=vt_ns, eid=e.eid, port=e.port, vcpu=e.vcpu)


def _unmask(proc: DomainProcess, e: Unmask, vt_ns: int, caller: int) -> None:
    events.unmask(proc.memory, e.port, e.vcpu)


def _clear_pending(proc: DomainProcess, e: ClearPending, vt_ns: int, caller: int) -> None:
    events.clear(proc.memory, e.port)


def _flush(proc: DomainProcess, e: FlushTlb | Invlpg, vt_ns: int, caller: int) -> None:
    vcpu = _vcpu(proc, e)
    vcpu.flush_tlb()  # Unicorn has no single-page flush from the host side
    if isinstance(e, FlushTlb):  # a full flush: its refill (a single page's one walk is in INVLPG's price)
        vcpu.refill_tlb()


def _set_cr3(proc: DomainProcess, e: SetCr3, vt_ns: int, caller: int) -> None:
    _vcpu(proc, e).set_cr3(e.cr3)


def _write_machine(proc: DomainProcess, e: WriteMachine, vt_ns: int, caller: int) -> None:
    if 0 <= e.addr and e.addr + len(e.data) <= proc.memory.size:
        proc.memory.write_pa(e.addr, e.data)
    else:
        proc.trace("domain.bad_write", vcpu=caller, addr=e.addr, length=len(e.data))


def _set_va_pte(proc: DomainProcess, e: SetVaPte, vt_ns: int, caller: int) -> None:
    """update_va_mapping: the L1 entry for va in the calling vCPU's tables; no flush here (the hypervisor's flush
    effects follow)."""
    pte_pa = pte_address(proc.memory, _vcpu(proc, e).cr3, e.va)
    if pte_pa is None:
        proc.trace("domain.bad_write", vcpu=caller, va=e.va, detail="no L1 table maps this va")
    else:
        ram = proc.memory
        if ram.pae:  # a 64-bit entry
            ram.write_pa(pte_pa, (e.value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))
        else:
            ram.write_pa(pte_pa, (e.value & 0xFFFFFFFF).to_bytes(4, "little"))


def _set_context(proc: DomainProcess, e: SetContext, vt_ns: int, caller: int) -> None:
    v = _vcpu(proc, e)
    v.set_regs(e.regs.as_dict())
    if v.pv is not None:
        v.enter_kernel()
    v.initialised = True


def _set_callback(proc: DomainProcess, e: SetCallback, vt_ns: int, caller: int) -> None:
    _vcpu(proc, e).upcall_eip = e.eip


def _up(proc: DomainProcess, e: VcpuUp, vt_ns: int, caller: int) -> None:
    v = _vcpu(proc, e)
    v.advance_to(vt_ns)
    if v.trap is not None:  # it had taken itself down: VCPUOP_down returns now
        v.complete_trap(0, vt_ns)
    else:
        v.state = VcpuState.RUNNING


def _down(proc: DomainProcess, e: VcpuDown, vt_ns: int, caller: int) -> None:
    _vcpu(proc, e).state = VcpuState.DOWN


def _block(proc: DomainProcess, e: Block, vt_ns: int, caller: int) -> None:
    """SCHEDOP_block enables event delivery first, and does not sleep if an event is already pending."""
    v = _vcpu(proc, e)
    events.set_upcall_mask(proc.memory, v.vid, False)
    if events.upcall_pending(proc.memory, v.vid) and v.trap is not None:
        v.complete_trap(0, vt_ns)
    else:
        v.state = VcpuState.BLOCKED


def _poll(proc: DomainProcess, e: Poll, vt_ns: int, caller: int) -> None:
    """SCHEDOP_poll: done at once if a polled port is pending, else the vCPU sleeps until one is (the upcall mask is
    left alone, unlike block)."""
    v = _vcpu(proc, e)
    if v.trap is None:
        return
    if any(events.is_pending(proc.memory, p) for p in e.ports):
        v.complete_trap(0, vt_ns)
    else:
        v.poll_ports = list(e.ports)
        v.state = VcpuState.BLOCKED


def _poll_timeout(proc: DomainProcess, e: PollTimeout, vt_ns: int, caller: int) -> None:
    v = _vcpu(proc, e)
    if v.trap is not None and v.poll_ports is not None and v.trap.vt_ns == e.trap_vt:
        v.complete_trap(0, vt_ns)


def _restart(proc: DomainProcess, e: RestartHypercall, vt_ns: int, caller: int) -> None:
    """A hypercall continuation: back up over the `int 0x82` with the remaining work in the argument registers;
    the result that completes the trap puts the hypercall number back in EAX."""
    v = _vcpu(proc, e)
    regs = dict(zip(("ebx", "ecx", "edx", "esi", "edi"), e.args, strict=False))
    v.set_regs({**regs, "eip": v.reg("eip") - INT_INSN_LEN})


def _set_speed(proc: DomainProcess, e: SetSpeed, vt_ns: int, caller: int) -> None:
    _vcpu(proc, e).ps_per_instr = e.ps_per_instr
    proc.trace("vcpu.speed", vt_ns=vt_ns, vcpu=e.vcpu, ps_per_instr=e.ps_per_instr)


def _set_clock_skew(proc: DomainProcess, e: SetClockSkew, vt_ns: int, caller: int) -> None:
    proc.skew = (e.offset_ns, e.ppm)
    proc.trace("clock.skew", vt_ns=vt_ns, offset_ns=e.offset_ns, ppm=e.ppm)


def _set_gdt(proc: DomainProcess, e: SetGdt, vt_ns: int, caller: int) -> None:
    v = _vcpu(proc, e)
    v.load_gdt(list(e.frames))
    v.gdt_ents = e.entries
    proc.trace("vcpu.gdt", vt_ns=vt_ns, vcpu=e.vcpu, frames=list(e.frames), entries=e.entries)


def _set_ts(proc: DomainProcess, e: SetTs, vt_ns: int, caller: int) -> None:
    _vcpu(proc, e).set_ts(e.ts)


def _set_trap_table(proc: DomainProcess, e: SetTrapTable, vt_ns: int, caller: int) -> None:
    v = _vcpu(proc, e)
    if v.pv is None:  # a ring-0 kernel (native, vmi) takes its exceptions through its own IDT
        proc.trace("vcpu.trap_table_ignored", vt_ns=vt_ns, vcpu=e.vcpu, entries=len(e.traps))
        return
    v.pv.set_traps(e.traps, e.clear)


def _set_kernel_stack(proc: DomainProcess, e: SetKernelStack, vt_ns: int, caller: int) -> None:
    v = _vcpu(proc, e)
    if v.pv is not None:
        v.pv.kernel_ss, v.pv.kernel_sp = e.ss, e.esp


_APPLY: dict[type, Callable[[DomainProcess, Any, int, int], None]] = {
    SetPending: _set_pending,
    Unmask: _unmask,
    ClearPending: _clear_pending,
    FlushTlb: _flush,
    Invlpg: _flush,
    SetCr3: _set_cr3,
    WriteMachine: _write_machine,
    SetVaPte: _set_va_pte,
    SetContext: _set_context,
    SetCallback: _set_callback,
    VcpuUp: _up,
    VcpuDown: _down,
    Block: _block,
    Poll: _poll,
    PollTimeout: _poll_timeout,
    RestartHypercall: _restart,
    SetSpeed: _set_speed,
    SetClockSkew: _set_clock_skew,
    SetGdt: _set_gdt,
    SetTrapTable: _set_trap_table,
    SetKernelStack: _set_kernel_stack,
    SetTs: _set_ts,
}

"""What the hypervisor asks a domain process to do to its vCPUs and memory: one frozen record per kind of effect.

The hypervisor holds no guest RAM and runs no guest code, so every decision it takes that changes a vCPU (a TLB
flush, a new CR3, an event made pending, a vCPU brought up) travels to the domain process as one of these records,
inside the ``HypercallResult`` of the hypercall that caused it or, for things decided outside the domain's own
hypercalls (an interdomain event, a timer, a peer closing its end), inside a ``Delivery`` stamped with the virtual
time it arrives. The domain process applies each with one small function (``domains/effects.py``).

On the wire an effect is ``[TAG, [fields...]]``: tags are protocol, never renumber, only add. ``KIND`` is the name
traces use for it (``domain.event`` kinds, wake-up reasons), kept from the first trace format. The codec validates
every field against these annotations, so a domain process never sees an effect with a missing or mistyped field.
"""

from __future__ import annotations

from typing import ClassVar, Union

import attrs


@attrs.frozen
class VcpuRegs:
    """The general registers, EIP and EFLAGS a vCPU starts from (VCPUOP_initialise)."""

    eax: int
    ebx: int
    ecx: int
    edx: int
    esi: int
    edi: int
    ebp: int
    esp: int
    eip: int
    eflags: int

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


# -- event channels (bits in shared_info) -------------------------------------------------------------------


@attrs.frozen
class SetPending:
    """Xen's evtchn_set_pending: mark ``port`` pending and, unless it is masked, raise ``vcpu``'s upcall. ``eid``
    names this notification (``event.sent`` in the hypervisor's trace, ``event.delivered`` in the domain's), so a
    checker can tell a lost or twice-delivered event from the traces alone."""

    TAG: ClassVar[int] = 1
    KIND: ClassVar[str] = "evtchn_pending"
    vcpu: int
    port: int
    eid: int = 0


@attrs.frozen
class Unmask:
    """EVTCHNOP_unmask: clear the port's mask bit; a port still pending raises ``vcpu``'s upcall again."""

    TAG: ClassVar[int] = 2
    KIND: ClassVar[str] = "evtchn_unmask"
    vcpu: int
    port: int


@attrs.frozen
class ClearPending:
    """Clear the pending bit of a port being closed, so that a port reused later starts clean."""

    TAG: ClassVar[int] = 3
    KIND: ClassVar[str] = "evtchn_clear"
    port: int


# -- the MMU ------------------------------------------------------------------------------------------------


@attrs.frozen
class FlushTlb:
    """Drop every cached translation of ``vcpu``."""

    TAG: ClassVar[int] = 4
    KIND: ClassVar[str] = "flush_tlb"
    vcpu: int


@attrs.frozen
class Invlpg:
    """Drop ``vcpu``'s translation of the page holding ``va``."""

    TAG: ClassVar[int] = 5
    KIND: ClassVar[str] = "invlpg"
    vcpu: int
    va: int


@attrs.frozen
class SetCr3:
    """Load ``cr3`` (a machine address) as ``vcpu``'s page-table base; as on the CPU, its TLB goes with it."""

    TAG: ClassVar[int] = 6
    KIND: ClassVar[str] = "set_cr3"
    vcpu: int
    cr3: int


@attrs.frozen
class WriteMachine:
    """Write ``data`` at machine address ``addr`` (a page-table entry mmu_update validated)."""

    TAG: ClassVar[int] = 7
    KIND: ClassVar[str] = "write_pa"
    addr: int
    data: bytes


@attrs.frozen
class SetVaPte:
    """update_va_mapping: write ``value`` into the L1 entry that maps ``va`` in ``vcpu``'s current tables."""

    TAG: ClassVar[int] = 8
    KIND: ClassVar[str] = "set_va_pte"
    vcpu: int
    va: int
    value: int


# -- vCPU state --------------------------------------------------------------------------------------------


@attrs.frozen
class SetContext:
    """VCPUOP_initialise: the registers ``vcpu`` starts from when it is brought up."""

    TAG: ClassVar[int] = 9
    KIND: ClassVar[str] = "set_context"
    vcpu: int
    regs: VcpuRegs


@attrs.frozen
class SetCallback:
    """The entry point of ``vcpu``'s event upcall (callbacks are per vCPU in Xen)."""

    TAG: ClassVar[int] = 10
    KIND: ClassVar[str] = "set_callback"
    vcpu: int
    eip: int


@attrs.frozen
class VcpuUp:
    """VCPUOP_up: ``vcpu`` starts running (or returns from its own VCPUOP_down)."""

    TAG: ClassVar[int] = 11
    KIND: ClassVar[str] = "up"
    vcpu: int


@attrs.frozen
class VcpuDown:
    """VCPUOP_down: ``vcpu`` stops running until brought up again."""

    TAG: ClassVar[int] = 12
    KIND: ClassVar[str] = "down"
    vcpu: int


@attrs.frozen
class Block:
    """SCHEDOP_block: enable event delivery and sleep until an event is pending (not at all if one is)."""

    TAG: ClassVar[int] = 13
    KIND: ClassVar[str] = "block"
    vcpu: int


@attrs.frozen
class Poll:
    """SCHEDOP_poll: sleep until one of ``ports`` is pending (at once if one is); the upcall mask stays as it is."""

    TAG: ClassVar[int] = 14
    KIND: ClassVar[str] = "poll"
    vcpu: int
    ports: list[int]


@attrs.frozen
class PollTimeout:
    """The poll timer fired: end ``vcpu``'s SCHEDOP_poll, if it is still the poll trapped at ``trap_vt``."""

    TAG: ClassVar[int] = 15
    KIND: ClassVar[str] = "poll_timeout"
    vcpu: int
    trap_vt: int


@attrs.frozen
class RestartHypercall:
    """A hypercall continuation, as Xen's hypercall_create_continuation: the hypercall stopped part way (its
    work budget for the window was spent), so ``vcpu`` re-executes its ``int 0x82`` with EAX = ``nr`` and these
    argument registers (EBX, ECX, EDX, ESI, EDI), which describe the work that is left."""

    TAG: ClassVar[int] = 16
    KIND: ClassVar[str] = "restart"
    vcpu: int
    nr: int
    args: list[int]


@attrs.frozen
class SetSpeed:
    """The virtual picoseconds each guest instruction of ``vcpu`` costs from now on (the ``slow`` fault)."""

    TAG: ClassVar[int] = 17
    KIND: ClassVar[str] = "set_speed"
    vcpu: int
    ps_per_instr: int


@attrs.frozen
class SetClockSkew:
    """Skew the system time the domain publishes in every vcpu_time_info: ``offset_ns`` plus ``ppm`` parts per
    million of the true time, and its TSC scale by the same ppm (the ``skew`` fault: a drifting clock source)."""

    TAG: ClassVar[int] = 18
    KIND: ClassVar[str] = "set_clock_skew"
    offset_ns: int
    ppm: int


@attrs.frozen
class SetGdt:
    """set_gdt: ``vcpu``'s GDT is now the first ``entries`` descriptors of machine ``frames`` (validated and typed
    by the hypervisor); the vCPU's TLB goes with the old one, as Xen's flush_tlb_local after pv_set_gdt."""

    TAG: ClassVar[int] = 19
    KIND: ClassVar[str] = "set_gdt"
    vcpu: int
    frames: list[int]
    entries: int


@attrs.frozen
class SetTs:
    """fpu_taskswitch: set (``ts``) or clear CR0.TS of ``vcpu``, so that its next FPU instruction raises #NM."""

    TAG: ClassVar[int] = 20
    KIND: ClassVar[str] = "set_ts"
    vcpu: int
    ts: bool


@attrs.frozen
class SetTrapTable:
    """set_trap_table: ``vcpu``'s virtual IDT. ``traps`` are the entries the guest listed, each ``[vector, flags,
    cs, address]`` (cs already raised to ring 1), which replace those vectors only; ``clear`` empties the whole
    table first (the guest passed NULL), as compat_set_trap_table does."""

    TAG: ClassVar[int] = 21
    KIND: ClassVar[str] = "set_trap_table"
    vcpu: int
    traps: list[list[int]]
    clear: bool = False


@attrs.frozen
class SetKernelStack:
    """stack_switch: the ring-1 stack (``ss``:``esp``) ``vcpu`` lands on when a trap or event takes it from ring 3
    to ring 1 (Xen's kernel_ss / kernel_sp)."""

    TAG: ClassVar[int] = 22
    KIND: ClassVar[str] = "set_kernel_stack"
    vcpu: int
    ss: int
    esp: int


Effect = Union[  # noqa: UP007 - the codec reads the members of this Union to decode tagged records
    SetPending,
    Unmask,
    ClearPending,
    FlushTlb,
    Invlpg,
    SetCr3,
    WriteMachine,
    SetVaPte,
    SetContext,
    SetCallback,
    VcpuUp,
    VcpuDown,
    Block,
    Poll,
    PollTimeout,
    RestartHypercall,
    SetSpeed,
    SetClockSkew,
    SetGdt,
    SetTs,
    SetTrapTable,
    SetKernelStack,
]

EFFECTS: tuple[type, ...] = (
    SetPending,
    Unmask,
    ClearPending,
    FlushTlb,
    Invlpg,
    SetCr3,
    WriteMachine,
    SetVaPte,
    SetContext,
    SetCallback,
    VcpuUp,
    VcpuDown,
    Block,
    Poll,
    PollTimeout,
    RestartHypercall,
    SetSpeed,
    SetClockSkew,
    SetGdt,
    SetTs,
    SetTrapTable,
    SetKernelStack,
)

# Effects that flush translations: a hypervisor that skips them is the fault the stale-TLB checker must catch.
FLUSHES: tuple[type, ...] = (FlushTlb, Invlpg)


def kind(effect: Effect) -> str:
    return str(type(effect).KIND)


def target_vcpu(effect: Effect) -> int | None:
    """The vCPU an effect acts on, or None for one that acts on the domain's memory as a whole."""
    vcpu = getattr(effect, "vcpu", None)
    return vcpu if isinstance(vcpu, int) else None

"""A vCPU as the hypervisor keeps it (Xen's ``struct vcpu``): its one run state, its timers and its counters.

Run state is kept here once. ``runstate`` is the scheduler's view (does it hold a pCPU, want one, wait for an
event, or not exist for scheduling); ``ready_ns`` is the clock's view: the virtual time from which the vCPU can
execute guest code again, or None while it cannot (blocked, down, or trapped in a hypercall whose result is not
decided yet). The invariant the clock keeps: ``ready_ns`` is set only while ``runstate`` is RUNNING or RUNNABLE.
What the vCPU is doing inside its domain process (executing, halted, trapped) is that process's business; the
hypervisor learns it from window reports and folds it into these two fields.
"""

from __future__ import annotations

import enum

import attrs

HELD_FOREVER = -1  # Vcpu.held_until of a vCPU an offline fault holds until it is brought online


class RunState(enum.Enum):
    RUNNING = "running"  # holds a pCPU
    RUNNABLE = "runnable"  # wants a pCPU (preempted or woken, waiting its turn)
    BLOCKED = "blocked"  # waits for an event or interrupt
    OFFLINE = "offline"  # down, crashed, paused, or its domain is gone


@attrs.define
class VcpuTimers:
    """The singleshot timer (set_timer_op, VCPUOP_set_singleshot_timer), the periodic timer and the SCHEDOP_poll
    timeout, as absolute virtual times."""

    singleshot: int | None = None
    period: int = 0  # 0: no periodic timer
    periodic_next: int | None = None
    poll: int | None = None
    poll_seq: int = 0  # the virtual time of the poll's trap, which names the poll a timeout ends
    polling: bool = False  # in SCHEDOP_poll, as far as the hypervisor knows (until the vCPU's next hypercall)

    def next_deadline(self) -> int | None:
        times = [t for t in (self.singleshot, self.periodic_next, self.poll) if t is not None]
        return min(times) if times else None

    def end_poll(self) -> None:
        self.poll, self.polling = None, False

    def clear(self) -> None:
        self.singleshot = self.periodic_next = self.poll = None
        self.period = 0
        self.polling = False


@attrs.define(eq=False)
class Vcpu:
    domid: int
    vid: int
    affinity: tuple[int, ...]  # the pCPUs it may run on (the domain's `cpus`, or all)
    # VCPUOP state
    initialised: bool = False
    up: bool = False
    # the scheduler's view
    runstate: RunState = RunState.OFFLINE
    since_ns: int = 0
    pcpu: int | None = None
    slice_start_ns: int = 0
    queued_at_ns: int = 0
    preemptions: int = 0
    # a preempt or offline fault holds the vCPU off every pCPU until then (HELD_FOREVER: until brought online)
    held_until: int | None = None
    # the clock's view
    ready_ns: int | None = None
    # from the domain's last report
    clock_ns: int = 0
    instructions: int = 0
    hypercalls: int = 0
    timers: VcpuTimers = attrs.Factory(VcpuTimers)
    # Descriptor-table and FPU state a PV guest sets by hypercall (Xen's arch.pv): the frames of its GDT (set_gdt)
    # and how many entries they hold, the ring-1 stack for ring 3 -> 1 transitions (stack_switch), and the CR0.TS
    # the guest asked for (fpu_taskswitch).
    gdt_frames: tuple[int, ...] = ()
    gdt_ents: int = 0
    kernel_ss: int = 0
    kernel_sp: int = 0
    cr0_ts: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.domid, self.vid)

    @property
    def running(self) -> bool:
        return self.runstate is RunState.RUNNING

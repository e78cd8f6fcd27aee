"""Each TLB shootdown, from its guest marks and what crossed the hypervisor, and where its latency went.

A shootdown runs from the initiator's SHOOTDOWN_REQUEST mark to its SHOOTDOWN_DONE mark (``Mark``). Between them
the analysis follows the critical path, the chain of steps the done mark waited on, and charges every nanosecond
of it to one component (``COMPONENTS``), so a shootdown's breakdown sums exactly to its latency:

* IPI designs (native, cr3): the target whose acknowledgement came last is the critical one. ``initiator`` runs
  from the request to the moment the notification for that target left (its APIC ICR write, or the event the
  hypervisor sent) less ``hypercall``, the part of that inside the hypercall that sent it (event channels);
  ``delivery`` is from there to the target's ``irq.enter``; ``handler`` from there to its FLUSH_ACK mark;
  ``ack`` from there to the done mark (the initiator noticing). Time the target spent without a pCPU inside
  ``delivery`` or ``handler`` is ``wait_pcpu``; time the initiator spent without one inside ``initiator`` or
  ``ack`` is ``initiator_preempted``.
* Paravirtual designs (pv, pv (vmi rom)): ``hypercall`` from each flush hypercall's trap to its answer's arrival,
  ``initiator`` the rest (less ``initiator_preempted``). The hypervisor flushes targets without a pCPU before they
  next run, so nothing waits for them.
"""

from __future__ import annotations

import bisect
from typing import Any

import attrs

COMPONENTS = ("initiator", "initiator_preempted", "hypercall", "wait_pcpu", "delivery", "handler", "ack")


@attrs.frozen
class VcpuStates:
    """A vCPU's run state when a shootdown started and every change until it ended."""

    vcpu: int
    at_start: str
    changes: tuple[tuple[int, str], ...]


@attrs.frozen
class Shootdown:
    dom: int
    name: str
    mode: str
    round: int
    initiator: int
    start_ns: int
    end_ns: int
    targets: tuple[int, ...]
    preempted: int
    messages: int
    hypercalls: int
    breakdown: dict[str, int]
    critical_target: int | None
    sends: tuple[tuple[int, int], ...]
    flushes: tuple[tuple[int, int], ...]
    vcpu_states: tuple[VcpuStates, ...] = ()

    @property
    def latency_ns(self) -> int:
        return self.end_ns - self.start_ns

    def to_json(self) -> dict[str, Any]:
        return {
            "dom": self.dom, "name": self.name, "mode": self.mode, "round": self.round, "initiator": self.initiator,
            "start_vt_ns": self.start_ns, "end_vt_ns": self.end_ns, "latency_us": self.latency_ns / 1000,
            "targets": list(self.targets), "preempted": self.preempted, "messages": self.messages,
            "hypercalls": self.hypercalls, "critical_target": self.critical_target,
            "breakdown_us": {k: v / 1000 for k, v in self.breakdown.items()},
            "sends": [list(s) for s in self.sends], "flushes": [list(f) for f in self.flushes],
            "vcpu_states": [{"vcpu": s.vcpu, "at_start": s.at_start, "changes": [list(c) for c in s.changes]}
                            for s in self.vcpu_states],
        }


class RunStates:
    """One vCPU's recent run-state changes, for "how long was it without a pCPU between a and b".

    Only the recent past is kept (``KEEP`` changes; a shootdown older than that has long been closed), so memory is
    flat however long the run.
    """

    KEEP = 4096
    __slots__ = ("times", "states")

    def __init__(self) -> None:
        self.times: list[int] = []
        self.states: list[str] = []

    def change(self, vt_ns: int, state: str) -> None:
        if len(self.times) >= 2 * self.KEEP:
            del self.times[: self.KEEP], self.states[: self.KEEP]
        self.times.append(vt_ns)
        self.states.append(state)

    def state_at(self, vt_ns: int) -> str:
        i = bisect.bisect_right(self.times, vt_ns)
        return self.states[i - 1] if i else "running"

    def not_running(self, a: int, b: int) -> int:
        """Virtual ns in [a, b) this vCPU held no pCPU (before its first known change it counts as running)."""
        if b <= a:
            return 0
        times, states = self.times, self.states
        i = bisect.bisect_right(times, a)
        state = states[i - 1] if i else "running"
        total, at = 0, a
        while i < len(times) and times[i] < b:
            if state != "running":
                total += times[i] - at
            at, state = times[i], states[i]
            i += 1
        if state != "running":
            total += b - at
        return total

    def changes(self, a: int, b: int) -> tuple[tuple[int, str], ...]:
        lo, hi = bisect.bisect_right(self.times, a), bisect.bisect_right(self.times, b)
        return tuple(zip(self.times[lo:hi], self.states[lo:hi], strict=True))


@attrs.define
class OpenShootdown:
    """What is known about a shootdown between its request and done marks."""

    round: int
    initiator: int
    start_ns: int
    sends: dict[int, int] = attrs.Factory(dict)  # target -> vt the notification left
    preempted: int = 0
    ipis: int = 0
    hypercalls: int = 0
    calls: list[tuple[int, int]] = attrs.Factory(list)  # the initiator's hypercalls: (trap, answer arrival)
    pv: list[tuple[int, int, tuple[int, ...]]] = attrs.Factory(list)  # paravirtual flushes: (trap, end, targets)
    entered: dict[int, int] = attrs.Factory(dict)  # target -> irq.enter
    acks: dict[int, int] = attrs.Factory(dict)  # target -> FLUSH_ACK mark
    flushed: dict[int, int] = attrs.Factory(dict)  # target -> tlb.flush (paravirtual)


def close(o: OpenShootdown, end_ns: int, dom: int, name: str, mode: str,
          history: dict[int, RunStates]) -> Shootdown:
    """The finished shootdown with its breakdown (see the module docstring)."""
    comp = dict.fromkeys(COMPONENTS, 0)
    init = history.get(o.initiator) or RunStates()

    def on_initiator(a: int, b: int, label: str) -> None:
        away = init.not_running(a, b)
        comp[label] += b - a - away
        comp["initiator_preempted"] += away

    critical: int | None = None
    if o.sends:
        critical = max(o.sends, key=lambda v: (o.acks.get(v, o.entered.get(v, o.sends[v])), v))
        target = history.get(critical) or RunStates()
        sent = min(max(o.sends[critical], o.start_ns), end_ns)
        # an event channel's notification leaves from inside the hypercall that sent it
        trap = max((t for t, arrive in o.calls if t <= sent <= arrive), default=sent)
        trap = max(trap, o.start_ns)
        entered = min(max(o.entered.get(critical, sent), sent), end_ns)
        acked = min(max(o.acks.get(critical, entered), entered), end_ns)
        on_initiator(o.start_ns, trap, "initiator")
        comp["hypercall"] += sent - trap
        for a, b, label in ((sent, entered, "delivery"), (entered, acked, "handler")):
            away = target.not_running(a, b)
            comp[label] += b - a - away
            comp["wait_pcpu"] += away
        on_initiator(acked, end_ns, "ack")
    else:
        at = o.start_ns
        for trap, end, _ in sorted(o.pv):
            arrive = next((arr for t, arr in o.calls if t == trap), end)
            trap = min(max(trap, at), end_ns)
            arrive = min(max(arrive, trap), end_ns)
            on_initiator(at, trap, "initiator")
            comp["hypercall"] += arrive - trap
            at = arrive
        on_initiator(at, end_ns, "initiator")
    if o.sends:
        targets = tuple(o.sends)
        flushes = tuple((v, o.acks.get(v, o.entered.get(v, end_ns))) for v in targets)
        sends = tuple(o.sends.items())
    else:
        targets = tuple(sorted({v for _, _, ts in o.pv for v in ts}))
        flushes = tuple((v, o.flushed.get(v, end_ns)) for v in targets)
        first_trap = min((t for t, _, _ in o.pv), default=o.start_ns)
        sends = tuple((v, first_trap) for v in targets)
    return Shootdown(
        dom=dom, name=name, mode=mode, round=o.round, initiator=o.initiator, start_ns=o.start_ns, end_ns=end_ns,
        targets=targets, preempted=o.preempted,
        # a hypercall is one request on the bus; an APIC IPI crosses it twice (sender -> hypervisor -> target);
        # acknowledgements are writes to shared memory and cost no message
        messages=o.hypercalls + 2 * o.ipis, hypercalls=o.hypercalls,
        breakdown=comp, critical_target=critical, sends=sends, flushes=flushes,
    )


def with_states(sd: Shootdown, history: dict[int, RunStates]) -> Shootdown:
    """``sd`` with every vCPU's run state at its start and the changes until its end (for the slowest list)."""
    states = tuple(
        VcpuStates(v, h.state_at(sd.start_ns), h.changes(sd.start_ns, sd.end_ns)) for v, h in sorted(history.items())
    )
    return attrs.evolve(sd, vcpu_states=states)

"""The physical-CPU scheduler: places the vCPUs of every domain on ``pcpus`` physical CPUs in virtual time.

Round-robin with a time slice, decided at window boundaries: a vCPU that wants to run waits in one FIFO queue
(ordered by when it became runnable, then domain and vCPU id, so the order never depends on host timing); a running
vCPU keeps its pCPU until it blocks, goes offline, or has used its slice while others wait for a pCPU. Each vCPU may
run only on the pCPUs of its domain's hard affinity (the spec's ``cpus``, as xl.cfg's); every change of run state is
traced with how long the previous state lasted.

Domains whose affinities share a pCPU compete for it and form one *partition*; domains in different partitions never
meet in the scheduler. The clock asks for a partition's decisions only in windows that partition takes part in, so a
domain pinned to pCPUs of its own runs exactly as it would if the other partitions did not exist.

The scheduler keeps no table of its own: the run state lives on each ``Vcpu`` (``hypervisor/vcpu.py``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import attrs

from hypervisor.vcpu import RunState, Vcpu

if TYPE_CHECKING:
    from hypervisor.domain import Domain


@attrs.frozen
class Partition:
    """Domains that compete for pCPUs (directly or through each other), and the pCPUs they may use."""

    domains: tuple[Domain, ...]
    pcpus: tuple[int, ...]

    @property
    def vcpus(self) -> list[Vcpu]:
        return [v for d in self.domains for v in d.vcpus]

    @property
    def last_window(self) -> int:
        return max(d.last_window for d in self.domains)

    @property
    def last_activity(self) -> int | None:
        """The earliest activity the partition had when its last window was chosen."""
        times = [d.last_activity for d in self.domains if d.last_activity is not None]
        return min(times) if times else None


def partitions(domains: Sequence[Domain]) -> list[Partition]:
    """Group ``domains`` (in domid order) by overlapping affinity, with union-find over pCPUs."""
    parent: dict[int, int] = {}

    def find(p: int) -> int:
        while parent.setdefault(p, p) != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    cpus = {d.domid: _cpus(d) for d in domains}
    for d in domains:
        mine = cpus[d.domid]
        for p in mine[1:]:
            parent[find(p)] = find(mine[0])
    groups: dict[int, list[Domain]] = {}
    for d in domains:
        if cpus[d.domid]:
            groups.setdefault(find(cpus[d.domid][0]), []).append(d)
    out = []
    for members in groups.values():
        pcpus = sorted({p for d in members for p in cpus[d.domid]})
        out.append(Partition(tuple(members), tuple(pcpus)))
    return sorted(out, key=lambda part: part.domains[0].domid)


def _cpus(dom: Domain) -> tuple[int, ...]:
    """Every pCPU any of the domain's vCPUs may run on (a pinned vCPU may have another affinity than the rest)."""
    return tuple(sorted({p for v in dom.vcpus for p in v.affinity}))


class Scheduler:
    def __init__(self, pcpus: int, slice_ns: int) -> None:
        self.pcpus = pcpus
        self.slice_ns = slice_ns

    def affinity(self, cpus: Iterable[int]) -> tuple[int, ...]:
        """A domain's hard affinity: its ``cpus`` (those that exist), or every pCPU."""
        chosen = tuple(sorted({p for p in cpus if 0 <= p < self.pcpus}))
        return chosen or tuple(range(self.pcpus))

    # -- run-state changes ---------------------------------------------------------------------------------

    @staticmethod
    def move(dom: Domain, v: Vcpu, state: RunState, now: int, why: str) -> None:
        if v.runstate is state:
            return
        if v.runstate is RunState.RUNNING:
            # A vCPU leaves its pCPU where its own clock is: it may have run past ``now`` (the window's start, for a
            # decision in a later sub-step of the window, or its last block overshooting the window's end).
            now = max(now, v.clock_ns)
        dom.trace.event("vcpu.runstate", vt_ns=now, vcpu=v.vid, state=state.value, previous=v.runstate.value,
                        duration_ns=max(0, now - v.since_ns), why=why, pcpu=v.pcpu)
        if state is RunState.RUNNABLE:
            v.queued_at_ns = now
        if state is not RunState.RUNNING:
            v.pcpu = None
        if state in (RunState.BLOCKED, RunState.OFFLINE):
            v.ready_ns = None
        v.runstate, v.since_ns = state, max(now, v.since_ns)

    def report(self, dom: Domain, v: Vcpu, reported: str, now: int, ran: bool) -> None:
        """A vCPU's state as its domain saw it at the end of a window. A vCPU that held no pCPU in the window
        cannot have changed on its own, so only its going offline counts: a wake-up the scheduler already
        knows about (an IPI, an event) must not be undone by the domain's older view."""
        if not ran and reported not in ("down", "crashed"):
            return
        if reported in ("running", "hypercall"):
            if v.runstate in (RunState.OFFLINE, RunState.BLOCKED):
                self.move(dom, v, RunState.RUNNABLE, now, "woke")
        elif reported == "blocked":
            self.move(dom, v, RunState.BLOCKED, now, "blocked")
        else:
            self.move(dom, v, RunState.OFFLINE, now, reported)

    def wake(self, dom: Domain, v: Vcpu, now: int, why: str) -> None:
        if v.runstate in (RunState.BLOCKED, RunState.OFFLINE):
            self.move(dom, v, RunState.RUNNABLE, now, why)

    def pin(self, dom: Domain, v: Vcpu, affinity: tuple[int, ...], now: int) -> None:
        """Set ``v``'s hard affinity (the ``pin`` fault, as `xl vcpu-pin`); a vCPU running elsewhere gives up its
        pCPU and waits for one of the new ones."""
        v.affinity = tuple(sorted(set(affinity)))
        if v.runstate is RunState.RUNNING and v.pcpu not in v.affinity:
            self.move(dom, v, RunState.RUNNABLE, now, "pinned elsewhere")

    def offline(self, dom: Domain, now: int, why: str) -> None:
        for v in dom.vcpus:
            self.move(dom, v, RunState.OFFLINE, now, why)

    # -- deciding a window -----------------------------------------------------------------------------------

    def pick(self, part: Partition, now: int) -> dict[int, list[int]]:
        """Assign the partition's pCPUs for the window starting at ``now``; return the vCPUs that run, by domain."""
        owner = {id(v): d for d in part.domains for v in d.vcpus}
        vcpus = [v for d in part.domains if d.running for v in d.vcpus]  # one paused as the window opened: none
        queue = sorted((v for v in vcpus if v.runstate is RunState.RUNNABLE), key=lambda v: (v.queued_at_ns, v.key))
        held = sum(1 for v in queue if v.held_until is not None)
        running = sorted((v for v in vcpus if v.runstate is RunState.RUNNING), key=lambda v: v.key)
        used = {v.pcpu for v in vcpus if v.runstate is RunState.RUNNING}
        # vCPUs that would find no free pCPU: as many running ones that used up their slice make way for them
        waiting = len(queue) - held - sum(1 for p in part.pcpus if p not in used)
        for v in running:
            if waiting <= 0:
                break
            if now - v.slice_start_ns >= self.slice_ns:
                v.preemptions += 1
                used.discard(v.pcpu)
                self.move(owner[id(v)], v, RunState.RUNNABLE, now, "slice used up")
                queue.append(v)
                waiting -= 1
        for v in queue:
            if v.held_until is not None:  # a preempt or offline fault holds it off every pCPU
                continue
            pcpu = next((p for p in v.affinity if p not in used), None)
            if pcpu is None:
                continue
            used.add(pcpu)
            at = max(now, v.queued_at_ns)  # woken inside the window: it runs from its wake-up, not before
            v.pcpu, v.slice_start_ns = pcpu, at
            self.move(owner[id(v)], v, RunState.RUNNING, at, "scheduled")
        out: dict[int, list[int]] = {}
        for v in sorted(vcpus, key=lambda v: v.key):
            if v.runstate is RunState.RUNNING:
                out.setdefault(v.domid, []).append(v.vid)
        return out

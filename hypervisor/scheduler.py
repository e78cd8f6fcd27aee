"""The physical-CPU scheduler: places vCPUs of every domain on ``pcpus`` physical CPUs in virtual time.

Round-robin with a time slice, decided at window boundaries: a vCPU that wants to run waits in one FIFO queue
(ordered by when it became runnable, then domain and vCPU id, so the order never depends on host timing); a
running vCPU keeps its pCPU until it blocks, goes offline, or has used its slice while others wait. Every change of
run state is traced with how long the previous state lasted.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

Key = tuple[int, int]  # (domid, vcpu)


class RunState(enum.Enum):
    RUNNING = "running"  # on a pCPU
    RUNNABLE = "runnable"  # wants a pCPU (preempted or woken, waiting its turn)
    BLOCKED = "blocked"  # waits for an event or interrupt
    OFFLINE = "offline"  # down, crashed, or its domain is gone


@attrs.define
class VcpuSched:
    key: Key
    state: RunState = RunState.OFFLINE
    since_ns: int = 0
    slice_start_ns: int = 0
    queued_at_ns: int = 0
    pcpu: int | None = None
    preemptions: int = 0


@attrs.define
class Scheduler:
    pcpus: int
    slice_ns: int
    log: Any
    vcpus: dict[Key, VcpuSched] = attrs.Factory(dict)

    def _get(self, key: Key) -> VcpuSched:
        v = self.vcpus.get(key)
        if v is None:
            v = self.vcpus[key] = VcpuSched(key)
        return v

    def _move(self, v: VcpuSched, state: RunState, now: int, why: str) -> None:
        if v.state is state:
            return
        self.log.info("vcpu.runstate", vt_ns=now, dom=v.key[0], vcpu=v.key[1], state=state.value,
                      previous=v.state.value, duration_ns=now - v.since_ns, why=why, pcpu=v.pcpu)
        if state is RunState.RUNNABLE:
            v.queued_at_ns = now
        if state is not RunState.RUNNING:
            v.pcpu = None
        v.state, v.since_ns = state, now

    # -- what the domains report, and what wakes a vCPU ----------------------------------------------------

    def report(self, key: Key, reported: str, now: int, ran: bool) -> None:
        """A vCPU's state as its domain saw it at the end of a window. A vCPU that held no pCPU in the window
        cannot have changed on its own, so only its going offline counts: a wake-up the scheduler already
        knows about (an IPI, an event) must not be undone by the domain's older view."""
        v = self._get(key)
        if not ran and reported not in ("down", "crashed"):
            return
        if reported in ("running", "hypercall"):
            if v.state in (RunState.OFFLINE, RunState.BLOCKED):
                self._move(v, RunState.RUNNABLE, now, "woke")
        elif reported == "blocked":
            self._move(v, RunState.BLOCKED, now, "blocked")
        else:
            self._move(v, RunState.OFFLINE, now, reported)

    def wake(self, key: Key, now: int, why: str) -> None:
        v = self._get(key)
        if v.state in (RunState.BLOCKED, RunState.OFFLINE):
            self._move(v, RunState.RUNNABLE, now, why)

    def offline(self, domid: int, now: int) -> None:
        for v in self.vcpus.values():
            if v.key[0] == domid:
                self._move(v, RunState.OFFLINE, now, "domain gone")

    def is_running(self, key: Key) -> bool:
        v = self.vcpus.get(key)
        return v is not None and v.state is RunState.RUNNING

    # -- deciding the next window ----------------------------------------------------------------------------

    def pick(self, now: int) -> dict[int, list[int]]:
        """Assign pCPUs for the window starting at ``now``; return the vCPUs that run, by domain."""
        queue = sorted((v for v in self.vcpus.values() if v.state is RunState.RUNNABLE),
                       key=lambda v: (v.queued_at_ns, v.key))
        running = sorted((v for v in self.vcpus.values() if v.state is RunState.RUNNING), key=lambda v: v.key)
        if queue:
            for v in running:
                if now - v.slice_start_ns >= self.slice_ns:
                    v.preemptions += 1
                    self._move(v, RunState.RUNNABLE, now, "slice used up")
                    queue.append(v)
        used = {v.pcpu for v in self.vcpus.values() if v.state is RunState.RUNNING}
        free = [p for p in range(self.pcpus) if p not in used]
        for v, pcpu in zip(queue, free, strict=False):
            v.pcpu, v.slice_start_ns = pcpu, now
            self._move(v, RunState.RUNNING, now, "scheduled")
        out: dict[int, list[int]] = {}
        for v in sorted(self.vcpus.values(), key=lambda v: v.key):
            if v.state is RunState.RUNNING:
                out.setdefault(v.key[0], []).append(v.key[1])
        return out

    def waiting(self, domid: int) -> list[int]:
        """vCPUs of ``domid`` that want to run but hold no pCPU (preempted or not yet scheduled)."""
        return sorted(v.key[1] for v in self.vcpus.values() if v.key[0] == domid and v.state is RunState.RUNNABLE)

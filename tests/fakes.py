"""A scripted stand-in for a domain process, to drive the hypervisor core in-process, fast.

Each vCPU runs a program of ops instead of x86 code: ``("compute", ns)`` spends virtual time, ``("block", ns)`` spends
it without stopping at the window's end (a translated block that runs past it, as Unicorn's do), ``("hc", nr, args,
regions)`` traps with a hypercall (regions: the guest buffers it names, as the domain process would copy them in),
``("loop", k)`` jumps back to op ``k``. The fake applies what the hypervisor sends the way a domain process does in
the parts the core cares about: results complete traps (and move the clock to the result's time), ``Block`` sleeps
until an event is pending, ``SetPending`` wakes a vCPU that waits, ``VcpuUp`` starts a vCPU, ``RestartHypercall``
re-issues the trap. ``Cluster`` wires fakes to a ``Hypervisor`` the way the transport shell does, minus sockets.
"""

from __future__ import annotations

import struct
from typing import Any

import attrs

from hypervisor.core import Hypervisor
from pvcluster.abi.xen import Hypercall, SchedOp, ShutdownReason
from pvcluster.bus.effects import Block, RestartHypercall, SetPending, Unmask, VcpuDown, VcpuUp
from pvcluster.bus.messages import (
    Build,
    BuildResult,
    Delivery,
    Hello,
    HypercallReq,
    Region,
    Stop,
    VcpuReport,
    Window,
    WindowDone,
)
from pvcluster.spec import ClusterSpec

Op = tuple[Any, ...]
SHUTDOWN_BUF = 0x1000


def shutdown_op(reason: ShutdownReason = ShutdownReason.poweroff) -> Op:
    return ("hc", Hypercall.sched_op, [SchedOp.shutdown, SHUTDOWN_BUF, 0, 0, 0],
            [Region(SHUTDOWN_BUF, 4, struct.pack("<I", reason), False)])


def block_op() -> Op:
    return ("hc", Hypercall.sched_op, [SchedOp.block, 0, 0, 0, 0], [])


def version_op() -> Op:
    return ("hc", Hypercall.xen_version, [0, 0, 0, 0, 0], [])


@attrs.define
class FakeVcpu:
    vid: int
    program: list[Op]
    pc: int = 0
    clock: int = 0
    state: str = "down"  # running | hypercall | blocked | down
    left: int | None = None  # ns left of the current compute op
    seq: int = 0
    trap: HypercallReq | None = None
    instructions: int = 0


class FakeDomain:
    def __init__(self, domid: int, programs: list[list[Op]]) -> None:
        self.domid = domid
        self.vcpus = [FakeVcpu(v, p) for v, p in enumerate(programs)]
        self.pending: set[int] = set()
        self.stopped = False

    # -- what the hypervisor sends ---------------------------------------------------------------------------

    def build(self, req: Build) -> BuildResult:
        self.vcpus[0].state = "running"
        return BuildResult(ok=True, error_code="", error="", entry=0, start_info=0, guest_os="fake")

    def window(self, w: Window) -> WindowDone:
        for d in w.events:
            self._delivery(d)
        for r in w.results:
            v = self.vcpus[r.vcpu]
            for e in r.effects:
                self._effect(e, r.vt_ns)
            if r.complete and v.trap is not None and v.trap.seq == r.seq:
                v.trap, v.state, v.clock = None, "running", max(v.clock, r.vt_ns)
        reqs: list[HypercallReq] = []
        run = set(w.run)
        for v in self.vcpus:
            if v.vid not in run:
                if v.state in ("running", "hypercall"):
                    v.clock = max(v.clock, w.end_ns)  # waits out the window without a pCPU
                continue
            req = self._run(v, w.end_ns)
            if req is not None:
                reqs.append(req)
        reports = [VcpuReport(v.vid, v.state, v.clock, v.instructions) for v in self.vcpus]
        return WindowDone(index=w.index, vcpus=reports, hypercalls=reqs, faults=[])

    def _delivery(self, d: Delivery) -> None:
        vid = getattr(d.effect, "vcpu", None)
        if isinstance(vid, int) and self.vcpus[vid].state == "blocked":
            self.vcpus[vid].clock = max(self.vcpus[vid].clock, d.vt_ns)
        self._effect(d.effect, d.vt_ns)

    def _effect(self, e: Any, vt: int) -> None:
        if isinstance(e, (SetPending, Unmask)):
            if isinstance(e, SetPending):
                self.pending.add(e.port)
            v = self.vcpus[e.vcpu]
            if v.state == "blocked" and self.pending:
                self._wake(v, vt)
        elif isinstance(e, Block):
            v = self.vcpus[e.vcpu]
            if self.pending:
                self._wake(v, vt)
            else:
                v.state = "blocked"
        elif isinstance(e, VcpuUp):
            v = self.vcpus[e.vcpu]
            v.state, v.clock = "running", max(v.clock, vt)
        elif isinstance(e, VcpuDown):
            self.vcpus[e.vcpu].state = "down"
        elif isinstance(e, RestartHypercall):
            self.vcpus[e.vcpu].pc -= 1  # the trap op runs again with the remaining work

    def _wake(self, v: FakeVcpu, vt: int) -> None:
        self.pending.clear()
        v.trap, v.state, v.clock = None, "running", max(v.clock, vt)

    # -- running a vCPU --------------------------------------------------------------------------------------

    def _run(self, v: FakeVcpu, end: int) -> HypercallReq | None:
        while v.state == "running" and v.clock < end:
            op = v.program[v.pc % len(v.program)]
            if op[0] in ("compute", "block"):
                left = op[1] if v.left is None else v.left
                step = min(left, end - v.clock) if op[0] == "compute" else left
                v.clock += step
                v.instructions += step
                v.left = left - step
                if v.left == 0:
                    v.left = None
                    v.pc += 1
            elif op[0] == "loop":
                v.pc = op[1]
            else:
                _, nr, args, regions = op
                v.pc += 1
                v.seq += 1
                v.trap = HypercallReq(vcpu=v.vid, seq=v.seq, vt_ns=v.clock, nr=int(nr), args=list(args),
                                      regions=list(regions))
                v.state = "hypercall"
                return v.trap
        return None


class Cluster:
    """A Hypervisor and fake domains wired together the way the transport shell wires processes."""

    def __init__(self, spec: ClusterSpec, programs: dict[str, list[list[Op]]], log: Any) -> None:
        self.hv = Hypervisor(spec, log)
        self.programs = programs
        self.fakes: dict[int, FakeDomain] = {}
        for d in spec.domains:
            dom = self.hv.create_domain(d)
            self.fakes[dom.domid] = FakeDomain(dom.domid, programs[d.name])
        for dom in self.hv.domains:
            self.hv.receive(dom, Hello(pid=0))
        self._flush()

    def _flush(self) -> bool:
        """Hand the core's outbox to the fakes; True when a restarted domain was launched (the clock may go on)."""
        launched = bool(self.hv.to_launch)
        while self.hv.to_launch:  # a restart the core decided: a new fake runs the name's program, as the shell would
            launches, self.hv.to_launch = self.hv.to_launch, []
            for dom in launches:
                self.fakes[dom.domid] = FakeDomain(dom.domid, self.programs[dom.name])
                self.hv.receive(dom, Hello(pid=0))
        outbox, self.hv.outbox = self.hv.outbox, []
        for dom, msg in outbox:
            fake = self.fakes[dom.domid]
            if isinstance(msg, Build):
                self.hv.receive(dom, fake.build(msg))
            elif isinstance(msg, Stop):
                fake.stopped = True
                self.hv.process_exited(dom, 0)
        self.hv.to_kill.clear()
        return launched

    def run(self, max_windows: int = 100_000) -> int:
        """Step until nothing can happen; returns the number of windows."""
        for n in range(max_windows):
            windows = self.hv.step()
            if self._flush() and not windows:
                continue
            if not windows:
                return n
            for domid, w in windows.items():
                dom = self.hv.domains.get(domid)
                assert dom is not None
                self.hv.receive(dom, self.fakes[domid].window(w))
            self._flush()
        raise AssertionError(f"still running after {max_windows} windows")

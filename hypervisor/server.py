"""The hypervisor process: the domain bus, the control socket, domain processes and the conductor loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
import zmq

from hypervisor import evtchn, mm, timers
from hypervisor.conductor import Conductor, ReportError, Shutdown
from hypervisor.domain import Domain, DomainState, DomainTable, IllegalTransition
from hypervisor.hypercall_page import hypercall_page
from hypervisor.scheduler import Scheduler
from hypervisor.vmi_rom import vmi_rom
from pvcluster import launch
from pvcluster.abi.xen import ShutdownReason
from pvcluster.bus import codec
from pvcluster.bus.endpoints import Endpoints
from pvcluster.bus.messages import (
    Build,
    BuildResult,
    Error,
    Hello,
    Ipi,
    Stop,
    VcpuAction,
    Window,
    WindowDone,
)
from pvcluster.bus.zsock import TrioSocket
from pvcluster.spec import ClusterSpec, DomainSpec

# Wall-clock limits only decide when a silent peer is declared dead; they never shape simulated behaviour.
WINDOW_REPORT_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0


class Hypervisor:
    def __init__(self, spec: ClusterSpec, run_dir: Path, log: Any) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.log = log
        self.table = DomainTable()
        cost = spec.hypervisor.cost
        self.conductor = Conductor(
            window_ns=spec.hypervisor.window_ns,
            hypercall_ns=cost.hypercall_ns,
            jitter_ns=cost.hypercall_jitter_ns,
            seed=spec.cluster.seed,
            log=log,
        )
        self.scheduler = Scheduler(spec.hypervisor.pcpus, spec.hypervisor.slice_ns, log)
        self.conductor.is_running = self.scheduler.is_running
        self.conductor.link_ns = cost.link_ns
        self.conductor.domain_alive = self._domain_alive
        self.ipi_ns = cost.ipi_ns
        # IPIs waiting for their target to hold a pCPU, by (domid, vcpu)
        self.pending_ipis: dict[tuple[int, int], list[Ipi]] = {}
        self._runs: dict[int, list[int]] = {}
        self.dmesg: list[str] = []
        self.ctx = zmq.Context()
        self.endpoints = Endpoints.for_spec(spec, run_dir)
        self.bus: TrioSocket | None = None
        self.control: TrioSocket | None = None
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.changed = trio.Event()
        self.reports_in = trio.Event()
        self.awaiting: set[int] = set()
        self.idle = False
        self.stopping = False
        self._send_seq = 0
        self._page = hypercall_page()
        self.nursery: trio.Nursery | None = None

    # -- logging ---------------------------------------------------------------------------------------------

    def printk(self, text: str, **fields: Any) -> None:
        """A hypervisor log line, as `xl dmesg` shows it, and a trace event."""
        vt = fields.pop("vt_ns", self.conductor.end_ns)
        self.dmesg.append(f"(XEN) [{vt / 1000:12.3f} us] {text}")
        del self.dmesg[:-5000]
        self.log.info("dmesg", vt_ns=vt, text=text, **fields)

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # -- sockets ---------------------------------------------------------------------------------------------

    def bind(self) -> None:
        bus = self.ctx.socket(zmq.ROUTER)
        bus.setsockopt(zmq.ROUTER_MANDATORY, 1)
        bus.setsockopt(zmq.LINGER, 0)
        # Frames up to twice the codec limit are read and answered "oversized"; beyond that ZeroMQ drops the
        # peer before a byte reaches us, so no peer can make the hypervisor buffer more than this.
        bus.setsockopt(zmq.MAXMSGSIZE, 2 * codec.MAX_FRAME_BYTES)
        control = self.ctx.socket(zmq.ROUTER)
        control.setsockopt(zmq.LINGER, 0)
        control.setsockopt(zmq.MAXMSGSIZE, 2 * codec.MAX_FRAME_BYTES)
        self.endpoints = self.endpoints.bind(bus, control)
        self.bus, self.control = TrioSocket(bus), TrioSocket(control)
        info = {"pid": os.getpid(), "bus": self.endpoints.bus, "control": self.endpoints.control}
        tmp = self.run_dir / "hypervisor.json.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.run_dir / "hypervisor.json")
        self.log.info("hypervisor.listening", vt_ns=0, **info)

    async def _send(self, sock: TrioSocket, identity: bytes, body: Any) -> bool:
        self._send_seq += 1
        frame = codec.encode(body, seq=self._send_seq, vt_ns=self.conductor.end_ns)
        try:
            await sock.send_multipart([identity, frame])
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone; its watcher reports the death
            self.log.warning(
                "bus.send_failed",
                vt_ns=self.conductor.end_ns,
                peer=identity[:6].decode(errors="replace"),
                error=str(exc),
                msg=type(body).__name__,
            )
            return False
        return True

    async def _reject(self, sock: TrioSocket, identity: bytes, kind: str, detail: str, seq: int, **fields: Any) -> None:
        self.log.warning(f"bus.{kind}", vt_ns=self.conductor.end_ns, detail=detail, ref_seq=seq, **fields)
        await self._send(sock, identity, Error(kind=kind, detail=detail, ref_seq=seq))

    # -- the domain bus --------------------------------------------------------------------------------------

    async def bus_reader(self) -> None:
        assert self.bus is not None
        while True:
            frames = await self.bus.recv_multipart()
            identity = frames[0]
            dom = self.table.by_identity(identity)
            # Identity first: a peer the hypervisor did not create learns nothing about its frames.
            if dom is None:
                await self._reject(
                    self.bus,
                    identity,
                    "unknown-peer",
                    "this socket identity was not assigned by the hypervisor",
                    -1,
                    peer=identity[:32].hex(),
                )
                continue
            if len(frames) != 2:
                await self._reject(
                    self.bus,
                    identity,
                    "malformed",
                    f"expected 1 payload frame, got {len(frames) - 1}",
                    -1,
                    dom=dom.domid,
                )
                continue
            try:
                env = codec.decode(frames[1])
            except codec.FrameError as exc:
                await self._reject(
                    self.bus,
                    identity,
                    exc.kind,
                    exc.detail,
                    exc.seq if exc.seq is not None else -1,
                    dom=dom.domid,
                    size=len(frames[1]),
                )
                continue
            try:
                await self._on_domain_message(dom, env.body, env.seq)
            except (ReportError, IllegalTransition) as exc:
                await self._reject(self.bus, identity, "unexpected", str(exc), env.seq, dom=dom.domid)

    async def _on_domain_message(self, dom: Domain, body: Any, seq: int) -> None:
        if isinstance(body, Hello) and dom.state in (DomainState.SHUTTING_DOWN, DomainState.CRASHED, DomainState.DEAD):
            # destroyed before its process connected: the Stop sent then could not be delivered
            await self._send(self.bus, dom.identity, Stop(reason="destroy"))  # type: ignore[arg-type]
        elif isinstance(body, Hello) and dom.state is DomainState.BUILDING and not dom.hello:
            dom.hello = True
            await self._send(self.bus, dom.identity, self._build_message(dom))  # type: ignore[arg-type]
        elif isinstance(body, BuildResult) and dom.state is DomainState.BUILDING and dom.hello:
            self._on_built(dom, body)
        elif isinstance(body, WindowDone) and dom.domid in self.awaiting:
            self.conductor.report(dom, body)
            self.awaiting.discard(dom.domid)
            if not self.awaiting:
                self.reports_in.set()
        elif isinstance(body, Error):
            self.log.warning(
                "bus.peer_error",
                vt_ns=self.conductor.end_ns,
                dom=dom.domid,
                kind=body.kind,
                detail=body.detail,
                ref_seq=body.ref_seq,
            )
        else:
            raise ReportError(f"{type(body).__name__} is not expected from a domain in state {dom.state.value}")

    def _build_message(self, dom: Domain) -> Build:
        s: DomainSpec = dom.spec
        return Build(
            domid=dom.domid,
            name=dom.name,
            vcpus=s.vcpus,
            memory_bytes=s.memory_mib << 20,
            kernel=s.kernel,
            cmdline=s.cmdline,
            backend=s.backend,
            boot=s.boot,
            patching=s.patching,
            hypercall_page=self._page,
            ps_per_instr=self.spec.hypervisor.cost.ps_per_instr,
            rom=vmi_rom() if s.backend == "vmi" else b"",
        )

    def _on_built(self, dom: Domain, res: BuildResult) -> None:
        if not res.ok:
            dom.crash_detail = f"build failed: {res.error_code}: {res.error}"
            dom.move(DomainState.CRASHED, dom.crash_detail)
            self.printk(f"d{dom.domid} ({dom.name}): {dom.crash_detail}", dom=dom.domid, error_code=res.error_code)
            self._poke()
            return
        dom.move(DomainState.RUNNING, "built")
        if dom.spec.backend != "native":
            # a paravirtualized guest's initial tables are validated and pinned, so it cannot map them writable
            mm.pin(dom, res.l2_mfn, 2)
            for mfn in res.l1_mfns:
                mm.pin(dom, mfn, 1)
        dom.vcpus[0].initialised = dom.vcpus[0].up = True
        dom.vcpus[0].state = "running"
        self.conductor.join(dom)
        self.scheduler.wake((dom.domid, 0), dom.started_vt, "boot")
        self.printk(
            f"d{dom.domid} ({dom.name}): built {res.guest_os}, entry {res.entry:#x}, start_info "
            f"{res.start_info:#x}, {len(dom.vcpus)} vcpus, backend {dom.spec.backend}, boot {dom.spec.boot}",
            dom=dom.domid,
            entry=res.entry,
            guest_os=res.guest_os,
            backend=dom.spec.backend,
            boot=dom.spec.boot,
        )
        self._poke()

    # -- the conductor loop ----------------------------------------------------------------------------------

    def participants(self) -> list[Domain]:
        return [d for d in self.table if d.state is DomainState.RUNNING and d.joined_window is not None]

    async def conductor_loop(self) -> None:
        while True:
            if any(d.state is DomainState.BUILDING for d in self.table):
                # Building takes no virtual time: domains created together start together, whatever the
                # order in which their processes happened to finish building.
                await self.changed.wait()
                continue
            parts = self.participants()
            runs = self._runs = self.scheduler.pick(self.conductor.end_ns)
            end = self.conductor.next_end(runs) if parts else None
            if end is None and parts:
                # nothing scheduled can run; a vCPU waiting for a pCPU may still be able to
                end = self.conductor.next_end({d.domid: list(range(len(d.vcpus))) for d in parts})
            if end is None:
                if parts and not self.idle:
                    self.idle = True
                    self.printk(
                        "no runnable vCPU and no pending event: the cluster is idle",
                        domains=[d.domid for d in parts],
                    )
                await self.changed.wait()
                continue
            self.idle = False
            self.conductor.open(end)
            self._fire_timers()
            self.awaiting = {d.domid for d in parts}
            self.reports_in = trio.Event()
            for d in parts:
                run = runs.get(d.domid, [])
                irqs = [i for v in run for i in self.pending_ipis.pop((d.domid, v), [])]
                window = Window(
                    index=self.conductor.index,
                    end_ns=self.conductor.end_ns,
                    results=self.conductor.take_results(d.domid),
                    run=run,
                    irqs=irqs,
                    events=self.conductor.take_events(d.domid),
                )
                await self._send(self.bus, d.identity, window)  # type: ignore[arg-type]
            with trio.move_on_after(WINDOW_REPORT_TIMEOUT_S):
                await self.reports_in.wait()
            for domid in sorted(self.awaiting):
                dom = self.table.get(domid)
                if dom is not None and dom.alive:
                    self._crash(
                        dom,
                        f"no report for window {self.conductor.index} within {WINDOW_REPORT_TIMEOUT_S:.0f} s",
                    )
            self.awaiting.clear()
            self._schedule_reports(parts)
            for shutdown in self.conductor.close({d.domid: d for d in parts}):
                await self._shutdown(shutdown)
            self._wake_targets(parts)
            for d in parts:
                for fault in self.conductor.reports.get(d.domid, WindowDone(0, [], [], [])).faults:
                    if d.alive:
                        self._crash(
                            d,
                            f"vcpu {fault.vcpu} {fault.kind}: {fault.detail} at eip {fault.eip:#x} ({fault.disasm})",
                            vt_ns=fault.vt_ns,
                        )

    def _schedule_reports(self, parts: list[Domain]) -> None:
        """Feed the window's vCPU states to the scheduler and queue the IPIs the vCPUs sent."""
        for d in parts:
            done = self.conductor.reports.get(d.domid)
            if done is None:
                continue
            ran = set(self._runs.get(d.domid, []))
            for v in done.vcpus:
                self.scheduler.report((d.domid, v.vcpu), v.state, v.clock_ns, v.vcpu in ran)
            for ipi in done.ipis:
                if not 0 <= ipi.dest < len(d.vcpus) or not 0 <= ipi.src < len(d.vcpus):
                    self.log.warning("ipi.dropped", vt_ns=ipi.vt_ns, dom=d.domid, vcpu=ipi.src, dest=ipi.dest,
                                     vector=ipi.vector, why="no such vCPU")
                    continue
                arrive = Ipi(ipi.src, ipi.dest, ipi.vector, ipi.vt_ns + self.ipi_ns)
                self.pending_ipis.setdefault((d.domid, ipi.dest), []).append(arrive)
                self.log.info("ipi", vt_ns=ipi.vt_ns, dom=d.domid, vcpu=ipi.src, dest=ipi.dest, vector=ipi.vector,
                              target_running=self.scheduler.is_running((d.domid, ipi.dest)))
                self.scheduler.wake((d.domid, ipi.dest), arrive.vt_ns, "ipi")

    def _wake_targets(self, parts: list[Domain]) -> None:
        """Events and vCPU bring-up decided in this window make their targets runnable."""
        for d in parts:
            for res in self.conductor.results.get(d.domid, []):
                for act in res.actions:
                    if act.kind in ("evtchn_pending", "evtchn_unmask", "up"):
                        self.scheduler.wake((d.domid, act.vcpu), res.vt_ns, act.kind)
                        self.conductor.wake((d.domid, act.vcpu), res.vt_ns)
        for (domid, vid), ipis in self.pending_ipis.items():
            if ipis:
                self.conductor.wake((domid, vid), min(i.vt_ns for i in ipis))
        running = {d.domid for d in parts if d.state is DomainState.RUNNING}
        for domid, queue in self.conductor.events.items():
            if domid not in running:
                continue
            for act in queue:
                self._wake_at((domid, act.vcpu), act.regs["vt_ns"], act.kind)
                if act.kind == "evtchn_pending":  # a vCPU polling the port may not be the one it notifies
                    for v in timers.pollers(domid):
                        self._wake_at((domid, v), act.regs["vt_ns"], "poll")
        # a vCPU that cannot run but has a timer armed runs again at its deadline, so a window reaches it
        for key in timers.armed():
            deadline = timers.next_deadline(*key)
            dom = self.table.get(key[0])
            if key[0] in running and deadline is not None and dom is not None and dom.vcpus[key[1]].up:
                self._wake_at(key, deadline, "timer")

    def _wake_at(self, key: tuple[int, int], vt_ns: int, why: str) -> None:
        """Make a vCPU that cannot run now runnable from ``vt_ns``; a vCPU that can run keeps its own clock."""
        if self.conductor.times.get(key) is None:
            self.conductor.times[key] = vt_ns
            self.scheduler.wake(key, vt_ns, why)

    def _fire_timers(self) -> None:
        """Timers due by the end of the window just opened become events for their domains."""
        for exp in timers.due(self.conductor.end_ns):
            dom = self.table.get(exp.domid)
            if dom is None or dom.state is not DomainState.RUNNING:
                continue
            if exp.kind == "poll":
                action = VcpuAction(kind="poll_timeout", vcpu=exp.vcpu, regs={"trap_vt": exp.seq})
            else:
                port = evtchn.virq_port(exp.domid, exp.vcpu, evtchn.Virq.TIMER)
                p = evtchn.lookup(exp.domid, port) if port is not None else None
                if p is None:
                    self.log.info("timer.expired", vt_ns=exp.vt_ns, dom=exp.domid, vcpu=exp.vcpu, kind=exp.kind,
                                  port=None)
                    continue
                action = VcpuAction(kind="evtchn_pending", vcpu=p.notify_vcpu, regs={"port": p.number})
            self.log.info("timer.expired", vt_ns=exp.vt_ns, dom=exp.domid, vcpu=exp.vcpu, kind=exp.kind,
                          port=action.regs.get("port"))
            self.conductor.post(exp.domid, action, exp.vt_ns)

    def _domain_alive(self, domid: int) -> bool:
        dom = self.table.get(domid)
        return dom is not None and dom.alive

    def _notify_peers(self, domid: int, peers: list[tuple[int, int]]) -> None:
        """``domid``'s channels were closed: each peer port is UNBOUND now; raise an event on it for its owner."""
        for peer_dom, peer_port in peers:
            p = evtchn.lookup(peer_dom, peer_port)
            if p is None or p.state is not evtchn.PortState.UNBOUND:
                continue
            vt = self.conductor.end_ns + self.conductor.link_ns
            self.log.info("evtchn.peer_closed", vt_ns=vt, dom=peer_dom, port=peer_port, remote_dom=domid)
            self.conductor.post(peer_dom, VcpuAction(kind="evtchn_pending", vcpu=p.notify_vcpu,
                                                     regs={"port": peer_port}), vt)
            self._wake_at((peer_dom, p.notify_vcpu), vt, "peer-closed")

    def _leave(self, dom: Domain) -> None:
        """``dom`` stops taking part in windows: its vCPUs give up their pCPUs, its queued IPIs are dropped, its
        timers stopped and its event channels closed."""
        self.conductor.leave(dom)
        self.scheduler.offline(dom.domid, self.conductor.end_ns)
        timers.forget(dom.domid)
        # its channels close now, in virtual time, not when its process happens to exit: peers see them go
        self._notify_peers(dom.domid, evtchn.close_all(dom.domid))
        for key in [k for k in self.pending_ipis if k[0] == dom.domid]:
            del self.pending_ipis[key]

    async def _shutdown(self, sd: Shutdown) -> None:
        dom = sd.dom
        dom.shutdown_reason = sd.reason
        dom.ended_vt = sd.vt_ns
        if sd.reason is ShutdownReason.crash:
            dom.crash_detail = "guest requested SCHEDOP_shutdown(crash)"
            dom.move(DomainState.CRASHED, "guest shutdown: crash")
        else:
            dom.move(DomainState.SHUTTING_DOWN, f"guest shutdown: {sd.reason.name}")
        self._leave(dom)
        self.printk(
            f"d{dom.domid} ({dom.name}): shutdown, reason {sd.reason.name}",
            vt_ns=sd.vt_ns,
            dom=dom.domid,
            reason=sd.reason.name,
        )
        self.log.info("domain.shutdown", vt_ns=sd.vt_ns, dom=dom.domid, reason=sd.reason.name)
        await self._send(self.bus, dom.identity, Stop(reason=sd.reason.name))  # type: ignore[arg-type]

    def _crash(self, dom: Domain, detail: str, vt_ns: int | None = None) -> None:
        vt = self.conductor.end_ns if vt_ns is None else vt_ns
        dom.crash_detail = detail
        dom.ended_vt = vt
        dom.move(DomainState.CRASHED, detail)
        self._leave(dom)
        self.awaiting.discard(dom.domid)
        if not self.awaiting:
            self.reports_in.set()
        self.printk(f"d{dom.domid} ({dom.name}) crashed: {detail}", vt_ns=vt, dom=dom.domid)
        self.log.info("domain.crash", vt_ns=vt, dom=dom.domid, detail=detail)
        proc = self.procs.get(dom.domid)
        if proc is not None and proc.poll() is None:
            proc.terminate()
        self._poke()

    # -- domain processes ------------------------------------------------------------------------------------

    def create_domain(self, spec: DomainSpec) -> Domain:
        assert self.nursery is not None
        dom = self.table.create(spec)
        argv = launch.python_module_argv(
            "domains",
            "--endpoint",
            self.endpoints.bus,
            "--identity",
            dom.identity.decode(),
            "--run-dir",
            str(self.run_dir),
            "--domid",
            str(dom.domid),
            "--name",
            dom.name,
        )
        proc = launch.spawn(argv, log=self.run_dir / "logs" / f"dom{dom.domid}-{dom.name}.log")
        self.procs[dom.domid] = proc
        self.printk(f"d{dom.domid} ({dom.name}): created, process {proc.pid}", dom=dom.domid)
        self.nursery.start_soon(self._watch, dom, proc)
        return dom

    async def _watch(self, dom: Domain, proc: subprocess.Popen[bytes]) -> None:
        rc = await launch.wait_exit(proc)
        self.log.info("domain.process_exit", vt_ns=self.conductor.end_ns, dom=dom.domid, returncode=rc)
        mm.forget(dom.domid)
        self._notify_peers(dom.domid, evtchn.close_all(dom.domid))  # peers' ports go back to unbound
        evtchn.forget(dom.domid)
        timers.forget(dom.domid)
        if dom.state is DomainState.SHUTTING_DOWN:
            dom.move(DomainState.DEAD, f"process exited ({rc})")
            self.printk(f"d{dom.domid} ({dom.name}): dead", dom=dom.domid)
        elif dom.state is not DomainState.CRASHED and dom.state is not DomainState.DEAD:
            self._crash(dom, f"domain process exited unexpectedly with code {rc}")
        self._leave(dom)
        self.awaiting.discard(dom.domid)
        if not self.awaiting:
            self.reports_in.set()
        self._poke()

    async def destroy(self, dom: Domain) -> None:
        if dom.state is DomainState.DEAD:
            return
        if dom.state is DomainState.CRASHED:
            dom.move(DomainState.DEAD, "destroyed")
        elif dom.state is not DomainState.SHUTTING_DOWN:
            dom.ended_vt = self.conductor.end_ns
            dom.move(DomainState.SHUTTING_DOWN, "destroyed by the toolstack")
        self._leave(dom)
        self.printk(f"d{dom.domid} ({dom.name}): destroyed", dom=dom.domid)
        await self._send(self.bus, dom.identity, Stop(reason="destroy"))  # type: ignore[arg-type]
        proc = self.procs.get(dom.domid)
        if proc is not None:
            with trio.move_on_after(STOP_GRACE_S):
                await launch.wait_exit(proc)
            if proc.poll() is None:
                proc.kill()
                await launch.wait_exit(proc)
        if dom.state is DomainState.SHUTTING_DOWN:
            dom.move(DomainState.DEAD, "destroyed")
        self._poke()

    # -- running ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        from hypervisor.control import ControlServer

        self.bind()
        self.printk(
            f"pvcluster hypervisor up: {self.spec.hypervisor.pcpus} pcpus, window "
            f"{self.spec.hypervisor.window_ns} ns, seed {self.spec.cluster.seed}"
        )
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self.bus_reader)
                nursery.start_soon(self.conductor_loop)
                await ControlServer(self).serve()
                nursery.cancel_scope.cancel()
        finally:
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.kill()
            for sock in (self.bus, self.control):
                if sock is not None:
                    sock.close()
            self.ctx.term()
            # A stale file would make the toolstack talk to a dead hypervisor.
            (self.run_dir / "hypervisor.json").unlink(missing_ok=True)
            print("hypervisor: stopped", file=sys.stderr)

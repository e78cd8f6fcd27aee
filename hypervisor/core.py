"""The simulated hypervisor: the one object that owns every piece of simulation state.

``Hypervisor`` holds the domain table (and, hanging off each ``Domain`` as Xen hangs them off ``struct domain``,
its vCPUs and their run state and timers, its event channels, its page-table pins, its random stream and its
trace), the pCPU scheduler, the virtual clock, the costs, and the hypervisor's log. It imports no trio, no ZeroMQ
and no sockets: the transport shell (``hypervisor/shell.py``) feeds it what arrives (a domain's bus message, a
control command, a process exit) and takes what it wants sent from ``outbox`` and which processes it wants ended
from ``to_kill``. Tests drive it the same way, in-process.

Nothing a domain or the toolstack sends may raise out of here except ``ReportError`` (a message that contradicts
what the hypervisor knows, answered with an Error frame); everything else that goes wrong while serving one domain
ends that domain, traced with its cause.
"""

from __future__ import annotations

import random
import time
import traceback
from typing import Any

import attrs

from hypervisor import backends, evtchn, faults, ptops
from hypervisor.clock import Clock
from hypervisor.domain import Domain, DomainState, DomainTable
from hypervisor.errors import ReportError
from hypervisor.evtchn import EvtchnTable, PortState
from hypervisor.extensions import load_extensions
from hypervisor.faults import FOREVER, FaultPlan
from hypervisor.hypercall_page import hypercall_page
from hypervisor.hypercalls import FAMILIES
from hypervisor.link import Link
from hypervisor.pagetypes import Refused
from hypervisor.scheduler import Scheduler
from hypervisor.tracing import DomainTrace
from hypervisor.vcpu import RunState, Vcpu
from hypervisor.vmi_rom import vmi_rom
from pvcluster.abi.xen import KexecType, ShutdownReason
from pvcluster.bus.effects import Effect, SetPending
from pvcluster.bus.messages import (
    Build,
    BuildResult,
    Delivery,
    Error,
    Hello,
    HypercallResult,
    Ipi,
    Leaving,
    Stop,
    Window,
    WindowDone,
)
from pvcluster.faults import Kind, random_schedule
from pvcluster.spec import ClusterSpec, DomainSpec

MAX_DMESG_LINES = 5000
# The reboot-storm guard on restarts (on_*="restart", kexec, kdump): a domain (by name) restarted RESTART_LIMIT times
# within RESTART_SPAN_NS of virtual time is not restarted again, as xl refuses to keep restarting a domain that
# reboots too quickly. Generous enough for any guest that does work between boots; a guest that only reboots stops.
RESTART_LIMIT = 5
RESTART_SPAN_NS = 10_000_000
MAX_PAUSES = 255  # Xen limits the toolstack's pause count to 255 (_domain_pause_by_systemcontroller)
# The seeded wallclock at system time 0 falls in [2000-01-01, 2030-01-01) UTC: wc_sec fits shared_info's 32 bits.
WALLCLOCK_FIRST_S = 946_684_800
WALLCLOCK_SPAN_S = 946_771_200


def boot_wallclock(seed: int) -> tuple[int, int]:
    """The wallclock (seconds, ns since the Unix epoch) at virtual time 0, which every domain's shared_info shows
    (wc_sec / wc_nsec: Xen's wallclock is the host's, one for all domains). A stream of its own, so one seed gives
    one wallclock whatever else the seed decides."""
    rng = random.Random(f"{seed}/wallclock")
    return WALLCLOCK_FIRST_S + rng.randrange(WALLCLOCK_SPAN_S), rng.randrange(1_000_000_000)


@attrs.frozen
class Refusal:
    """Why a process may not join as the domain it claimed: ``kind`` is the Error kind its answer carries."""

    kind: str  # "refused", or "not-declared" (no such domain yet: the process may ask again)
    detail: str


@attrs.define
class RunWall:
    """Wall-clock time from the first window's opening to the last window's closing: the run without its start-up
    (processes launching, domains building), what benchmarks divide by. Nothing simulated reads it."""

    first_ns: int | None = None
    last_ns: int | None = None

    def note(self, *, closed: bool, opened: bool) -> None:
        now = time.monotonic_ns()
        if opened and self.first_ns is None:
            self.first_ns = now
        if closed:
            self.last_ns = now

    def seconds(self, *, window_open: bool) -> float:
        """So far: a window still open (a status read while the last one runs) counts up to now."""
        if self.first_ns is None:
            return 0.0
        end = time.monotonic_ns() if window_open or self.last_ns is None else self.last_ns
        return max(0, end - self.first_ns) / 1e9


class Hypervisor:
    def __init__(self, spec: ClusterSpec, log: Any) -> None:
        self.spec = spec
        self.log = log
        h = spec.hypervisor
        self.cost = h.cost
        self.work_budget = h.work_budget
        self.trace_burst = h.trace_burst
        self.trace_rate = h.trace_rate
        self.domains = DomainTable()
        self.scheduler = Scheduler(h.pcpus, h.slice_ns)
        self.clock = Clock(self, h.window_ns)
        self.dmesg: list[str] = []
        # What the shell must do next: messages to send to domain processes, processes to end.
        self.outbox: list[tuple[Domain, Any]] = []
        self.to_kill: list[Domain] = []
        # Domains the core created as restarts (life-cycle actions, kexec, kdump) whose processes the shell is to
        # launch, as it launches any new domain's; and when each name was restarted (the reboot-storm guard).
        self.to_launch: list[Domain] = []
        # Ended domains whose memory the toolstack dumps before their processes are ended (on_crash = "coredump-*",
        # kdump): the shell writes <run_dir>/dumps/NAME-dDOMID.core, then sends their Stop or ends their process.
        self.coredumps: list[Domain] = []
        self._restarts: dict[str, list[int]] = {}
        self.hypercalls = 0
        self.idle = False
        self.run_wall = RunWall()
        self._page = hypercall_page()
        # The spec's hypercall extensions, loaded for this hypervisor (ExtensionError: the cluster does not start).
        self.extensions = load_extensions(spec.extensions, FAMILIES.keys())
        self.link_rto_ns = h.link_rto_ns
        self.partition_limit_ns = h.partition_limit_ns
        # Faults still to come and those done; process signals (stop, kill) the shell must send.
        self.faults = FaultPlan(self)
        self.signals: list[tuple[Domain, str, int]] = []
        for req in spec.faults:
            self.faults.schedule(req, "spec")
        if spec.random_faults is not None:
            doms = [(d.name, d.vcpus) for d in spec.domains]
            for req in random_schedule(spec.random_faults, spec.cluster.seed, doms, h.pcpus):
                self.faults.schedule(req, "random")

    @property
    def fault_kinds(self) -> dict[str, Kind]:
        """The fault catalog of this hypervisor: the built-in kinds and those its extensions add."""
        return self.extensions.fault_catalog()

    # -- what hypercall handlers may ask about other domains ------------------------------------------------

    def alive(self, domid: int) -> bool:
        dom = self.domains.get(domid)
        return dom is not None and dom.alive

    def evtchn_of(self, domid: int) -> EvtchnTable | None:
        dom = self.domains.get(domid)
        return dom.evtchn if dom is not None and dom.alive else None

    # -- logging -----------------------------------------------------------------------------------------------

    def printk(self, text: str, *, vt_ns: int | None = None, **fields: Any) -> None:
        """A hypervisor log line, as `xl dmesg` shows it, and a trace event."""
        vt = self.clock.now_ns if vt_ns is None else vt_ns
        self.dmesg.append(f"(XEN) [{vt / 1000:12.3f} us] {text}")
        del self.dmesg[:-MAX_DMESG_LINES]
        self.log.info("dmesg", vt_ns=vt, text=text, **fields)

    # -- life cycle ------------------------------------------------------------------------------------------

    def create_domain(self, spec: DomainSpec, image: bytes = b"") -> Domain:
        """A new domain in BUILDING, waiting for a process to join as it (``claim``); ValueError if the name is
        taken. ``image``: the kernel's bytes, sent in the Build (empty: the domain process loads the kernel)."""
        if self.domains.live_named(spec.name) is not None:
            raise ValueError(f"a domain named {spec.name!r} already exists")
        domid = self.domains.next_domid()
        affinity = self.scheduler.affinity(spec.cpus)
        dom = Domain(
            domid=domid,
            name=spec.name,
            spec=spec,
            image=image,
            vcpus=[Vcpu(domid, v, affinity) for v in range(spec.vcpus)],
            trace=DomainTrace(self.log, domid, self.trace_burst, self.trace_rate),
            # One stream per domain, seeded by the cluster seed and the domain's name: a domain's draws do not
            # depend on which other domains exist or what they do.
            rng=random.Random(f"{self.spec.cluster.seed}/{spec.name}"),
            faults=faults.parse(spec.faults),
            link=Link(rto_ns=self.link_rto_ns, reorder_ns=self.cost.link_ns,
                      rng=random.Random(f"{self.spec.cluster.seed}/{spec.name}/link")),
        )
        if "skip-flush" in spec.faults:  # a domain's permanent spec fault: every one of its hypercalls
            dom.bugs["skip-flush"] = FOREVER
        self.domains.add(dom)
        return dom

    def claim(self, identity: bytes, hello: Hello, key_domain: str | None) -> Domain | Refusal:
        """A process joins as the declared domain ``hello.name``: bind its bus identity to the domain and answer its
        Hello. Returns the domain, or why the claim is refused (traced). ``key_domain``: the domain the peer's CURVE
        key belongs to (None on ipc, where only the hypervisor's own user can reach the bus)."""
        name = hello.name[:64]
        dom = self.domains.live_named(name) if name else None
        if key_domain is not None and name != key_domain:
            why = Refusal("refused", f"its key is domain {key_domain!r}'s, not {name!r}'s")
        elif dom is None:
            # not (yet) declared: a process started before its domain's `create` asks again (domains/join.py)
            why = Refusal("not-declared", f"no domain named {name!r} was declared")
        elif dom.identity:
            why = Refusal("refused", f"domain {name!r} has already joined")
        elif dom.state in (DomainState.RUNNING, DomainState.PAUSED):
            why = Refusal("refused", f"domain {name!r} is {dom.state.value}")
        else:  # building; or destroyed before a process joined, which then gets its Stop
            self.domains.bind(dom, identity)
            dom.trace.event("domain.joined", vt_ns=self.clock.now_ns, pid=hello.pid, host=hello.host[:255],
                            placement=dom.spec.placement)
            self.receive(dom, hello)
            return dom
        self.log.warning("domain.join_refused", vt_ns=self.clock.now_ns, name=name, pid=hello.pid,
                         host=hello.host[:255], kind=why.kind, reason=why.detail)
        return why

    def receive(self, dom: Domain, body: Any) -> None:
        """A message from ``dom``'s process. ReportError: not expected now (the shell answers with an Error)."""
        if isinstance(body, Hello) and dom.state in (DomainState.SHUTTING_DOWN, DomainState.CRASHED,
                                                     DomainState.DEAD):
            self.outbox.append((dom, Stop(reason="destroy")))  # destroyed before its process connected
        elif isinstance(body, Hello) and dom.state is DomainState.BUILDING and not dom.hello:
            dom.hello = True
            backends.prepare(dom)  # the toolstack's ports for the xenstore and console rings, before the build
            self.outbox.append((dom, faults.on_build(dom.faults, self._build_message(dom), dom.trace)))
        elif isinstance(body, BuildResult) and dom.state is DomainState.BUILDING and dom.hello:
            self._built(dom, body)
        elif isinstance(body, WindowDone) and not dom.alive:
            # sent before its process learned of the end (a kill races its last report): nothing to act on, and
            # whether it arrives at all is the host's timing, so the event is marked host-dependent
            self.log.info("bus.late_report", vt_ns=self.clock.now_ns, dom=dom.domid, index=body.index, hostdep=True)
        elif isinstance(body, WindowDone):
            self.clock.accept(dom, body)
        elif isinstance(body, Leaving):
            # A local process's exit is seen by its watcher (with the code the host reports); a remote one has no
            # watcher here, so its goodbye is its exit.
            if dom.spec.placement == "remote" and dom.identity:
                self.process_exited(dom, body.code)
        elif isinstance(body, Error):
            dom.trace.warning("bus.peer_error", vt_ns=self.clock.now_ns, kind=body.kind, detail=body.detail,
                              ref_seq=body.ref_seq)
        else:
            raise ReportError(f"{type(body).__name__} is not expected from a domain in state {dom.state.value}")

    def _build_message(self, dom: Domain) -> Build:
        s: DomainSpec = dom.spec
        wc_sec, wc_nsec = boot_wallclock(self.spec.cluster.seed)
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
            ps_per_instr=self.cost.ps_per_instr,
            rom=vmi_rom() if s.backend == "vmi" else b"",
            insn_ps=list(self.cost.insn_ps),
            irq_entry_ns=self.cost.irq_entry_ns,
            mmio_ns=self.cost.mmio_ns,
            tlb_refill_ns=self.cost.tlb_refill_ns,
            image=dom.image,
            store_evtchn=dom.store_port,
            console_evtchn=dom.console_port,
            wc_sec=wc_sec,
            wc_nsec=wc_nsec,
            copyin=self.extensions.copyin(),
        )

    def _built(self, dom: Domain, res: BuildResult) -> None:
        if not res.ok:
            dom.crash_detail = f"build failed: {res.error_code}: {res.error}"
            dom.move(DomainState.CRASHED, dom.crash_detail)
            self.printk(f"d{dom.domid} ({dom.name}): {dom.crash_detail}", dom=dom.domid, error_code=res.error_code)
            return
        if not all(0 <= mfn < dom.nr_pages for mfn in (res.l2_mfn, *res.l2_mfns, *res.l1_mfns)):
            raise ReportError(f"build result names page-table frames outside the domain ({res.l2_mfn})")
        dom.move(DomainState.RUNNING, "built")
        backends.connect(dom, res)  # xenconsoled and xenstored bind their ports once the domain exists
        if dom.spec.backend != "native":
            # a paravirtualized guest's initial tables are validated and the L2 pinned, as Xen's builder leaves them
            try:
                if res.pae:  # the L3 is the root: pinned as MMUEXT_PIN_L3_TABLE
                    ptops.type_initial_pae_tables(dom.frames, res.l2_mfn, [*res.l2_mfns, *res.l1_mfns], res.tables,
                                                  len(dom.vcpus))
                else:
                    ptops.type_initial_tables(dom.frames, res.l2_mfn, list(res.l1_mfns), res.tables,
                                              len(dom.vcpus))
            except Refused as r:
                raise ReportError(f"build result's page tables are refused: {r.reason} {r.fields}") from None
        now = self.clock.now_ns
        dom.joined, dom.started_vt = True, now
        dom.last_window = now // self.clock.window_ns
        boot = dom.vcpus[0]
        boot.initialised = boot.up = True
        self.scheduler.wake(dom, boot, now, "boot")
        boot.ready_ns = now
        self.printk(
            f"d{dom.domid} ({dom.name}): built {res.guest_os}, entry {res.entry:#x}, start_info "
            f"{res.start_info:#x}, {len(dom.vcpus)} vcpus, backend {dom.spec.backend}, boot {dom.spec.boot}; "
            f"xenstore port {dom.store_port} page {dom.store_mfn:#x}, console port {dom.console_port} page "
            f"{dom.console_mfn:#x}",
            dom=dom.domid,
            entry=res.entry,
            guest_os=res.guest_os,
            backend=dom.spec.backend,
            boot=dom.spec.boot,
            store_port=dom.store_port,
            store_mfn=dom.store_mfn,
            console_port=dom.console_port,
            console_mfn=dom.console_mfn,
        )

    def deliver(self, dom: Domain, effect: Effect, vt_ns: int) -> None:
        """Queue an effect decided outside ``dom``'s own hypercalls, sent at ``vt_ns``: it crosses ``dom``'s link
        (``hypervisor/link.py``), and an event-channel notification is named and may meet a hypervisor bug."""
        if not dom.alive or dom.state is DomainState.BUILDING:
            return
        for e in self.notifications(dom, [effect], vt_ns):
            arrival = dom.link.send(vt_ns, e.KIND, dom.trace)
            for _ in range(arrival.copies):
                dom.deliveries.append(Delivery(vt_ns=arrival.vt_ns, effect=e, seq=arrival.seq))

    def notifications(self, dom: Domain, effects: list[Effect], vt_ns: int) -> list[Effect]:
        """Point.EVENT: every event-channel notification for ``dom`` gets the domain's next event id and an
        ``event.sent`` trace event (the checker matches it with the domain's ``event.delivered``); a lose-event or
        dup-event bug armed on the domain drops it or doubles it."""
        out: list[Effect] = []
        for e in effects:
            if not isinstance(e, SetPending):
                out.append(e)
                continue
            dom.events_sent += 1
            e = SetPending(vcpu=e.vcpu, port=e.port, eid=dom.events_sent)
            dom.trace.event("event.sent", vt_ns=vt_ns, eid=e.eid, port=e.port, vcpu=e.vcpu)
            out.extend([e] * faults.event_copies(dom, e.eid, vt_ns))
        return out

    def send_result(self, dom: Domain, result: HypercallResult) -> HypercallResult:
        """A hypercall result crosses ``dom``'s link; returns it as it arrives. One the link held back waits in
        ``held_results`` until the window its arrival falls in."""
        arrival = dom.link.send(result.vt_ns, "result", dom.trace)
        moved = HypercallResult(vcpu=result.vcpu, seq=result.seq, vt_ns=arrival.vt_ns, value=result.value,
                                writes=result.writes, effects=result.effects, complete=result.complete,
                                link_seq=arrival.seq)
        for _ in range(arrival.copies):
            (dom.results if arrival.vt_ns == result.vt_ns else dom.held_results).append(moved)
        return moved

    def send_ipi(self, dom: Domain, ipi: Ipi) -> None:
        """An IPI crosses the link twice (sender to hypervisor, hypervisor to target): modelled as one send."""
        arrival = dom.link.send(ipi.vt_ns, "ipi", dom.trace)
        for _ in range(arrival.copies):
            dom.ipis.append(Ipi(ipi.src, ipi.dest, ipi.vector, arrival.vt_ns, arrival.seq))

    def shutdown(self, dom: Domain, reason: ShutdownReason, vt_ns: int) -> None:
        """SCHEDOP_shutdown: the guest is done."""
        dom.shutdown_reason = reason
        dom.ended_vt = vt_ns
        if reason is ShutdownReason.crash:
            dom.crash_detail = "guest requested SCHEDOP_shutdown(crash)"
            dom.move(DomainState.CRASHED, "guest shutdown: crash")
        else:
            dom.move(DomainState.SHUTTING_DOWN, f"guest shutdown: {reason.name}")
        label = dom.end_reason or reason.name  # "kexec" for a kexec (held as soft_reset)
        self._leave(dom, f"shutdown {label}")
        self.printk(f"d{dom.domid} ({dom.name}): shutdown, reason {label}", vt_ns=vt_ns, dom=dom.domid,
                    reason=label)
        dom.trace.event("domain.shutdown", vt_ns=vt_ns, reason=label)
        self.outbox.append((dom, Stop(reason=label)))
        self._after_end(dom, reason, vt_ns)

    def crash(self, dom: Domain, detail: str, *, vt_ns: int | None = None, exc: BaseException | None = None,
              signal: str = "term") -> None:
        """End ``dom`` (it stays listed as crashed until destroyed); its process is terminated (``signal="kill"``:
        killed at once, as the ``kill`` fault does)."""
        if not dom.alive:
            return
        vt = self.clock.now_ns if vt_ns is None else vt_ns
        dom.crash_detail = detail
        dom.ended_vt = vt
        dom.move(DomainState.CRASHED, detail)
        self._leave(dom, "crashed")
        self.printk(f"d{dom.domid} ({dom.name}) crashed: {detail}", vt_ns=vt, dom=dom.domid)
        fields: dict[str, Any] = {"detail": detail}
        if exc is not None:
            fields["traceback"] = "".join(traceback.format_exception(exc))[-4000:]
        dom.trace.event("domain.crash", vt_ns=vt, **fields)
        if signal == "kill":
            self.signals.append((dom, "kill", 0))
        else:
            self.to_kill.append(dom)
        self._after_end(dom, ShutdownReason.crash, vt)

    # -- what the toolstack does with a domain that ended (xl's on_poweroff / on_reboot / on_crash) -------------

    def _after_end(self, dom: Domain, reason: ShutdownReason, vt: int) -> None:
        """The toolstack's action on ``dom``, which has just ended with ``reason``: a kexec builds the loaded image,
        a crash with a crash image loaded dumps the memory (``coredumps``) and builds that (kdump), otherwise
        the spec's life-cycle action for the reason (pvcluster/spec.py: LIFECYCLE_ACTIONS)."""
        if reason is ShutdownReason.soft_reset and dom.kexec_started is not None:
            image = dom.kexec_images.get(dom.kexec_started)
            if image is not None:
                self._rebuild(dom, image.data, "kexec", vt)
            return
        if reason is ShutdownReason.crash:
            crash_image = dom.kexec_images.get(KexecType.CRASH)
            if crash_image is not None:
                self.coredumps.append(dom)
                self._rebuild(dom, crash_image.data, "kdump", vt)
                return
            key = "on_crash"
        elif reason is ShutdownReason.poweroff:
            key = "on_poweroff"
        elif reason is ShutdownReason.reboot:
            key = "on_reboot"
        else:
            return  # suspend, watchdog: no life-cycle key here; the domain stays as it ended
        action = str(getattr(dom.spec, key, "preserve"))
        if action.startswith("coredump-"):
            self.coredumps.append(dom)
            action = action.removeprefix("coredump-")
        if action == "restart":
            self._rebuild(dom, dom.image, f"{key}=restart", vt)
        elif action == "destroy" and dom.state is DomainState.CRASHED:
            # a domain that shut down is dead once its process exits (destroy is what always happened to it); a
            # crashed one would stay listed as crashed: destroy it, as `pvcluster destroy` would
            self.destroy(dom)

    def _rebuild(self, old: Domain, image: bytes, why: str, vt: int) -> None:
        """The toolstack builds a new domain with ``old``'s DomainSpec (same name, a new domid, as xl does) from
        ``image`` (empty: the spec's kernel), unless the name has restarted too often (RESTART_LIMIT)."""
        recent = [t for t in self._restarts.get(old.name, []) if vt - t < RESTART_SPAN_NS]
        if len(recent) >= RESTART_LIMIT:
            old.trace.warning("domain.restart_refused", vt_ns=vt, why=why, restarts=len(recent),
                              span_ns=RESTART_SPAN_NS)
            self.printk(f"d{old.domid} ({old.name}): restarted {len(recent)} times within {RESTART_SPAN_NS} ns: "
                        f"not restarted again ({why})", vt_ns=vt, dom=old.domid)
            return
        self._restarts[old.name] = [*recent, vt]
        if old.state in (DomainState.SHUTTING_DOWN, DomainState.CRASHED):
            # xl destroys the old domain before it builds the new one: its name is free now, in virtual time (its
            # process, already told to stop, exits when it does)
            old.move(DomainState.DEAD, f"replaced ({why})")
        new = self.create_domain(old.spec, image)
        old.trace.event("domain.restarted", vt_ns=vt, old_domid=old.domid, new_domid=new.domid, why=why,
                        image_bytes=len(image))
        self.printk(f"d{old.domid} ({old.name}): restarted as d{new.domid} ({why})", vt_ns=vt, dom=old.domid,
                    new_domid=new.domid)
        self.to_launch.append(new)

    def destroy(self, dom: Domain) -> None:
        """The toolstack's destroy: the domain stops now; the shell then waits for its process to exit."""
        if dom.state is DomainState.DEAD:
            return
        if dom.state is DomainState.CRASHED:
            dom.move(DomainState.DEAD, "destroyed")
        elif dom.state is not DomainState.SHUTTING_DOWN:
            dom.ended_vt = self.clock.now_ns
            dom.move(DomainState.SHUTTING_DOWN, "destroyed by the toolstack")
        self._leave(dom, "destroyed")
        self.printk(f"d{dom.domid} ({dom.name}): destroyed", dom=dom.domid)
        dom.trace.event("domain.destroy", vt_ns=self.clock.now_ns)
        self.outbox.append((dom, Stop(reason="destroy")))

    def process_exited(self, dom: Domain, returncode: int) -> None:
        """``dom``'s process is gone: whatever the domain still held is reclaimed."""
        vt = dom.ended_vt if dom.ended_vt is not None else self.clock.now_ns
        dom.trace.event("domain.process_exit", vt_ns=vt, returncode=returncode)
        if dom.state is DomainState.SHUTTING_DOWN:
            dom.move(DomainState.DEAD, f"process exited ({returncode})")
            self.printk(f"d{dom.domid} ({dom.name}): dead", vt_ns=vt, dom=dom.domid)
        elif dom.alive:
            self.crash(dom, f"domain process exited unexpectedly with code {returncode}")
        self._leave(dom, "process exited")
        dom.frames.clear()
        # its bus identity dies with it: a frame sent under it now is an unknown peer's
        self.domains.forget_identity(dom)

    def pause(self, dom: Domain, vt_ns: int | None = None) -> int:
        """The toolstack's pause (XEN_DOMCTL_pausedomain): pauses nest, so a paused domain's count goes up (at most
        MAX_PAUSES, as Xen's -EOVERFLOW). Returns the new count."""
        if dom.state not in (DomainState.RUNNING, DomainState.PAUSED):
            raise ValueError(f"domain {dom.domid} is {dom.state.value}, not running")
        if dom.pause_count >= MAX_PAUSES:
            raise ValueError(f"domain {dom.domid} is already paused {dom.pause_count} times, the limit")
        dom.pause_count += 1
        vt = self.clock.now_ns if vt_ns is None else vt_ns
        if dom.pause_count > 1:
            self.printk(f"d{dom.domid} ({dom.name}): pause count {dom.pause_count}", vt_ns=vt, dom=dom.domid)
            return dom.pause_count
        dom.move(DomainState.PAUSED, "paused by the toolstack")
        # A paused domain's vCPUs give up their pCPUs; the ones that could run are woken again on unpause.
        for v in dom.vcpus:  # a running one stops where its own clock is (Scheduler.move)
            if v.runstate in (RunState.RUNNING, RunState.RUNNABLE):
                self.scheduler.move(dom, v, RunState.RUNNABLE, vt, "paused")
        self.printk(f"d{dom.domid} ({dom.name}): paused", vt_ns=vt, dom=dom.domid)
        return 1

    def unpause(self, dom: Domain, vt_ns: int | None = None) -> int:
        """Undo one pause (XEN_DOMCTL_unpausedomain; one too many is Xen's -EINVAL); the domain runs again when the
        count reaches 0. Returns the new count."""
        if dom.state is not DomainState.PAUSED or dom.pause_count <= 0:
            raise ValueError(f"domain {dom.domid} is {dom.state.value}, not paused")
        dom.pause_count -= 1
        if dom.pause_count:
            self.printk(f"d{dom.domid} ({dom.name}): pause count {dom.pause_count}", dom=dom.domid)
            return dom.pause_count
        dom.move(DomainState.RUNNING, "unpaused by the toolstack")
        now = max(self.clock.now_ns if vt_ns is None else vt_ns, dom.last_window * self.clock.window_ns)
        # Virtual time went on while it was paused; it cannot take part in windows already closed.
        dom.last_window = max(dom.last_window, now // self.clock.window_ns)
        for v in dom.vcpus:
            if v.ready_ns is not None:
                v.ready_ns = max(v.ready_ns, now)
        self.printk(f"d{dom.domid} ({dom.name}): unpaused", vt_ns=now, dom=dom.domid)
        return 0

    def _leave(self, dom: Domain, why: str) -> None:
        """``dom`` stops taking part in windows: its vCPUs give up their pCPUs, what was queued for it is dropped,
        its timers stop and its event channels close now, in virtual time, not when its process happens to exit:
        its peers see them go."""
        now = self.clock.now_ns
        self.scheduler.offline(dom, now, why)
        for v in dom.vcpus:
            v.timers.clear()
            v.ready_ns = None
        dom.results.clear()
        dom.held_results.clear()
        dom.deliveries.clear()
        dom.ipis.clear()
        for peer_dom, peer_port in evtchn.close_all(dom.domid, dom.evtchn, self.evtchn_of):
            self._notify_peer_closed(dom.domid, peer_dom, peer_port, now + self.cost.link_ns)
        dom.trace.flush(now)

    def _notify_peer_closed(self, domid: int, peer_domid: int, peer_port: int, vt: int) -> None:
        peer = self.domains.get(peer_domid)
        p = peer.evtchn.lookup(peer_port) if peer is not None else None
        if peer is None or p is None or p.state is not PortState.UNBOUND:
            return
        peer.trace.event("evtchn.peer_closed", vt_ns=vt, port=peer_port, remote_dom=domid)
        self.deliver(peer, SetPending(vcpu=p.notify_vcpu, port=peer_port), vt)

    # -- the clock -------------------------------------------------------------------------------------------

    def step(self) -> dict[int, Window]:
        """Close the open window and open the next (``Clock.step``); notes when the cluster goes idle."""
        closing = self.clock.open is not None
        windows = self.clock.step()
        self.run_wall.note(closed=closing, opened=bool(windows))
        running = [d.domid for d in self.domains if d.running]
        building = any(d.state is DomainState.BUILDING for d in self.domains)
        if not windows and running and not building and not self.idle:
            self.idle = True
            self.printk("no runnable vCPU and no pending event: the cluster is idle", domains=running)
        elif windows:
            self.idle = False
        return windows

    def status(self) -> dict[str, Any]:
        return {
            "vt_ns": self.clock.now_ns,
            "window": self.clock.index,
            "wall_run_s": self.run_wall.seconds(window_open=self.clock.open is not None),
            "idle": self.idle,
            "hypercalls": self.hypercalls,
            "domains": [d.summary() for d in self.domains],
        }

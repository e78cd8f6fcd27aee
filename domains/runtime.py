"""The guest-domain process: builds the guest on the hypervisor's word, then runs its vCPUs window by window.

In virtual-time mode the vCPUs of a domain run one after another in id order, each up to the window's end, so
their interleaving over the shared RAM depends only on virtual time, never on host thread timing.

The process answers one message at a time and never has two things to wait for, so it runs no event loop: a plain
ZeroMQ DEALER polls (PARENT_CHECK_S at most, then it checks that the hypervisor still exists), receives, handles
and replies, the least a round trip can cost. Its only other inputs are
signals, handled by the ``signal`` module between two bytecodes, even inside a blocking receive (pyzmq runs
handlers when the wait is interrupted): the hypervisor's death (``on_hypervisor_gone``), termination and Ctrl-C
(domains/__main__.py). Each flushes the trace and ends the process at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import zmq

from domains import capture, effects, timeinfo
from domains.builder import RING1_BACKENDS, BootState, build_domain
from domains.debug import Debugger
from domains.elf_load import ImageError
from domains.join import Connection
from domains.link import LinkReceiver
from domains.memory import GuestRam
from domains.paging import read_virt, walk, write_virt
from domains.tablecopy import table_regions
from domains.vcpu import InsnCounter, Vcpu, VcpuState, flat_gdt
from pvcluster.abi import extcopy
from pvcluster.abi.copyin import Descriptor, Span, copy_in, notified_port
from pvcluster.abi.layouts import XENCONS_INTERFACE
from pvcluster.abi.platform import MARK_CODE_MASK, MARK_DETAIL_SHIFT, VMI_ROM_BASE, Mark
from pvcluster.abi.xen import PAGE_SHIFT, PAGE_SIZE
from pvcluster.bus import codec
from pvcluster.bus.effects import FLUSHES, FlushTlb, Invlpg, SetPending, Unmask, VcpuUp, kind
from pvcluster.bus.messages import (
    Build,
    BuildResult,
    Delivery,
    Error,
    HypercallReq,
    HypercallResult,
    Ipi,
    Leaving,
    Region,
    Retire,
    Stop,
    VcpuFault,
    VcpuReport,
    Window,
    WindowDone,
)
from pvcluster.designs import mode_of
from pvcluster.trace import no_flush as trace_no_flush

# How often a domain process waiting for the hypervisor checks that it still exists (wall clock; nothing simulated
# depends on it).
PARENT_CHECK_S = 30.0
REMOTE_CHECK_S = 5.0
# How long closing the socket may wait for queued frames to reach a live hypervisor.
LINGER_MS = 2000
EXIT_HYPERVISOR_GONE = 5
# Deliveries that wake a sleeping vCPU at their arrival (a delayed flush, a speed or clock change do not; a poll
# timeout does, but only by ending the poll).
_WAKING = (SetPending, Unmask, VcpuUp)
# What of the console page its backend reads: out[] and the four indices after it.
_RING_OUT = XENCONS_INTERFACE.offset("out")
_RING_LEN = XENCONS_INTERFACE.size - _RING_OUT


class DomainProcess:
    def __init__(self, conn: Connection, domid: int, name: str, log: Any,
                 flush_trace: Callable[[], None] = trace_no_flush, exit_now: Callable[[int], None] = os._exit,
                 spawned: bool = True) -> None:
        self.conn = conn  # joined: the hypervisor has sent this domain's Build (domains/join.py)
        self.spawned = spawned  # started by the hypervisor, which is then its parent
        self.domid = domid
        self.name = name
        self.log = log.bind(dom=domid)  # every event of this process is about this domain
        self.flush_trace = flush_trace  # writes out the buffered trace (pvcluster.trace.TraceFile.flush)
        self.exit_now = exit_now  # flushes the trace and ends the process (TraceFile.flush_and_exit)
        self.ram: GuestRam | None = None
        self.boot: BootState | None = None
        self.vcpus: list[Vcpu] = []
        self.vt_ns = 0
        self._seq = 0
        self._reported_trap: dict[int, int] = {}  # vCPU -> sequence number of the last trap reported
        self._reported_faults: set[int] = set()
        # The latest arrival time of a delivery applied so far: guest memory already shows it, so no vCPU may run
        # at an earlier time again (one that trapped before it resumes, in a later sub-step, no earlier than this).
        self._seen_ns = 0
        self.exit_code = 0
        self._ipis: list[Ipi] = []
        # deliveries of a window cut short by a trap (see _window), applied in the sub-step that goes on from there
        self._held: list[Delivery] = []
        self._stop_window = False  # set by _route_ipi: end this window where the sender stopped
        # the halted targets an IPI has already ended this (grid) window for, and which window that is (_may_wake)
        self._wakes_asked: set[int] = set()
        self._wakes_window = -1
        # the window being run: which vCPUs hold a pCPU, where it ends, what an IPI takes (see _route_ipi)
        self._local: tuple[frozenset[int], int, int] = (frozenset(), 0, 0)
        self._span_start: dict[int, int] = {}
        self._shootdown_mode = ""
        self.parent = os.getppid()  # the hypervisor, when it launched this process
        self.skew = (0, 0)  # the skew fault: (offset ns, ppm) added to the system time vcpu_time_info shows
        self.link = LinkReceiver()
        # the console ring (its port and the machine address of the part its backend reads), from the build
        self._console: tuple[int, int] = (0, 0)
        # The spec's hypercall extensions' copy-in, from the Build message (pvcluster/abi/extcopy.py)
        self._ext_copyin: dict[int, Descriptor] = {}
        # What the hypervisor may ask between two windows, while it holds the cluster at a boundary (dump, save,
        # the debugger: hypervisor/boundary.py): request type -> handler returning the answer. Asked only of a
        # built domain.
        self.answers: dict[type, Callable[[Any], Any]] = {}
        self.debugger = Debugger(self)  # dumps and the gdb stub: registers, memory, breakpoints, steps
        capture.register(self)  # save and migrate: its state and memory

    @property
    def memory(self) -> GuestRam:
        """Guest RAM; only asked for once the domain is built."""
        if self.ram is None:
            raise RuntimeError("the domain is not built yet")
        return self.ram

    def trace(self, event: str, /, **fields: Any) -> None:
        fields.setdefault("vt_ns", self.vt_ns)
        self.log.info(event, **fields)


    def send(self, body: Any) -> None:
        """Send one message to the hypervisor (outside the serving loop: a restored process's Restored)."""
        self._send(self.conn.sock, body)

    def _send(self, sock: zmq.Socket, body: Any) -> None:
        """Send one message. The trace is flushed first: whatever the hypervisor learns from this process, its
        trace already shows (a process killed outright leaves a trace that ends at its last report)."""
        self.flush_trace()
        self._seq += 1
        sock.send(codec.encode(body, seq=self._seq, vt_ns=self.vt_ns))

    def run(self, build_frame: bytes | None) -> int:
        """Serve the hypervisor, starting with the Build that answered this process's Hello (None: a restored
        process, already past its build); the exit code."""
        sock = self.conn.sock
        poller = zmq.Poller()  # one poll set for the process's life, not one per message
        poller.register(sock, zmq.POLLIN)
        code = EXIT_HYPERVISOR_GONE
        try:
            code = self._serve(sock, poller, build_frame)
        finally:
            self.conn.close(0 if code == EXIT_HYPERVISOR_GONE else LINGER_MS)
            self.flush_trace()
        return code

    def on_hypervisor_gone(self, signum: int, _frame: object) -> None:
        """HYPERVISOR_GONE_SIGNAL's handler: the launcher has the kernel send it when the hypervisor process dies.
        Say so in the trace and on stderr, and end the process with EXIT_HYPERVISOR_GONE (nobody is left to hear
        from it)."""
        self._say_hypervisor_gone()
        self.exit_now(EXIT_HYPERVISOR_GONE)

    def _say_hypervisor_gone(self) -> None:
        who = f"pid {self.parent}" if self.spawned else self.conn.endpoint
        self.trace("domain.hypervisor_gone", hypervisor_pid=self.parent if self.spawned else 0)
        print(f"domain {self.domid} ({self.name}): the hypervisor ({who}) is gone; trace flushed, exiting",
              file=sys.stderr, flush=True)

    def _hypervisor_gone(self) -> bool:
        """The fallback check after a silence: a launcher's child sees its parent change (the death signal is the
        quick way to learn it); a process started by anything else sees its connection stay down."""
        return os.getppid() != self.parent if self.spawned else self.conn.gone()

    def _receive(self, sock: zmq.Socket, poller: zmq.Poller) -> bytes | None:
        """The next frame, or None after a silence (PARENT_CHECK_S; a few seconds for a remote process, whose
        connection's state is cheap to look at)."""
        if not poller.poll(int((PARENT_CHECK_S if self.spawned else REMOTE_CHECK_S) * 1000)):
            return None
        return sock.recv_multipart(zmq.NOBLOCK)[-1]  # type: ignore[no-any-return]

    def _serve(self, sock: zmq.Socket, poller: zmq.Poller, first: bytes | None = None) -> int:
        """Answer the hypervisor, from the Build that answered the Hello, until it says stop; the exit code."""
        pending: bytes | None = first
        while True:
            frame, pending = (pending, None) if pending is not None else (self._receive(sock, poller), None)
            if frame is None:
                # Silence alone judges nobody: the hypervisor may be waiting, lock-stepped, for a domain that is
                # stopped or slow. Only a hypervisor that is gone ends this process.
                if self._hypervisor_gone():
                    self._say_hypervisor_gone()
                    return EXIT_HYPERVISOR_GONE
                continue
            try:
                env = codec.decode(frame)
            except codec.FrameError as exc:
                self.trace(f"bus.{exc.kind}", detail=exc.detail)
                self._send(sock, Error(exc.kind, exc.detail, exc.seq if exc.seq is not None else -1))
                continue
            body = env.body
            if isinstance(body, Build):
                # from then on only this domain's own windows move its clock: its trace must not depend on
                # what the hypervisor did for other domains meanwhile
                self.vt_ns = max(self.vt_ns, env.vt_ns)
            if isinstance(body, Build) and self.ram is None:
                self._send(sock, self._build(body))
                if self.ram is None:
                    return 3
            elif isinstance(body, Window) and self.ram is not None:
                self._send(sock, self._window(body))
            elif type(body) in self.answers and self.ram is not None:
                self._send(sock, self._answer(body, env.seq))
            elif isinstance(body, Retire):
                # the domain goes on in another process (migrate): nothing to trace, nobody to say goodbye to
                return 0
            elif isinstance(body, Stop):
                self.trace("domain.stop", reason=body.reason)
                self._send(sock, Leaving(code=self.exit_code))  # a remote hypervisor learns the exit code only so
                return self.exit_code
            elif isinstance(body, Error):
                self.trace("bus.peer_error", kind=body.kind, detail=body.detail, ref_seq=body.ref_seq)
            else:
                detail = f"{type(body).__name__} is not expected now"
                self.trace("bus.unexpected", detail=detail)
                self._send(sock, Error("unexpected", detail, env.seq))

    def _answer(self, body: Any, seq: int) -> Any:
        """A request between two windows: its handler's answer, or an Error saying why there is none (a bad request
        is the hypervisor's problem, never a reason to end the domain)."""
        try:
            return self.answers[type(body)](body)
        except Exception as exc:
            self.trace("bus.request_failed", request=type(body).__name__, error=repr(exc)[:400])
            return Error("request-failed", f"{type(body).__name__}: {exc!r}"[:400], seq)

    # -- build ---------------------------------------------------------------------------------------------

    def _build(self, req: Build) -> BuildResult:
        try:
            ram, boot = build_domain(req)
        except ImageError as exc:
            self.trace("domain.build_failed", code=exc.code, error=exc.message, kernel=req.kernel)
            return BuildResult(
                ok=False, error_code=exc.code, error=exc.message, entry=0, start_info=0, guest_os=""
            )
        self.ram, self.boot = ram, boot
        if req.console_evtchn and boot.console_mfn:
            self._console = (req.console_evtchn, (boot.console_mfn << PAGE_SHIFT) + _RING_OUT)
        self._ext_copyin = extcopy.descriptors(req.copyin)
        self._shootdown_mode = mode_of({"backend": req.backend, "cmdline": req.cmdline})
        ram.write_pa(ram.gdt_paddr, flat_gdt())
        # Every vCPU starts with paging on over the builder's tables; a secondary's VCPUOP_initialise context
        # may name other ones (the hypervisor then sends set_cr3).
        self.vcpus = self.make_vcpus(req, ram, boot.cr3)
        boot_vcpu = self.vcpus[0]
        boot_vcpu.set_regs(boot.regs)
        if boot_vcpu.pv is not None:
            boot_vcpu.enter_kernel()
        boot_vcpu.initialised = True
        boot_vcpu.state = VcpuState.RUNNING
        boot_vcpu.advance_to(self.vt_ns)
        self.trace(
            "domain.built",
            entry=boot.entry,
            start_info=boot.start_info,
            guest_os=boot.image.guest_os,
            metadata=boot.image.metadata_source,
            backend=req.backend,
            boot=req.boot,
            vcpus=req.vcpus,
            pt_base=boot.pt_base,
            l2_mfn=boot.l2_mfn,
            l1_mfns=list(boot.l1_mfns),
        )
        return BuildResult(
            ok=True,
            error_code="",
            error="",
            entry=boot.entry,
            start_info=boot.start_info,
            guest_os=boot.image.guest_os,
            l2_mfn=boot.l2_mfn,
            l1_mfns=list(boot.l1_mfns),
            store_mfn=boot.store_mfn,
            console_mfn=boot.console_mfn,
            tables=b"".join(ram.read_pa(mfn << PAGE_SHIFT, PAGE_SIZE)
                            for mfn in (boot.l2_mfn, *boot.l2_mfns, *boot.l1_mfns)),
            pae=boot.pae,
            l2_mfns=list(boot.l2_mfns),
        )

    def make_vcpus(self, req: Build, ram: GuestRam, cr3: int) -> list[Vcpu]:
        """The domain's vCPUs over ``ram``, wired to this process, as ``req`` configures them (a build, or a
        restore that then loads their saved state: domains/capture.py)."""
        counter = InsnCounter(tuple(req.insn_ps) if req.insn_ps else None, req.tlb_refill_ns * 1000)
        vcpus = [Vcpu(v, ram, counter, req.ps_per_instr, cr3, ring1=req.backend in RING1_BACKENDS)
                 for v in range(req.vcpus)]
        for vcpu in vcpus:
            vcpu.irq_entry_ps, vcpu.mmio_ps = req.irq_entry_ns * 1000, req.mmio_ns * 1000
            vcpu.refill_ps = req.tlb_refill_ns * 1000
            vcpu.ipi_sink = self._route_ipi
            vcpu.mark_sink = self._mark
            vcpu.irq_sink = self._irq_entered
            if req.rom:
                vcpu.map_rom(VMI_ROM_BASE, req.rom)
        return vcpus

    # -- windows ---------------------------------------------------------------------------------------------

    def _apply(self, res: HypercallResult) -> None:
        ram = self.ram
        assert ram is not None
        if not self.link.first(res.link_seq, "result", self.trace, res.vt_ns):
            return
        if not 0 <= res.vcpu < len(self.vcpus):
            self.trace("domain.bad_result", vcpu=res.vcpu, seq=res.seq, detail="no such vCPU")
            return
        vcpu = self.vcpus[res.vcpu]
        if res.complete and (vcpu.trap is None or vcpu.trap.seq != res.seq):
            self.trace("domain.bad_result", vcpu=res.vcpu, seq=res.seq, detail="no such pending hypercall")
            return
        # copy_to_guest: through the page tables of the vCPU that made the call
        for w in res.writes:
            if not write_virt(ram, vcpu.cr3, w.addr, w.data):
                self.trace("domain.bad_write", vcpu=res.vcpu, addr=w.addr, length=len(w.data))
        span = f"hc-d{self.domid}v{res.vcpu}-{res.seq}"
        applied = sum(effects.apply(self, effect, res.vt_ns, res.vcpu) for effect in res.effects)
        for target in sorted({e.vcpu for e in res.effects if isinstance(e, FlushTlb | Invlpg) and e.vcpu != res.vcpu}):
            self.trace("tlb.flush", vt_ns=res.vt_ns, vcpu=target, by=res.vcpu, span=span)
        # the other half of the hypervisor's `hypercall` event: the checker pairs them by span
        self.trace("hypercall.done", vt_ns=res.vt_ns, vcpu=res.vcpu, span=span, value=res.value,
                   complete=res.complete, effects=applied)
        if res.complete:
            vcpu.complete_trap(res.value, res.vt_ns)

    def _route_ipi(self, src: int, dest: int, vector: int, vt_ns: int) -> None:
        """The APIC bus leads to the hypervisor, which delivers each IPI when its target next holds a pCPU. A target
        that holds one in this window, and that the IPI reaches before the window ends, this process interrupts
        itself at the IPI's arrival (the vCPUs take turns in steps no longer than an IPI takes, so the target has not
        run past it by more than one translated block); the report still tells the hypervisor."""
        running, end_ns, ipi_ns = self._local
        targets = [v.vid for v in self.vcpus if v.vid != src] if dest == -1 else [dest]
        for target in targets:
            local = target in running and vt_ns + ipi_ns < end_ns
            if local:
                self.vcpus[target].post_irq(vt_ns + ipi_ns, src, vector)
            elif vt_ns + ipi_ns < end_ns and self._may_wake(target, end_ns):
                # The hypervisor wakes the halted target at the IPI's arrival, inside this window (a sub-step, when
                # a pCPU is free): the sender stops here, so it does not run on past what the woken one does.
                self._stop_window = True
                self.vcpus[src].request_stop()
            self._ipis.append(Ipi(src=src, dest=target, vector=vector, vt_ns=vt_ns, local=local))
            self.trace("apic.ipi", vt_ns=vt_ns, vcpu=src, target=target, vector=vector)

    def _may_wake(self, target: int, end_ns: int) -> bool:
        """Whether an IPI to ``target`` ends the window early: only a halted target can be given a free pCPU inside
        the window (a runnable one would already hold it), and each target once per window, so a guest's flood of
        IPIs cannot cut a window into a sub-step per IPI."""
        if self._wakes_window != end_ns:
            self._wakes_window, self._wakes_asked = end_ns, set()
        if not 0 <= target < len(self.vcpus) or self.vcpus[target].state is not VcpuState.BLOCKED:
            return False
        if target in self._wakes_asked:
            return False
        self._wakes_asked.add(target)
        return True

    def _irq_entered(self, vcpu: int, vector: int | None, vt_ns: int) -> None:
        """The trace analysis times IPI and event delivery by this (``vector`` None: an event upcall)."""
        self.trace("irq.enter", vt_ns=vt_ns, vcpu=vcpu, vector=vector)

    def _mark(self, vcpu: int, value: int, vt_ns: int) -> None:
        code, rnd = value & MARK_CODE_MASK, value >> MARK_DETAIL_SHIFT
        span = f"sd-d{self.domid}-r{rnd}"
        self.trace("guest.mark", vt_ns=vt_ns, vcpu=vcpu, code=code, round=rnd, span=span)
        if code == Mark.SHOOTDOWN_REQUEST:
            self._span_start[rnd] = vt_ns
        elif code == Mark.SHOOTDOWN_DONE and rnd in self._span_start:
            start = self._span_start.pop(rnd)
            self.trace("shootdown.span", vt_ns=start, vcpu=vcpu, span=span, round=rnd, end_vt_ns=vt_ns,
                        latency_ns=vt_ns - start, mode=self._shootdown_mode)

    def _publish_time(self, vcpu: Vcpu) -> None:
        """The vCPU's vcpu_time_info, as Xen updates it when it schedules the vCPU (``domains/timeinfo.py``)."""
        assert self.ram is not None
        timeinfo.publish(self.ram, vcpu.vid, vcpu.clock_ps, self.skew)

    @staticmethod
    def _report(v: Vcpu) -> VcpuReport:
        # A halted vCPU with an interrupt coming is runnable from that moment: the clock must not call the
        # domain idle, nor start the next window past it.
        if v.state is VcpuState.BLOCKED and v.trap is None and v.pending_irqs and v.reg("eflags") & 0x200:
            return VcpuReport(v.vid, "running", max(v.clock_ns, v.pending_irqs[0][0] // 1000), v.instructions)
        return VcpuReport(v.vid, v.state.value, v.clock_ns, v.instructions)

    def _copy_in(self, vcpu: Vcpu, nr: int, args: list[int]) -> list[Region]:
        """The guest buffers hypercall ``nr`` names, read through ``vcpu``'s page tables. A span that is not
        mapped (or, for one the hypervisor may write, not mapped writable) goes with data None: -EFAULT. Each
        goes with how it was translated, so the hypervisor knows which of them a page-table write made by an
        earlier multicall entry leaves stale (``hypervisor/guestmem.py``)."""
        assert self.ram is not None
        ram, cr3 = self.ram, vcpu.cr3

        def read(va: int, n: int, write: bool = False) -> bytes | None:
            return read_virt(ram, cr3, va, n, write)

        def region(s: Span) -> Region:
            data = read(s.addr, s.length, s.writable)
            entries, frames = walk(ram, cr3, s.addr, s.length)
            return Region(s.addr, s.length, data, s.writable, entries, frames if data is not None and s.length else [])

        spans = copy_in(nr, args, read, self._ext_copyin)
        return [region(s) for s in spans if not s.machine] + table_regions(ram, spans)

    def _rings(self, vcpu: Vcpu, nr: int, args: list[int]) -> list[Region]:
        """The console ring, when this trap notifies its port: its backend (the hypervisor, as xenconsoled) reads
        the bytes between out_cons and out_prod from this copy, taken at the trap's instant."""
        port, ring_pa = self._console
        if not port or notified_port(nr, args, vcpu.read_virt) != port:
            return []
        assert self.ram is not None
        return [Region(ring_pa, _RING_LEN, self.ram.read_pa(ring_pa, _RING_LEN), False)]

    def _event(self, d: Delivery) -> None:
        """An effect decided outside this domain's own hypercalls, arriving at ``d.vt_ns``: a vCPU asleep until then
        wakes no earlier than that."""
        if not self.link.first(d.seq, kind(d.effect), self.trace, d.vt_ns):
            return
        self._seen_ns = max(self._seen_ns, d.vt_ns)
        vcpu = getattr(d.effect, "vcpu", -1)
        self.trace("domain.event", vt_ns=d.vt_ns, vcpu=vcpu, kind=kind(d.effect),
                   port=getattr(d.effect, "port", None))
        blocked = 0 <= vcpu < len(self.vcpus) and self.vcpus[vcpu].state is VcpuState.BLOCKED
        if blocked and isinstance(d.effect, _WAKING):  # a poll timeout that ends a poll advances the clock
            self.vcpus[vcpu].advance_to(d.vt_ns)
        if isinstance(d.effect, SetPending):  # and a vCPU polling the port wakes no earlier than the event either
            for v in self.vcpus:
                if v.poll_ports is not None and d.effect.port in v.poll_ports:
                    v.advance_to(d.vt_ns)
        if isinstance(d.effect, FLUSHES):  # a flush no hypercall answer carried (the delay-flush bug)
            self.trace("tlb.flush", vt_ns=d.vt_ns, vcpu=vcpu, by=None, span=None)
        effects.apply(self, d.effect, d.vt_ns, vcpu)

    def _window(self, window: Window) -> WindowDone:
        """Run the window. A delivery arriving inside it (an event, a peer closing, a timer) is applied at its
        arrival: every vCPU that runs first runs up to that instant (to its first block boundary there), so no
        guest sees a pending bit before the event could have reached it."""
        assert self.ram is not None
        events, self._held = self._held + list(window.events), []
        self._stop_window = False
        for v in self.vcpus:
            v.stop_requested = False
            v.debug_hit = None
        later = [d for d in events if d.vt_ns > window.start_ns]
        for act in events:
            if act.vt_ns <= window.start_ns:
                self._event(act)
        for res in window.results:
            self._apply(res)
        self._ipis = []
        for irq in window.irqs:
            if not self.link.first(irq.seq, "ipi", self.trace, irq.vt_ns):
                continue
            if 0 <= irq.dest < len(self.vcpus) and self.vcpus[irq.dest].state is not VcpuState.DOWN:
                self.vcpus[irq.dest].post_irq(irq.vt_ns, irq.src, irq.vector)
        run = set(window.run)
        running = []
        for vcpu in self.vcpus:
            if vcpu.vid not in run:
                if vcpu.state in (VcpuState.RUNNING, VcpuState.HYPERCALL):
                    vcpu.advance_to(window.end_ns)  # runnable but without a pCPU: it waits out the window
                continue
            # It holds its pCPU from the window's start at the earliest, and cannot observe memory at a time
            # before a delivery it may already see (``_seen_ns``).
            vcpu.advance_to(max(window.start_ns, self._seen_ns))
            self._publish_time(vcpu)
            running.append(vcpu)
        reqs: list[HypercallReq] = []
        faults: list[VcpuFault] = []
        steps = set(range(window.start_ns + window.step_ns, window.end_ns, window.step_ns)) if window.step_ns else set()
        self._local = (frozenset(v.vid for v in running) if window.step_ns else frozenset(), window.end_ns,
                       window.ipi_ns)
        stopped = False
        for until in sorted({d.vt_ns for d in later if d.vt_ns < window.end_ns} | steps | {window.end_ns}):
            for vcpu in running:
                vcpu.run(until)
                self._collect(vcpu, reqs, faults)
                if vcpu.debug_hit is not None:  # the debugger stopped it: the domain's window ends there too
                    self._stop_window = True
                if self._stop_window:  # an IPI the hypervisor must deliver inside this window (_route_ipi)
                    break
            if self._stop_window:
                self._held = [d for d in later if d.vt_ns >= until]  # not applied yet: those at `until` neither
                stopped = True
                break
            for act in later:
                if act.vt_ns == until:
                    self._event(act)
            if window.step_ns and reqs and until < window.end_ns:
                # A vCPU trapped into the hypervisor: its answer lands a hypercall's time later, inside this window,
                # and the others must not run on past it (it would resume in their past). Report now: the
                # hypervisor answers, and the window goes on in a sub-step from here.
                self._held = [d for d in later if d.vt_ns > until]
                stopped = True
                break
        if not stopped:
            for vcpu in running:  # one woken by a delivery at the window's very end is running when it ends
                vcpu.run(window.end_ns)
                self._collect(vcpu, reqs, faults)
        self._local = (frozenset(), 0, 0)
        self.vt_ns = max(self.vt_ns, window.end_ns)
        reports = [self._report(v) for v in self.vcpus]
        return WindowDone(index=window.index, vcpus=reports, hypercalls=reqs, faults=faults, ipis=self._ipis,
                          debug_stops=self.debugger.stopped())

    def _collect(self, vcpu: Vcpu, reqs: list[HypercallReq], faults: list[VcpuFault]) -> None:
        """What ``vcpu`` stopped on, reported once. A hypercall's arguments are copied in now, as the CPU would at
        the trap: a vCPU that runs after this one in the same window must not be able to change what the
        hypervisor reads."""
        trap = vcpu.trap
        if trap is not None and self._reported_trap.get(vcpu.vid) != trap.seq:
            self._reported_trap[vcpu.vid] = trap.seq
            regions = self._copy_in(vcpu, trap.nr, trap.args)
            reqs.append(HypercallReq(vcpu.vid, trap.seq, trap.vt_ns, trap.nr, trap.args, regions,
                                     self._rings(vcpu, trap.nr, trap.args), emulated=trap.emulated))
        f = vcpu.fault
        if f is not None and vcpu.vid not in self._reported_faults:
            self._reported_faults.add(vcpu.vid)
            faults.append(VcpuFault(vcpu.vid, f.vt_ns, f.kind, f.detail, f.eip, f.disasm))
            self.trace("vcpu.fault", vcpu=vcpu.vid, kind=f.kind, detail=f.detail, eip=f.eip, disasm=f.disasm)

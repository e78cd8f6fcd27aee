"""The guest-domain process: builds the guest on the hypervisor's word, then runs its vCPUs window by window.

In virtual-time mode the vCPUs of a domain run one after another in id order, each up to the window's end, so
their interleaving over the shared RAM depends only on virtual time, never on host thread timing.
"""

from __future__ import annotations

import os
from typing import Any

import trio
import zmq

from domains import events
from domains.builder import BootState, build_domain
from domains.elf_load import ImageError
from domains.memory import GuestRam
from domains.paging import pte_address, read_virt, write_virt
from domains.vcpu import InsnCounter, Vcpu, VcpuState, flat_gdt
from hypervisor.hypercalls import copy_in
from pvcluster.abi.layouts import SHARED_INFO, VCPU_INFO
from pvcluster.abi.platform import MARK_CODE_MASK, MARK_DETAIL_SHIFT, VMI_ROM_BASE, Mark
from pvcluster.analysis import mode_of
from pvcluster.bus import codec
from pvcluster.bus.messages import (
    Build,
    BuildResult,
    Error,
    Hello,
    HypercallReq,
    HypercallResult,
    Ipi,
    Region,
    Stop,
    VcpuAction,
    VcpuFault,
    VcpuReport,
    Window,
    WindowDone,
)
from pvcluster.bus.zsock import TrioSocket

# Wall clock only decides when a silent hypervisor is presumed dead; nothing simulated depends on it.
HYPERVISOR_SILENCE_S = 120.0


class DomainProcess:
    def __init__(self, endpoint: str, identity: bytes, domid: int, name: str, log: Any) -> None:
        self.endpoint = endpoint
        self.identity = identity
        self.domid = domid
        self.name = name
        self.log = log
        self.ctx = zmq.Context()
        self.ram: GuestRam | None = None
        self.boot: BootState | None = None
        self.vcpus: list[Vcpu] = []
        self.vt_ns = 0
        self._seq = 0
        self._reported_traps: set[tuple[int, int]] = set()
        self._reported_faults: set[int] = set()
        self.exit_code = 0
        self._ipis: list[Ipi] = []
        self._span_start: dict[int, int] = {}
        self._shootdown_mode = ""

    def _trace(self, event: str, **fields: Any) -> None:
        fields.setdefault("vt_ns", self.vt_ns)
        self.log.info(event, dom=self.domid, **fields)

    async def _send(self, sock: TrioSocket, body: Any) -> None:
        self._seq += 1
        await sock.send_multipart([codec.encode(body, seq=self._seq, vt_ns=self.vt_ns)])

    async def run(self) -> int:
        raw = self.ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.IDENTITY, self.identity)
        raw.setsockopt(zmq.LINGER, 2000)
        raw.connect(self.endpoint)
        sock = TrioSocket(raw)
        try:
            await self._send(sock, Hello(pid=os.getpid()))
            while True:
                with trio.move_on_after(HYPERVISOR_SILENCE_S) as timeout:
                    frames = await sock.recv_multipart()
                if timeout.cancelled_caught:
                    self._trace("domain.hypervisor_silent", seconds=HYPERVISOR_SILENCE_S)
                    return 4
                try:
                    env = codec.decode(frames[-1])
                except codec.FrameError as exc:
                    self._trace(f"bus.{exc.kind}", detail=exc.detail)
                    await self._send(
                        sock, Error(exc.kind, exc.detail, exc.seq if exc.seq is not None else -1)
                    )
                    continue
                body = env.body
                self.vt_ns = max(self.vt_ns, env.vt_ns)
                if isinstance(body, Build) and self.ram is None:
                    await self._send(sock, self._build(body))
                    if self.ram is None:
                        return 3
                elif isinstance(body, Window) and self.ram is not None:
                    await self._send(sock, self._window(body))
                elif isinstance(body, Stop):
                    self._trace("domain.stop", reason=body.reason)
                    return self.exit_code
                elif isinstance(body, Error):
                    self._trace("bus.peer_error", kind=body.kind, detail=body.detail, ref_seq=body.ref_seq)
                else:
                    detail = f"{type(body).__name__} is not expected now"
                    self._trace("bus.unexpected", detail=detail)
                    await self._send(sock, Error("unexpected", detail, env.seq))
        finally:
            sock.close()
            self.ctx.term()

    # -- build ---------------------------------------------------------------------------------------------

    def _build(self, req: Build) -> BuildResult:
        try:
            ram, boot = build_domain(req)
        except ImageError as exc:
            self._trace("domain.build_failed", code=exc.code, error=exc.message, kernel=req.kernel)
            return BuildResult(
                ok=False, error_code=exc.code, error=exc.message, entry=0, start_info=0, guest_os=""
            )
        self.ram, self.boot = ram, boot
        self._shootdown_mode = mode_of({"backend": req.backend, "cmdline": req.cmdline})
        counter = InsnCounter()
        ram.write_pa(ram.gdt_paddr, flat_gdt())
        # Every vCPU starts with paging on over the builder's tables; a secondary's VCPUOP_initialise context
        # may name other ones (the hypervisor then sends set_cr3).
        self.vcpus = [Vcpu(v, ram, counter, req.ps_per_instr, boot.cr3) for v in range(req.vcpus)]
        for vcpu in self.vcpus:
            vcpu.ipi_sink = self._route_ipi
            vcpu.mark_sink = self._mark
        if req.rom:
            for vcpu in self.vcpus:
                vcpu.map_rom(VMI_ROM_BASE, req.rom)
        boot_vcpu = self.vcpus[0]
        boot_vcpu.set_regs(boot.regs)
        boot_vcpu.initialised = True
        boot_vcpu.state = VcpuState.RUNNING
        boot_vcpu.advance_to(self.vt_ns)
        self._trace(
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
        )

    # -- windows ---------------------------------------------------------------------------------------------

    def _apply(self, res: HypercallResult) -> None:
        assert self.ram is not None
        if not 0 <= res.vcpu < len(self.vcpus):
            self._trace("domain.bad_result", vcpu=res.vcpu, detail="no such vCPU")
            return
        # copy_to_guest: through the page tables of the vCPU that made the call
        cr3 = self.vcpus[res.vcpu].cr3
        for w in res.writes:
            if not write_virt(self.ram, cr3, w.addr, w.data):
                self._trace("domain.bad_write", vcpu=res.vcpu, addr=w.addr, length=len(w.data))
        for act in res.actions:
            if not 0 <= act.vcpu < len(self.vcpus):
                continue
            target = self.vcpus[act.vcpu]
            if act.kind == "set_context":
                target.set_regs(
                    {
                        k: v
                        for k, v in act.regs.items()
                        if k in ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "eip", "eflags")
                    }
                )
                target.initialised = True
            elif act.kind == "up":
                target.advance_to(res.vt_ns)
                if target.trap is not None:  # it had taken itself down: VCPUOP_down returns now
                    target.complete_trap(0, res.vt_ns)
                else:
                    target.state = VcpuState.RUNNING
            elif act.kind == "down":
                target.state = VcpuState.DOWN
            elif act.kind == "block":
                # SCHEDOP_block enables event delivery first, and does not sleep if an event is already pending
                events.set_upcall_mask(self.ram, target.vid, False)
                if events.upcall_pending(self.ram, target.vid) and target.trap is not None:
                    target.complete_trap(0, res.vt_ns)
                else:
                    target.state = VcpuState.BLOCKED
            elif act.kind == "poll":
                # SCHEDOP_poll: done at once if a polled port is pending, else the vCPU sleeps until one is (the
                # upcall mask is left alone, unlike block)
                ports = [act.regs.get(f"p{i}", 0) for i in range(act.regs.get("nr", 0))]
                if target.trap is not None and any(events.is_pending(self.ram, p) for p in ports):
                    target.complete_trap(0, res.vt_ns)
                elif target.trap is not None:
                    target.poll_ports = ports
                    target.state = VcpuState.BLOCKED
            elif act.kind == "poll_timeout":
                if target.trap is not None and target.poll_ports is not None \
                        and target.trap.vt_ns == act.regs.get("trap_vt"):
                    target.complete_trap(0, res.vt_ns)
            elif act.kind == "evtchn_pending":
                events.set_pending(self.ram, act.regs.get("port", 0), target.vid)
            elif act.kind == "evtchn_unmask":
                events.unmask(self.ram, act.regs.get("port", 0), target.vid)
            elif act.kind == "evtchn_clear":
                events.clear(self.ram, act.regs.get("port", 0))
            elif act.kind == "set_callback":
                target.upcall_eip = act.regs.get("eip", 0)
            elif act.kind == "write_pa":
                addr, value = act.regs.get("addr", -1), act.regs.get("value", 0)
                if 0 <= addr <= self.ram.size - 4:
                    self.ram.write_pa(addr, (value & 0xFFFFFFFF).to_bytes(4, "little"))
                else:
                    self._trace("domain.bad_write", vcpu=res.vcpu, addr=addr, length=4)
            elif act.kind == "set_cr3":
                target.set_cr3(act.regs.get("cr3", 0))
            elif act.kind in ("flush_tlb", "invlpg"):
                target.flush_tlb()
            elif act.kind == "set_va_pte":
                # update_va_mapping: the L1 entry for va in the calling vCPU's tables; no flush here (the
                # hypervisor's flush actions follow)
                va, value = act.regs.get("va", 0), act.regs.get("value", 0)
                pte_pa = pte_address(self.ram, target.cr3, va)
                if pte_pa is None:
                    self._trace("domain.bad_write", vcpu=res.vcpu, va=va, detail="no L1 table maps this va")
                else:
                    self.ram.write_pa(pte_pa, (value & 0xFFFFFFFF).to_bytes(4, "little"))
            else:
                self._trace("domain.unsupported_action", vcpu=res.vcpu, kind=act.kind)
        vcpu = self.vcpus[res.vcpu]
        if res.complete:
            if vcpu.trap is None or vcpu.trap.seq != res.seq:
                self._trace(
                    "domain.bad_result", vcpu=res.vcpu, seq=res.seq, detail="no such pending hypercall"
                )
                return
            vcpu.complete_trap(res.value, res.vt_ns)

    def _route_ipi(self, src: int, dest: int, vector: int, vt_ns: int) -> None:
        """The APIC bus leads to the hypervisor: it delivers each IPI when its target next holds a pCPU."""
        targets = [v.vid for v in self.vcpus if v.vid != src] if dest == -1 else [dest]
        for target in targets:
            self._ipis.append(Ipi(src=src, dest=target, vector=vector, vt_ns=vt_ns))
            self._trace("apic.ipi", vt_ns=vt_ns, vcpu=src, target=target, vector=vector)

    def _mark(self, vcpu: int, value: int, vt_ns: int) -> None:
        code, rnd = value & MARK_CODE_MASK, value >> MARK_DETAIL_SHIFT
        span = f"sd-d{self.domid}-r{rnd}"
        self._trace("guest.mark", vt_ns=vt_ns, vcpu=vcpu, code=code, round=rnd, span=span)
        if code == Mark.SHOOTDOWN_REQUEST:
            self._span_start[rnd] = vt_ns
        elif code == Mark.SHOOTDOWN_DONE and rnd in self._span_start:
            start = self._span_start.pop(rnd)
            self._trace("shootdown.span", vt_ns=start, vcpu=vcpu, span=span, round=rnd, end_vt_ns=vt_ns,
                        latency_ns=vt_ns - start, mode=self._shootdown_mode)

    def _publish_time(self, vcpu: Vcpu) -> None:
        """vcpu_time_info.system_time as Xen keeps it: version odd while writing, even when consistent."""
        assert self.ram is not None
        info = self.ram.shared_info_paddr + SHARED_INFO.offset("vcpu_info") + vcpu.vid * VCPU_INFO.size
        version_at, time_at = info + VCPU_INFO.offset("time.version"), info + VCPU_INFO.offset("time.system_time")
        version = int.from_bytes(self.ram.read_pa(version_at, 4), "little")
        self.ram.write_pa(version_at, ((version | 1) & 0xFFFFFFFF).to_bytes(4, "little"))
        self.ram.write_pa(time_at, vcpu.clock_ns.to_bytes(8, "little"))
        self.ram.write_pa(version_at, (((version | 1) + 1) & 0xFFFFFFFF).to_bytes(4, "little"))

    @staticmethod
    def _report(v: Vcpu) -> VcpuReport:
        # A halted vCPU with an interrupt coming is runnable from that moment: the conductor must not call the
        # domain idle, nor start the next window past it.
        if v.state is VcpuState.BLOCKED and v.trap is None and v.pending_irqs and v.reg("eflags") & 0x200:
            return VcpuReport(v.vid, "running", max(v.clock_ns, v.pending_irqs[0][0] // 1000), v.instructions)
        return VcpuReport(v.vid, v.state.value, v.clock_ns, v.instructions)

    def _copy_in(self, vcpu: Vcpu, nr: int, args: list[int]) -> list[Region]:
        """The guest buffers hypercall ``nr`` names, read through ``vcpu``'s page tables. A span that is not
        mapped (or, for one the hypervisor may write, not mapped writable) goes with data None: -EFAULT."""
        assert self.ram is not None
        ram, cr3 = self.ram, vcpu.cr3

        def read(va: int, n: int, write: bool = False) -> bytes | None:
            return read_virt(ram, cr3, va, n, write)

        return [Region(s.addr, s.length, read(s.addr, s.length, s.writable), s.writable)
                for s in copy_in(nr, args, read)]

    def _event(self, act: VcpuAction) -> None:
        """An action decided outside this domain's own hypercalls, arriving at regs["vt_ns"]: a vCPU asleep until
        then wakes no earlier than that."""
        vt = act.regs.get("vt_ns", self.vt_ns)
        self._trace("domain.event", vt_ns=vt, vcpu=act.vcpu, kind=act.kind, port=act.regs.get("port"))
        blocked = 0 <= act.vcpu < len(self.vcpus) and self.vcpus[act.vcpu].state is VcpuState.BLOCKED
        if blocked and act.kind != "poll_timeout":  # a poll timeout that ends a poll advances the clock itself
            self.vcpus[act.vcpu].advance_to(vt)
        if act.kind == "evtchn_pending":  # and a vCPU polling the port wakes no earlier than the event either
            for v in self.vcpus:
                if v.poll_ports is not None and act.regs.get("port") in v.poll_ports:
                    v.advance_to(vt)
        self._apply(HypercallResult(vcpu=act.vcpu, seq=-1, vt_ns=vt, value=0, writes=[], actions=[act],
                                    complete=False))

    def _window(self, window: Window) -> WindowDone:
        assert self.ram is not None
        for act in window.events:
            self._event(act)
        for res in window.results:
            self._apply(res)
        reqs: list[HypercallReq] = []
        faults: list[VcpuFault] = []
        self._ipis = []
        for irq in window.irqs:
            if 0 <= irq.dest < len(self.vcpus) and self.vcpus[irq.dest].state is not VcpuState.DOWN:
                self.vcpus[irq.dest].post_irq(irq.vt_ns, irq.src, irq.vector)
        run = set(window.run)
        for vcpu in self.vcpus:
            if vcpu.vid not in run:
                if vcpu.state in (VcpuState.RUNNING, VcpuState.HYPERCALL):
                    vcpu.advance_to(window.end_ns)  # runnable but without a pCPU: it waits out the window
                continue
            self._publish_time(vcpu)
            vcpu.run(window.end_ns)
            # Copy the hypercall's arguments in now, as the CPU would at the trap: a vCPU that runs after this
            # one in the same window must not be able to change what the hypervisor reads.
            trap = vcpu.trap
            if trap is not None and (vcpu.vid, trap.seq) not in self._reported_traps:
                self._reported_traps.add((vcpu.vid, trap.seq))
                regions = self._copy_in(vcpu, trap.nr, trap.args)
                reqs.append(HypercallReq(vcpu.vid, trap.seq, trap.vt_ns, trap.nr, trap.args, regions))
            f = vcpu.fault
            if f is not None and vcpu.vid not in self._reported_faults:
                self._reported_faults.add(vcpu.vid)
                faults.append(VcpuFault(vcpu.vid, f.vt_ns, f.kind, f.detail, f.eip, f.disasm))
                self._trace(
                    "vcpu.fault", vcpu=vcpu.vid, kind=f.kind, detail=f.detail, eip=f.eip, disasm=f.disasm
                )
        self.vt_ns = max(self.vt_ns, window.end_ns)
        reports = [self._report(v) for v in self.vcpus]
        return WindowDone(index=window.index, vcpus=reports, hypercalls=reqs, faults=faults, ipis=self._ipis)

"""The domain process's side of dumps and the debugger: what the hypervisor may ask of it between two windows
(hypervisor/boundary.py), and the breakpoints and single steps that stop a vCPU inside a window.

Requests (each answered at once; every address and length is checked here, a bad one gets an Error or no data):

* ``DebugRegsReq``: each vCPU's registers in gdb's order, state, CR3 and clock;
* ``DebugMapsReq``: the guest RAM a vCPU's page tables map, as runs of contiguous pages (a dump's segments);
* ``DebugRead`` / ``DebugWrite``: memory by virtual address through a vCPU's tables (or by guest-physical
  address), in chunks of at most MAX_CHUNK; registers from a ``G``;
* ``DebugArm``: the breakpoints and the single step for the windows that follow.

Breakpoints are Unicorn code hooks on exactly their address (``UC_HOOK_CODE`` with begin = end), in every vCPU, so
guest memory is never patched (a guest that checksums or copies its code sees its own bytes). A hook stops its vCPU
before the instruction, charging only the instructions of the block before it (``Vcpu._rewind``), and the domain
ends its window at that instant for all its vCPUs (``DomainProcess._window``), reporting ``WindowDone.debug_stop``;
the hypervisor then holds the cluster there. A vCPU that stands on a breakpoint when the debugger resumes executes
that instruction first (gdb's step-over). A single step is a one-instruction slice (``Vcpu.step_once``) in the
normal window machinery, so it costs that instruction's virtual time and nothing else.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from unicorn import UC_HOOK_CODE
from unicorn import x86_const as X
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TB_FLUSH

from domains.paging import read_virt, translate, write_virt
from domains.vcpu import Vcpu
from pvcluster.abi.x86 import PTE_PRESENT, PTE_RW
from pvcluster.bus.messages import (
    DebugAck,
    DebugArm,
    DebugData,
    DebugMaps,
    DebugMapsReq,
    DebugRead,
    DebugRegs,
    DebugRegsReq,
    DebugStop,
    DebugVcpu,
    DebugWrite,
    MapRun,
)
from pvcluster.coredump import MAX_SEGMENTS, merge_pages
from pvcluster.gdbregs import GDB_REGS, SEGMENTS

if TYPE_CHECKING:
    from domains.memory import GuestRam
    from domains.runtime import DomainProcess

# The most one read or write moves (a bus frame is at most 4 MiB).
MAX_CHUNK = 1 << 20
# How many breakpoints the debugger may set (gdb asks for a handful; each is a hook in every vCPU).
MAX_BREAKPOINTS = 64
_SEG_IDS = {"cs": X.UC_X86_REG_CS, "ss": X.UC_X86_REG_SS, "ds": X.UC_X86_REG_DS, "es": X.UC_X86_REG_ES,
            "fs": X.UC_X86_REG_FS, "gs": X.UC_X86_REG_GS}
_FRAME = 0xFFFFF000
_PAE_FRAME = 0x000FFFFFFFFFF000


def flush_translations(vcpu: Vcpu) -> None:
    """Drop the vCPU's translated blocks: ones translated before a hook was added (or code was patched) would not
    call it (or would run the old bytes)."""
    vcpu.uc.ctl(UC_CTL_TB_FLUSH, UC_CTL_IO_WRITE)


def read_regs(vcpu: Vcpu) -> list[int]:
    return [int(vcpu.uc.reg_read(_SEG_IDS[n])) if n in SEGMENTS else vcpu.reg(n) for n in GDB_REGS]


def mapped_pages(ram: GuestRam, cr3: int) -> list[tuple[int, int, bool]]:
    """(virtual, physical, writable) of every page the tables at ``cr3`` map to guest RAM, in virtual order."""
    out: list[tuple[int, int, bool]] = []
    page = 4096

    def table(pa: int, width: int) -> tuple[int, ...] | None:
        if not 0 <= pa <= ram.size - page:
            return None
        return struct.unpack_from("<1024I" if width == 4 else "<512Q", ram.buf, pa)

    if ram.pae:
        l3 = cr3 & 0xFFFFFFE0
        if not 0 <= l3 <= ram.size - 32:
            return out
        for i3, e3 in enumerate(struct.unpack_from("<4Q", ram.buf, l3)):
            l2 = table(e3 & _PAE_FRAME, 8) if e3 & PTE_PRESENT else None
            for i2, e2 in enumerate(l2 or ()):
                l1 = table(e2 & _PAE_FRAME, 8) if e2 & PTE_PRESENT else None
                for i1, e1 in enumerate(l1 or ()):
                    pa = e1 & _PAE_FRAME
                    if e1 & PTE_PRESENT and pa <= ram.size - page:
                        out.append((i3 << 30 | i2 << 21 | i1 << 12, pa, bool(e2 & e1 & PTE_RW)))
        return out
    for i2, e2 in enumerate(table(cr3 & _FRAME, 4) or ()):
        l1 = table(e2 & _FRAME, 4) if e2 & PTE_PRESENT else None
        for i1, e1 in enumerate(l1 or ()):
            pa = e1 & _FRAME
            if e1 & PTE_PRESENT and pa <= ram.size - page:
                out.append((i2 << 22 | i1 << 12, pa, bool(e2 & e1 & PTE_RW)))
    return out


class Debugger:
    """One per domain process: answers the debug requests and keeps the breakpoints armed in its vCPUs."""

    def __init__(self, proc: DomainProcess) -> None:
        self.proc = proc
        self.breakpoints: dict[int, list[Any]] = {}  # address -> the hook handle in each vCPU
        self._hooked = 0  # how many vCPUs the hooks cover (secondaries exist from the build on)
        proc.answers.update({DebugRegsReq: self.regs, DebugMapsReq: self.maps, DebugRead: self.read,
                             DebugWrite: self.write, DebugArm: self.arm})

    def _vcpu(self, vid: int) -> Vcpu:
        if not 0 <= vid < len(self.proc.vcpus):
            raise ValueError(f"no vCPU {vid}")
        return self.proc.vcpus[vid]

    def regs(self, req: DebugRegsReq) -> DebugRegs:
        vcpus = self.proc.vcpus if req.vcpu == -1 else [self._vcpu(req.vcpu)]
        return DebugRegs([DebugVcpu(v.vid, v.state.value, read_regs(v), v.cr3, v.clock_ns) for v in vcpus])

    def maps(self, req: DebugMapsReq) -> DebugMaps:
        vcpu = self._vcpu(req.vcpu)
        runs = merge_pages(mapped_pages(self.proc.memory, vcpu.cr3))
        if len(runs) > MAX_SEGMENTS:  # a guest's tables could alias frames everywhere: no answer fits a frame then
            raise ValueError(f"{len(runs)} mapped runs: a core holds at most {MAX_SEGMENTS}")
        return DebugMaps([MapRun(r.vaddr, r.paddr, r.size, r.writable) for r in runs])

    def read(self, req: DebugRead) -> DebugData:
        if not 0 <= req.length <= MAX_CHUNK or not 0 <= req.addr < 1 << 32:
            raise ValueError(f"read of {req.length} bytes at {req.addr:#x}: at most {MAX_CHUNK} in the 32-bit space")
        ram = self.proc.memory
        if req.physical:
            if req.addr + req.length > ram.size:
                return DebugData(None)
            return DebugData(ram.read_pa(req.addr, req.length))
        return DebugData(read_virt(ram, self._vcpu(req.vcpu).cr3, req.addr, req.length))

    def write(self, req: DebugWrite) -> DebugAck:
        vcpu = self._vcpu(req.vcpu)
        if len(req.data) > MAX_CHUNK or not 0 <= req.addr < 1 << 32:
            raise ValueError(f"write of {len(req.data)} bytes at {req.addr:#x}: at most {MAX_CHUNK}")
        if req.regs and (len(req.regs) != len(GDB_REGS) or not all(0 <= r < 1 << 32 for r in req.regs)):
            raise ValueError(f"registers: {len(GDB_REGS)} values of 32 bits expected")
        # A debugger write goes where the guest's own would, read-only pages included (gdb patches code, too)
        if req.data and not write_virt(self.proc.memory, vcpu.cr3, req.addr, req.data) \
                and not self._write_readonly(vcpu, req.addr, req.data):
            return DebugAck(False, f"{req.addr:#x}: not mapped to RAM")
        if req.regs:
            # the segment registers stay the hypervisor's (a PV guest's selectors are Xen's flat ones)
            vcpu.set_regs({n: v for n, v in zip(GDB_REGS, req.regs, strict=True) if n not in SEGMENTS})
        if req.data:
            for v in self.proc.vcpus:  # translated code may hold the old bytes
                flush_translations(v)
        return DebugAck(True, "")

    def _write_readonly(self, vcpu: Vcpu, va: int, data: bytes) -> bool:
        """A debugger's write to pages mapped read-only (code, say), as long as each is the domain's own RAM."""
        ram = self.proc.memory
        at = 0
        while at < len(data):
            n = min(len(data) - at, 4096 - ((va + at) & 4095))
            pa = translate(ram, vcpu.cr3, va + at, False)
            if pa is None or pa + n > ram.nr_pages * 4096:  # never the hypervisor's frames past the domain's RAM
                return False
            at += n
        at = 0
        while at < len(data):
            n = min(len(data) - at, 4096 - ((va + at) & 4095))
            pa = translate(ram, vcpu.cr3, va + at, False)
            assert pa is not None
            ram.write_pa(pa, data[at : at + n])
            at += n
        return True

    def arm(self, req: DebugArm) -> DebugAck:
        wanted = set(req.breakpoints)
        if len(wanted) > MAX_BREAKPOINTS or not all(0 <= a < 1 << 32 for a in wanted):
            raise ValueError(f"at most {MAX_BREAKPOINTS} breakpoints, each a 32-bit address")
        if req.step != -1:
            self._vcpu(req.step)
        vcpus = self.proc.vcpus
        changed = False
        for addr in set(self.breakpoints) - wanted:
            for v, handle in zip(vcpus, self.breakpoints.pop(addr), strict=True):
                v.uc.hook_del(handle)
            changed = True
        for addr in wanted - set(self.breakpoints):
            self.breakpoints[addr] = [v.uc.hook_add(UC_HOOK_CODE, self._hit, v, addr, addr) for v in vcpus]
            changed = True
        for v in vcpus:
            if changed:  # blocks translated before a hook was added or removed would not call it, or still would
                flush_translations(v)
            v.debug_hit = None
            # a vCPU standing on a breakpoint executes that instruction first, whichever way it resumes
            v.bp_skip = v.reg("eip") if v.reg("eip") in wanted else None
            v.step_once = v.vid == req.step
        return DebugAck(True, "")

    @staticmethod
    def _hit(uc: Any, addr: int, size: int, vcpu: Vcpu) -> None:
        if vcpu.bp_skip == addr:
            vcpu.bp_skip = None
            return
        vcpu.bp_skip = None
        vcpu._rewind(addr)  # noqa: SLF001 - the block hook charged the whole block; only what ran counts
        vcpu.debug_stop("breakpoint", addr)

    def stopped(self) -> list[DebugStop]:
        """The vCPU the debugger stopped in this window, if any (the window ended there): at most one."""
        for v in self.proc.vcpus:
            if v.debug_hit is not None:
                why, eip = v.debug_hit
                return [DebugStop(v.vid, eip, why, v.clock_ns)]
        return []

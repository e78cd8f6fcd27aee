"""One guest vCPU: its own Unicorn instance (so its own TLB) over the domain's shared RAM.

Virtual time advances with executed instructions. Unicorn cannot report how many instructions ran before an
``emu_stop``, so a block hook counts each translated block's instructions before the block runs. A block hook that
stops emulation prevents that block from running, so a slice ends at the first block boundary at or after the
window end: deterministic, since block boundaries depend only on the code. The hook is C (``domains.blockhook``):
it finds the block's bytes through this vCPU's page tables, looks their count up in a table shared by the domain's
vCPUs (keyed by address, size and the exact bytes), and calls back into Python only for a block it has not seen
with those bytes (``InsnCounter`` disassembles it once with capstone) or whose bytes it cannot read. The clock and
the instruction count live in the hook's C state; ``clock_ps`` and ``instructions`` are properties over it. RDTSC
is answered there too, from the same clock (the virtual TSC, ``domains/timeinfo.py``), never the host's counter.

Memory: the domain's RAM is mapped at physical address 0 in every instance, the local APIC's MMIO page at physical
0xFEE00000 and the VMI ROM (when there is one) at physical 0xFFFF0000. The vCPU runs with paging on (CR0.PG, and
CR0.WP so that supervisor writes honour read-only entries) from its creation, on the domain builder's page tables;
the guest may switch them (``mov cr3`` or the hypervisor's ``set_cr3``). A ``native`` or ``vmi`` kernel runs in ring
0; a ``xen`` kernel in ring 1 under the hypervisor hole, where every exception, software interrupt and iret comes
to the domain process (``_take_exception``: ``domains/rings.py``, ``traps.py``, ``privop.py``).
Whatever this module reads or writes by virtual address uses the software walk in ``domains.paging`` with this
vCPU's current CR3. A page fault stops the vCPU with a "page-fault" fault naming CR2 and the kind of access.
"""

from __future__ import annotations

import ctypes
import enum
import heapq
import mmap
import struct
from collections.abc import Callable

import attrs
import capstone
from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_FETCH_UNMAPPED,
    UC_HOOK_MEM_INVALID,
    UC_MODE_32,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    Uc,
    UcError,
)
from unicorn import x86_const as X
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TB_FLUSH, UC_CTL_TLB_FLUSH

from domains import events, privop, ptwr, rings, traps
from domains.blockhook import BlockHook, CountTable
from domains.insn_cost import BlockPricer
from domains.memory import GuestRam
from domains.paging import read_virt, translate, write_virt
from pvcluster.abi.platform import (
    APIC_BASE,
    APIC_ICR_HIGH,
    APIC_ICR_LOW,
    APIC_ID,
    APIC_ID_SHIFT,
    CLOCK_PORT,
    KERNEL_CS,
    KERNEL_DS,
    MARK_PORT,
)
from pvcluster.abi.x86 import CR0_TS
from pvcluster.abi.xen import (
    DOMID_SELF,
    FLAT_RING1_CS,
    FLAT_RING1_DS,
    HYPERCALL_VECTOR,
    HYPERVISOR_CS,
    HYPERVISOR_DS,
    Hypercall,
    MmuextCmd,
)
from pvcluster.costs import CLOCK_READ_PS, InsnClass

_STOP_ADDR = 0xFFFFFFFF  # emu_start's `until`; ignored, since each vCPU turns exit addresses on with none set
# The platform's ports (pvcluster/abi/platform.py): `in eax, dx` from CLOCK_PORT reads the vCPU's virtual time in ns
# (RDTSC reads it in TSC ticks, through the C hook: domains/blockhook.py); a write to MARK_PORT puts a guest mark in
# the trace at the exact virtual time (workloads use it to bracket what they measure, e.g. each TLB shootdown).
CR0_WP, CR0_PG = 1 << 16, 1 << 31
CR4_PAE = 1 << 5
PAGE_FAULT_VECTOR = 14
_PAGE = 0x1000
# Instructions that write memory without naming it as an operand (the stack).
_IMPLICIT_WRITERS = ("push", "call", "enter")
EFLAGS_IF, EFLAGS_TF = 0x200, 0x100
# (sender vCPU, destination vCPU or -1 for all but the sender, vector, virtual time)
IpiSink = Callable[[int, int, int, int], None]


def flat_gdt() -> bytes:
    """null, then flat 4 GiB ring-0 code (KERNEL_CS) and data (KERNEL_DS) descriptors."""

    def desc(access: int) -> bytes:
        return struct.pack("<II", 0x0000FFFF, 0x00CF0000 | (access << 8))

    gdt = bytearray(8 * (max(KERNEL_CS, KERNEL_DS) // 8 + 1))  # a selector's index is its value / 8
    gdt[KERNEL_CS & ~7 : (KERNEL_CS & ~7) + 8] = desc(0x9A)
    gdt[KERNEL_DS & ~7 : (KERNEL_DS & ~7) + 8] = desc(0x92)
    return bytes(gdt)
REG_IDS: dict[str, int] = {
    "eax": X.UC_X86_REG_EAX,
    "ebx": X.UC_X86_REG_EBX,
    "ecx": X.UC_X86_REG_ECX,
    "edx": X.UC_X86_REG_EDX,
    "esi": X.UC_X86_REG_ESI,
    "edi": X.UC_X86_REG_EDI,
    "ebp": X.UC_X86_REG_EBP,
    "esp": X.UC_X86_REG_ESP,
    "eip": X.UC_X86_REG_EIP,
    "eflags": X.UC_X86_REG_EFLAGS,
}
_ARG_REGS = [X.UC_X86_REG_EBX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX, X.UC_X86_REG_ESI, X.UC_X86_REG_EDI]


class VcpuState(enum.Enum):
    DOWN = "down"  # not brought up (or taken down) by VCPUOP
    RUNNING = "running"  # runnable: executes whenever its domain runs a window
    HYPERCALL = "hypercall"  # trapped into the hypervisor, waiting for the result
    BLOCKED = "blocked"  # SCHEDOP_block or hlt: waits for an event
    CRASHED = "crashed"  # took a fault the domain cannot handle


@attrs.frozen
class Trap:
    """A hypercall the vCPU made: ``int 0x82`` with the number in EAX and arguments in EBX..EDI."""

    seq: int
    vt_ns: int
    nr: int
    args: list[int]
    emulated: bool = False  # the domain process's emulation of a page-table write (domains/ptwr.py)


@attrs.frozen
class TakenException:
    """An exception or software interrupt a ring-1 vCPU took, waiting for the domain process to act on it outside
    emulation (``Vcpu._take_exception``): ``eip`` where it stopped (after an ``int n``, at a faulting instruction)."""

    intno: int
    eip: int
    cr2: int


@attrs.frozen
class Fault:
    vt_ns: int
    kind: str
    detail: str
    eip: int
    disasm: str
    cr2: int | None = None  # page faults: the faulting linear address
    write: bool | None = None  # page faults: whether the access was a write


class InsnCounter:
    """Instruction counts and costs of translated blocks, shared by the vCPUs of one domain: the C hook's table of
    the blocks seen (``table``), and capstone (``domains/insn_cost.py``) for the blocks it has not seen."""

    def __init__(self, insn_ps: tuple[int, ...] | None = None, refill_ps: int = 0) -> None:
        self._md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
        self.pricer = BlockPricer(insn_ps, refill_ps)
        # C asks again only for a block whose bytes it cannot read (it stores the rest): those are cached here
        self._cache: dict[tuple[int, bytes], int] = {}
        self._md_detail: capstone.Cs | None = None
        self.table = CountTable()

    def count(self, addr: int, code: bytes) -> int:
        """What the C hook keeps for the block: its instruction count and cost, packed (``BlockPricer.packed``)."""
        key = (addr, code)
        n = self._cache.get(key)
        if n is None:
            n = self.pricer.packed(addr, code)
            self._cache[key] = n
        return n

    def disasm(self, addr: int, code: bytes) -> str:
        for _, _, mnemonic, ops in self._md.disasm_lite(code, addr, 1):
            return f"{mnemonic} {ops}".strip()
        return f"<undecodable {code[:8].hex()}>"

    def detail_decoder(self) -> capstone.Cs:
        """capstone with operand details, made on first use."""
        if self._md_detail is None:
            self._md_detail = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
            self._md_detail.detail = True
        return self._md_detail

    def writes_memory(self, addr: int, code: bytes) -> bool:
        """Whether the instruction at ``addr`` writes memory (an operand it writes, or the stack)."""
        for insn in self.detail_decoder().disasm(code, addr, 1):
            if insn.mnemonic.split()[-1].startswith(_IMPLICIT_WRITERS):
                return True
            return any(op.type == capstone.x86.X86_OP_MEM and op.access & capstone.CS_AC_WRITE
                       for op in insn.operands)
        return False


class Vcpu:
    def __init__(self, vid: int, ram: GuestRam, counter: InsnCounter, ps_per_instr: int, cr3: int,
                 ring1: bool = False) -> None:
        """A vCPU with paging on over the page directory at physical ``cr3`` (the domain builder's), which must
        map the GDT at ``ram.virt_base + ram.gdt_paddr``; or, with ``ring1`` (a Xen PV kernel), the hypervisor hole
        (``domains/rings.py``), whose GDT window it then runs on."""
        self.vid = vid
        self.ram = ram
        self.counter = counter
        self.state = VcpuState.DOWN
        self.initialised = False
        self.trap: Trap | None = None
        self.fault: Fault | None = None
        self._end_ps = 0
        self._trap_seq = 0
        self.uc = Uc(UC_ARCH_X86, UC_MODE_32)
        self.uc.mem_map_ptr(0, ram.size, UC_PROT_ALL, ram.host_addr)
        # No exit address: with `until` = 0xFFFFFFFF Unicorn looks that address up through the page tables when
        # emulation stops, and the silent #PF it takes there turns the guest's next real #PF into a #DF.
        self.uc.ctl_exits_enabled(True)
        self.uc.ctl_set_exits([])
        # Virtual time: the C hook's state holds the clock relative to _base_ps (so C's 64 bits never overflow
        # whatever Python sets it to), the slice end on the same base, and the instruction count.
        self._hook = BlockHook(self.uc, X.UC_X86_REG_CR3, ram.host_addr, ram.size, counter.table, self._count_block,
                               self._price_prefix, pae=ram.pae)
        self._st = self._hook.state
        self._base_ps = 0
        self.ps_per_instr = ps_per_instr
        # costs outside instruction classes, in ps (the domain process sets them from the spec's cost model)
        # set when the vCPU must stop at its next block (its domain ends the window there: see DomainProcess)
        self.stop_requested = False
        self.irq_entry_ps = 0
        self.mmio_ps = 0
        self.refill_ps = 0  # after a full flush applied from outside (the hypervisor's)
        self._rom: tuple[mmap.mmap, ctypes.c_char] | None = None
        self.uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        self.uc.hook_add(UC_HOOK_MEM_INVALID | UC_HOOK_MEM_FETCH_UNMAPPED, self._on_bad_access)
        self.uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        self.uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        # (vcpu, value, virtual time): what the guest writes to the trace-mark port
        self.mark_sink: Callable[[int, int, int], None] | None = None
        # (vcpu, vector or None for an event upcall, virtual time): each interrupt this vCPU takes
        self.irq_sink: Callable[[int, int | None, int], None] | None = None
        self.flushes = 0
        # interrupts posted to this vCPU: (virtual time, sender, sequence, vector), taken in that order
        self.pending_irqs: list[tuple[int, int, int, int]] = []
        self._irq_seq = 0
        self.upcall_eip: int | None = None
        # SCHEDOP_poll in progress: the ports it waits on (it does not wake on other events)
        self.poll_ports: list[int] | None = None
        # The GDT the guest installed with set_gdt (machine frames, entries), as the hypervisor validated it. The
        # CPU keeps running on the flat segments of the hypervisor's GDT frame (Xen's reserved entries stand in
        # the same way for a PV kernel's FLAT_RING1_CS/DS); loading the guest's own selectors is not modelled.
        self.gdt_frames: list[int] = []
        self.gdt_ents = 0
        self.ipi_sink: IpiSink | None = None
        # A ring-1 vCPU's part of Xen's pv_vcpu (trap table, kernel stack) and virtual CR2/CR4; the exception it
        # stopped on, taken outside emulation.
        self.pv: traps.PvCpu | None = traps.PvCpu(callback_cs=FLAT_RING1_CS) if ring1 else None
        self.virt_cr2 = 0
        self.virt_cr4 = 0
        self._exc: TakenException | None = None
        # an emulated page-table write or CR3 load waiting for the hypervisor's answer (its trap is `emulated`)
        self._emulating: ptwr.Pending | privop.Cr3Write | None = None
        if ring1:  # Unicorn reports #UD to this hook, not as an interrupt: Xen's #UD path (forced emulation)
            self.uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)
        self._icr_high = 0
        # The debugger (domains/debug.py): why and where this vCPU stopped for it, and whether its next slice is
        # one instruction only (a single step).
        self.debug_hit: tuple[str, int] | None = None
        self.step_once = False
        self.bp_skip: int | None = None  # the breakpoint it stands on when resumed: executed once, not hit
        self.uc.mmio_map(APIC_BASE, 0x1000, self._apic_read, None, self._apic_write, None)
        # Paging first: loading the segment registers reads their descriptors from the GDT by virtual address.
        self.uc.reg_write(X.UC_X86_REG_CR3, cr3 & 0xFFFFF000)
        if ram.pae:  # a PAE guest's vCPUs run with CR4.PAE: 3-level tables (Xen's pv_guest_cr4_to_real_cr4 keeps it)
            self.uc.reg_write(X.UC_X86_REG_CR4, int(self.uc.reg_read(X.UC_X86_REG_CR4)) | CR4_PAE)
        self.uc.reg_write(X.UC_X86_REG_CR0, int(self.uc.reg_read(X.UC_X86_REG_CR0)) | CR0_PG | CR0_WP)
        if ring1:  # on the hypervisor's ring-0 selectors until enter_kernel moves it to ring 1
            self.uc.reg_write(X.UC_X86_REG_GDTR, (0, rings.gdt_base(vid), rings.GDT_LIMIT, 0))
            self.uc.reg_write(X.UC_X86_REG_CS, HYPERVISOR_CS)
            self.uc.reg_write(X.UC_X86_REG_SS, HYPERVISOR_DS)
            for seg in (X.UC_X86_REG_DS, X.UC_X86_REG_ES, X.UC_X86_REG_FS, X.UC_X86_REG_GS):
                self.uc.reg_write(seg, FLAT_RING1_DS)
            return
        gdt_va = ram.virt_base + ram.gdt_paddr
        self.uc.reg_write(X.UC_X86_REG_GDTR, (0, gdt_va, 23, 0))
        self.uc.reg_write(X.UC_X86_REG_CS, KERNEL_CS)
        for seg in (X.UC_X86_REG_DS, X.UC_X86_REG_ES, X.UC_X86_REG_SS, X.UC_X86_REG_FS, X.UC_X86_REG_GS):
            self.uc.reg_write(seg, KERNEL_DS)

    def map_rom(self, base: int, image: bytes) -> None:
        """A read-only, executable page the hypervisor supplies (the VMI ROM) at physical ``base``, which the
        builder's page tables map read-only at the same virtual address; a guest write to it faults. Its memory
        is ours (``mem_map_ptr``), so the block hook reads the very bytes the CPU executes."""
        buf = mmap.mmap(-1, len(image))
        buf[:] = image
        anchor = ctypes.c_char.from_buffer(buf)
        self.uc.mem_map_ptr(base, len(image), UC_PROT_READ | UC_PROT_EXEC, ctypes.addressof(anchor))
        self._rom = (buf, anchor)  # alive as long as Unicorn maps it
        self._hook.map_rom(ctypes.addressof(anchor), base, len(image))

    def set_cr3(self, value: int) -> None:
        """Load CR3 (which, as on the CPU, drops this vCPU's TLB). A ring-1 vCPU's new page directory gets the
        hypervisor hole first."""
        if self.pv is not None:
            rings.install_hole(self.ram, value & 0xFFFFF000)
        self.uc.reg_write(X.UC_X86_REG_CR3, value & 0xFFFFFFFF)
        self._st.cr3_known = 0  # the block hook's memo of it

    def set_ts(self, ts: bool) -> None:
        """CR0.TS as fpu_taskswitch asked: set, the vCPU's next FPU or SSE instruction raises #NM."""
        cr0 = int(self.uc.reg_read(X.UC_X86_REG_CR0))
        self.uc.reg_write(X.UC_X86_REG_CR0, cr0 | CR0_TS if ts else cr0 & ~CR0_TS)

    # -- rings (a ring-1 vCPU: domains/rings.py, domains/traps.py) ---------------------------------------------

    def pv_state(self) -> traps.PvCpu:
        if self.pv is None:
            raise RuntimeError(f"vCPU {self.vid} is not a ring-1 vCPU")
        return self.pv

    def segment(self, name: str) -> int:
        return int(self.uc.reg_read({"cs": X.UC_X86_REG_CS, "ss": X.UC_X86_REG_SS}[name]))

    def transfer(self, eip: int, cs: int, eflags: int, esp: int, ss: int) -> None:
        """Continue at cs:eip, ss:esp in the ring ``cs`` names. The trampoline's one ``iretd`` is Xen's own exit
        path, not guest work: its cost is taken back from the clock before its block charges it."""
        if rings.transfer(self.uc, self.ram, self.vid, eip, cs, eflags, esp, ss):
            iret = rings.trampoline_iret()
            self._charge(-self.counter.pricer.price(rings.trampoline_va(self.vid), iret)[1])

    def enter_kernel(self) -> None:
        """Start a ring-1 vCPU where its registers say, in ring 1 on Xen's flat selectors (its boot or its
        VCPUOP_initialise context), with events as the real interrupt flag Xen always leaves on."""
        self.transfer(self.reg("eip"), FLAT_RING1_CS, self.reg("eflags") | EFLAGS_IF, self.reg("esp"),
                      FLAT_RING1_DS)

    def load_gdt(self, frames: list[int]) -> None:
        """set_gdt's frames, shown in this vCPU's GDT window (a ring-1 vCPU; the others only record them)."""
        self.gdt_frames = list(frames)
        if self.pv is not None:
            rings.map_gdt(self.ram, self.vid, self.gdt_frames)

    @property
    def cr0(self) -> int:
        return int(self.uc.reg_read(X.UC_X86_REG_CR0))

    @property
    def cr3(self) -> int:
        return int(self.uc.reg_read(X.UC_X86_REG_CR3))

    def read_virt(self, va: int, length: int, write: bool = False) -> bytes | None:
        """Guest memory by virtual address through this vCPU's page tables (see ``domains.paging.read_virt``)."""
        return read_virt(self.ram, self.cr3, va, length, write)

    def write_virt(self, va: int, data: bytes) -> bool:
        return write_virt(self.ram, self.cr3, va, data)

    def fetch(self, va: int, length: int) -> bytes:
        """Code bytes at ``va`` as the vCPU would fetch them (RAM or the ROM page); as many as are mapped."""
        out = bytearray()
        cr3 = self.cr3
        while length > 0:
            n = min(length, _PAGE - (va & (_PAGE - 1)))
            pa = translate(self.ram, cr3, va, False)
            if pa is None:
                break
            if pa + n <= self.ram.size:
                out += self.ram.buf[pa : pa + n]
            else:
                try:
                    out += self.uc.mem_read(pa, n)  # physical: the ROM
                except UcError:
                    break
            va, length = va + n, length - n
        return bytes(out)

    def flush_tlb(self) -> None:
        """Drop this vCPU's cached translations (Unicorn has no single-page flush from the host side)."""
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        self.flushes += 1

    def refill_tlb(self) -> None:
        """After a full flush the hypervisor applied: the translations it dropped are walked again."""
        self._charge(self.refill_ps)

    # -- the local APIC (trapped MMIO) and interrupt delivery -----------------------------------------------

    def _charge(self, ps: int) -> None:
        """Virtual time an operation takes beyond its instruction's class (scaled like the classes). Called from
        inside emulation too, so it moves the hook's clock on its own base (the slice end is on that base)."""
        self._st.clock_ps = max(0, self._st.clock_ps + ps * self.ps_per_instr // 1000)

    def _apic_read(self, uc: Uc, offset: int, size: int, _: object) -> int:
        self._charge(self.mmio_ps)  # a trapped MMIO access
        if offset == APIC_ID:
            return self.vid << APIC_ID_SHIFT
        if offset == APIC_ICR_HIGH:
            return self._icr_high
        return 0

    def _apic_write(self, uc: Uc, offset: int, size: int, value: int, _: object) -> None:
        self._charge(self.mmio_ps)  # a trapped MMIO access (an ICR write sends the IPI at the time it completes)
        if offset == APIC_ICR_HIGH:
            self._icr_high = value & 0xFFFFFFFF
        elif offset == APIC_ICR_LOW and self.ipi_sink is not None:
            vector, shorthand = value & 0xFF, (value >> 18) & 3
            if shorthand == 1:
                self.ipi_sink(self.vid, self.vid, vector, self.clock_ns)
            elif shorthand == 3:
                self.ipi_sink(self.vid, -1, vector, self.clock_ns)
            else:
                self.ipi_sink(self.vid, self._icr_high >> APIC_ID_SHIFT, vector, self.clock_ns)
        # EOI and the other registers need no model: delivery is edge-triggered and one at a time

    def post_irq(self, vt_ns: int, src: int, vector: int) -> None:
        self._irq_seq += 1
        heapq.heappush(self.pending_irqs, (vt_ns * 1000, src, self._irq_seq, vector))

    def _irq_enabled(self) -> bool:
        return bool(self.reg("eflags") & EFLAGS_IF)

    def _enter(self, target: int, clear_if: bool) -> bool:
        """Push an interrupt frame (eflags, cs, eip) on the guest stack and continue at ``target``."""
        esp, eflags = self.reg("esp"), self.reg("eflags")
        frame = struct.pack("<III", self.reg("eip"), KERNEL_CS, eflags)
        if not self.write_virt(esp - 12, frame):
            self._set_fault("double-fault", f"interrupt frame at {esp - 12:#x} is not in guest memory", self.reg("eip"))
            self.state = VcpuState.CRASHED
            return False
        self.set_regs({"esp": esp - 12, "eip": target,
                       "eflags": eflags & ~(EFLAGS_IF | EFLAGS_TF) if clear_if else eflags & ~EFLAGS_TF})
        self._charge(self.irq_entry_ps)  # delivery through the gate (or Xen's bounce frame)
        return True

    def _idt_gate(self, vector: int) -> int | None:
        _, base, limit, _ = self.uc.reg_read(X.UC_X86_REG_IDTR)
        if vector * 8 + 7 > limit:
            return None
        gate = self.read_virt(base + vector * 8, 8)
        if gate is None or not gate[5] & 0x80:
            return None
        return int(struct.unpack_from("<H", gate, 0)[0] | struct.unpack_from("<H", gate, 6)[0] << 16)

    def _inject(self) -> None:
        """Take one interrupt or event upcall that is due, the way the CPU (or Xen) would."""
        if self.pending_irqs and self.pending_irqs[0][0] <= self.clock_ps and self._irq_enabled():
            vector = heapq.heappop(self.pending_irqs)[3]
            target = self._idt_gate(vector)
            if target is None:
                self._set_fault("trap", f"interrupt vector {vector:#x} has no present IDT gate", self.reg("eip"))
                self.state = VcpuState.CRASHED
                return
            taken = self.clock_ns  # the instant it is taken; the entry's own cost is the handler's
            if self._enter(target, clear_if=True) and self.irq_sink is not None:
                self.irq_sink(self.vid, vector, taken)
            return
        if (self.upcall_eip is not None and events.upcall_pending(self.ram, self.vid)
                and not events.upcall_masked(self.ram, self.vid)):
            taken = self.clock_ns
            if self.pv is not None:
                self._upcall_ring1(taken)
                return
            # Xen masks further upcalls on entry; the guest's handler unmasks before it returns
            events.set_upcall_mask(self.ram, self.vid, True)
            if self._enter(self.upcall_eip, clear_if=False) and self.irq_sink is not None:
                self.irq_sink(self.vid, None, taken)

    def _upcall_ring1(self, taken: int) -> None:
        """The event upcall of a ring-1 vCPU: a bounce frame that masks events (TBF_INTERRUPT)."""
        assert self.pv is not None and self.upcall_eip is not None
        try:
            traps.bounce(self, self.pv.callback_cs, self.upcall_eip, None, mask_events=True)
        except traps.GuestCrash as crash:
            self._set_fault("double-fault", f"event upcall: {crash}", self.reg("eip"))
            self.state = VcpuState.CRASHED
            return
        self._charge(self.irq_entry_ps)
        if self.irq_sink is not None:
            self.irq_sink(self.vid, None, taken)

    def _wake(self, end_ps: int) -> None:
        """A halted vCPU resumes on an interrupt it can take; one blocked in SCHEDOP_block on an event."""
        if self.state is not VcpuState.BLOCKED:
            return
        if self.trap is not None:
            if self.poll_ports is not None:
                if any(events.is_pending(self.ram, p) for p in self.poll_ports):
                    self.complete_trap(0, self.clock_ns)
            elif events.upcall_pending(self.ram, self.vid):
                self.complete_trap(0, self.clock_ns)
            return
        if self.pending_irqs and self._irq_enabled() and self.pending_irqs[0][0] < end_ps:
            self.clock_ps = max(self.clock_ps, self.pending_irqs[0][0])
            self.state = VcpuState.RUNNING

    def _instant_ns(self) -> int:
        """Virtual time at the instruction now running: the hook charged its whole block before the block ran, so
        this is the clock before the block plus the instructions before this one."""
        start, eip = int(self._st.block_addr), self.reg("eip")
        before = self.fetch(start, eip - start) if 0 < eip - start < 4096 else b""
        cost = self.counter.pricer.price(start, before)[1] if before else 0
        return (self._base_ps + int(self._st.block_ps) + cost * self.ps_per_instr // 1000) // 1000

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _: object) -> None:
        if port == MARK_PORT:
            # measuring must not change what is measured: the mark's own port write costs nothing, and it is
            # stamped at its own instant within the block
            self._charge(-self.counter.pricer.insn_ps[InsnClass.IO])
            if self.mark_sink is not None:
                self.mark_sink(self.vid, value & 0xFFFFFFFF, self._instant_ns())

    def _on_in(self, uc: Uc, port: int, size: int, _: object) -> int:
        if port == CLOCK_PORT:  # the guest's cycle counter: priced as RDTSC, not as a trip to the LPC bus
            self._charge(CLOCK_READ_PS - self.counter.pricer.insn_ps[InsnClass.IO])
            return self._instant_ns() & 0xFFFFFFFF
        return 0xFFFFFFFF  # no device: the bus floats high

    @property
    def clock_ps(self) -> int:
        """Virtual time in picoseconds: the base Python last set plus what the C hook has counted since."""
        return self._base_ps + self._st.clock_ps

    @clock_ps.setter
    def clock_ps(self, value: int) -> None:
        self._base_ps = value
        self._hook.set_base(value)  # RDTSC reads the clock in C: it needs the base too
        self._st.clock_ps = 0

    @property
    def instructions(self) -> int:
        return int(self._st.instructions)

    @instructions.setter
    def instructions(self, value: int) -> None:
        self._st.instructions = value

    @property
    def ps_per_instr(self) -> int:
        return int(self._st.ps_per_instr)

    @ps_per_instr.setter
    def ps_per_instr(self, value: int) -> None:
        self._st.ps_per_instr = value

    @property
    def clock_ns(self) -> int:
        return self.clock_ps // 1000

    def advance_to(self, vt_ns: int) -> None:
        """Virtual time passes while the vCPU is not executing (waiting, descheduled, just created)."""
        self.clock_ps = max(self.clock_ps, vt_ns * 1000)

    def set_regs(self, regs: dict[str, int]) -> None:
        for name, value in regs.items():
            self.uc.reg_write(REG_IDS[name], value & 0xFFFFFFFF)

    def reg(self, name: str) -> int:
        return int(self.uc.reg_read(REG_IDS[name]))

    # -- hooks: keep them short, they run inside emu_start ---------------------------------------------

    def _count_block(self, addr: int, size: int, code: bytes | None) -> int:
        """The C hook's miss: a block it has not seen with these bytes (``code``), or whose bytes it could not
        read (None: read them here, through the RAM or the ROM the way the CPU fetched them)."""
        if code is None:
            code = self.fetch(addr, size)
        return self.counter.count(addr, code)

    def _price_prefix(self, addr: int, size: int, code: bytes | None) -> int:
        """What the ``size`` bytes of instructions at ``addr`` cost (ps at ps_per_instr = 1000): the part of a block
        before an RDTSC, which C keeps once asked (``None``: C could not read them; read them here)."""
        if code is None:
            code = self.fetch(addr, size)
        return self.counter.pricer.price(addr, code)[1] if code else 0

    def _on_interrupt(self, uc: Uc, intno: int, _: object) -> None:
        eip = int(uc.reg_read(X.UC_X86_REG_EIP))
        if self.pv is not None and (intno != HYPERCALL_VECTOR or rings.cpl(uc) > 1
                                    or int(uc.reg_read(X.UC_X86_REG_EAX)) == Hypercall.iret):
            # everything but a ring-1 hypercall is Xen's entry path: taken outside emulation (_take_exception)
            self._exc = TakenException(intno, eip, int(uc.reg_read(X.UC_X86_REG_CR2)))
            uc.emu_stop()
            return
        if intno == HYPERCALL_VECTOR:
            self._trap_seq += 1
            args = [int(uc.reg_read(r)) for r in _ARG_REGS]
            nr = int(uc.reg_read(X.UC_X86_REG_EAX))
            self.trap = Trap(seq=self._trap_seq, vt_ns=self.clock_ns, nr=nr, args=args)
        elif intno == PAGE_FAULT_VECTOR:
            self._page_fault(int(uc.reg_read(X.UC_X86_REG_CR2)), eip)
        else:
            self._set_fault("trap", f"unhandled exception or interrupt vector {intno}", eip)
        uc.emu_stop()

    def _on_invalid(self, uc: Uc, _: object) -> bool:
        self._exc = TakenException(traps.UD_VECTOR, int(uc.reg_read(X.UC_X86_REG_EIP)), 0)
        uc.emu_stop()
        return True

    def _on_bad_access(self, uc: Uc, access: int, addr: int, size: int, value: int, _: object) -> bool:
        eip = int(uc.reg_read(X.UC_X86_REG_EIP))
        self._set_fault(
            "page-fault", f"access type {access} to unmapped address {addr:#010x} ({size} bytes)", eip
        )
        return False

    def _page_fault(self, cr2: int, eip: int) -> None:
        """A page fault the guest cannot handle ends it, with the access it made."""
        access, write, present = self._pf_access(cr2, eip)
        why = "page is read-only" if present else "page not present"
        if present and self.pv is not None and rings.cpl(self.uc) == 3:
            why = "page is read-only or not a user page"
        self._set_fault("page-fault", f"{access} at cr2={cr2:#010x}: {why}", eip, cr2=cr2, write=write)

    def _pf_access(self, cr2: int, eip: int) -> tuple[str, bool, bool]:
        """Unicorn hands over #PF without its error code: tell the access from the tables and the instruction
        (access, write, present). In a supervisor ring a present page can fault only on a write (no NX without
        PAE); in ring 3 a read of a supervisor page faults too; a missing page on any access."""
        code = self.fetch(eip, 15)
        present = translate(self.ram, self.cr3, cr2, False) is not None
        if not code or (eip <= cr2 < eip + 15 and not present):
            return "instruction fetch", False, present
        user = self.pv is not None and rings.cpl(self.uc) == 3
        write = (present and not user) or self.counter.writes_memory(eip, code)
        return ("write" if write else "read"), write, present

    # -- a ring-1 vCPU's exceptions (Xen's entry paths: domains/traps.py) -----------------------------------

    def _take_exception(self) -> None:
        """Act on the exception a ring-1 vCPU stopped on: emulate a privileged instruction, return from
        HYPERVISOR_iret, bounce it to the guest's handler, or end the domain when it has none."""
        exc, self._exc = self._exc, None
        if exc is None:
            return
        rings.clear_exception(self.uc)
        try:
            if not self._dispatch(exc):
                self._unhandled(exc)
        except traps.GuestCrash as crash:
            self._set_fault("trap", str(crash), exc.eip)
        if self.fault is not None:
            self.state = VcpuState.CRASHED
        elif self.trap is not None:
            self.state = VcpuState.HYPERCALL

    def _dispatch(self, exc: TakenException) -> bool:
        intno, eip = exc.intno, exc.eip
        if 0 <= eip - rings.trampoline_va(self.vid) < _PAGE:
            raise traps.GuestCrash("the context it returned to could not be loaded (a fault in the iret)")
        if intno == HYPERCALL_VECTOR and rings.cpl(self.uc) <= 1:
            self._charge(self.irq_entry_ps)
            traps.iret(self)
            return True
        if intno >= 32:  # `int n`: EIP is past the two-byte instruction
            return traps.software_interrupt(self, intno, 2)
        if intno in (3, 4):  # int3 and into: traps, delivered at the instruction after them
            return traps.exception(self, intno, 0)
        code = self.fetch(eip, 15)
        if intno == traps.GP_VECTOR and (source := privop.cr3_source(code)) is not None:
            self._rewind(eip)
            self._begin_cr3_write(eip, self.reg(source))
            return True
        emulate = {traps.GP_VECTOR: privop.emulate_gp, traps.UD_VECTOR: privop.emulate_ud}.get(intno)
        length = emulate(self, code) if emulate is not None and code else None
        if length is not None:
            self._rewind(eip + length)
            self._charge(self.irq_entry_ps)
            self.set_regs({"eip": eip + length})
            return True
        self._rewind(eip)
        if intno == traps.PF_VECTOR and rings.set_descriptor_accessed(self.ram, self.vid, exc.cr2):
            return True  # the CPU's own accessed-bit write: the instruction runs again
        if intno == traps.PF_VECTOR:
            _, write, present = self._pf_access(exc.cr2, eip)
            if write and present and rings.cpl(self.uc) == 1 and self._begin_ptwr(eip, exc.cr2, code):
                return True
            code_bits = int(present) | int(write) << 1 | int(rings.cpl(self.uc) == 3) << 2
            return traps.exception(self, intno, code_bits, exc.cr2)
        return traps.exception(self, intno, 0)

    def _begin_ptwr(self, eip: int, cr2: int, code: bytes) -> bool:
        """A ring-1 write to a read-only page of its own: emulate it as a one-entry mmu_update the hypervisor checks
        (``domains/ptwr.py``). False: not a store this emulation takes; the page fault is the guest's."""
        store = ptwr.decode(self.counter.detail_decoder(), code, eip)
        if store is None or store.size not in (1, 2, 4) or cr2 % store.size:
            return False
        width = 8 if self.ram.pae else 4  # the entry the store is widened to
        pa = translate(self.ram, self.cr3, cr2 & ~(width - 1), False)
        if pa is None or pa + width > self.ram.nr_pages * _PAGE:
            return False
        word = int.from_bytes(self.ram.buf[pa : pa + width], "little")
        offset = cr2 & (width - 1)
        old = ptwr.part(word, offset, store.size)
        value = store.imm if store.source is None else ptwr.read_reg(self.reg, store.source)
        if store.kind == "cmpxchg" and old != self.reg("eax"):  # fails as the CPU would: no update to check
            self.set_regs({"eax": old, "eflags": self.reg("eflags") & ~ptwr.EFLAGS_ZF, "eip": eip + store.length})
            self._charge(self.irq_entry_ps)
            return True
        self._emulated_trap(Hypercall.mmu_update, ptwr.request(pa, ptwr.merge(word, offset, store.size, value, width)),
                            hint=ptwr.upper_half(width, offset, store))
        self._emulating = ptwr.Pending(eip, cr2, store, old)
        return True

    def _emulated_trap(self, nr: int, request: bytes, hint: int = 0) -> None:
        """Trap to the hypervisor with a one-element ``request`` the domain process wrote for the guest (in the
        trampoline page, which the guest cannot write): an emulated write's hypercall (``hint``: its fifth
        argument, see ``ptwr.upper_half``)."""
        slot_va, slot_pa = rings.ptwr_slot(self.ram, self.vid)
        self.ram.write_pa(slot_pa, request)
        self._trap_seq += 1
        self.trap = Trap(self._trap_seq, self.clock_ns, nr, [slot_va, 1, 0, DOMID_SELF, hint], emulated=True)

    def _begin_cr3_write(self, eip: int, value: int) -> None:
        """``mov reg, cr3`` in ring 1: Xen's new_guest_cr3, i.e. the hypervisor's MMUEXT_NEW_BASEPTR."""
        self._emulated_trap(Hypercall.mmuext_op, struct.pack("<3I", MmuextCmd.NEW_BASEPTR, value >> 12, 0))
        self._emulating = privop.Cr3Write(eip)

    def _finish_emulation(self, value: int) -> None:
        pending, self._emulating = self._emulating, None
        if isinstance(pending, ptwr.Pending):
            self._finish_ptwr(pending, value)
        elif pending is not None and value == 0:
            self.set_regs({"eip": pending.eip + pending.length})
        elif pending is not None:
            try:
                if traps.exception(self, traps.GP_VECTOR, 0):
                    return
                self._set_fault("trap", "mov to cr3 refused by the hypervisor, and no #GP handler", pending.eip)
            except traps.GuestCrash as crash:
                self._set_fault("trap", str(crash), pending.eip)
            self.state = VcpuState.CRASHED

    def _finish_ptwr(self, pending: ptwr.Pending, value: int) -> None:
        """The hypervisor's answer to an emulated page-table write: done (the vCPU goes on after the store, with what
        xchg or cmpxchg leave in registers), or refused (the store's page fault goes to the guest)."""
        store = pending.store
        if value == 0:
            regs = {"eip": pending.eip + store.length}
            if store.kind == "xchg" and store.source is not None:
                regs[store.source] = pending.old_word
            if store.kind == "cmpxchg":
                regs["eflags"] = self.reg("eflags") | ptwr.EFLAGS_ZF
            self.set_regs(regs)
            return
        try:
            if traps.exception(self, traps.PF_VECTOR, 3, pending.cr2):
                return
            self._page_fault(pending.cr2, pending.eip)
        except traps.GuestCrash as crash:
            self._set_fault("trap", str(crash), pending.eip)
        self.state = VcpuState.CRASHED

    def _unhandled(self, exc: TakenException) -> None:
        if exc.intno == traps.PF_VECTOR:
            self._page_fault(exc.cr2, exc.eip)
        elif exc.intno >= 32:
            self._set_fault("trap", f"int {exc.intno:#x}: no handler admits it in the trap table", exc.eip - 2)
        else:
            self._set_fault("trap", f"unhandled exception or interrupt vector {exc.intno}", exc.eip)

    def _rewind(self, eip: int) -> None:
        """The C hook charged the whole block before it ran; an exception stopped it at ``eip``: count only the
        instructions before it, since the rest runs again (and is charged again) from there."""
        start = int(self._st.block_addr)
        if not 0 <= eip - start < _PAGE:
            return
        before = self.fetch(start, eip - start) if eip > start else b""
        cost = self.counter.pricer.price(start, before)[1] if before else 0
        self._st.clock_ps = int(self._st.block_ps) + cost * self.ps_per_instr // 1000

    def _set_fault(self, kind: str, detail: str, eip: int, cr2: int | None = None,
                   write: bool | None = None) -> None:
        code = self.fetch(eip, 15)
        self.fault = Fault(self.clock_ns, kind, detail, eip, self.counter.disasm(eip, code), cr2, write)

    # -- running ------------------------------------------------------------------------------------------

    def run(self, end_ns: int) -> None:
        """Execute until the clock reaches ``end_ns`` or the vCPU traps, blocks or faults; interrupts that come
        due meanwhile are taken at the first block boundary at or after their time."""
        end_ps = end_ns * 1000
        while not self.stop_requested:
            self._wake(end_ps)
            if self.state is not VcpuState.RUNNING or self.clock_ps >= end_ps:
                return
            self._inject()
            if self.state is not VcpuState.RUNNING:
                return
            later = [t for t, *_ in self.pending_irqs if t > self.clock_ps]
            self._end_ps = min([end_ps, *later])
            self._slice()

    def _slice(self) -> None:
        while self.state is VcpuState.RUNNING and self.clock_ps < self._end_ps and not self.stop_requested:
            eip = self.reg("eip")
            self._hook.start(self._end_ps - self._base_ps)
            stepping, self.step_once = self.step_once, False
            if stepping:  # Unicorn's instruction count is a code hook that blocks translated before it never call
                self.uc.ctl(UC_CTL_TB_FLUSH, UC_CTL_IO_WRITE)
            try:
                self.uc.emu_start(eip, _STOP_ADDR, count=1 if stepping else 0)
                self._hook.raise_error()
            except UcError as exc:
                if self.fault is None:
                    self._set_fault("cpu", str(exc), self.reg("eip"))
            if stepping:
                self._stepped(eip)
            if self._exc is not None:
                self._take_exception()
                continue
            if self.stop_requested and self.fault is None and self.trap is None:
                return  # asked to stop (request_stop): the hook ended emulation at a block boundary
            if self.fault is not None:
                self.state = VcpuState.CRASHED
            elif self.trap is not None:
                self.state = VcpuState.HYPERCALL
            elif self.clock_ps < self._end_ps:
                # emu_start returned on its own: Unicorn does that after `hlt`.
                here = self.reg("eip")
                if self.fetch(here - 1, 1) == b"\xf4":
                    self.state = VcpuState.BLOCKED
                else:
                    self._set_fault("cpu", "emulation stopped unexpectedly", here)
                    self.state = VcpuState.CRASHED

    def debug_stop(self, why: str, eip: int) -> None:
        """Stop for the debugger (from a code hook too): the window ends here for this vCPU."""
        self.debug_hit = (why, eip)
        self.stop_requested = True
        self.uc.emu_stop()

    def _stepped(self, eip: int) -> None:
        """After a one-instruction slice from ``eip``: the block hook charged the whole block it began, so charge
        only that instruction (a trap or an exception has charged its own way), and stop for the debugger."""
        if self._exc is None and self.trap is None and self.fault is None and int(self._st.block_addr) == eip:
            code = self.fetch(eip, 15)
            insn = next(self.counter.detail_decoder().disasm(code, eip, 1), None) if code else None
            if insn is not None:
                cost = self.counter.pricer.price(eip, code[: insn.size])[1]
                self._st.clock_ps = int(self._st.block_ps) + cost * self.ps_per_instr // 1000
        self.debug_hit = ("step", self.reg("eip"))
        self.stop_requested = True

    def request_stop(self) -> None:
        """Stop at the next block boundary (from inside emulation too): the hook's slice ends where the clock is."""
        self.stop_requested = True
        self._st.end_ps = self._st.clock_ps

    def complete_trap(self, value: int, vt_ns: int) -> None:
        emulated = self._emulating is not None
        if not emulated:
            self.uc.reg_write(X.UC_X86_REG_EAX, value & 0xFFFFFFFF)
        self.trap = None
        self.poll_ports = None
        self.advance_to(vt_ns)
        self.state = VcpuState.RUNNING
        if emulated:
            self._finish_emulation(value & 0xFFFFFFFF)

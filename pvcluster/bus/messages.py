"""The typed records that travel on the bus. Wire codes are protocol: never renumber, only add.

Domain <-> hypervisor (ROUTER/DEALER on the domain bus):
  Hello -> Build -> BuildResult -> (Window -> WindowDone)* -> Stop -> Leaving
A domain process joins by saying Hello with the name of a domain the hypervisor declared; the hypervisor answers
with Build, or with Error(kind="refused") when the peer may not claim that domain.
Toolstack <-> hypervisor (control socket): CtlRequest -> CtlReply
Either direction: Error, the answer to a frame that could not be accepted.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from pvcluster.abi.extcopy import ExtCopyIn
from pvcluster.bus.effects import Effect


@attrs.frozen
class Error:
    WIRE: ClassVar[int] = 1
    kind: str  # stable slug: "malformed", "unknown-type", "unknown-peer", "unexpected", ...
    detail: str
    ref_seq: int  # sequence number of the offending frame, -1 when it could not be read


@attrs.frozen
class Hello:
    WIRE: ClassVar[int] = 2
    pid: int
    name: str = ""  # the declared domain this process claims
    host: str = ""  # the host it runs on (for the trace only)


@attrs.frozen
class Build:
    WIRE: ClassVar[int] = 3
    domid: int
    name: str
    vcpus: int
    memory_bytes: int
    kernel: str
    cmdline: str
    backend: str
    boot: str
    patching: bool
    hypercall_page: bytes
    ps_per_instr: int
    rom: bytes  # the VMI ROM page when the hypervisor offers one (backend "vmi"), else empty
    # The 32-bit ident written at the start of start_info in place of the hypervisor's own: the builder fault
    # "ident=0x..." (hypervisor/faults.py), which no backend recognises. None: the hypervisor's.
    start_info_ident: int | None = None
    # the cost model's prices the domain process charges (pvcluster/costs.py): ps per instruction by class at
    # ps_per_instr = 1000 (InsnClass order; empty: the defaults), an interrupt's entry, a trapped MMIO access
    insn_ps: list[int] = attrs.Factory(list)
    irq_entry_ns: int = 0
    mmio_ns: int = 0
    tlb_refill_ns: int = 0  # the refill after a full TLB flush, charged to the flushed vCPU
    # The kernel image, read by the hypervisor (a file kernel only after checking the requester could read it), so
    # a domain process on another host needs no file of its own; empty: the process loads ``kernel`` itself.
    image: bytes = b""
    # Start of day, as the toolstack hands them to Xen's domain builder: the xenstore and console event channels it
    # allocated (start_info.store_evtchn, console.domU.evtchn; 0: none), and the wallclock at system time 0
    # (shared_info.wc_sec / wc_nsec).
    store_evtchn: int = 0
    console_evtchn: int = 0
    wc_sec: int = 0
    wc_nsec: int = 0
    # What the spec's hypercall extensions copy in (pvcluster/abi/extcopy.py): the domain process copies their
    # buffers with the trap without importing the extension modules.
    copyin: list[ExtCopyIn] = attrs.Factory(list)


@attrs.frozen
class BuildResult:
    WIRE: ClassVar[int] = 4
    ok: bool
    error_code: str
    error: str
    entry: int
    start_info: int  # guest virtual address of start_info
    guest_os: str
    l2_mfn: int = 0  # the initial page directory, pinned by the hypervisor as Xen's builder pins it
    l1_mfns: list[int] = attrs.Factory(list)
    # the pages the builder gave the xenstore and console rings (start_info.store_mfn, console.domU.mfn; 0: none)
    store_mfn: int = 0
    console_mfn: int = 0
    # The initial tables' contents, the L2's frame then each L1's in ``l1_mfns`` order: the hypervisor validates
    # them as Xen's builder pins the initial L2 (empty: all zero, a hand-made result). PAE: the root's frame, then
    # each of ``l2_mfns``, then each L1's.
    tables: bytes = b""
    # The domain's paging mode: a PAE guest (xen-3.0-x86_32p) has 3-level tables of 64-bit entries; then
    # ``l2_mfn`` is the root, the L3 (pinned as MMUEXT_PIN_L3_TABLE), and ``l2_mfns`` its L2s in slot order.
    pae: bool = False
    l2_mfns: list[int] = attrs.Factory(list)


@attrs.frozen
class Region:
    """A span of guest memory copied in for a hypercall. ``data`` is None when the span is not mapped.

    How the domain process translated it, so that the hypervisor can tell when an earlier part of the same hypercall
    (a multicall entry, a batch request) changed what the span means (``hypervisor/guestmem.py``): ``walk`` holds
    the machine addresses of the page-table entries read, page by page (the PDE, then the PTE when the PDE is
    present); ``frames`` the machine frame of each page of a mapped span. A zero-length region is a translation
    only (the L1 entry update_va_mapping writes). Empty lists: not known (a hand-made region), never stale."""

    addr: int
    length: int
    data: bytes | None
    writable: bool
    walk: list[int] = attrs.Factory(list)
    frames: list[int] = attrs.Factory(list)
    # ``addr`` is a machine address: a whole frame copied for page-table validation (copyin.Span.machine)
    machine: bool = False


@attrs.frozen
class HypercallReq:
    vcpu: int
    seq: int
    vt_ns: int
    nr: int
    args: list[int]
    regions: list[Region]
    # Shared rings a backend reads when this trap notifies it (the console ring, for an EVTCHNOP_send on the console
    # port), by machine address, copied at the trap like ``regions``.
    rings: list[Region] = attrs.Factory(list)
    # Not the guest's own hypercall: the domain process emulating a guest write that faulted on a read-only page,
    # as the one-entry mmu_update it amounts to (writable page tables: domains/ptwr.py, hypervisor/ptwr.py).
    emulated: bool = False


@attrs.frozen
class MemWrite:
    addr: int
    data: bytes


@attrs.frozen
class Delivery:
    """An effect decided outside the domain's own hypercalls (an interdomain event, a timer, a peer closing its
    end, a poll timeout), arriving at virtual time ``vt_ns``: a vCPU asleep until then wakes no earlier. ``seq`` is
    its sequence number on the hypervisor-domain link: a copy the link duplicated has the same one, and the
    domain drops it."""

    vt_ns: int
    effect: Effect
    seq: int = 0


@attrs.frozen
class HypercallResult:
    vcpu: int
    seq: int
    vt_ns: int  # virtual time at which the result lands in the vCPU
    value: int  # EAX, unsigned 32-bit
    writes: list[MemWrite]
    effects: list[Effect]
    complete: bool  # False: apply writes and effects, but the vCPU keeps waiting (blocked, taken down, restarted)
    link_seq: int = 0  # its sequence number on the hypervisor-domain link: the domain drops a duplicate


@attrs.frozen
class VcpuReport:
    vcpu: int
    state: str  # "running", "hypercall", "blocked", "down"
    clock_ns: int
    instructions: int


@attrs.frozen
class VcpuFault:
    vcpu: int
    vt_ns: int
    kind: str
    detail: str
    eip: int
    disasm: str


@attrs.frozen
class Ipi:
    """An inter-processor interrupt within one domain, routed through the hypervisor's scheduler."""

    src: int
    dest: int
    vector: int
    vt_ns: int
    seq: int = 0  # its sequence number on the hypervisor-domain link (0 from a domain): the domain drops a duplicate
    # (in a report) the domain delivered it itself: its target held a pCPU in the window and it arrived inside it
    local: bool = False


@attrs.frozen
class Window:
    WIRE: ClassVar[int] = 5
    index: int
    end_ns: int
    results: list[HypercallResult]
    run: list[int] = attrs.Factory(list)  # the vCPUs that hold a physical CPU in this window
    irqs: list[Ipi] = attrs.Factory(list)  # interrupts to take, each no earlier than its vt_ns
    # effects decided outside this domain's own hypercalls (interdomain events, peers closing, timers, poll
    # timeouts), in arrival order; each applied at its arrival (those at or before start_ns before the vCPUs run)
    events: list[Delivery] = attrs.Factory(list)
    # where the window starts: a vCPU given a pCPU runs from here at the earliest (after a pause, say, its own clock
    # is still where it stopped)
    start_ns: int = 0
    # Lockstep within the domain: its running vCPUs take turns in steps of step_ns (0: each runs the window through
    # at once), so one sees what another did no later than a step after; an IPI between two of them arrives ipi_ns
    # after it was sent and the domain delivers it itself.
    step_ns: int = 0
    ipi_ns: int = 0


@attrs.frozen
class WindowDone:
    WIRE: ClassVar[int] = 6
    index: int
    vcpus: list[VcpuReport]
    hypercalls: list[HypercallReq]
    faults: list[VcpuFault]
    ipis: list[Ipi] = attrs.Factory(list)
    # The vCPU the debugger stopped (a breakpoint, a single step): the domain ended its window there
    # (domains/debug.py). At most one; a list, not an optional record, so the codec's fast path decodes it.
    debug_stops: list[DebugStop] = attrs.Factory(list)


@attrs.frozen
class Stop:
    WIRE: ClassVar[int] = 7
    reason: str


@attrs.frozen
class Leaving:
    """The domain process's last word after a Stop: the exit code it ends with (a remote process has no parent
    that would learn it)."""

    WIRE: ClassVar[int] = 8
    code: int


@attrs.frozen
class CtlRequest:
    WIRE: ClassVar[int] = 20
    cmd: str
    args: dict[str, Any]


@attrs.frozen
class CtlReply:
    WIRE: ClassVar[int] = 21
    ok: bool
    data: Any
    error: str


# -- the toolstack's view into a domain between two windows (dump, the gdb stub: hypervisor/boundary.py) ---------
# Asked only while the cluster is held at a window boundary; the domain process answers each request with its
# answer record, or Error. Addresses and lengths are the requester's word: the domain process checks them.


@attrs.frozen
class DebugStop:
    """Where the debugger stopped a vCPU inside a window: ``why`` "breakpoint" (before the instruction at ``eip``)
    or "step" (after one instruction), at the vCPU's virtual time ``vt_ns``."""

    vcpu: int
    eip: int
    why: str
    vt_ns: int


@attrs.frozen
class DebugVcpu:
    """One vCPU's registers in gdb's i386 order (GDB_REGS: eax ecx edx ebx esp ebp esi edi eip eflags cs ss ds es
    fs gs), its run state, page-table base and clock."""

    vcpu: int
    state: str
    regs: list[int]
    cr3: int
    clock_ns: int


@attrs.frozen
class MapRun:
    """Virtually and physically contiguous mapped guest RAM, as a vCPU's page tables map it."""

    vaddr: int
    paddr: int
    size: int
    writable: bool


@attrs.frozen
class DebugRegsReq:
    WIRE: ClassVar[int] = 30
    vcpu: int = -1  # -1: every vCPU


@attrs.frozen
class DebugRegs:
    WIRE: ClassVar[int] = 31
    vcpus: list[DebugVcpu]


@attrs.frozen
class DebugMapsReq:
    WIRE: ClassVar[int] = 32
    vcpu: int  # whose page tables


@attrs.frozen
class DebugMaps:
    WIRE: ClassVar[int] = 33
    runs: list[MapRun]


@attrs.frozen
class DebugRead:
    """``length`` bytes at ``addr``: a guest-physical address, or a virtual one through ``vcpu``'s tables."""

    WIRE: ClassVar[int] = 34
    vcpu: int
    addr: int
    length: int
    physical: bool = False


@attrs.frozen
class DebugData:
    WIRE: ClassVar[int] = 35
    data: bytes | None  # None: not all of it is mapped to RAM


@attrs.frozen
class DebugWrite:
    """Write ``data`` at virtual ``addr`` through ``vcpu``'s tables, and/or set its registers (``regs``: empty, or
    all 16 in gdb's order)."""

    WIRE: ClassVar[int] = 36
    vcpu: int
    addr: int
    data: bytes
    regs: list[int] = attrs.Factory(list)


@attrs.frozen
class DebugAck:
    WIRE: ClassVar[int] = 37
    ok: bool
    detail: str


@attrs.frozen
class DebugArm:
    """What the debugger wants of the next windows: stop any vCPU before the instructions at ``breakpoints`` (a
    vCPU standing on one now steps over it first), and, with ``step`` >= 0, stop that vCPU after one instruction."""

    WIRE: ClassVar[int] = 38
    breakpoints: list[int]
    step: int = -1


MESSAGES: tuple[type, ...] = (Error, Hello, Build, BuildResult, Window, WindowDone, Stop, Leaving, CtlRequest,
                              CtlReply, DebugRegsReq, DebugRegs, DebugMapsReq, DebugMaps, DebugRead, DebugData,
                              DebugWrite, DebugAck, DebugArm)


# -- save, restore and migrate (hypervisor/saving.py, domains/capture.py) -------------------------------------
# Asked of a domain process while the cluster is held at a window boundary (hypervisor/boundary.py): its state, then
# its memory in chunks (a frame holds at most codec.MAX_FRAME_BYTES). A process that joins as a restored or migrated
# domain gets Restore and RestoreRam chunks in place of a Build, and answers Restored.


@attrs.frozen
class CaptureState:
    """Asked of a domain process: its vCPUs' and its own state (``CapturedState``)."""

    WIRE: ClassVar[int] = 40
    reason: str = "save"  # "save" or "migrate", for the process's log only


@attrs.frozen
class CapturedState:
    WIRE: ClassVar[int] = 41
    state: bytes  # the process's state, pickled (pvcluster/statepickle.py: only allowed classes load)
    ram_size: int  # bytes of guest memory to read with ReadRam
    ram_sha256: bytes  # of that memory, as it is at this boundary


@attrs.frozen
class ReadRam:
    WIRE: ClassVar[int] = 42
    offset: int
    length: int  # at most statepickle.CHUNK_BYTES


@attrs.frozen
class RamChunk:
    WIRE: ClassVar[int] = 43
    offset: int
    data: bytes


@attrs.frozen
class Restore:
    """The answer to a Hello from a process that joins as a restored (or migrated) domain: what its Build was, its
    saved state, and how much memory follows in RestoreRam chunks; it answers Restored once all of it is in."""

    WIRE: ClassVar[int] = 44
    build: Build
    state: bytes
    ram_size: int
    ram_sha256: bytes


@attrs.frozen
class RestoreRam:
    WIRE: ClassVar[int] = 45
    offset: int
    data: bytes


@attrs.frozen
class Restored:
    WIRE: ClassVar[int] = 46
    ok: bool
    error: str = ""


@attrs.frozen
class Retire:
    """To a domain process whose domain moved to another process (migrate): leave at once, tracing nothing (the
    domain's trace goes on in the new process)."""

    WIRE: ClassVar[int] = 47
    reason: str = "migrated"


MESSAGES = MESSAGES + (CaptureState, CapturedState, ReadRam, RamChunk, Restore, RestoreRam, Restored, Retire)

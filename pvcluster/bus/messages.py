"""The typed records that travel on the bus. Wire codes are protocol: never renumber, only add.

Domain <-> hypervisor (ROUTER/DEALER on the domain bus):
  Hello -> Build -> BuildResult -> (Window -> WindowDone)* -> Stop
Toolstack <-> hypervisor (control socket): CtlRequest -> CtlReply
Either direction: Error, the answer to a frame that could not be accepted.
"""

from __future__ import annotations

from typing import Any

import attrs

from pvcluster.bus.codec import message


@message(1)
@attrs.frozen
class Error:
    kind: str  # stable slug: "malformed", "unknown-type", "unknown-peer", "unexpected", ...
    detail: str
    ref_seq: int  # sequence number of the offending frame, -1 when it could not be read


@message(2)
@attrs.frozen
class Hello:
    pid: int


@message(3)
@attrs.frozen
class Build:
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


@message(4)
@attrs.frozen
class BuildResult:
    ok: bool
    error_code: str
    error: str
    entry: int
    start_info: int  # guest virtual address of start_info
    guest_os: str
    l2_mfn: int = 0  # the initial page directory, pinned by the hypervisor as Xen's builder pins it
    l1_mfns: list[int] = attrs.Factory(list)


@attrs.frozen
class Region:
    """A span of guest memory copied in for a hypercall. ``data`` is None when the span is not mapped."""

    addr: int
    length: int
    data: bytes | None
    writable: bool


@attrs.frozen
class HypercallReq:
    vcpu: int
    seq: int
    vt_ns: int
    nr: int
    args: list[int]
    regions: list[Region]


@attrs.frozen
class MemWrite:
    addr: int
    data: bytes


@attrs.frozen
class VcpuAction:
    """A change to a vCPU's state decided by the hypervisor and carried out by the domain process."""

    kind: str  # "up", "down", "block", "set_context"
    vcpu: int
    regs: dict[str, int]


@attrs.frozen
class HypercallResult:
    vcpu: int
    seq: int
    vt_ns: int  # virtual time at which the result lands in the vCPU
    value: int  # EAX, unsigned 32-bit
    writes: list[MemWrite]
    actions: list[VcpuAction]
    complete: bool  # False: apply writes and actions, but the vCPU keeps waiting (blocked, taken down)


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


@message(5)
@attrs.frozen
class Window:
    index: int
    end_ns: int
    results: list[HypercallResult]
    run: list[int] = attrs.Factory(list)  # the vCPUs that hold a physical CPU in this window
    irqs: list[Ipi] = attrs.Factory(list)  # interrupts to take, each no earlier than its vt_ns
    # actions decided outside this domain's own hypercalls (interdomain events, peers closing, timers, poll
    # timeouts), each with its arrival time in regs["vt_ns"]; applied before the vCPUs run
    events: list[VcpuAction] = attrs.Factory(list)


@message(6)
@attrs.frozen
class WindowDone:
    index: int
    vcpus: list[VcpuReport]
    hypercalls: list[HypercallReq]
    faults: list[VcpuFault]
    ipis: list[Ipi] = attrs.Factory(list)


@message(7)
@attrs.frozen
class Stop:
    reason: str


@message(20)
@attrs.frozen
class CtlRequest:
    cmd: str
    args: dict[str, Any]


@message(21)
@attrs.frozen
class CtlReply:
    ok: bool
    data: Any
    error: str

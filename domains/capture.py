"""A domain process's state, captured between two windows and restored into a fresh process (save, restore, migrate).

What a domain process holds that the simulation depends on:

* guest memory: the ``GuestRam`` buffer (RAM and the hypervisor's frames after it), read by the hypervisor in chunks
  (``ReadRam``) and sent back the same way (``RestoreRam``);
* each vCPU's CPU: Unicorn's saved context (``uc.context_save``: QEMU's CPU state, control registers, segment
  caches, the FPU). The bytes of a saved context are a small header (its size, mode, arch, and a pointer of the
  process that saved it) and then the CPU state, which holds no pointer; so restoring copies the CPU state into a
  context saved from the new instance, keeping that instance's own header;
* each vCPU's clock and counts, kept in the C block hook's state (``domains/blockhook.py``): the numeric fields
  only (the pointers in it belong to the process);
* the Python side of each vCPU and of the process (trap in flight, pending interrupts, trap table, upcall and poll
  state, ptwr emulation in flight, the link receiver's duplicates, deliveries held over a sub-step, ...): every
  attribute but the wiring (RAM, Unicorn, the hook, callbacks, sockets, the log), pickled, and on restore checked
  against the attributes a fresh object has (same names, same types) before it is put in place.

Caches are not state: the C hook's block table and capstone's counts are recomputed on a miss, with the same
result. Unicorn's TLB is not in a saved context: a restored vCPU starts with an empty TLB, as after a full flush
(a stale translation held at the boundary is not carried over; README "Save, restore and migrate").
"""

from __future__ import annotations

import ctypes
import hashlib
from typing import TYPE_CHECKING, Any

import zmq

from domains.builder import build_domain
from domains.elf_load import ImageError
from domains.vcpu import Vcpu, flat_gdt
from pvcluster import statepickle
from pvcluster.abi.xen import PAGE_SIZE
from pvcluster.bus import codec
from pvcluster.bus.messages import CapturedState, CaptureState, RamChunk, ReadRam, Restore, Restored, RestoreRam

if TYPE_CHECKING:
    from domains.runtime import DomainProcess

FORMAT = 1
# The process's wiring: live objects, rebuilt by the new process, never pickled.
# The debugger's breakpoints and steps belong to a gdb session, which a save or a migration does not carry; the
# extensions' copy-in descriptors are rebuilt from the Build the new process is given.
_PROC_WIRING = frozenset({"conn", "log", "flush_trace", "exit_now", "ram", "boot", "vcpus", "answers", "parent",
                          "spawned", "debugger", "_ext_copyin"})
_VCPU_WIRING = frozenset({"ram", "counter", "uc", "_hook", "_st", "_rom", "mark_sink", "irq_sink", "ipi_sink"})
# The C hook's numbers that are simulation state (the rest are pointers and memos of this process).
HOOK_FIELDS = ("clock_ps", "end_ps", "instructions", "misses", "unreadable", "block_addr", "block_ps", "base_ps",
               "tsc_reads", "tsc_priced")
# How long a restored process waits for its memory to arrive (wall clock: only a dead hypervisor makes it wait).
RESTORE_WAIT_S = 120.0


class RestoreError(Exception):
    """The state sent to this process cannot be restored (malformed, or not this domain's)."""


def register(proc: DomainProcess) -> None:
    """What this module answers between windows (``DomainProcess.answers``)."""
    proc.answers[CaptureState] = lambda req: capture(proc)
    proc.answers[ReadRam] = lambda req: read_ram(proc, req)


# -- capture ------------------------------------------------------------------------------------------------------


def _cpu_context(vcpu: Vcpu) -> bytes:
    return bytes(vcpu.uc.context_save())


def capture(proc: DomainProcess) -> CapturedState:
    ram = proc.memory
    state = {
        "format": FORMAT,
        "domid": proc.domid,
        "name": proc.name,
        "memory_bytes": ram.nr_pages * PAGE_SIZE,
        "virt_base": ram.virt_base,
        "pae": ram.pae,
        "ram_size": ram.size,
        "proc": {k: v for k, v in vars(proc).items() if k not in _PROC_WIRING},
        "vcpus": [
            {
                "attrs": {k: v for k, v in vars(vcpu).items() if k not in _VCPU_WIRING},
                "hook": {f: int(getattr(vcpu._st, f)) for f in HOOK_FIELDS},
                "cpu": _cpu_context(vcpu),
            }
            for vcpu in proc.vcpus
        ],
    }
    proc.trace("domain.captured", hostdep=True)
    return CapturedState(state=statepickle.dumps(state), ram_size=ram.size,
                         ram_sha256=hashlib.sha256(ram.buf).digest())


def read_ram(proc: DomainProcess, req: ReadRam) -> RamChunk:
    ram = proc.memory
    if not (0 <= req.offset <= ram.size and 0 < req.length <= statepickle.CHUNK_BYTES):
        raise ValueError(f"bad range {req.offset}+{req.length} of {ram.size} bytes")
    return RamChunk(offset=req.offset, data=ram.read_pa(req.offset, min(req.length, ram.size - req.offset)))


# -- restore --------------------------------------------------------------------------------------------------------


def receive(proc: DomainProcess, req: Restore) -> Restored:
    """After a Restore: take the RestoreRam chunks that follow, then restore. The answer to send."""
    sock = proc.conn.sock
    ram = bytearray(req.ram_size) if 0 < req.ram_size <= (4 << 30) else None
    got = 0
    while ram is not None and got < len(ram):
        if not sock.poll(int(RESTORE_WAIT_S * 1000)):
            return Restored(ok=False, error=f"memory did not arrive within {RESTORE_WAIT_S:g} s")
        try:
            body = codec.decode(sock.recv_multipart(zmq.NOBLOCK)[-1]).body
        except codec.FrameError as exc:
            return Restored(ok=False, error=f"bad frame while restoring: {exc}")
        if not isinstance(body, RestoreRam) or body.offset != got or got + len(body.data) > len(ram):
            return Restored(ok=False, error=f"unexpected {type(body).__name__} while restoring memory")
        ram[got : got + len(body.data)] = body.data
        got += len(body.data)
    try:
        if ram is None:
            raise RestoreError(f"bad memory size {req.ram_size}")
        if hashlib.sha256(ram).digest() != req.ram_sha256:
            raise RestoreError("memory does not match its checksum")
        restore(proc, req, bytes(ram))
    except (RestoreError, statepickle.StateError) as exc:
        return Restored(ok=False, error=str(exc)[:400])
    return Restored(ok=True)


def _checked(fresh: dict[str, Any], saved: Any, what: str, wiring: frozenset[str]) -> dict[str, Any]:
    """``saved`` attributes, each one a fresh object has (its wiring aside), of the same type (None stands for
    any)."""
    if not isinstance(saved, dict):
        raise RestoreError(f"{what}: not a mapping")
    for key, value in saved.items():
        if key not in fresh or key in wiring:
            raise RestoreError(f"{what}: unknown attribute {str(key)[:40]!r}")
        old = fresh[key]
        if old is not None and value is not None and type(old) is not type(value):
            raise RestoreError(f"{what}.{key}: {type(value).__name__}, expected {type(old).__name__}")
    return saved


def _load_context(vcpu: Vcpu, saved: Any) -> None:
    ctx = vcpu.uc.context_save()
    mine = bytes(ctx)
    if not isinstance(saved, bytes) or len(saved) != len(mine):
        raise RestoreError(f"vCPU {vcpu.vid}: a CPU context of another size (another Unicorn build?)")
    header = len(mine) - int.from_bytes(mine[:8], "little")  # uc_context: size_t context_size first, data last
    if not 0 < header <= 64:
        raise RestoreError("cannot tell this Unicorn's context layout")
    address = ctypes.cast(ctx.context, ctypes.c_void_p).value
    assert address is not None
    ctypes.memmove(address + header, saved[header:], len(saved) - header)
    vcpu.uc.context_restore(ctx)


def restore(proc: DomainProcess, req: Restore, ram_bytes: bytes) -> None:
    """Put the saved state in place in this (new) process: memory, vCPUs (CPU, clock, Python state), the process's
    own state. Everything is checked before anything is used."""
    state = statepickle.loads(req.state, modules=statepickle.DOMAIN_MODULES)
    b = req.build
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise RestoreError("not a domain state of this format")
    if state.get("domid") != b.domid or state.get("name") != b.name:
        raise RestoreError(f"the state is domain {state.get('domid')!r}'s, not {b.domid}'s")
    vstates = state.get("vcpus")
    if not isinstance(vstates, list) or len(vstates) != b.vcpus:
        raise RestoreError("the state's vCPUs do not match the domain's")
    memory_bytes, virt_base, pae = state.get("memory_bytes"), state.get("virt_base"), state.get("pae")
    if memory_bytes != b.memory_bytes or not isinstance(virt_base, int) or not isinstance(pae, bool):
        raise RestoreError("the state's memory does not match the domain's")
    # The vCPUs are made as the build makes them, over the build's memory (a new vCPU loads its segments through
    # the builder's page tables); then the saved memory and CPU state replace the build's.
    try:
        ram, boot = build_domain(b)
    except ImageError as exc:
        raise RestoreError(f"the domain's kernel cannot be loaded here: {exc.code}: {exc.message}") from None
    if (ram.nr_pages * PAGE_SIZE, ram.virt_base, ram.pae) != (memory_bytes, virt_base, pae):
        raise RestoreError("the state's memory layout is not the one its kernel builds")
    if ram.size != len(ram_bytes) or ram.size != state.get("ram_size"):
        raise RestoreError(f"memory of {len(ram_bytes)} bytes for a domain of {ram.size}")
    ram.write_pa(ram.gdt_paddr, flat_gdt())
    vcpus = proc.make_vcpus(b, ram, boot.cr3)
    ram.buf[:] = ram_bytes
    proc_attrs = _checked(vars(proc), state.get("proc"), "process", _PROC_WIRING)
    checked = []
    for vcpu, vs in zip(vcpus, vstates, strict=True):
        if not isinstance(vs, dict):
            raise RestoreError(f"vCPU {vcpu.vid}: not a mapping")
        hook = vs.get("hook")
        if not isinstance(hook, dict) or set(hook) != set(HOOK_FIELDS) or not all(
                isinstance(v, int) and 0 <= v < 1 << 64 for v in hook.values()):
            raise RestoreError(f"vCPU {vcpu.vid}: bad clock state")
        attrs = _checked(vars(vcpu), vs.get("attrs"), f"vcpu{vcpu.vid}", _VCPU_WIRING)
        checked.append((vcpu, attrs, hook, vs.get("cpu")))
    for vcpu, attrs, hook, cpu in checked:
        _load_context(vcpu, cpu)
        vars(vcpu).update(attrs)
        for f, v in hook.items():
            setattr(vcpu._st, f, v)
        vcpu._st.cr3_known = 0
    vars(proc).update(proc_attrs)
    proc.ram, proc.vcpus = ram, vcpus
    proc.trace("domain.restored", hostdep=True)

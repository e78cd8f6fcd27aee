"""Dumping a domain: an ELF core of its memory and vCPUs (pvcluster/coredump.py), written by the hypervisor.

``dump_domain`` holds the cluster at the next window boundary (hypervisor/boundary.py), so the domain's process is
idle with its state exactly as of that virtual time, asks it for every vCPU's registers and for the RAM vCPU 0's
page tables map (runs of contiguous pages), then streams that memory into the file in chunks of at most
``CHUNK`` (a bus frame is at most 4 MiB), and lets the clock go on. Virtual time does not move while it dumps, so
the simulation's trace is the one it would have been without the dump, plus ``dump.paused`` / ``dump.resumed``.
A domain about to be ended (kdump, ``on_crash = "coredump-*"``) is dumped the same way, as long as its process is
still alive.

The file: ``path`` must be absolute (the toolstack resolves it); it is created with mode 0600 and never follows a
symlink. An existing file is refused unless ``force``, which replaces it (the new core is written beside it and
renamed over it, so a failed dump never leaves half a file under the name asked for). A requester other than the
hypervisor's own user (a toolstack key on tcp) must be able to write into the directory, by its permission bits,
as for kernel files (hypervisor/kernel_files.py).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypervisor.boundary import AskError
from hypervisor.domain import DomainState
from hypervisor.kernel_files import Requester
from pvcluster.bus.messages import DebugData, DebugMaps, DebugMapsReq, DebugRead, DebugRegs, DebugRegsReq
from pvcluster.coredump import CoreError, CoreSegment, CoreThread, core_layout
from pvcluster.gdbregs import GDB_REGS

if TYPE_CHECKING:
    from hypervisor.domain import Domain
    from hypervisor.shell import HypervisorProcess

CHUNK = 1 << 20
_WRITE_DIR = (stat.S_IWUSR | stat.S_IXUSR, stat.S_IWGRP | stat.S_IXGRP, stat.S_IWOTH | stat.S_IXOTH)


class DumpError(Exception):
    """The dump was not written (a path refused, a domain without a process, a file that could not be written)."""


def check_path(path: Path, force: bool, requester: Requester | None = None) -> None:
    if not path.is_absolute():
        raise DumpError(f"dump {path}: must be an absolute path")
    parent = path.parent
    try:
        st = os.stat(parent)
    except OSError as exc:
        raise DumpError(f"dump {path}: directory {parent}: {exc.strerror or 'cannot be examined'}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DumpError(f"dump {path}: {parent} is not a directory")
    if requester is not None and not requester.may(st, _WRITE_DIR):
        raise DumpError(f"dump {path}: user {requester.name} may not write in {parent}")
    if os.path.lexists(path):
        if not force:
            raise DumpError(f"dump {path}: the file exists (--force replaces it)")
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise DumpError(f"dump {path}: exists and is not a regular file")


def threads_of(regs: DebugRegs) -> list[CoreThread]:
    return [CoreThread(tid=v.vcpu + 1, regs=dict(zip(GDB_REGS, v.regs, strict=True))) for v in regs.vcpus
            if len(v.regs) == len(GDB_REGS)]


async def dump_domain(hvp: HypervisorProcess, dom: Domain, path: Path, force: bool = False,
                      requester: Requester | None = None) -> dict[str, Any]:
    """Write ``dom``'s core to ``path``; returns what was written (path, bytes, segments, vcpus, vt_ns). Holds the
    cluster at a window boundary meanwhile (DumpError when the dump cannot be made; the cluster goes on)."""
    check_path(path, force, requester)
    if dom.state is DomainState.BUILDING:
        raise DumpError(f"domain {dom.domid} ({dom.name}) is still being built: nothing to dump yet")
    if not dom.alive or not dom.identity:
        raise DumpError(f"domain {dom.domid} ({dom.name}) is {dom.state.value}: no process holds its memory")
    async with hvp.boundary.held() as vt_ns:
        return await _dump(hvp, dom, path, force, vt_ns, ending=False)


async def dump_ending(hvp: HypervisorProcess, dom: Domain, path: Path) -> dict[str, Any]:
    """The toolstack's core dump of a domain that has just ended (``on_crash = "coredump-*"``, kdump), before its
    process is ended: it takes part in no window any more, so its process, idle once its last report is in, is asked
    without holding the cluster. The core's virtual time is the domain's end."""
    if not dom.identity:
        raise DumpError(f"domain {dom.domid} ({dom.name}) has no process: its memory is gone")
    check_path(path, True)
    vt_ns = dom.ended_vt if dom.ended_vt is not None else hvp.core.clock.now_ns
    return await _dump(hvp, dom, path, True, vt_ns, ending=True)


async def _dump(hvp: HypervisorProcess, dom: Domain, path: Path, force: bool, vt_ns: int,
                ending: bool) -> dict[str, Any]:
    dom.trace.event("dump.paused", vt_ns=vt_ns, file=str(path))
    size = 0
    try:
        regs = await hvp.boundary.ask(dom, DebugRegsReq(), DebugRegs, ending=ending)
        maps = await hvp.boundary.ask(dom, DebugMapsReq(vcpu=0), DebugMaps, ending=ending)
        segments = [CoreSegment(r.vaddr, r.paddr, r.size, r.writable) for r in maps.runs]
        head, _ = core_layout(threads_of(regs), segments, dom.name, f"{dom.spec.kernel} {dom.spec.cmdline}")
        size = await _write(hvp, dom, path, head, segments, force, ending)
    except (AskError, CoreError, OSError) as exc:
        dom.trace.warning("dump.failed", vt_ns=vt_ns, file=str(path), error=str(exc)[:400])
        raise DumpError(f"dump of domain {dom.domid} ({dom.name}) failed: {exc}") from None
    finally:
        dom.trace.event("dump.resumed", vt_ns=vt_ns, file=str(path), size=size)
    return {"dom": dom.domid, "name": dom.name, "path": str(path), "size": size, "vt_ns": vt_ns,
            "vcpus": len(regs.vcpus), "segments": len(segments)}


async def _write(hvp: HypervisorProcess, dom: Domain, path: Path, head: bytes, segments: list[CoreSegment],
                 force: bool, ending: bool) -> int:
    """Stream the core into a new file beside ``path`` and rename it over ``path`` (without ``force``, link it
    there: a file that appeared meanwhile is not replaced); the bytes written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(head)
            for seg in segments:
                for off in range(0, seg.size, CHUNK):
                    n = min(CHUNK, seg.size - off)
                    got = await hvp.boundary.ask(dom, DebugRead(0, seg.paddr + off, n, physical=True), DebugData,
                                                   ending=ending)
                    if got.data is None or len(got.data) != n:
                        raise OSError(f"guest-physical {seg.paddr + off:#x} (+{n}) could not be read")
                    fh.write(got.data)
            size = fh.tell()
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return size

"""Save, restore and migrate: the hypervisor's side.

All three happen at a window boundary, with the cluster held there (``hypervisor/boundary.py``): every domain
process is idle between two windows, and virtual time does not move while held, so what is saved (or moved) is the
simulation exactly as that boundary has it, and nothing an operation does changes a virtual-time trace (its own
events are marked ``hostdep``: which process runs a domain, and where, is the host's business).

* **save**: each domain process is asked for its state (``CaptureState``) and its memory (``ReadRam`` chunks:
  domains/capture.py); the core (``Hypervisor``: domains, vCPU run states, timers, event channels, queued
  deliveries and held results, scheduler, clock, fault plan, random streams, trace buckets) is pickled whole, with
  its live objects left out by ``persistent_id`` (the loggers, the shell's fault recorder; the frame-ownership
  lambdas a ``Domain`` rebuilds itself). With the trace files' sizes at that boundary, all of it goes into the save
  file (pvcluster/savefile.py).
* **restore**: a new hypervisor process loads the core from the file (``load_core``) in place of a new one; each
  domain that had a process gets a new one (started here, or joining from elsewhere for a remote domain), whose
  Hello is answered with ``Restore`` and its memory in ``RestoreRam`` chunks instead of a Build; the clock is held
  until every one has answered ``Restored``.
* **migrate**: one domain's state and memory are captured the same way, a new process joins as it (started here,
  or with ``--to HOST`` one started on HOST by ``pvcluster join``, which the migration takes only from that host)
  and is restored; only then is the old process told to leave (``Retire``), so a failed migration leaves the domain
  where it was. Deliveries meanwhile stay queued in the core, and the domain is in no window while held: its peers
  see nothing.

A joining process is not bound to its domain until it answered ``Restored``: until then it is a ``Joiner`` of this
module, which the shell asks first about any frame from a peer that is no domain's (``Joiners.take``).
"""

from __future__ import annotations

import hashlib
import os
import random
import time
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from hypervisor.boundary import AskError
from hypervisor.clock import Clock
from hypervisor.core import Hypervisor, RunWall
from hypervisor.domain import Domain, DomainState, DomainTable
from hypervisor.evtchn import EvtchnTable
from hypervisor.extensions import load_extensions
from hypervisor.faults import FaultPlan
from hypervisor.hypercalls import FAMILIES
from hypervisor.link import Link
from hypervisor.pagetypes import Frames
from hypervisor.scheduler import Scheduler
from hypervisor.tracing import DomainTrace
from hypervisor.vcpu import Vcpu
from pvcluster import savefile, statepickle
from pvcluster.bus.messages import (
    CapturedState,
    CaptureState,
    Hello,
    RamChunk,
    ReadRam,
    Restore,
    Restored,
    RestoreRam,
    Retire,
)
from pvcluster.spec import ClusterSpec, DomainSpec
from pvcluster.trace.log import TraceLogger

if TYPE_CHECKING:
    from hypervisor.shell import HypervisorProcess

# The shell's methods the core may hold (FaultPlan.on_record): put back as the new shell's.
_SHELL_METHODS = frozenset({"_record_fault"})
# Callables inside a Domain that it rebuilds itself (Domain.__attrs_post_init__: its frames' ownership checks).
_REBUILT = frozenset({"Domain.__attrs_post_init__.<locals>.<lambda>"})


_RUNS = (DomainState.RUNNING, DomainState.PAUSED)


class SaveError(Exception):
    """The cluster cannot be saved (or the domain migrated) now, and why."""


@attrs.define
class DomainImage:
    """One domain process's state and memory, as captured at a boundary."""

    state: bytes
    ram: bytes
    ram_sha256: bytes


# -- capturing -----------------------------------------------------------------------------------------------------


async def capture_domain(hvp: HypervisorProcess, dom: Domain, reason: str) -> DomainImage:
    """``dom``'s process's state and memory. Only while held. SaveError if the process does not give them."""
    try:
        cap = await hvp.boundary.ask(dom, CaptureState(reason=reason), CapturedState)
        if not 0 < cap.ram_size <= savefile.MAX_IMAGE_BYTES:
            raise SaveError(f"domain {dom.domid}'s process reports {cap.ram_size} bytes of memory")
        ram = bytearray()
        while len(ram) < cap.ram_size:
            length = min(statepickle.CHUNK_BYTES, cap.ram_size - len(ram))
            chunk = await hvp.boundary.ask(dom, ReadRam(offset=len(ram), length=length), RamChunk)
            if chunk.offset != len(ram) or len(chunk.data) != length:
                raise SaveError(f"domain {dom.domid}'s process sent memory at {chunk.offset}, not {len(ram)}")
            ram += chunk.data
    except AskError as exc:
        raise SaveError(str(exc)) from None
    if hashlib.sha256(ram).digest() != cap.ram_sha256:
        raise SaveError(f"domain {dom.domid}'s memory did not arrive as its process hashed it")
    return DomainImage(cap.state, bytes(ram), cap.ram_sha256)


def _persistent_id(hvp: HypervisorProcess, dropped: list[str]) -> Any:
    def persistent_id(obj: Any) -> Any:
        if obj is hvp.core.extensions:  # modules and their handlers: loaded again from the spec on restore
            return ("extensions",)
        if isinstance(obj, TraceLogger):
            return ("log", dict(obj._context))
        if isinstance(obj, types.MethodType) and obj.__self__ is hvp and obj.__name__ in _SHELL_METHODS:
            return ("shell", obj.__name__)
        if isinstance(obj, types.FunctionType | types.MethodType | types.BuiltinFunctionType):
            if obj.__qualname__ in _REBUILT:
                return ("rebuilt", obj.__qualname__)
            dropped.append(obj.__qualname__)
            return ("dropped", obj.__qualname__)
        return None
    return persistent_id


def check_savable(core: Hypervisor) -> None:
    """What a save (or migration) cannot carry, refused with the reason: a domain still building (its process has
    not got its Build yet), a fault whose end is still to come (its undo is code)."""
    building = [d.name for d in core.domains if d.state is DomainState.BUILDING]
    if building:
        raise SaveError(f"domain(s) {', '.join(building)} still building: save once they run")
    ending = [p.fid for p in core.faults.pending if p.undo is not None]
    if ending:
        raise SaveError(f"fault(s) {', '.join(map(str, ending))} have not ended yet: save after they end")


def pickle_core(hvp: HypervisorProcess) -> bytes:
    dropped: list[str] = []
    blob = statepickle.dumps(hvp.core, _persistent_id(hvp, dropped))
    if dropped:
        raise SaveError(f"the hypervisor's state holds code that cannot be saved: {', '.join(sorted(set(dropped)))}")
    return blob


def _trace_sizes(run_dir: Path) -> dict[str, int]:
    trace = run_dir / "trace"
    return {p.name: p.stat().st_size for p in sorted(trace.glob("*.jsonl")) if p.is_file()}


async def save(hvp: HypervisorProcess, path: Path, at_ns: int | None, wait_s: float) -> dict[str, Any]:
    """Hold the cluster at the next boundary (at or after virtual time ``at_ns``), save it to ``path``."""
    wall = time.monotonic()
    core = hvp.core
    async with hvp.boundary.held(at_ns=at_ns, wait_s=wait_s) as vt_ns:
        check_savable(core)
        held_wall = time.monotonic()
        # the domains whose processes run windows; one shutting down has been told to stop, and its process exits
        # on its own (a restore takes it for exited: restore_domains)
        domains = {d.domid: await capture_domain(hvp, d, "save")
                   for d in core.domains if d.state in _RUNS and d.identity}
        blob = pickle_core(hvp)
        hvp.flush_trace()  # every event up to this boundary is in the files whose sizes are saved
        faults = hvp.run_dir / "faults.jsonl"
        image = {
            "format": savefile.FORMAT_VERSION,
            "vt_ns": vt_ns,
            "window": core.clock.index,
            "spec": core.spec.to_dict(),
            "run_dir": str(hvp.run_dir),
            "hypervisor": blob,
            "domains": {domid: attrs.asdict(d) for domid, d in domains.items()},
            "traces": _trace_sizes(hvp.run_dir),
            "faults_bytes": faults.stat().st_size if faults.exists() else 0,
        }
        size = await trio.to_thread.run_sync(savefile.write, path, image)
        held_s = time.monotonic() - held_wall
    core.printk(f"saved to {path} at {vt_ns} ns ({size} bytes, {len(domains)} domain processes)", hostdep=True)
    return {"path": str(path), "vt_ns": vt_ns, "window": image["window"], "bytes": size,
            "domains": sorted(domains), "held_s": round(held_s, 4), "wall_s": round(time.monotonic() - wall, 4)}


# -- restoring the core -------------------------------------------------------------------------------------------


def load_core(image: dict[str, Any], log: Any, hvp: HypervisorProcess) -> Hypervisor:
    """The saved core, with this process's loggers and shell in place of the saved one's. ValueError if the
    image's core is not a Hypervisor."""
    sink = log

    def persistent_load(token: Any) -> Any:
        if not isinstance(token, tuple) or not token or not isinstance(token[0], str):
            raise statepickle.StateError("malformed live-object reference")
        kind = token[0]
        if kind == "log" and len(token) == 2 and isinstance(token[1], dict):
            context = {k: v for k, v in token[1].items() if k != "proc"}
            return sink.bind(**context)
        if kind == "shell" and len(token) == 2 and token[1] in _SHELL_METHODS:
            return getattr(hvp, token[1])
        if kind == "extensions" and len(token) == 1:
            return None  # loaded again from the spec below
        if kind == "rebuilt" and len(token) == 2 and token[1] in _REBUILT:
            return None  # Domain.__attrs_post_init__ puts it back
        raise statepickle.StateError(f"unknown live-object reference {str(token)[:80]}")

    core = statepickle.loads(image["hypervisor"], persistent_load, statepickle.HYPERVISOR_MODULES)
    check_core(core, image)
    core.log = log
    core.extensions = load_extensions(core.spec.extensions, FAMILIES.keys())
    core.run_wall = RunWall()
    core.outbox, core.to_kill, core.signals = [], [], []
    for dom in core.domains:
        dom.__attrs_post_init__()
        core.domains.forget_identity(dom)
        dom.identity = b""
    return core


def check_core(core: Any, image: dict[str, Any]) -> None:
    """The loaded core's shape: its parts and each domain's of the classes the simulation runs on, the spec the one
    the image names. (Only allowed classes can be in it at all: statepickle.) StateError if not."""
    def need(value: Any, cls: type | tuple[type, ...], what: str) -> None:
        if not isinstance(value, cls):
            raise statepickle.StateError(f"the saved hypervisor state's {what} is a {type(value).__name__}")

    need(core, Hypervisor, "core")
    parts: tuple[tuple[str, type], ...] = (("domains", DomainTable), ("clock", Clock), ("scheduler", Scheduler),
                                           ("faults", FaultPlan), ("spec", ClusterSpec), ("dmesg", list))
    for attr, cls in parts:
        need(getattr(core, attr, None), cls, attr)
    if core.spec.to_dict() != image["spec"]:
        raise statepickle.StateError("the saved hypervisor state's spec is not the image's")
    for dom in core.domains:
        need(dom, Domain, "domain")
        dom_parts: tuple[tuple[str, type], ...] = (
            ("domid", int), ("name", str), ("vcpus", list), ("state", DomainState), ("evtchn", EvtchnTable),
            ("frames", Frames), ("link", Link), ("rng", random.Random), ("trace", DomainTrace), ("spec", DomainSpec))
        for attr, cls in dom_parts:
            need(getattr(dom, attr, None), cls, f"domain {dom.domid!r}'s {attr}")
        if core.domains.get(dom.domid) is not dom or not dom.vcpus or not all(isinstance(v, Vcpu) for v in dom.vcpus):
            raise statepickle.StateError(f"the saved domain {dom.domid} is malformed")


# -- joiners: processes that join as a restored or migrating domain ---------------------------------------------


@attrs.define(eq=False)
class Joiner:
    dom: Domain
    image: DomainImage
    host: str | None  # only a process whose Hello says this host (migrate --to HOST); None: any
    identity: bytes = b""
    hello: Hello | None = None
    joined: trio.Event = attrs.Factory(trio.Event)
    answer: Restored | None = None
    answered: trio.Event = attrs.Factory(trio.Event)
    proc: Any = None  # the local process started for it (subprocess.Popen), if any


class Joiners:
    """The domains waiting for a process to join and take their saved state, by domain name."""

    def __init__(self, hvp: HypervisorProcess) -> None:
        self.hvp = hvp
        self.waiting: dict[str, Joiner] = {}

    def expect(self, dom: Domain, image: DomainImage, host: str | None) -> Joiner:
        if dom.name in self.waiting:
            raise SaveError(f"domain {dom.name} is already waiting for a process")
        joiner = self.waiting[dom.name] = Joiner(dom, image, host)
        return joiner

    def failed(self, joiner: Joiner, why: str) -> None:
        """``joiner`` will not restore (its process could not start, or exited): whoever waits learns why."""
        if joiner.answer is None:
            joiner.answer = Restored(ok=False, error=why)
        joiner.joined.set()
        joiner.answered.set()

    def exited(self, proc: Any, rc: int) -> None:
        """A local process that was no domain's exited: if a joiner waited on it, it failed."""
        for joiner in self.waiting.values():
            if joiner.proc is proc:
                self.failed(joiner, f"its process exited with code {rc}")

    def forget(self, joiner: Joiner) -> None:
        if self.waiting.get(joiner.dom.name) is joiner:
            del self.waiting[joiner.dom.name]

    def take(self, identity: bytes, body: Any, key_domain: str | None, address: str = "") -> bool:
        """A frame from a peer that is no domain's: True if it was a joiner's (its Hello, or its Restored).
        ``address``: on tcp, the peer's address. A migration to HOST takes a process whose Hello names HOST as its
        host, or that connected from HOST's address."""
        for joiner in self.waiting.values():
            if joiner.identity == identity:
                if isinstance(body, Restored) and joiner.answer is None:
                    joiner.answer = body
                    joiner.answered.set()
                return True
        if not isinstance(body, Hello):
            return False
        claimed = self.waiting.get(body.name[:64])
        if claimed is None or claimed.identity:
            return False
        joiner = claimed
        if key_domain is not None and key_domain != joiner.dom.name:
            return False  # the claim then fails as any other would
        host = body.host[:255]
        if joiner.host is not None and joiner.host not in (host, address):
            self.hvp.log.warning("domain.join_refused", vt_ns=self.hvp.core.clock.now_ns, name=joiner.dom.name,
                                 pid=body.pid, host=host, address=address, kind="refused",
                                 reason=f"the migration waits for a process on {joiner.host}")
            return False
        joiner.identity, joiner.hello = identity, body
        joiner.joined.set()
        return True


async def _hand_over(hvp: HypervisorProcess, joiner: Joiner, timeout_s: float) -> None:
    """Wait (``timeout_s`` at most) for ``joiner``'s process, send it the domain's state and memory, and wait for its
    Restored. SaveError if it does not come, or cannot restore."""
    dom = joiner.dom
    with trio.move_on_after(timeout_s):
        await joiner.joined.wait()
    if not joiner.joined.is_set():
        where = f" from {joiner.host}" if joiner.host else ""
        raise SaveError(f"no process joined as {dom.name}{where} within {timeout_s:g} s")
    if joiner.answer is not None:
        raise SaveError(f"the process started for {dom.name} failed: {joiner.answer.error}")
    image = joiner.image
    restore = Restore(build=hvp.core._build_message(dom), state=image.state, ram_size=len(image.ram),
                      ram_sha256=image.ram_sha256)
    sent = await hvp.send(joiner.identity, restore)
    for offset in range(0, len(image.ram), statepickle.CHUNK_BYTES):
        chunk = RestoreRam(offset=offset, data=image.ram[offset : offset + statepickle.CHUNK_BYTES])
        sent = sent and await hvp.send(joiner.identity, chunk)
    if not sent:
        raise SaveError(f"the process that joined as {dom.name} cannot be reached")
    with trio.move_on_after(hvp.unresponsive_s + 30.0):
        await joiner.answered.wait()
    if joiner.answer is None:
        raise SaveError(f"the process that joined as {dom.name} did not answer its restore")
    if not joiner.answer.ok:
        raise SaveError(f"the process that joined as {dom.name} could not restore: {joiner.answer.error}")


def _bind(hvp: HypervisorProcess, joiner: Joiner) -> None:
    """The joiner's process is now the domain's: frames under its identity are the domain's."""
    dom, hello = joiner.dom, joiner.hello
    assert hello is not None
    hvp.core.domains.bind(dom, joiner.identity)
    hvp.adopt(dom, joiner)
    dom.trace.event("domain.joined", vt_ns=hvp.core.clock.now_ns, pid=hello.pid, host=hello.host[:255],
                    placement=dom.spec.placement)


async def restore_domains(hvp: HypervisorProcess, image: dict[str, Any]) -> None:
    """A restored hypervisor's first act: a process for every domain that had one, each given its saved state,
    with the clock held until all are in (a domain whose process does not come, or cannot restore, is crashed).
    The hold is taken by the shell before any task runs, so no window opens before this: released here."""
    core = hvp.core
    try:
        joiners: list[Joiner] = []
        for stopped in core.domains:
            if stopped.state is DomainState.SHUTTING_DOWN and stopped.domid not in image["domains"]:
                core.process_exited(stopped, 0)  # it was told to stop before the save: its process has gone
        for domid, saved in sorted(image["domains"].items()):
            dom = core.domains.get(domid)
            if dom is None or dom.state not in _RUNS:
                continue
            joiner = hvp.joiners.expect(dom, DomainImage(saved["state"], saved["ram"], saved["ram_sha256"]), None)
            joiners.append(joiner)
            if dom.spec.placement == "local":
                hvp.start_process(dom, joiner)
            else:
                core.printk(f"d{dom.domid} ({dom.name}): restored, waiting for its process to join "
                            f"(`pvcluster join {dom.name} --endpoint {hvp.endpoints.bus}`)", dom=dom.domid,
                            hostdep=True)

        async def one(joiner: Joiner) -> None:
            try:
                await _hand_over(hvp, joiner, hvp.spec.hypervisor.join_timeout_s)
            except Exception as exc:  # SaveError, or a bug: this domain is not restored, the others go on
                await hvp.end_joiner(joiner)
                core.crash(joiner.dom, f"not restored: {exc}", exc=None if isinstance(exc, SaveError) else exc)
            else:
                _bind(hvp, joiner)
            finally:
                hvp.joiners.forget(joiner)

        async with trio.open_nursery() as nursery:
            for joiner in joiners:
                nursery.start_soon(one, joiner)
        await hvp.flush()
    finally:
        hvp.boundary.release()  # held since the shell started (HypervisorProcess.run)
    core.printk(f"restored {len(joiners)} domain processes; the clock goes on from {core.clock.now_ns} ns",
                hostdep=True)


# -- migrate ---------------------------------------------------------------------------------------------------------


async def migrate(hvp: HypervisorProcess, dom: Domain, host: str | None) -> dict[str, Any]:
    """Move ``dom`` to a new process (on ``host``: one started there by `pvcluster join`) at the next boundary."""
    wall = time.monotonic()
    core = hvp.core
    async with hvp.boundary.held() as vt_ns:
        if dom.state not in _RUNS or not dom.identity:
            raise SaveError(f"domain {dom.domid} ({dom.name}) is {dom.state.value}: only a running or paused "
                            f"domain with a process can migrate")
        check_savable(core)
        image = await capture_domain(hvp, dom, "migrate")
        captured_s = time.monotonic() - wall
        joiner = hvp.joiners.expect(dom, image, host)
        try:
            if host is None:
                hvp.start_process(dom, joiner)
            else:
                core.printk(f"d{dom.domid} ({dom.name}): migrating, waiting for a process on {host} "
                            f"(`pvcluster join {dom.name} --endpoint {hvp.endpoints.bus}` there)", dom=dom.domid,
                            hostdep=True)
            await _hand_over(hvp, joiner, hvp.spec.hypervisor.join_timeout_s)
            if not dom.alive or not dom.identity:  # its old process died meanwhile: the domain ended with it
                raise SaveError(f"domain {dom.name} ended while it was migrating ({dom.state.value})")
        except Exception:  # SaveError, or a bug (the control server answers it): the domain stays where it was
            await hvp.end_joiner(joiner)
            raise
        finally:
            hvp.joiners.forget(joiner)
        old = dom.identity
        hvp.retire(dom)
        await hvp.send(old, Retire())
        _bind(hvp, joiner)
        placement = "local" if host is None else "remote"
        if dom.spec.placement != placement:
            dom.spec = attrs.evolve(dom.spec, placement=placement)
        hello = joiner.hello
        assert hello is not None
        core.printk(f"d{dom.domid} ({dom.name}): migrated to process {hello.pid} on {hello.host[:64] or '?'} at "
                    f"{vt_ns} ns", dom=dom.domid, hostdep=True)
    return {"domid": dom.domid, "name": dom.name, "vt_ns": vt_ns, "host": hello.host[:255], "pid": hello.pid,
            "bytes": len(image.ram) + len(image.state), "capture_s": round(captured_s, 4),
            "wall_s": round(time.monotonic() - wall, 4)}


def trace_positions_ok(names: dict[str, int]) -> dict[str, int]:
    """The saved trace positions whose names are plain trace file names (nothing that leads out of trace/)."""
    return {n: size for n, size in names.items()
            if n.endswith(".jsonl") and os.path.basename(n) == n and not n.startswith(".")}

"""A domain (Xen's ``struct domain``) and the table of them: ids, socket identities and a checked life cycle.

Everything the hypervisor keeps about a domain hangs off its ``Domain``: its vCPUs (each with its run state and
timers), its event-channel table, its page-table pins, its random stream, its trace, and what is queued for its
next window (hypercall results, deliveries from elsewhere, IPIs). Dropping the domain drops all of it.
"""

from __future__ import annotations

import enum
import random
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs

from hypervisor import mm
from hypervisor.errors import IllegalTransition
from hypervisor.evtchn import EvtchnTable
from hypervisor.gnttab import GrantTable
from hypervisor.link import Link
from hypervisor.pagetypes import Frames
from hypervisor.tracing import DomainTrace
from hypervisor.vcpu import Vcpu
from pvcluster.abi.xen import ShutdownReason
from pvcluster.bus.messages import Delivery, HypercallResult, Ipi

if TYPE_CHECKING:
    from hypervisor.faults import Fault


@attrs.frozen
class KexecImage:
    """An image a guest loaded with kexec_op: the bytes its segments make (an ELF kernel, which the toolstack builds
    the next domain from), where the guest said its entry is, and how many segments it came in."""

    data: bytes
    entry_maddr: int
    segments: int


class DomainState(enum.Enum):
    BUILDING = "building"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting_down"
    CRASHED = "crashed"
    DEAD = "dead"


_S = DomainState
# Every legal move; anything else is a bug in the caller and raises IllegalTransition.
TRANSITIONS: dict[DomainState, frozenset[DomainState]] = {
    _S.BUILDING: frozenset({_S.RUNNING, _S.CRASHED, _S.SHUTTING_DOWN}),
    _S.RUNNING: frozenset({_S.PAUSED, _S.SHUTTING_DOWN, _S.CRASHED}),
    _S.PAUSED: frozenset({_S.RUNNING, _S.SHUTTING_DOWN, _S.CRASHED}),
    _S.SHUTTING_DOWN: frozenset({_S.DEAD, _S.CRASHED}),
    _S.CRASHED: frozenset({_S.DEAD}),
    _S.DEAD: frozenset(),
}
MAX_CONSOLE_LINES = 10_000
_DECIMAL = re.compile(r"[0-9]{1,9}")


@attrs.define(eq=False)
class Domain:
    domid: int
    name: str
    spec: Any  # pvcluster.spec.DomainSpec
    vcpus: list[Vcpu]
    trace: DomainTrace
    rng: random.Random
    faults: tuple[Fault, ...] = ()
    # The bus identity of the process that joined as this domain (Hypervisor.claim); empty until one has.
    identity: bytes = b""
    image: bytes = b""  # the kernel image the Build carries (empty: the domain process loads the kernel itself)
    # the modelled link to the domain's process, and the hypervisor bugs armed on it (kind -> strikes left)
    link: Link = attrs.Factory(lambda: Link(rto_ns=40_000, reorder_ns=10_000, rng=random.Random(0)))
    bugs: dict[str, int] = attrs.Factory(dict)
    bug_params: dict[str, int] = attrs.Factory(dict)
    state: DomainState = DomainState.BUILDING
    evtchn: EvtchnTable = attrs.Factory(EvtchnTable)
    frames: Frames = attrs.Factory(Frames)
    grant: GrantTable = attrs.Factory(GrantTable)
    vm_assist: int = 0  # the VMASST_TYPE_* bits the guest enabled (vm_assist)
    # kexec_op's loaded images by KEXEC_TYPE_* (hypervisor/hypercalls/kexec_op.py), and the type KEXEC_CMD_kexec
    # started (None: none): the shutdown it causes is then traced with reason "kexec"
    kexec_images: dict[int, KexecImage] = attrs.Factory(dict)
    kexec_started: int | None = None
    shutdown_reason: ShutdownReason | None = None
    crash_detail: str = ""
    console: list[str] = attrs.Factory(list)
    _partial_line: str = ""
    # The xenstore and console rings (hypervisor/backends.py): their ports and pages (0: none), and the console
    # backend's out_cons.
    store_port: int = 0
    console_port: int = 0
    store_mfn: int = 0
    console_mfn: int = 0
    console_cons: int = 0
    hello: bool = False
    joined: bool = False
    hypercalls: int = 0
    started_vt: int = 0
    ended_vt: int | None = None
    # Toolstack pauses nest, as Xen's controller_pause_count does (xen/common/domain.c): the domain runs again when
    # every pause has been matched by an unpause.
    pause_count: int = 0
    history: list[tuple[str, str]] = attrs.Factory(list)
    # What waits for the domain's next window.
    results: list[HypercallResult] = attrs.Factory(list)
    held_results: list[HypercallResult] = attrs.Factory(list)  # held back by the link until they arrive
    deliveries: list[Delivery] = attrs.Factory(list)
    ipis: list[Ipi] = attrs.Factory(list)
    # The last grid window the domain took part in, and its work budget in the window now open.
    events_sent: int = 0  # event-channel notifications sent to the domain: the next one's id (eid)
    last_window: int = -1
    last_activity: int | None = None
    work_left: int = 0
    # Per-domain state of the spec's hypercall extensions, one dict per extension family name (its handlers keep
    # nothing of their own: pvcluster/extensions.py).
    ext: dict[str, dict[str, Any]] = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        # what the frame types may hold references on: the domain's own RAM, and what a present L1 entry may map
        self.frames.owned = lambda mfn: mm.owned(self, mfn)
        self.frames.mappable = lambda mfn: mm.mappable(self, mfn)

    @property
    def nr_pages(self) -> int:
        """Frames the domain owns: machine frames 0 .. nr_pages-1 of its own RAM (an identity p2m). The frames
        just after them belong to the hypervisor: shared_info, the GDT, the grant table's (pvcluster.abi.platform)."""
        return int(self.spec.memory_mib) << 8

    @property
    def pae(self) -> bool:
        """A PAE guest (xen-3.0-x86_32p: 3-level tables, 64-bit entries), as its BuildResult said; the frame types
        keep the mode (``Frames.pae``), which every page-table hypercall reads."""
        return self.frames.pae

    @property
    def alive(self) -> bool:
        return self.state not in (DomainState.DEAD, DomainState.CRASHED)

    @property
    def running(self) -> bool:
        return self.state is DomainState.RUNNING and self.joined

    def move(self, new: DomainState, why: str) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"domain {self.domid} ({self.name}): {self.state.value} -> {new.value} ({why})")
        self.history.append((new.value, why))
        self.state = new

    @property
    def end_reason(self) -> str | None:
        """The shutdown reason as traced and listed: Xen's SHUTDOWN_* name, or "kexec" for a domain that kexec'd
        (Xen has no such reason; it is held internally as SHUTDOWN_soft_reset, the nearest: the domain asked for its
        toolstack to rebuild it)."""
        if self.shutdown_reason is None:
            return None
        if self.kexec_started is not None and self.shutdown_reason is ShutdownReason.soft_reset:
            return "kexec"
        return self.shutdown_reason.name

    def console_write(self, text: str) -> list[str]:
        """Append guest console output; return the lines it completed."""
        text = self._partial_line + text
        *done, self._partial_line = text.split("\n")
        self._partial_line = self._partial_line[-4096:]  # a line that never ends must not grow without bound
        self.console.extend(done)
        if len(self.console) > MAX_CONSOLE_LINES:  # a chatty guest must not grow the hypervisor without bound
            del self.console[: len(self.console) - MAX_CONSOLE_LINES]
        return done

    def take_deliveries(self, end_ns: int) -> list[Delivery]:
        """The deliveries due by ``end_ns``, in arrival order (stable for equal times)."""
        due = sorted((d for d in self.deliveries if d.vt_ns <= end_ns), key=lambda d: d.vt_ns)
        if due:
            self.deliveries = [d for d in self.deliveries if d.vt_ns > end_ns]
        return due

    def summary(self) -> dict[str, Any]:
        return {
            "domid": self.domid,
            "name": self.name,
            "state": self.state.value,
            "vcpus": len(self.vcpus),
            "vcpu_states": [v.runstate.value for v in self.vcpus],
            "shutdown_reason": self.end_reason,
            "crash": self.crash_detail,
            "hypercalls": self.hypercalls,
            "instructions": sum(v.instructions for v in self.vcpus),
            "started_vt_ns": self.started_vt,
            "ended_vt_ns": self.ended_vt,
            "backend": getattr(self.spec, "backend", ""),
            "boot": getattr(self.spec, "boot", ""),
            "cpus": list(getattr(self.spec, "cpus", ())),
            # what it still holds: a dead domain's are reclaimed
            "ports_open": len(self.evtchn.in_use()),
            "frames_pinned": len(self.frames.pinned),
        }


class DomainTable:
    """Domains by id and by the socket identity the hypervisor gave them; ids start at 1 (0 is dom0) and are
    never reused."""

    def __init__(self) -> None:
        self._by_id: dict[int, Domain] = {}
        self._by_identity: dict[bytes, Domain] = {}
        self._next = 1

    def next_domid(self) -> int:
        return self._next

    def add(self, dom: Domain) -> None:
        if dom.domid != self._next:
            raise IllegalTransition(f"domain id {dom.domid} is not the next one ({self._next})")
        if self.live_named(dom.name) is not None:
            raise ValueError(f"a domain named {dom.name!r} already exists")
        self._next += 1
        self._by_id[dom.domid] = dom
        if dom.identity:
            self._by_identity[dom.identity] = dom

    def bind(self, dom: Domain, identity: bytes) -> None:
        """``identity`` is now the bus peer of ``dom`` (its process joined)."""
        if not identity or identity in self._by_identity or dom.identity:
            raise IllegalTransition(f"identity {identity[:32]!r} cannot be bound to domain {dom.domid}")
        dom.identity = identity
        self._by_identity[identity] = dom

    def forget_identity(self, dom: Domain) -> None:
        self._by_identity.pop(dom.identity, None)

    def live_named(self, name: str) -> Domain | None:
        return next((d for d in self._by_id.values() if d.name == name and d.state is not DomainState.DEAD), None)

    def by_identity(self, identity: bytes) -> Domain | None:
        return self._by_identity.get(identity)

    def get(self, key: object) -> Domain | None:
        """A domain by id (an int, or a string of ASCII digits) or by name; None for anything else."""
        if isinstance(key, bool):
            return None
        if isinstance(key, int):
            return self._by_id.get(key)
        if not isinstance(key, str):
            return None
        if _DECIMAL.fullmatch(key):  # not str.isdigit: "²" is a digit to Python but no number
            return self._by_id.get(int(key))
        named = [d for d in self._by_id.values() if d.name == key]
        return next((d for d in named if d.state is not DomainState.DEAD), named[0] if named else None)

    def __iter__(self) -> Iterator[Domain]:
        # ``add`` takes ids in increasing order and nothing is removed, so insertion order is domid order; a copy,
        # so a domain created while a caller iterates does not change what it sees.
        return iter(list(self._by_id.values()))

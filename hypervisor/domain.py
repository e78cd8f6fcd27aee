"""The domain table: ids the hypervisor assigns, socket identities, and a checked life cycle."""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator
from typing import Any

import attrs

from pvcluster.abi.xen import ShutdownReason


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


class IllegalTransition(Exception):
    pass


@attrs.define
class VcpuInfo:
    vid: int
    initialised: bool = False
    up: bool = False
    state: str = "down"
    clock_ns: int = 0
    instructions: int = 0
    hypercalls: int = 0


@attrs.define
class Domain:
    domid: int
    name: str
    spec: Any  # pvcluster.spec.DomainSpec
    identity: bytes
    vcpus: list[VcpuInfo]
    state: DomainState = DomainState.BUILDING
    shutdown_reason: ShutdownReason | None = None
    crash_detail: str = ""
    console: list[str] = attrs.Factory(list)
    _partial_line: str = ""
    hello: bool = False
    joined_window: int | None = None
    hypercalls: int = 0
    started_vt: int = 0
    ended_vt: int | None = None
    history: list[tuple[str, str]] = attrs.Factory(list)

    @property
    def nr_pages(self) -> int:
        """Frames the domain owns: machine frames 0 .. nr_pages-1 of its own RAM (an identity p2m). The frame
        just after them holds shared_info and belongs to the hypervisor."""
        return int(self.spec.memory_mib) << 8

    @property
    def alive(self) -> bool:
        return self.state not in (DomainState.DEAD, DomainState.CRASHED)

    def move(self, new: DomainState, why: str) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"domain {self.domid} ({self.name}): {self.state.value} -> {new.value} ({why})")
        self.history.append((new.value, why))
        self.state = new

    def console_write(self, text: str) -> list[str]:
        """Append guest console output; return the lines it completed."""
        text = self._partial_line + text
        *done, self._partial_line = text.split("\n")
        self.console.extend(done)
        if len(self.console) > 10_000:  # a chatty guest must not grow the hypervisor without bound
            del self.console[: len(self.console) - 10_000]
        return done

    def summary(self) -> dict[str, Any]:
        return {
            "domid": self.domid,
            "name": self.name,
            "state": self.state.value,
            "vcpus": len(self.vcpus),
            "vcpu_states": [v.state for v in self.vcpus],
            "shutdown_reason": self.shutdown_reason.name if self.shutdown_reason is not None else None,
            "crash": self.crash_detail,
            "hypercalls": self.hypercalls,
            "instructions": sum(v.instructions for v in self.vcpus),
            "started_vt_ns": self.started_vt,
            "ended_vt_ns": self.ended_vt,
            "backend": getattr(self.spec, "backend", ""),
            "boot": getattr(self.spec, "boot", ""),
        }


class DomainTable:
    """Domains by id and by the socket identity the hypervisor gave them; ids start at 1 (0 is dom0)."""

    def __init__(self) -> None:
        self._by_id: dict[int, Domain] = {}
        self._by_identity: dict[bytes, Domain] = {}
        self._next = 1

    def create(self, spec: Any) -> Domain:
        if any(d.name == spec.name and d.state is not DomainState.DEAD for d in self._by_id.values()):
            raise ValueError(f"a domain named {spec.name!r} already exists")
        domid = self._next
        self._next += 1
        # The identity is a secret between the hypervisor and the process it launched: a process cannot
        # claim to be another domain by putting a different id in its messages.
        identity = b"dom%d-" % domid + os.urandom(8).hex().encode()
        dom = Domain(
            domid=domid,
            name=spec.name,
            spec=spec,
            identity=identity,
            vcpus=[VcpuInfo(v) for v in range(spec.vcpus)],
        )
        self._by_id[domid] = dom
        self._by_identity[identity] = dom
        return dom

    def by_identity(self, identity: bytes) -> Domain | None:
        return self._by_identity.get(identity)

    def get(self, key: int | str) -> Domain | None:
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            return self._by_id.get(int(key))
        return next((d for d in self._by_id.values() if d.name == key), None)

    def __iter__(self) -> Iterator[Domain]:
        return iter(sorted(self._by_id.values(), key=lambda d: d.domid))

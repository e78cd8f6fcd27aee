"""Typed trace records: what ``Run.records()`` yields, one frozen record per trace event (``docs/trace.md``).

Every record has ``vt_ns`` (virtual time; for an event without one, the time of the event before it in its file),
``proc`` (``hypervisor`` or ``domN``), ``dom`` and ``vcpu`` (None where they do not apply). Events the analysis
has no class for are ``Other`` records with the event's name and its remaining fields, so nothing is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs


@attrs.frozen(slots=True)
class Record:
    vt_ns: int
    proc: str
    dom: int | None
    vcpu: int | None


@attrs.frozen(slots=True)
class RunState(Record):
    """``vcpu.runstate`` (hypervisor): the vCPU is in ``state`` from ``vt_ns``; it was ``previous`` for
    ``duration_ns`` before."""

    state: str
    previous: str
    duration_ns: int
    why: str
    pcpu: int | None


@attrs.frozen(slots=True)
class Hypercall(Record):
    """``hypercall`` (hypervisor): trapped at ``vt_ns``, its result decided at ``done_vt_ns``, reaching the domain at
    ``arrival_vt_ns`` (None when the call ended its domain)."""

    nr: int
    name: str
    result: int | None
    done_vt_ns: int
    arrival_vt_ns: int | None
    span: str


@attrs.frozen(slots=True)
class Multicall(Record):
    """``multicall`` (hypervisor, before its ``hypercall``): ``entries`` in the batch, ``run`` of them run."""

    entries: int
    run: int


@attrs.frozen(slots=True)
class GuestMark(Record):
    """``guest.mark`` (domain): the guest wrote ``code | detail << 8`` to the mark port (``Mark`` names the codes)."""

    code: int
    detail: int


@attrs.frozen(slots=True)
class Ipi(Record):
    """``ipi`` (hypervisor): vCPU ``vcpu`` sent ``vector`` to vCPU ``dest`` through the APIC."""

    dest: int
    vector: int
    target_running: bool


@attrs.frozen(slots=True)
class PvFlush(Record):
    """``shootdown`` (hypervisor): a paravirtual flush of ``targets`` by a hypercall trapped at ``vt_ns``."""

    targets: tuple[int, ...]
    preempted: int
    pages: int
    end_vt_ns: int
    span: str


@attrs.frozen(slots=True)
class TlbFlush(Record):
    """``tlb.flush`` (domain): the domain flushed vCPU ``vcpu``'s TLB for vCPU ``by``'s hypercall ``span``."""

    by: int
    span: str


@attrs.frozen(slots=True)
class IrqEnter(Record):
    """``irq.enter`` (domain, schema 2): the vCPU entered an interrupt handler for ``vector`` (None: an event
    upcall)."""

    vector: int | None


@attrs.frozen(slots=True)
class EventSent(Record):
    """``event.sent`` (hypervisor): event ``eid`` (numbered per receiving domain ``dom``) on ``port``."""

    eid: int
    port: int


@attrs.frozen(slots=True)
class EventDelivered(Record):
    """``event.delivered`` (domain): event ``eid`` set pending on ``port`` for vCPU ``vcpu``."""

    eid: int
    port: int


@attrs.frozen(slots=True)
class Fault(Record):
    """``fault.inject`` / ``fault.outcome`` / ``fault.end`` (hypervisor); ``phase`` is the part after the dot."""

    phase: str
    fid: int
    kind: str
    target: str | None
    outcome: str | None


@attrs.frozen(slots=True)
class DomainEnd(Record):
    """``domain.shutdown`` / ``domain.crash`` (hypervisor)."""

    event: str
    reason: str | None


@attrs.frozen(slots=True)
class Other(Record):
    """Any other event: its name and its remaining fields."""

    event: str
    fields: dict[str, Any]


_COMMON = frozenset({"vt_ns", "proc", "dom", "vcpu", "event", "level", "wall_ns"})


def _base(e: dict[str, Any]) -> tuple[int, str, int | None, int | None]:
    return e.get("vt_ns", 0), e.get("proc", "?"), e.get("dom"), e.get("vcpu")


def _runstate(e: dict[str, Any]) -> Record:
    return RunState(*_base(e), e["state"], e["previous"], e["duration_ns"], e.get("why", ""), e.get("pcpu"))


def _hypercall(e: dict[str, Any]) -> Record:
    return Hypercall(*_base(e), e["nr"], e["name"], e.get("result"), e["done_vt_ns"], e.get("arrival_vt_ns"),
                     e.get("span", ""))


def _multicall(e: dict[str, Any]) -> Record:
    return Multicall(*_base(e), e["entries"], e.get("run", e["entries"]))


def _mark(e: dict[str, Any]) -> Record:
    return GuestMark(*_base(e), e["code"], e.get("round", 0))


def _ipi(e: dict[str, Any]) -> Record:
    return Ipi(*_base(e), e["dest"], e["vector"], bool(e.get("target_running")))


def _pvflush(e: dict[str, Any]) -> Record:
    return PvFlush(*_base(e), tuple(e["targets"]), e.get("preempted", 0), e.get("pages", 0), e["end_vt_ns"],
                   e.get("span", ""))


def _tlbflush(e: dict[str, Any]) -> Record:
    return TlbFlush(*_base(e), e["by"], e.get("span", ""))


def _irq(e: dict[str, Any]) -> Record:
    return IrqEnter(*_base(e), e.get("vector"))


def _sent(e: dict[str, Any]) -> Record:
    return EventSent(*_base(e), e["eid"], e.get("port", 0))


def _delivered(e: dict[str, Any]) -> Record:
    return EventDelivered(*_base(e), e["eid"], e.get("port", 0))


def _fault(e: dict[str, Any]) -> Record:
    return Fault(*_base(e), e["event"].partition(".")[2], e["fid"], e.get("kind", "?"), e.get("target"),
                 e.get("outcome"))


def _domain_end(e: dict[str, Any]) -> Record:
    return DomainEnd(*_base(e), e["event"], e.get("reason") or e.get("detail"))


CONVERTERS: dict[str, Callable[[dict[str, Any]], Record]] = {
    "vcpu.runstate": _runstate,
    "hypercall": _hypercall,
    "multicall": _multicall,
    "guest.mark": _mark,
    "ipi": _ipi,
    "shootdown": _pvflush,
    "tlb.flush": _tlbflush,
    "irq.enter": _irq,
    "event.sent": _sent,
    "event.delivered": _delivered,
    "fault.inject": _fault,
    "fault.outcome": _fault,
    "fault.end": _fault,
    "domain.shutdown": _domain_end,
    "domain.crash": _domain_end,
}


def to_record(e: dict[str, Any]) -> Record:
    """The typed record for one trace event; an event that lacks a field its class needs becomes ``Other``."""
    convert = CONVERTERS.get(e["event"])
    if convert is not None:
        try:
            return convert(e)
        except (KeyError, TypeError, ValueError):
            pass  # a field missing or of the wrong type: the event is kept whole, as Other, below
    return Other(*_base(e), e["event"], {k: v for k, v in e.items() if k not in _COMMON})

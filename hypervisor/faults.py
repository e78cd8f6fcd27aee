"""Fault injection: every fault the hypervisor can inject, at named points of the simulation core.

A fault is a deliberate deviation from correct behaviour (a hypervisor bug, a bad boot block) that proves a checker
or a guest's defences work. Each is armed for one domain (from the spec's ``faults`` list today; from the CLI,
test scripts and spec schedules in later work) and acts only where the core calls into this module, at one of
these injection points:

* ``Point.BUILD``: the Build message a domain is sent. ``ident=0x...`` replaces the 32-bit ident at the start of
  start_info, so no backend recognises the hypervisor (the kernel's unknown-ident path).
* ``Point.HYPERCALL_EFFECTS``: the effects a hypercall decided, before they are delivered. ``skip-flush`` drops the
  TLB flushes a hypercall asks of the caller's *other* vCPUs (the stale-TLB checker must catch it).

Every injection is a trace event (``fault.<kind>``) with its parameters and what it changed.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attrs

from hypervisor.hypercalls.base import Call
from hypervisor.tracing import DomainTrace
from pvcluster.bus.effects import FLUSHES, Effect
from pvcluster.bus.messages import Build


class Point(enum.Enum):
    BUILD = "build"
    HYPERCALL_EFFECTS = "hypercall-effects"


@attrs.frozen
class Fault:
    kind: str
    point: Point
    value: int | None = None


# kind -> where it acts. The spec validates names against the same list (pvcluster/spec.py DOMAIN_FAULTS).
KINDS: dict[str, Point] = {"skip-flush": Point.HYPERCALL_EFFECTS, "ident": Point.BUILD}


def parse(items: Iterable[str]) -> tuple[Fault, ...]:
    """The faults a domain's spec names (already validated): ``"skip-flush"``, ``"ident=0x..."``."""
    out = []
    for item in items:
        kind, _, value = item.partition("=")
        if kind in KINDS:
            out.append(Fault(kind, KINDS[kind], int(value, 16) if value else None))
    return tuple(out)


def at(faults: Iterable[Fault], point: Point) -> list[Fault]:
    return [f for f in faults if f.point is point]


def on_build(faults: Iterable[Fault], build: Build, trace: DomainTrace) -> Build:
    """Point.BUILD: the Build message about to be sent."""
    for f in at(faults, Point.BUILD):
        if f.kind == "ident" and f.value is not None:
            build = attrs.evolve(build, start_info_ident=f.value & 0xFFFFFFFF)
            trace.event("fault.ident", vt_ns=0, ident=f.value & 0xFFFFFFFF)
    return build


def on_hypercall_effects(faults: Iterable[Fault], call: Call) -> None:
    """Point.HYPERCALL_EFFECTS: ``call.effects`` as the hypercall decided them, changed in place."""
    for f in at(faults, Point.HYPERCALL_EFFECTS):
        if f.kind == "skip-flush":
            _skip_flushes(call)


def _skip_flushes(call: Call) -> None:
    """The hypervisor "forgets" to flush the other vCPUs a hypercall names."""

    def foreign_flush(e: Effect) -> bool:
        return isinstance(e, FLUSHES) and getattr(e, "vcpu", call.vcpu) != call.vcpu

    dropped = sorted({getattr(e, "vcpu", -1) for e in call.effects if foreign_flush(e)})
    if dropped:
        call.effects = [e for e in call.effects if not foreign_flush(e)]
        call.dom.trace.event("fault.skip_flush", vt_ns=call.vt_ns, vcpu=call.vcpu, targets=dropped)

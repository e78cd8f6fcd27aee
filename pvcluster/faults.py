"""The fault catalog: every fault kind pvcluster can inject, what it targets and which parameters it takes.

One catalog serves every way a fault comes in (the spec's ``[[fault]]`` schedule and ``[faults] random``, the
``pvcluster inject`` verb, ``Cluster.inject`` in test scripts, the pytest plugin) and the hypervisor that carries
them out (``hypervisor/faults.py``), so a name or parameter means the same thing everywhere and is checked once.

A fault request names a ``kind``, a ``target`` (a domain by name or id, or one vCPU of it as ``"alpha.1"``), the
virtual time it takes effect (``at_ns``; None: as soon as the hypervisor next steps) and integer ``params``. Every
injection is a trace event (``fault.inject``) with its parameters, and what it changed is another
(``fault.outcome``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any

import attrs

# Virtual time a fault may be scheduled at or last: far beyond any run, well inside the hypervisor's range.
MAX_FAULT_NS = 1 << 60
MAX_COUNT = 1 << 20
# The longest scheduler slice `sched` may set: one virtual second (xl's credit scheduler allows 1 s as well).
MAX_SLICE_NS = 1_000_000_000


class FaultError(ValueError):
    """A fault request that cannot be carried out: the message says what is wrong and what is allowed."""


@attrs.frozen
class Param:
    doc: str
    default: int | None = None  # None: required
    lo: int = 0
    hi: int = MAX_FAULT_NS


@attrs.frozen
class Kind:
    group: str  # "domain", "vcpu", "link", "bug", "clock", "sched"; "extension" for one an extension registers
    target: str  # "domain" or "vcpu"
    doc: str
    params: Mapping[str, Param] = attrs.Factory(dict)


_DUR = Param("virtual ns it lasts; 0: until undone by its opposite", 0)
_COUNT = Param("how many times it strikes", 1, 1, MAX_COUNT)

KINDS: Mapping[str, Kind] = {
    # domain
    "kill": Kind("domain", "domain", "SIGKILL the domain's process; the domain ends as crashed"),
    "crash": Kind("domain", "domain", "crash the domain as the guest's SCHEDOP_shutdown(SHUTDOWN_crash) would"),
    "pause": Kind("domain", "domain", "pause the domain (its vCPUs leave their pCPUs)", {"duration_ns": _DUR}),
    "unpause": Kind("domain", "domain", "unpause a paused domain"),
    "destroy": Kind("domain", "domain", "destroy the domain, as `pvcluster destroy`"),
    "shutdown": Kind("domain", "domain", "shut the domain down with a reason (0 poweroff, 1 reboot, 2 suspend, "
                     "3 crash, 4 watchdog), as dom0's SCHEDOP_remote_shutdown: `pvcluster shutdown` and `reboot`",
                     {"reason": Param("the SHUTDOWN_* reason", 0, 0, 4)}),
    "stop": Kind("domain", "domain", "SIGSTOP the domain's process for a wall-clock time, then SIGCONT",
                 {"wall_ms": Param("wall-clock milliseconds it stays stopped", None, 1, 3_600_000)}),
    # vCPU
    "preempt": Kind("vcpu", "vcpu", "take the vCPU off its pCPU for a virtual time",
                    {"duration_ns": Param("virtual ns it waits", None, 1)}),
    "offline": Kind("vcpu", "vcpu", "take the vCPU offline (it runs no guest code) until brought online",
                    {"duration_ns": _DUR}),
    "online": Kind("vcpu", "vcpu", "bring a vCPU taken offline by a fault back"),
    "pin": Kind("vcpu", "vcpu", "pin the vCPU to one pCPU (its hard affinity)",
                {"pcpu": Param("the pCPU", None, 0, 63), "duration_ns": _DUR}),
    "slow": Kind("vcpu", "vcpu", "a straggler: each guest instruction costs factor times its virtual time",
                 {"factor": Param("how many times slower", None, 2, 1000),
                  "duration_ns": Param("virtual ns it lasts", None, 1)}),
    # the link between the hypervisor and a domain, in virtual time
    "delay": Kind("link", "domain", "delay every message on the domain's link",
                  {"delay_ns": Param("extra virtual ns per message", None, 1),
                   "jitter_ns": Param("seeded uniform extra, 0..jitter_ns", 0),
                   "duration_ns": Param("virtual ns it lasts", None, 1)}),
    "drop": Kind("link", "domain", "drop the next messages (retransmitted after the link's timeout)",
                 {"count": _COUNT}),
    "dup": Kind("link", "domain", "deliver the next messages twice (the receiver drops the copy)", {"count": _COUNT}),
    "reorder": Kind("link", "domain", "swap the next pairs of messages (the receiver restores their order)",
                    {"count": _COUNT}),
    "partition": Kind("link", "domain", "cut the link for a virtual time; longer than the spec's partition_limit_ns "
                      "and the domain is ended as unreachable", {"duration_ns": Param("virtual ns", None, 1)}),
    # hypervisor-side bugs, which the checkers must catch
    "skip-flush": Kind("bug", "domain", "skip the TLB flushes a hypercall asks of other vCPUs", {"count": _COUNT}),
    "lose-event": Kind("bug", "domain", "lose event-channel notifications meant for the domain", {"count": _COUNT}),
    "dup-event": Kind("bug", "domain", "deliver event-channel notifications twice", {"count": _COUNT}),
    "corrupt-result": Kind("bug", "domain", "flip bits of hypercall results",
                           {"count": _COUNT, "xor": Param("the bits flipped", 0xFFFFFFFF, 1, 0xFFFFFFFF)}),
    "delay-flush": Kind("bug", "domain", "apply the TLB flushes a hypercall asks of other vCPUs only later",
                        {"count": _COUNT, "delay_ns": Param("virtual ns later", None, 1)}),
    # the domain's view of time
    "skew": Kind("clock", "domain", "skew the system time the domain reads in vcpu_time_info",
                 {"offset_ns": Param("added to system time", 0, -MAX_FAULT_NS, MAX_FAULT_NS),
                  "ppm": Param("drift, parts per million", 0, -1_000_000, 1_000_000)}),
    # the scheduler (cluster-wide; the target only names the domain whose window boundary it acts at and whose
    # trace records it: `pvcluster sched --slice`)
    "sched": Kind("sched", "domain", "set the scheduler's time slice for every domain, as `xl sched-credit -t`: "
                  "`pvcluster sched --slice NS` (at least hypervisor.window_ns)",
                  {"slice_ns": Param("the new slice in virtual ns", None, 1, MAX_SLICE_NS)}),
}

# Kinds that end the domain they hit: their outcome is final.
ENDING = frozenset({"kill", "crash", "destroy"})
# The outcome of a fault that did not act because its domain was gone or had shut down (the checker relies on it)
NO_SUCH_DOMAIN = "no such live domain"
_TARGET = re.compile(r"(?P<dom>[a-z0-9][a-z0-9_-]{0,31})(?:\.(?P<vcpu>[0-9]{1,2}))?")


@attrs.frozen
class FaultRequest:
    kind: str
    target: str
    at_ns: int | None = None
    params: Mapping[str, int] = attrs.Factory(dict)

    @property
    def domain(self) -> str:
        return self.target.split(".", 1)[0]

    @property
    def vcpu(self) -> int | None:
        _, _, v = self.target.partition(".")
        return int(v) if v else None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "at_ns": self.at_ns, "params": dict(self.params)}

    def to_table(self) -> dict[str, Any]:
        """As a ``[[fault]]`` table of the spec: the parameters inline."""
        return {"kind": self.kind, "target": self.target, "at_ns": self.at_ns, **self.params}


def describe_kinds() -> str:
    """One line per kind, for `--help` and error messages."""
    lines = []
    for name, k in KINDS.items():
        ps = " ".join(f"{p}=N" if spec.default is None else f"[{p}={spec.default}]" for p, spec in k.params.items())
        target = "DOM.VCPU" if k.target == "vcpu" else "DOM"
        lines.append(f"  {name} {target} {ps}".rstrip())
        lines.append(f"      {k.doc}")
    return "\n".join(lines)


def request(kind: object, target: object, at_ns: object = None, params: object = None,
            kinds: Mapping[str, Kind] = KINDS) -> FaultRequest:
    """Validate a fault request from any source; FaultError says exactly what is wrong. ``kinds``: the catalog to
    check against, the built-in one unless the cluster's extensions add kinds (``Extensions.fault_catalog``)."""
    if not isinstance(kind, str) or kind not in kinds:
        raise FaultError(f"unknown fault kind {kind!r}; kinds: {', '.join(kinds)}")
    spec = kinds[kind]
    m = _TARGET.fullmatch(target) if isinstance(target, str) else None
    if m is None:
        what = "a domain name or id and a vCPU, DOM.N" if spec.target == "vcpu" else "a domain name or id"
        raise FaultError(f"{kind}: target must be {what}, got {target!r}")
    if (spec.target == "vcpu") != (m.group("vcpu") is not None):
        want = "a vCPU, DOM.N (e.g. alpha.1)" if spec.target == "vcpu" else "a domain, not a vCPU"
        raise FaultError(f"{kind}: target must be {want}, got {target!r}")
    if at_ns is not None and (not _is_int(at_ns) or not 0 <= at_ns <= MAX_FAULT_NS):  # type: ignore[operator]
        raise FaultError(f"{kind}: at_ns must be an integer between 0 and {MAX_FAULT_NS}, got {at_ns!r}")
    return FaultRequest(kind, target, at_ns, _params(kind, spec, params))  # type: ignore[arg-type]


def checked_here(kind: object, target: object, at_ns: object = None, params: object = None) -> FaultRequest:
    """A request from the toolstack to a running cluster (``pvcluster inject``, ``Cluster.inject``): a built-in kind
    is checked here; any other kind may be one the cluster's extensions add, which only the hypervisor knows, so it
    goes as given and the hypervisor checks it against its own catalog (``hypervisor/control.py``)."""
    if isinstance(kind, str) and kind not in KINDS and isinstance(target, str):
        given = params if isinstance(params, Mapping) else {}
        return FaultRequest(kind, target, at_ns, given)  # type: ignore[arg-type]
    return request(kind, target, at_ns, params)


def _params(kind: str, spec: Kind, raw: object) -> dict[str, int]:
    given = {} if raw is None else raw
    if not isinstance(given, Mapping):
        raise FaultError(f"{kind}: parameters must be a table of name = integer")
    unknown = sorted(str(k) for k in given if k not in spec.params)
    if unknown:
        known = ", ".join(spec.params) or "none"
        raise FaultError(f"{kind}: unknown parameter {', '.join(unknown)} (takes: {known})")
    out: dict[str, int] = {}
    for name, p in spec.params.items():
        v = given.get(name, p.default)
        if v is None:
            raise FaultError(f"{kind}: parameter {name} is required ({p.doc})")
        if not _is_int(v) or not p.lo <= v <= p.hi:
            raise FaultError(f"{kind}: {name} must be an integer between {p.lo} and {p.hi} ({p.doc}), got {v!r}")
        out[name] = v
    return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# -- seeded random schedules ([faults] random in the spec) ---------------------------------------------------

# What a random schedule draws from by default: faults that perturb a run without being hypervisor bugs (the
# checkers would rightly flag those) and without ending a domain.
DEFAULT_RANDOM_KINDS: tuple[str, ...] = (
    "pause", "preempt", "offline", "pin", "slow", "delay", "drop", "dup", "reorder", "partition", "skew",
)
MAX_RANDOM_FAULTS = 10_000  # per domain: a rate typo must not plan millions


@attrs.frozen
class RandomFaults:
    """``[faults] random = {rate, kinds, until_ns}``: each domain gets its own Poisson stream of faults."""

    rate: float  # expected faults per virtual millisecond, per domain
    kinds: tuple[str, ...] = DEFAULT_RANDOM_KINDS
    until_ns: int = 2_000_000  # no random fault is planned after this virtual time
    targets: tuple[str, ...] = ()  # domain names; () = every domain of the spec

    def to_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "kinds": list(self.kinds), "until_ns": self.until_ns, "targets": list(self.targets)}


def random_schedule(rf: RandomFaults, seed: int, domains: list[tuple[str, int]], pcpus: int) -> list[FaultRequest]:
    """The faults ``rf`` plans for ``domains`` ((name, vCPUs), in spec order). Each domain draws from its own stream,
    seeded by the cluster seed and its name, so adding a domain does not change another domain's faults."""
    out: list[FaultRequest] = []
    for name, vcpus in domains:
        if rf.targets and name not in rf.targets:
            continue
        rng = random.Random(f"{seed}/{name}/faults")
        t = 0.0
        for _ in range(MAX_RANDOM_FAULTS):
            t += rng.expovariate(rf.rate / 1e6)
            if t > rf.until_ns:
                break
            kind = rf.kinds[rng.randrange(len(rf.kinds))]
            target = f"{name}.{rng.randrange(vcpus)}" if KINDS[kind].target == "vcpu" else name
            out.append(request(kind, target, int(t), random_params(kind, rng, pcpus)))
    return sorted(out, key=lambda r: (r.at_ns or 0, r.target, r.kind))


def random_params(kind: str, rng: random.Random, pcpus: int) -> dict[str, int]:
    """Parameters for a randomly planned ``kind``: short enough that a run survives them (a partition stays within
    the default partition_limit_ns), varied enough to matter."""
    dur = rng.randint(5_000, 200_000)
    count = rng.randint(1, 4)
    table: dict[str, dict[str, int]] = {
        "pause": {"duration_ns": dur},
        "stop": {"wall_ms": rng.randint(20, 300)},
        "preempt": {"duration_ns": dur},
        "offline": {"duration_ns": dur},
        "pin": {"pcpu": rng.randrange(pcpus), "duration_ns": dur},
        "slow": {"factor": rng.randint(2, 20), "duration_ns": dur},
        "delay": {"delay_ns": rng.randint(1_000, 50_000), "jitter_ns": rng.randint(0, 20_000), "duration_ns": dur},
        "drop": {"count": count}, "dup": {"count": count}, "reorder": {"count": count},
        "partition": {"duration_ns": rng.randint(10_000, 1_000_000)},
        "skip-flush": {"count": count}, "lose-event": {"count": count}, "dup-event": {"count": count},
        "corrupt-result": {"count": count}, "delay-flush": {"count": count, "delay_ns": rng.randint(1_000, 100_000)},
        "skew": {"offset_ns": rng.randint(-1_000_000, 1_000_000), "ppm": rng.randint(-2_000, 2_000)},
        # from the default window to ten of them (a slice below the spec's window_ns is refused when it acts)
        "sched": {"slice_ns": rng.randint(10_000, 100_000)},
    }
    return table.get(kind, {})

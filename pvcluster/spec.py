"""Cluster spec: the TOML file that says what to boot, validated in full before any process starts.

``load_spec(path)`` reads a file (or, with no path, the embedded ``default_spec.toml``), ``parse_spec``
reads text. Both return a frozen :class:`ClusterSpec` or raise :class:`SpecError` listing *every* problem
found, each as ``"key.path: problem"``, so one edit-run cycle fixes a spec instead of one cycle per mistake.

The parent hands the validated spec to child processes as ``ClusterSpec.to_dict()``; ``from_dict`` validates
again because the dict crossed a process boundary and the receiving side must not trust it blindly.
"""

from __future__ import annotations

import datetime
import difflib
import importlib.resources
import json
import os
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast, get_args

import attrs

from pvcluster import costs, extspec
from pvcluster.abi.xen import MAX_GUEST_CMDLINE, MAX_LEGACY_VCPUS
from pvcluster.extspec import ExtensionSpec
from pvcluster.faults import DEFAULT_RANDOM_KINDS, FaultError, FaultRequest, RandomFaults, request
from pvcluster.faults import KINDS as FAULT_KINDS

__all__ = [
    "BUILTIN_KERNELS",
    "BusSection",
    "ClusterSection",
    "ClusterSpec",
    "CostModel",
    "DomainSpec",
    "HypervisorSection",
    "SpecError",
    "default_spec_text",
    "load_spec",
    "parse_spec",
]

BUILTIN_KERNELS: tuple[str, ...] = ("pvkern",)

Mode = Literal["virtual"]
LogLevel = Literal["debug", "info", "warning", "error"]
Transport = Literal["ipc", "tcp"]
Placement = Literal["local", "remote"]
Backend = Literal["xen", "native", "vmi"]
Boot = Literal["ebx", "ident", "entry"]

MODES: tuple[str, ...] = get_args(Mode)
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
TRANSPORTS: tuple[str, ...] = get_args(Transport)
PLACEMENTS: tuple[str, ...] = get_args(Placement)
BACKENDS: tuple[str, ...] = get_args(Backend)
BOOT_PROTOCOLS: tuple[str, ...] = get_args(Boot)
# Accepted by the schema's vocabulary but not runnable yet; named so the error can say so rather than
# pretending the word is unknown.
UNIMPLEMENTED_MODES: tuple[str, ...] = ("realtime",)

NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,31}"
_NAME_RE = re.compile(NAME_PATTERN)
MAX_DOMAINS = 64
MAX_PCPUS = 64
# shared_info holds vcpu_info for only the first 32 vCPUs; more would need VCPUOP_register_vcpu_info.
MAX_VCPUS = MAX_LEGACY_VCPUS
MAX_MEMORY_MIB = 256
MIN_WINDOW_NS = 100
MAX_PS_PER_INSTR = 1_000_000
MAX_INSN_PS = 1_000_000_000  # one instruction class's cost: at most 1 ms of virtual time an instruction
MAX_COST_NS = 1_000_000_000  # an operation's cost outside instruction classes: at most 1 s
# [hypervisor.cost] keys priced outside instruction classes, with their defaults (pvcluster/costs.py says why)
_DYNAMIC_COSTS = {
    "irq_entry_ns": costs.IRQ_ENTRY_NS,
    "mmio_ns": costs.MMIO_NS,
    "multicall_entry_ns": costs.MULTICALL_ENTRY_NS,
    "flush_local_ns": costs.FLUSH_LOCAL_NS,
    "flush_page_ns": costs.FLUSH_PAGE_NS,
    "flush_remote_ns": costs.FLUSH_REMOTE_NS,
    "tlb_refill_ns": costs.TLB_REFILL_NS,
}
# The control socket binds bus.port + 1 (pvcluster/bus/endpoints.py), and 65535 is the highest TCP port.
MAX_PORT = 65534
MAX_UNRESPONSIVE_S = 86400
MAX_LINK_NS = 1 << 50  # link timeouts and limits: far beyond any run, well inside the clock's range
MAX_SCHEDULED_FAULTS = 10_000
# Tables and arrays a value may sit in; a valid spec needs 4 (top, [[domain]] array, domain table, faults).
# Checked without recursion before anything else looks at the data: a hostile spec must not exhaust the stack.
MAX_NESTING = 16
SPEC_NESTING = 4
# start_info.cmd_line is char[1024] and must keep room for its NUL terminator.
GUEST_CMDLINE_MAX = MAX_GUEST_CMDLINE

RUN_DIR_ENV = "PVCLUSTER_RUN_DIR"
DEFAULT_SOURCE = "<default>"
_DICT_SOURCE = "<dict>"

_MISSING: Any = object()


# Hypervisor-side bugs a domain can be run under, to prove the checkers catch them.
DOMAIN_FAULTS = ("skip-flush",)
# The parameterised fault "ident=0xNNNNNNNN": the builder writes this ident into start_info instead of the
# hypervisor's. Normalised to 8 lower-case hex digits, so equal idents compare equal.
IDENT_FAULT = "ident"
_IDENT_FAULT_RE = re.compile(r"ident=0x([0-9a-fA-F]{1,8})")
KNOWN_FAULTS_TEXT = '"skip-flush", "ident=0xNNNNNNNN" (1 to 8 hex digits)'


class SpecError(Exception):
    """An invalid cluster spec; ``problems`` holds every problem found, each ``"key.path: problem"``."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        # Both values go into args so the exception survives pickling across a process boundary.
        super().__init__(source, list(problems))
        self.source = source
        self.problems: list[str] = list(problems)

    def __str__(self) -> str:
        return f"invalid cluster spec {self.source}:" + "".join(f"\n  - {p}" for p in self.problems)


@attrs.frozen
class ClusterSection:
    name: str
    seed: int
    run_dir: str  # "" or an absolute path; see ClusterSpec.resolved_run_dir
    mode: Mode


@attrs.frozen
class CostModel:
    """``[hypervisor.cost]``: what each modelled operation costs in virtual time (``pvcluster/costs.py`` says where
    each default's order of magnitude comes from)."""

    ps_per_instr: int
    hypercall_ns: int
    hypercall_jitter_ns: int
    link_ns: int
    ipi_ns: int = 1000
    # ps per instruction of each class (InsnClass order) at ps_per_instr = 1000: ``[hypervisor.cost.insn]``
    insn_ps: tuple[int, ...] = tuple(costs.INSN_PS[c] for c in costs.InsnClass)
    irq_entry_ns: int = costs.IRQ_ENTRY_NS
    mmio_ns: int = costs.MMIO_NS
    multicall_entry_ns: int = costs.MULTICALL_ENTRY_NS
    flush_local_ns: int = costs.FLUSH_LOCAL_NS
    flush_page_ns: int = costs.FLUSH_PAGE_NS
    flush_remote_ns: int = costs.FLUSH_REMOTE_NS
    tlb_refill_ns: int = costs.TLB_REFILL_NS

    def to_dict(self) -> dict[str, Any]:
        """The TOML layout: the instruction classes as the ``insn`` table, by name."""
        out = attrs.asdict(self)
        del out["insn_ps"]
        out["insn"] = {c.name.lower(): ps for c, ps in zip(costs.InsnClass, self.insn_ps, strict=True)}
        return out


@attrs.frozen
class HypervisorSection:
    pcpus: int
    window_ns: int
    log_level: LogLevel
    cost: CostModel
    slice_ns: int = 30000
    # Wall seconds a domain process may stay silent, counting only time the hypervisor itself was running.
    unresponsive_s: float = 30.0
    # Batch elements (multicall entries, mmu_update requests, mmuext_op ops) per domain per window.
    work_budget: int = 1024
    # Per-domain token bucket on detail trace events: trace_burst tokens, refilled by trace_rate per virtual us.
    trace_burst: int = 20000  # 0 = no limit (trace_rate is ignored)
    trace_rate: int = 50  # 0 = never refilled: at most trace_burst detail events per domain
    # The hypervisor-domain link: a message lost on it is retransmitted after link_rto_ns; a domain whose link stays
    # cut for longer than partition_limit_ns is ended as unreachable.
    link_rto_ns: int = 40000
    partition_limit_ns: int = 5_000_000
    # Wall seconds of the hypervisor's running time it waits for a declared domain's process to join.
    join_timeout_s: float = 120.0


@attrs.frozen
class BusSection:
    transport: Transport
    host: str
    port: int
    keys: str = ""  # the CURVE key directory (tcp); "" = RUN_DIR/keys


# xl.cfg's life-cycle actions (on_poweroff, on_reboot, on_crash): what the toolstack does with a domain that ended.
# "destroy" ends it for good; "restart" builds a new domain (new domid) from the same DomainSpec; "preserve" leaves
# it listed as it ended; the coredump-* ones (on_crash only) dump its memory first (an ELF core in
# <run_dir>/dumps: hypervisor/coredumps.py) and then destroy or restart. xl's
# "rename-restart" is refused by the spec checker (Checker.lifecycle).
LIFECYCLE_ACTIONS = ("destroy", "restart", "preserve")
CRASH_ACTIONS = (*LIFECYCLE_ACTIONS, "coredump-destroy", "coredump-restart")


@attrs.frozen
class DomainSpec:
    name: str
    vcpus: int
    memory_mib: int
    kernel: str  # a BUILTIN_KERNELS name, or an absolute path to a readable file
    cmdline: str
    backend: Backend
    boot: Boot
    patching: bool
    faults: tuple[str, ...] = ()
    cpus: tuple[int, ...] = ()  # hard affinity; () = every pCPU
    # "local": the hypervisor starts the domain's process; "remote": something else starts it (another host, a
    # container, a batch job) and it joins over the bus
    placement: Placement = "local"
    # What the toolstack does when the domain ends (xl.cfg's on_poweroff / on_reboot / on_crash; LIFECYCLE_ACTIONS)
    on_poweroff: str = "destroy"
    on_reboot: str = "preserve"
    on_crash: str = "preserve"

    @property
    def builtin_kernel(self) -> bool:
        return self.kernel in BUILTIN_KERNELS

    def to_dict(self) -> dict[str, Any]:
        """The ``[[domain]]`` table as ``create`` and ``ClusterSpec.to_dict`` carry it (lists, not tuples)."""
        return {**attrs.asdict(self), "faults": list(self.faults), "cpus": list(self.cpus)}

    @property
    def ident_fault(self) -> int | None:
        """The start_info ident the builder must write instead of the hypervisor's, from an ``ident=`` fault."""
        for fault in self.faults:
            name, _, value = fault.partition("=")
            if name == IDENT_FAULT:
                return int(value, 16)
        return None


@attrs.frozen
class ClusterSpec:
    """A validated spec. Build it with load_spec / parse_spec / from_dict; the constructor does not check."""

    cluster: ClusterSection
    hypervisor: HypervisorSection
    bus: BusSection
    domains: tuple[DomainSpec, ...]
    source: str
    faults: tuple[FaultRequest, ...] = ()  # the [[fault]] schedule
    random_faults: RandomFaults | None = None  # [faults] random
    extensions: tuple[ExtensionSpec, ...] = ()  # [[extension]]: hypercall extensions (pvcluster/extspec.py)

    def resolved_run_dir(self) -> Path:
        """Where this cluster's sockets and traces go.

        The environment is read here rather than at parse time so that a spec handed to a child keeps
        meaning "the run directory of this run", not whatever the parent's environment said when parsing.
        """
        if self.cluster.run_dir:
            return Path(self.cluster.run_dir)
        env = os.environ.get(RUN_DIR_ENV)
        if env:
            return Path(env).expanduser().absolute() / self.cluster.name
        # Per-uid so two users on one host do not collide on (or get refused by) each other's sockets.
        return Path(f"/tmp/pvcluster-{os.getuid()}") / self.cluster.name

    def keys_dir(self, run_dir: Path | None = None) -> Path:
        """The CURVE key directory: ``bus.keys``, else ``keys`` in the run directory."""
        if self.bus.keys:
            return Path(self.bus.keys)
        return (run_dir or self.resolved_run_dir()) / "keys"

    def domain(self, name: str) -> DomainSpec:
        for dom in self.domains:
            if dom.name == name:
                return dom
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict in the TOML layout (``domain`` list included), plus ``source``."""
        out = {
            "source": self.source,
            "cluster": attrs.asdict(self.cluster),
            "hypervisor": {**attrs.asdict(self.hypervisor), "cost": self.hypervisor.cost.to_dict()},
            "bus": attrs.asdict(self.bus),
            "domain": [d.to_dict() for d in self.domains],
        }
        if self.faults:
            out["fault"] = [f.to_table() for f in self.faults]
        if self.random_faults is not None:
            out["faults"] = {"random": self.random_faults.to_dict()}
        if self.extensions:
            out["extension"] = [e.to_dict() for e in self.extensions]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClusterSpec:
        """Rebuild (and re-validate) a spec from ``to_dict()`` output; relative paths resolve against CWD."""
        if not isinstance(data, Mapping):
            raise SpecError(_DICT_SOURCE, [f"spec: must be a table, got {_describe(data)}"])
        body = dict(data)
        source = body.pop("source", _DICT_SOURCE)
        checker = _Checker(Path.cwd())
        if not isinstance(source, str):
            checker.error("source", f"must be a string, got {_describe(source)}")
            source = _DICT_SOURCE
        elif not _encodable(source):
            checker.error("source", "must be valid Unicode text")
            source = _DICT_SOURCE
        return checker.spec(body, source)


def default_spec_text() -> str:
    return importlib.resources.files("pvcluster").joinpath("default_spec.toml").read_text(encoding="utf-8")


def parse_spec(text: str, *, source: str = "<string>", base_dir: Path | None = None) -> ClusterSpec:
    """Parse and validate spec text; relative paths in it resolve against ``base_dir`` (default: CWD)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(source, [f"TOML syntax error: {exc}"]) from None
    except RecursionError:
        # tomllib reads arrays and inline tables recursively: a few hundred levels exhaust Python's stack.
        raise SpecError(source, [_too_deep_message("TOML arrays or inline tables")]) from None
    except ValueError as exc:
        # int() refuses literals longer than sys.get_int_max_str_digits(); its advice is for programmers.
        raise SpecError(source, [f"TOML value cannot be read: {str(exc).split(';')[0]}"]) from None
    return _Checker(Path(base_dir) if base_dir is not None else Path.cwd()).spec(data, source)


def load_spec(path: str | os.PathLike[str] | None = None) -> ClusterSpec:
    """Load a spec file, or the embedded default when ``path`` is None."""
    if path is None:
        return parse_spec(default_spec_text(), source=DEFAULT_SOURCE)
    p = Path(path)
    source = str(p)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise SpecError(source, [f"spec file not found: {p}"]) from None
    except IsADirectoryError:
        raise SpecError(source, [f"spec file is a directory: {p}"]) from None
    except OSError as exc:
        raise SpecError(source, [f"cannot read spec file {p}: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(source, [f"spec file is not valid UTF-8 (byte {exc.start})"]) from None
    return parse_spec(text, source=source, base_dir=p.absolute().parent)


def parse_domain_dict(data: object, *, base_dir: Path | None = None, pcpus: int | None = None,
                      check_files: bool = True) -> DomainSpec:
    """Validate one ``[[domain]]`` table on its own, as the hypervisor's ``create`` command receives it.

    ``pcpus`` is the hypervisor's pCPU count, to check ``cpus`` against; without it only the 0..MAX_PCPUS-1
    range is checked. ``check_files=False``: a kernel path must be absolute and is not looked at (the hypervisor
    checks it as the requesting user, hypervisor/kernel_files.py: its own look would tell anyone whether a file
    exists).
    """
    checker = _Checker(Path(base_dir) if base_dir is not None else Path.cwd(), check_files=check_files)
    if not checker.nesting(data, "domain"):
        raise SpecError("<create>", checker.problems)
    dom = checker.domain(data, "domain", pcpus)
    if checker.problems:
        raise SpecError("<create>", checker.problems)
    return dom


# --------------------------------------------------------------------------------------------- validation


def _join(path: str, key: object) -> str:
    # Keys from TOML, JSON and msgpack are strings; anything else is described, never str()-ed (a deeply
    # nested tuple would recurse).
    if not isinstance(key, str):
        k = f"<{_describe(key)}>"
    elif re.fullmatch(r"[A-Za-z0-9_-]{1,60}", key):
        k = key
    else:
        # Quote keys a reader could not type bare in TOML, so the path in the message is unambiguous.
        k = _quote(key)
    return f"{path}.{k}" if path else k


def _encodable(s: str) -> bool:
    """False for lone surrogates (only reachable through from_dict): no file name, message or frame can hold them."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _quote(s: str, limit: int = 60) -> str:
    # ASCII escapes only where needed: a message must stay printable and sendable over the bus.
    q = json.dumps(s, ensure_ascii=not _encodable(s))
    return q if len(q) <= limit else q[: limit - 4] + '..."'


def _too_deep_message(what: str) -> str:
    return f"{what} nested too deeply (more than {MAX_NESTING} levels; a cluster spec needs at most {SPEC_NESTING})"


def _too_deep(data: object, path: str) -> str | None:
    """The key path of the first table or array nested more than MAX_NESTING levels deep in ``data``, or None.

    Iterative on purpose: a recursive walk is exactly what a hostile spec would overflow. Also ends on
    self-referencing values, which from_dict could be handed.
    """
    stack: list[tuple[object, str, int]] = [(data, path, 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, Mapping):
            children = [(_join(where, k), v) for k, v in value.items()]
        elif isinstance(value, list | tuple):
            children = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        if depth >= MAX_NESTING:
            return where
        stack.extend((v, p, depth + 1) for p, v in reversed(children))
    return None


def _describe(v: object) -> str:
    """How a bad value appears in a message, in TOML's vocabulary (the user wrote TOML, not Python)."""
    if isinstance(v, bool):
        return f"boolean {'true' if v else 'false'}"
    if isinstance(v, int):
        if v.bit_length() > 64:  # str() of a huge int is slow and, past 4300 digits, raises ValueError
            return f"{'a negative' if v < 0 else 'an'} integer of {v.bit_length()} bits"
        return str(v)
    if isinstance(v, float):
        return f"float {v!r}"
    if isinstance(v, str):
        return _quote(v)
    if isinstance(v, datetime.date | datetime.time):
        return f"datetime {v.isoformat()}"
    if isinstance(v, Mapping):
        return "a table"
    if isinstance(v, list | tuple):
        return "an array"
    if v is None:
        return "null"
    return type(v).__name__


def _choices(allowed: Iterable[str]) -> str:
    return ", ".join(json.dumps(a) for a in allowed)


def _hint(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Checker:
    """Walks the raw spec, collecting problems; a bad value is replaced by its default so the walk goes on."""

    def __init__(self, base_dir: Path, check_files: bool = True) -> None:
        self.base_dir = base_dir
        self.check_files = check_files
        self.problems: list[str] = []
        self._bad: set[str] = set()

    def error(self, path: str, msg: str) -> None:
        self.problems.append(f"{path}: {msg}")
        self._bad.add(path)

    def ok(self, *paths: str) -> bool:
        """Nothing reported at or above any of ``paths``: cross-field checks skip values already known bad."""
        for p in paths:
            for bad in self._bad:
                if p == bad or p.startswith(bad + ".") or p.startswith(bad + "["):
                    return False
        return True

    # ---- primitives

    def table(self, value: object, path: str, keys: Sequence[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.error(path, f"must be a table, got {_describe(value)}")
            return {}
        for key in value:
            if key not in keys:
                self.error(_join(path, key), "unknown key" + (_hint(key, keys) if isinstance(key, str) else ""))
        return value

    def integer(
        self, tbl: Mapping[str, Any], path: str, key: str, default: int, lo: int, hi: int | None = None, why: str = ""
    ) -> int:
        """An integer in [lo, hi]; ``why`` explains the bounds in the message when they are not obvious."""
        v = tbl.get(key, default)
        # bool is an int subclass in Python, but `vcpus = true` is a mistake, not 1.
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            want = f"an integer between {lo} and {hi}" if hi is not None else f"an integer >= {lo}"
            self.error(_join(path, key), f"must be {want}, got {_describe(v)}" + (f" ({why})" if why else ""))
            return default
        return v

    def number(self, tbl: Mapping[str, Any], path: str, key: str, default: float, above: float, hi: float) -> float:
        """An integer or float in (above, hi]; NaN fails every comparison and so is rejected too."""
        v = tbl.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not above < v <= hi:
            self.error(_join(path, key), f"must be a number greater than {above} and at most {hi}, got {_describe(v)}")
            return default
        return float(v)

    def string(self, tbl: Mapping[str, Any], path: str, key: str, default: str) -> str | None:
        v = tbl.get(key, default)
        if not isinstance(v, str):
            self.error(_join(path, key), f"must be a string, got {_describe(v)}")
            return None
        if "\0" in v:
            self.error(_join(path, key), "must not contain NUL characters")
            return None
        if not _encodable(v):
            self.error(_join(path, key), "must be valid Unicode text")
            return None
        return v

    def choice(self, tbl: Mapping[str, Any], path: str, key: str, default: str, allowed: Sequence[str]) -> str:
        v = tbl.get(key, default)
        if isinstance(v, str) and v in allowed:
            return v
        hint = _hint(v, allowed) if isinstance(v, str) else ""
        self.error(_join(path, key), f"must be one of {_choices(allowed)}, got {_describe(v)}{hint}")
        return default

    def boolean(self, tbl: Mapping[str, Any], path: str, key: str, default: bool) -> bool:
        v = tbl.get(key, default)
        if not isinstance(v, bool):
            self.error(_join(path, key), f"must be a boolean (true or false), got {_describe(v)}")
            return default
        return v

    def name(self, tbl: Mapping[str, Any], path: str, key: str, default: str) -> str:
        v = tbl.get(key, default)
        if v is _MISSING:
            self.error(_join(path, key), "required key missing")
            return ""
        if not isinstance(v, str) or not _NAME_RE.fullmatch(v):
            self.error(_join(path, key), f"must be a string matching {NAME_PATTERN}, got {_describe(v)}")
            return ""
        return v

    def local_path(self, raw: str, path: str) -> Path | None:
        """``raw`` as an absolute path (``~`` expanded, relative to base_dir), or None after reporting why not."""
        try:
            p = Path(raw).expanduser()
        except RuntimeError:  # "~name/..." where no user "name" exists
            self.error(path, f"cannot expand {_quote(raw)}: no such user's home directory; write the path without ~")
            return None
        return Path(os.path.abspath(p if p.is_absolute() else self.base_dir / p))

    def nesting(self, data: object, path: str) -> bool:
        """Report ``data`` nested deeper than any spec needs; False means: do not walk it any further."""
        where = _too_deep(data, path)
        if where is None:
            return True
        self.error(where or "spec", _too_deep_message("tables or arrays"))
        return False

    # ---- sections

    def spec(self, data: Mapping[str, Any], source: str) -> ClusterSpec:
        if not self.nesting(data, ""):
            raise SpecError(source, self.problems)
        top = self.table(data, "", ("cluster", "hypervisor", "bus", "domain", "fault", "faults", "extension"))
        cluster = self.cluster(top.get("cluster", {}))
        hypervisor = self.hypervisor(top.get("hypervisor", {}))
        bus = self.bus(top.get("bus", {}))
        # Domains' cpus are checked against pcpus only when pcpus itself is valid (else only against MAX_PCPUS).
        pcpus = hypervisor.pcpus if self.ok("hypervisor.pcpus") else None
        domains = self.domains(top.get("domain", _MISSING), pcpus)
        extensions = extspec.check(self, top.get("extension", []))
        schedule = self.fault_schedule(top.get("fault", []), domains, hypervisor.pcpus, extensions)
        random_faults = self.random_faults(top.get("faults", {}), domains)
        if self.problems:
            raise SpecError(source, self.problems)
        return ClusterSpec(cluster, hypervisor, bus, domains, source, schedule, random_faults, extensions)

    def cluster(self, raw: object) -> ClusterSection:
        path = "cluster"
        t = self.table(raw, path, ("name", "seed", "run_dir", "mode"))
        name = self.name(t, path, "name", "default")
        seed = self.integer(t, path, "seed", 1, 0)
        run_dir = self.string(t, path, "run_dir", "") or ""
        if run_dir:
            # Fixed now, against the spec's directory: children may run with another CWD.
            resolved = self.local_path(run_dir, f"{path}.run_dir")
            run_dir = str(resolved) if resolved is not None else ""
        mode = t.get("mode", "virtual")
        if mode in UNIMPLEMENTED_MODES:
            self.error(
                f"{path}.mode",
                f"{_describe(mode)} is not implemented yet; only {_choices(MODES)} is accepted for now",
            )
            mode = "virtual"
        else:
            mode = self.choice(t, path, "mode", "virtual", MODES)
        return ClusterSection(name or "default", seed, run_dir, cast(Mode, mode))

    def hypervisor(self, raw: object) -> HypervisorSection:
        path = "hypervisor"
        keys = ("pcpus", "window_ns", "slice_ns", "log_level", "cost", "unresponsive_s", "work_budget", "trace_burst",
                "trace_rate", "link_rto_ns", "partition_limit_ns", "join_timeout_s")
        t = self.table(raw, path, keys)
        pcpus = self.integer(t, path, "pcpus", 2, 1, MAX_PCPUS)
        window_ns = self.integer(t, path, "window_ns", 10000, MIN_WINDOW_NS)
        log_level = self.choice(t, path, "log_level", "info", LOG_LEVELS)
        cost = self.cost(t.get("cost", {}))
        if self.ok(f"{path}.window_ns", f"{path}.cost.link_ns") and window_ns > cost.link_ns:
            # A message sent at the start of a window must not be deliverable before that window ends,
            # or lock-stepped processes could observe it out of order.
            self.error(f"{path}.window_ns", f"must be <= hypervisor.cost.link_ns ({cost.link_ns}), got {window_ns}")
        slice_ns = self.integer(t, path, "slice_ns", 30000, MIN_WINDOW_NS)
        if self.ok(f"{path}.window_ns", f"{path}.slice_ns") and slice_ns < window_ns:
            # The scheduler preempts only at window boundaries, so a shorter slice could not be honoured.
            self.error(f"{path}.slice_ns", f"must be >= hypervisor.window_ns ({window_ns}), got {slice_ns}")
        unresponsive_s = self.number(t, path, "unresponsive_s", 30.0, 0, MAX_UNRESPONSIVE_S)
        work_budget = self.integer(t, path, "work_budget", 1024, 1)
        trace_burst = self.integer(t, path, "trace_burst", 20000, 0)
        trace_rate = self.integer(t, path, "trace_rate", 50, 0)
        rto = self.integer(t, path, "link_rto_ns", 40000, 1, MAX_LINK_NS)
        limit = self.integer(t, path, "partition_limit_ns", 5_000_000, 1, MAX_LINK_NS)
        join_timeout_s = self.number(t, path, "join_timeout_s", 120.0, 0, MAX_UNRESPONSIVE_S)
        return HypervisorSection(pcpus, window_ns, cast(LogLevel, log_level), cost, slice_ns, unresponsive_s,
                                 work_budget, trace_burst, trace_rate, rto, limit, join_timeout_s)

    def cost(self, raw: object) -> CostModel:
        path = "hypervisor.cost"
        t = self.table(raw, path, ("ps_per_instr", "hypercall_ns", "hypercall_jitter_ns", "link_ns", "ipi_ns",
                                   *_DYNAMIC_COSTS, "insn"))
        ps = self.integer(t, path, "ps_per_instr", 1000, 1, MAX_PS_PER_INSTR)
        hc = self.integer(t, path, "hypercall_ns", 400, 0)
        jitter = self.integer(t, path, "hypercall_jitter_ns", 40, 0)
        link = self.integer(t, path, "link_ns", 10000, 1)
        # Zero jitter is always fine (it is "no jitter"), which keeps hypercall_ns = 0 expressible.
        if self.ok(f"{path}.hypercall_ns", f"{path}.hypercall_jitter_ns") and jitter and jitter >= hc:
            self.error(f"{path}.hypercall_jitter_ns", f"must be less than hypercall_ns ({hc}), got {jitter}")
        ipi = self.integer(t, path, "ipi_ns", 1000, 0)
        dynamic = {k: self.integer(t, path, k, v, 0, MAX_COST_NS) for k, v in _DYNAMIC_COSTS.items()}
        return CostModel(ps, hc, jitter, link, ipi, self.insn_costs(t.get("insn", {}), f"{path}.insn"), **dynamic)

    def insn_costs(self, raw: object, path: str) -> tuple[int, ...]:
        names = [c.name.lower() for c in costs.InsnClass]
        t = self.table(raw, path, names)
        return tuple(self.integer(t, path, c.name.lower(), costs.INSN_PS[c], 1, MAX_INSN_PS) for c in costs.InsnClass)

    def bus(self, raw: object) -> BusSection:
        path = "bus"
        t = self.table(raw, path, ("transport", "host", "port", "keys"))
        transport = self.choice(t, path, "transport", "ipc", TRANSPORTS)
        host = self.string(t, path, "host", "127.0.0.1")
        if host is not None and not host.strip():
            self.error(f"{path}.host", "must not be empty")
        port = self.integer(t, path, "port", 0, 0, MAX_PORT,
                            why=f"the control socket binds port + 1, so {MAX_PORT} is the highest; 0 = pick free ports")
        keys = self.string(t, path, "keys", "") or ""
        if keys:
            resolved = self.local_path(keys, f"{path}.keys")
            keys = str(resolved) if resolved is not None else ""
        return BusSection(cast(Transport, transport), host or "127.0.0.1", port, keys)

    def domains(self, raw: object, pcpus: int | None) -> tuple[DomainSpec, ...]:
        if raw is _MISSING:
            self.error("domain", "at least one [[domain]] is required")
            return ()
        if isinstance(raw, Mapping):
            self.error("domain", "must be an array of tables: write [[domain]] for each domain, not [domain]")
            return ()
        if not isinstance(raw, list | tuple):
            self.error("domain", f"must be an array of tables ([[domain]]), got {_describe(raw)}")
            return ()
        if not raw:
            self.error("domain", "at least one [[domain]] is required")
        elif len(raw) > MAX_DOMAINS:
            self.error("domain", f"at most {MAX_DOMAINS} domains are allowed, got {len(raw)}")
        doms = tuple(self.domain(d, f"domain[{i}]", pcpus) for i, d in enumerate(raw))
        first: dict[str, int] = {}
        for i, d in enumerate(doms):
            if not d.name:
                continue  # already reported
            if d.name in first:
                self.error(
                    f"domain[{i}].name",
                    f"duplicate domain name {_quote(d.name)} (also used by domain[{first[d.name]}])",
                )
            else:
                first[d.name] = i
        return doms

    def domain(self, raw: object, path: str, pcpus: int | None) -> DomainSpec:
        keys = ("name", "vcpus", "memory_mib", "kernel", "cmdline", "backend", "boot", "patching", "faults", "cpus",
                "placement", "on_poweroff", "on_reboot", "on_crash")
        t = self.table(raw, path, keys)
        if not isinstance(raw, Mapping):
            # Reported once; "name missing" on top of "not a table" would only be noise.
            return DomainSpec("", 1, 4, BUILTIN_KERNELS[0], "", "xen", "ebx", True)
        name = self.name(t, path, "name", _MISSING)
        vcpus = self.integer(t, path, "vcpus", 1, 1, MAX_VCPUS)
        memory_mib = self.integer(t, path, "memory_mib", 4, 1, MAX_MEMORY_MIB)
        kernel = self.kernel(t, path, name)
        cmdline = self.cmdline(t, path)
        backend = self.choice(t, path, "backend", "xen", BACKENDS)
        boot = self.choice(t, path, "boot", "ebx", BOOT_PROTOCOLS)
        patching = self.boolean(t, path, "patching", True)
        faults = self.faults(t, path)
        cpus = self.cpus(t, path, pcpus)
        placement = self.choice(t, path, "placement", "local", PLACEMENTS)
        on_poweroff = self.lifecycle(t, path, "on_poweroff", LIFECYCLE_ACTIONS)
        on_reboot = self.lifecycle(t, path, "on_reboot", LIFECYCLE_ACTIONS)
        on_crash = self.lifecycle(t, path, "on_crash", CRASH_ACTIONS)
        return DomainSpec(name, vcpus, memory_mib, kernel, cmdline, cast(Backend, backend), cast(Boot, boot), patching,
                          faults, cpus, cast(Placement, placement), on_poweroff, on_reboot, on_crash)

    def lifecycle(self, t: Mapping[str, Any], path: str, key: str, allowed: Sequence[str]) -> str:
        """An xl.cfg life-cycle action; ``rename-restart`` is xl's but refused here (see LIFECYCLE_ACTIONS)."""
        default = str(attrs.fields_dict(DomainSpec)[key].default)
        if t.get(key) == "rename-restart":
            self.error(_join(path, key), "\"rename-restart\" is not supported: a domain's name is how peers and the "
                                         "toolstack find it, so the old one cannot be kept beside the new under "
                                         "another name; use \"restart\" or \"preserve\"")
            return default
        return self.choice(t, path, key, default, allowed)

    def faults(self, t: Mapping[str, Any], path: str) -> tuple[str, ...]:
        key = f"{path}.faults"
        raw = t.get("faults", [])
        if not isinstance(raw, list | tuple):
            self.error(key, f"must be an array of fault names ({KNOWN_FAULTS_TEXT}), got {_describe(raw)}")
            return ()
        faults: list[str] = []
        first: dict[str, int] = {}  # fault kind ("skip-flush", "ident") -> index of its first occurrence
        for i, raw_fault in enumerate(raw):
            fault = self.fault(raw_fault, f"{key}[{i}]")
            if fault is None:
                continue
            kind = fault.partition("=")[0]
            if kind not in first:
                first[kind] = i
                faults.append(fault)
            elif kind == IDENT_FAULT:
                self.error(f"{key}[{i}]", f"at most one ident= fault per domain (another is faults[{first[kind]}])")
            else:
                self.error(f"{key}[{i}]", f"duplicate fault {_quote(fault)} (also faults[{first[kind]}])")
        return tuple(faults)

    def fault(self, raw: object, path: str) -> str | None:
        """One fault, normalised ("ident=0xDEADBEEF" -> "ident=0xdeadbeef", "ident=0x1" -> "ident=0x00000001")."""
        if not isinstance(raw, str):
            self.error(path, f"must be a fault name ({KNOWN_FAULTS_TEXT}), got {_describe(raw)}")
            return None
        if raw in DOMAIN_FAULTS:
            return raw
        m = _IDENT_FAULT_RE.fullmatch(raw)
        if m:
            return f"{IDENT_FAULT}=0x{int(m.group(1), 16):08x}"
        if raw.startswith(IDENT_FAULT):
            self.error(path, f"must be ident=0x followed by 1 to 8 hex digits, got {_quote(raw)}")
        else:
            self.error(path, f"unknown fault {_quote(raw)} (known: {KNOWN_FAULTS_TEXT}){_hint(raw, DOMAIN_FAULTS)}")
        return None

    def fault_schedule(self, raw: object, domains: Sequence[DomainSpec], pcpus: int,
                       extensions: Sequence[ExtensionSpec] = ()) -> tuple[FaultRequest, ...]:
        """``[[fault]]``: each a kind, a target domain (or DOM.VCPU) of this spec, ``at_ns`` and the kind's
        parameters inline, all checked against the shared fault catalog; a kind that is not built in, against the
        kinds the spec's extensions add (loaded here only then: ``fault_catalog``)."""
        catalog: Mapping[str, Any] = FAULT_KINDS
        tried = False
        if not isinstance(raw, list | tuple):
            self.error("fault", f"must be an array of tables ([[fault]]), got {_describe(raw)}")
            return ()
        if len(raw) > MAX_SCHEDULED_FAULTS:
            self.error("fault", f"at most {MAX_SCHEDULED_FAULTS} scheduled faults, got {len(raw)}")
            return ()
        vcpus = {d.name: d.vcpus for d in domains}
        out = []
        for i, item in enumerate(raw):
            path = f"fault[{i}]"
            if not isinstance(item, Mapping):
                self.error(path, f"must be a table with kind, target, at_ns and the kind's parameters, got "
                                 f"{_describe(item)}")
                continue
            params = {k: v for k, v in item.items() if k not in ("kind", "target", "at_ns")}
            if "at_ns" not in item:
                self.error(f"{path}.at_ns", "required key missing (the virtual time the fault acts at)")
                continue
            kind = item.get("kind")
            if isinstance(kind, str) and kind not in catalog and extensions and not tried:
                tried = True  # once: the extensions either add it or are reported once
                loaded = self.fault_catalog(extensions, f"{path}.kind", kind)
                if loaded is None:
                    continue
                catalog = loaded
            try:
                req = request(kind, item.get("target"), item["at_ns"], params, catalog)
            except FaultError as exc:
                self.error(path, str(exc))
                continue
            if req.domain not in vcpus:
                self.error(f"{path}.target", f"no domain named {_quote(req.domain)} in this spec"
                                             f"{_hint(req.domain, list(vcpus))}")
            elif req.vcpu is not None and req.vcpu >= vcpus[req.domain]:
                self.error(f"{path}.target", f"domain {req.domain} has {vcpus[req.domain]} vCPUs, no vCPU {req.vcpu}")
            elif "pcpu" in req.params and req.params["pcpu"] >= pcpus:
                self.error(f"{path}.pcpu", f"pCPU {req.params['pcpu']} does not exist: hypervisor.pcpus is {pcpus}")
            else:
                out.append(req)
        return tuple(out)

    def fault_catalog(self, extensions: Sequence[ExtensionSpec], path: str, kind: str) -> dict[str, Any] | None:
        """The built-in fault kinds and those the spec's extensions add (this imports the extension modules, which
        a spec whose faults are all built in never does); None, with the reason, when they do not load."""
        if any(b == "extension" or b.startswith(("extension[", "extension.")) for b in self._bad):
            self.error(path, f"fault kind {_quote(kind)} is not built in, and the spec's [[extension]] tables, which "
                             f"might add it, have problems")
            return None
        from pvcluster.extensions import ExtensionError, load

        try:
            return load(extensions).fault_catalog()
        except ExtensionError as exc:
            self.error(path, f"fault kind {_quote(kind)} is not built in, and the spec's extensions, which might add "
                             f"it, do not load: {exc}")
            return None

    def random_faults(self, raw: object, domains: Sequence[DomainSpec]) -> RandomFaults | None:
        """``[faults] random = {rate, kinds, until_ns, targets}``: a seeded random schedule per domain."""
        t = self.table(raw, "faults", ("random",))
        if "random" not in t:
            return None
        path = "faults.random"
        r = self.table(t["random"], path, ("rate", "kinds", "until_ns", "targets"))
        if "rate" not in r:
            self.error(f"{path}.rate", "required key missing (expected faults per virtual millisecond, per domain)")
        rate = self.number(r, path, "rate", 1.0, 0, 1000)
        kinds = r.get("kinds", list(DEFAULT_RANDOM_KINDS))
        if not isinstance(kinds, list | tuple) or not kinds or not all(isinstance(k, str) for k in kinds):
            self.error(f"{path}.kinds", f"must be a non-empty array of fault kinds, got {_describe(kinds)}")
            kinds = []
        for k in kinds:
            if k not in FAULT_KINDS:
                self.error(f"{path}.kinds", f"unknown fault kind {_quote(k)}{_hint(k, list(FAULT_KINDS))}")
            elif k in ("stop", "kill", "crash", "destroy", "unpause", "online"):
                self.error(f"{path}.kinds", f"{_quote(k)} cannot be drawn at random (it ends a domain, depends on wall "
                                            f"time, or only undoes another fault); schedule it with [[fault]]")
        until = self.integer(r, path, "until_ns", 2_000_000, 1, MAX_LINK_NS)
        targets = r.get("targets", [])
        names = {d.name for d in domains}
        if not isinstance(targets, list | tuple) or not all(isinstance(n, str) and n in names for n in targets):
            self.error(f"{path}.targets", f"must be an array of domain names of this spec, got {_describe(targets)}")
            targets = []
        return RandomFaults(rate, tuple(kinds), until, tuple(targets))

    def cpus(self, t: Mapping[str, Any], path: str, pcpus: int | None) -> tuple[int, ...]:
        """Hard affinity: distinct pCPU ids, below ``pcpus`` when it is known (else below MAX_PCPUS)."""
        key = f"{path}.cpus"
        raw = t.get("cpus", [])
        if not isinstance(raw, list | tuple):
            self.error(key, f"must be an array of pCPU ids (integers >= 0), got {_describe(raw)}")
            return ()
        if len(raw) > MAX_PCPUS:  # longer must repeat an id; one problem instead of thousands
            self.error(key, f"at most {MAX_PCPUS} pCPU ids, got {len(raw)}")
            return ()
        first: dict[int, int] = {}  # pCPU id -> index of its first occurrence; keeps the written order
        for i, cpu in enumerate(raw):
            where = f"{key}[{i}]"
            if isinstance(cpu, bool) or not isinstance(cpu, int) or cpu < 0:
                self.error(where, f"must be a pCPU id (an integer >= 0), got {_describe(cpu)}")
            elif pcpus is not None and cpu >= pcpus:
                self.error(where, f"pCPU {cpu} does not exist: hypervisor.pcpus is {pcpus} (ids 0..{pcpus - 1})")
            elif cpu >= MAX_PCPUS:
                self.error(where, f"pCPU {cpu} does not exist: there are at most {MAX_PCPUS} (ids 0..{MAX_PCPUS - 1})")
            elif cpu in first:
                self.error(where, f"duplicate pCPU {cpu} (also cpus[{first[cpu]}])")
            else:
                first[cpu] = i
        return tuple(first)

    def kernel(self, t: Mapping[str, Any], path: str, name: str) -> str:
        kpath = f"{path}.kernel"
        v = self.string(t, path, "kernel", BUILTIN_KERNELS[0])
        if v is None:
            return BUILTIN_KERNELS[0]
        if v in BUILTIN_KERNELS:
            return v
        if not v.strip():
            self.error(
                kpath,
                f"must be a built-in kernel ({_choices(BUILTIN_KERNELS)}) or a path to a file, got {_describe(v)}",
            )
            return BUILTIN_KERNELS[0]
        if not self.check_files:
            if not Path(v).is_absolute():
                self.error(kpath, f"must be a built-in kernel ({_choices(BUILTIN_KERNELS)}) or an absolute path")
            return v
        p = self.local_path(v, kpath)
        if p is None:
            return v
        who = f"domain {_quote(name)}" if name else path
        try:
            st = p.stat()
        except FileNotFoundError:
            # A bare word that is no file is more likely a misspelt built-in than a missing file.
            hint = _hint(v, BUILTIN_KERNELS) if os.sep not in v else ""
            self.error(kpath, f"kernel file for {who} not found: {p}{hint}")
            return str(p)
        except OSError as exc:
            self.error(kpath, f"kernel file for {who} is not accessible: {p} ({exc.strerror or exc})")
            return str(p)
        # Checked before opening: opening a FIFO would block the loader.
        if not stat.S_ISREG(st.st_mode):
            self.error(kpath, f"kernel file for {who} is not a regular file: {p}")
            return str(p)
        try:
            with open(p, "rb"):
                pass
        except OSError as exc:
            self.error(kpath, f"kernel file for {who} is not readable: {p} ({exc.strerror or exc})")
        return str(p)

    def cmdline(self, t: Mapping[str, Any], path: str) -> str:
        v = self.string(t, path, "cmdline", "")
        if v is None:
            return ""
        size = len(v.encode("utf-8"))  # string() refused text that does not encode
        if size >= GUEST_CMDLINE_MAX:
            self.error(
                f"{path}.cmdline",
                f"must be shorter than {GUEST_CMDLINE_MAX} bytes as UTF-8, got {size} bytes",
            )
            return ""
        return v

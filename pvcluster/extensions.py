"""Hypercall extensions: a Python module named in the spec adds hypercall families without editing pvcluster.

An extension module defines ``register(reg)`` and calls, on the ``Registry`` it is given::

    reg.hypercall(nr=50, name="batched_flush", handle=handle,
                  copyin=[ArgSpan(addr_arg=0, size=8, count_arg=1, max_count=64)])
    reg.trace_table("batched flushes", events=("batched_flush",), build=rows)
    reg.fault_kind("batched-flush-lose", "the next batched flushes raise no completion event", lose,
                   params={"count": Param("how many flushes", 1, 1, 1000)})

``handle(call)`` is exactly what a built-in family's ``handle`` is (``hypervisor/hypercalls/base.py``'s ``Call``:
the arguments, the copied-in guest buffers in ``call.mem``, the core's state through ``call.dom`` / ``call.hv``;
it returns the guest's EAX and puts what it wants done in ``call.effects`` / ``call.remote``, its virtual cost in
``call.work_ns`` and its trace fields through ``call.trace`` / ``call.record``). ``copyin`` declares which guest
buffers the domain process copies in with the trap (``pvcluster/abi/extcopy.py`` says why it is data).

``fault_kind`` adds a kind to the fault catalog (``pvcluster/faults.py``) for a cluster that loads the extension:
the spec's ``[[fault]]`` tables, ``pvcluster inject`` and ``Cluster.inject`` may name it, its parameters are
``pvcluster.faults.Param`` records checked as a built-in kind's are, and the hypervisor's ``FaultPlan`` runs
``apply(hv, dom, params, vt_ns)`` at a window boundary as it runs a built-in kind (traced ``fault.inject`` /
``fault.outcome``, recorded in ``faults.jsonl``, replayed by ``up --replay``). ``apply`` returns the outcome (a
string) and acts on the domain: typically it arms something in ``dom.ext[<extension label>]`` that the extension's
own handler reads. For a ``target="vcpu"`` kind ``params`` also holds ``vcpu``. An ``apply`` that raises ends the
domain it targets (a crash naming the extension and the kind), never the hypervisor.

Ownership, so that there is no module-level state: nothing here is global. ``load`` imports each module the spec
names and runs its ``register`` on a fresh ``Registry``; the result (``Extensions``) belongs to whoever loaded it,
the ``Hypervisor`` (``hypervisor/extensions.py``) or the toolstack (``pvcluster sdk``, ``pvcluster trace``). An
extension module must keep no state of its own between calls either: what a handler remembers hangs off the
domain (``call.dom.ext``, one dict per extension name).

Rules checked at load, each an ``ExtensionError`` naming the extension: a number outside the hypercall page, a
number two extensions (or one, twice) register, a built-in family's number without ``override = true`` in its
``[[extension]]`` table, a bad name, a module that does not import or has no ``register``; a fault kind named as a
built-in kind or another extension's, or not matching ``FAULT_NAME_PATTERN``, a target other than ``"domain"`` or
``"vcpu"``, a parameter that is not a ``Param`` or is named as a ``[[fault]]`` table's own keys.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs

from pvcluster.abi.copyin import Descriptor
from pvcluster.abi.extcopy import ArgSpan, ExtCopyIn, descriptors
from pvcluster.abi.platform import EXTENSION_NR_LIMIT
from pvcluster.extspec import ExtensionSpec
from pvcluster.faults import KINDS as BUILTIN_FAULT_KINDS
from pvcluster.faults import Kind, Param

ENTRY_POINT_GROUP = "pvcluster.extensions"
_NAME_RE = re.compile(r"[a-z_][a-z0-9_]{0,31}")
FAULT_NAME_PATTERN = r"[a-z][a-z0-9]*(-[a-z0-9]+)*"
_FAULT_NAME_RE = re.compile(FAULT_NAME_PATTERN)
MAX_FAULT_NAME = 48
# Keys a [[fault]] table has besides a kind's parameters, and the vCPU an apply of a vCPU kind is given.
_RESERVED_PARAMS = frozenset({"kind", "target", "at_ns", "vcpu"})

# A handler takes the hypervisor's Call; typed loosely because pvcluster/ never imports hypervisor/.
Handler = Callable[[Any], int]
# A trace-analysis table: the events named (merged by virtual time) -> its rows.
TableBuilder = Callable[[Iterable[dict[str, Any]]], list[dict[str, Any]]]
# A fault kind's action: (the Hypervisor, the target Domain, the parameters, virtual ns) -> its outcome.
FaultApply = Callable[[Any, Any, dict[str, int], int], str]


class ExtensionError(Exception):
    """An extension that cannot be loaded, or registers something it may not."""


@attrs.frozen
class Family:
    """One registered hypercall family."""

    nr: int
    name: str
    handle: Handler
    copyin: tuple[ArgSpan, ...]
    extension: str  # the [[extension]] it came from (its label)
    overrides: bool  # replaces a built-in family


@attrs.frozen
class TraceTable:
    """A table ``pvcluster trace`` prints for a run that loaded the extension."""

    title: str
    events: tuple[str, ...]
    build: TableBuilder
    extension: str


@attrs.frozen
class FaultKind:
    """One fault kind an extension adds to the catalog."""

    name: str
    kind: Kind  # what pvcluster.faults.request checks a request against (group "extension")
    apply: FaultApply
    extension: str


class Registry:
    """What one extension module registers (``register(reg)``): one per extension per load, never shared."""

    def __init__(self, ext: ExtensionSpec, builtin: Collection[int]) -> None:
        self.ext = ext
        self._builtin = builtin
        self.families: list[Family] = []
        self.tables: list[TraceTable] = []
        self.fault_kinds: list[FaultKind] = []

    def _fail(self, msg: str) -> ExtensionError:
        return ExtensionError(f"extension {self.ext.label}: {msg}")

    def hypercall(self, nr: int, name: str, handle: Handler, *, copyin: Sequence[ArgSpan] = ()) -> None:
        """Register hypercall ``nr`` (``name``: trace and C name, ``__HYPERVISOR_<name>``)."""
        if isinstance(nr, bool) or not isinstance(nr, int) or not 0 <= nr < EXTENSION_NR_LIMIT:
            raise self._fail(f"hypercall number must be 0..{EXTENSION_NR_LIMIT - 1} (a hypercall page stub), "
                             f"got {nr!r}")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise self._fail(f"hypercall name must match {_NAME_RE.pattern}, got {name!r}")
        if not callable(handle):
            raise self._fail(f"handler of {name} is not callable")
        spans = tuple(copyin)
        for s in spans:
            if not isinstance(s, ArgSpan):
                raise self._fail(f"copyin of {name} must be ArgSpan records, got {s!r}")
            if s.problems():
                raise self._fail(f"copyin of {name}: {'; '.join(s.problems())}")
        if nr in self._builtin and not self.ext.override:
            raise self._fail(f"hypercall {nr} ({name}) is a built-in family's number; set override = true in its "
                             f"[[extension]] table to replace it")
        if any(f.nr == nr for f in self.families):
            raise self._fail(f"hypercall {nr} registered twice")
        self.families.append(Family(nr, name, handle, spans, self.ext.label, nr in self._builtin))

    def trace_table(self, title: str, *, events: Sequence[str], build: TableBuilder) -> None:
        """Add a table to ``pvcluster trace``: ``build`` gets the named trace events of the run in virtual-time
        order and returns its rows (dicts with the same keys)."""
        if not title or not events or not callable(build):
            raise self._fail("trace_table needs a title, the events it reads and a build function")
        self.tables.append(TraceTable(title, tuple(events), build, self.ext.label))

    def fault_kind(self, name: str, doc: str, apply: FaultApply, *, target: str = "domain",
                   params: Mapping[str, Param] | None = None) -> None:
        """Add fault kind ``name`` (module docstring): ``apply(hv, dom, params, vt_ns) -> outcome``; ``target``
        "domain" or "vcpu" (then ``TARGET`` is ``DOM.N`` and ``params["vcpu"]`` is N); ``params``: name -> Param."""
        if not isinstance(name, str) or len(name) > MAX_FAULT_NAME or not _FAULT_NAME_RE.fullmatch(name):
            raise self._fail(f"fault kind name must match {FAULT_NAME_PATTERN} (at most {MAX_FAULT_NAME} "
                             f"characters), got {name!r}")
        if name in BUILTIN_FAULT_KINDS:
            raise self._fail(f"fault kind {name} is a built-in kind; name it after the extension (e.g. "
                             f"'myext-{name}')")
        if any(f.name == name for f in self.fault_kinds):
            raise self._fail(f"fault kind {name} registered twice")
        if not isinstance(doc, str) or not doc:
            raise self._fail(f"fault kind {name} needs a doc string (pvcluster inject --help lists it)")
        if not callable(apply):
            raise self._fail(f"apply of fault kind {name} is not callable")
        if target not in ("domain", "vcpu"):
            raise self._fail(f"fault kind {name}: target must be 'domain' or 'vcpu', got {target!r}")
        given = dict(params or {})
        for pname, p in given.items():
            if not isinstance(pname, str) or not _NAME_RE.fullmatch(pname) or pname in _RESERVED_PARAMS:
                raise self._fail(f"fault kind {name}: parameter name must match {_NAME_RE.pattern} and not be one "
                                 f"of {', '.join(sorted(_RESERVED_PARAMS))}, got {pname!r}")
            if not isinstance(p, Param):
                raise self._fail(f"fault kind {name}: parameter {pname} must be a pvcluster.faults.Param, got {p!r}")
            if p.lo > p.hi or (p.default is not None and not p.lo <= p.default <= p.hi):
                raise self._fail(f"fault kind {name}: parameter {pname} needs lo <= default <= hi, got {p!r}")
        kind = Kind("extension", target, f"{doc} (extension {self.ext.label})", given)
        self.fault_kinds.append(FaultKind(name, kind, apply, self.ext.label))


@attrs.frozen
class Extensions:
    """Everything the spec's extensions registered, by number."""

    families: dict[int, Family] = attrs.Factory(dict)
    tables: tuple[TraceTable, ...] = ()
    # number -> copy-in descriptor, for copyin.describe's ``extra`` (a multicall's entries, in the hypervisor)
    descriptors: dict[int, Descriptor] = attrs.Factory(dict)
    fault_kinds: dict[str, FaultKind] = attrs.Factory(dict)  # the fault kinds they add, by name

    def fault_catalog(self) -> dict[str, Kind]:
        """The built-in fault kinds and the extensions': what a cluster that loaded them accepts."""
        return {**BUILTIN_FAULT_KINDS, **{n: f.kind for n, f in self.fault_kinds.items()}}

    def copyin(self) -> list[ExtCopyIn]:
        """The copy-in declarations, as the Build message carries them to each domain process."""
        return [ExtCopyIn(f.nr, list(f.copyin)) for _, f in sorted(self.families.items())]

    def c_defines(self) -> list[str]:
        """``-D__HYPERVISOR_<name>=<nr>`` for each family: the guest's hypercall macros take the number from the
        same registration the hypervisor dispatches on (one definition)."""
        return [f"-D__HYPERVISOR_{f.name}={f.nr}" for _, f in sorted(self.families.items())]


def load(specs: Sequence[ExtensionSpec], builtin: Collection[int] = ()) -> Extensions:
    """Import each extension and run its ``register``; ``builtin``: the numbers of the built-in families."""
    families: dict[int, Family] = {}
    tables: list[TraceTable] = []
    fault_kinds: dict[str, FaultKind] = {}
    for ext in specs:
        reg = Registry(ext, builtin)
        register = _register_of(ext)
        try:
            register(reg)
        except ExtensionError:
            raise
        except Exception as exc:
            raise ExtensionError(f"extension {ext.label}: register() raised {exc!r}") from exc
        for f in reg.families:
            other = families.get(f.nr)
            if other is not None:
                raise ExtensionError(f"extension {ext.label}: hypercall {f.nr} ({f.name}) is also registered by "
                                     f"extension {other.extension} ({other.name})")
            families[f.nr] = f
        tables.extend(reg.tables)
        for k in reg.fault_kinds:
            taken = fault_kinds.get(k.name)
            if taken is not None:
                raise ExtensionError(f"extension {ext.label}: fault kind {k.name} is also registered by extension "
                                     f"{taken.extension}")
            fault_kinds[k.name] = k
    decls = [ExtCopyIn(f.nr, list(f.copyin)) for _, f in sorted(families.items())]
    return Extensions(families, tuple(tables), descriptors(decls), fault_kinds)


def _register_of(ext: ExtensionSpec) -> Callable[[Registry], None]:
    target: Any
    if ext.entry_point:
        found = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == ext.entry_point]
        if not found:
            raise ExtensionError(f"extension {ext.label}: no installed package offers a '{ext.entry_point}' entry "
                                 f"point in group {ENTRY_POINT_GROUP}")
        try:
            target = found[0].load()
        except Exception as exc:
            raise ExtensionError(f"extension {ext.label}: loading it raised {exc!r}") from exc
    else:
        target = _import(ext)
    register = getattr(target, "register", None) if isinstance(target, ModuleType) else target
    if not callable(register):
        raise ExtensionError(f"extension {ext.label}: has no register(reg) function")
    return register  # type: ignore[no-any-return]


def _import(ext: ExtensionSpec) -> ModuleType:
    """The module, imported normally, or (``path``) loaded from its file there without touching ``sys.path`` or
    ``sys.modules`` (a fresh module object per load: nothing one load does is seen by another)."""
    if not ext.path:
        try:
            return importlib.import_module(ext.module)
        except Exception as exc:
            raise ExtensionError(f"extension {ext.label}: cannot import it: {exc!r}") from exc
    base = Path(ext.path).joinpath(*ext.module.split("."))
    file = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
    if not file.is_file():
        raise ExtensionError(f"extension {ext.label}: no {base}.py (or package) under path {ext.path}")
    spec = importlib.util.spec_from_file_location(ext.module, file)
    if spec is None or spec.loader is None:
        raise ExtensionError(f"extension {ext.label}: {file} is not a loadable module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ExtensionError(f"extension {ext.label}: importing {file} raised {exc!r}") from exc
    return module

"""The shape of the code, checked: no module-level simulation state, processes that meet only in shared code, and a
simulation core that knows nothing of trio, ZeroMQ or sockets."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pvcluster", "hypervisor", "domains")
# Toolstack modules: the CLI and what only it uses. Neither process may import them.
TOOLSTACK = ("pvcluster.cli", "pvcluster.cluster", "pvcluster.control", "pvcluster.summary", "pvcluster.trace.analyse",
             "pvcluster.trace.run", "pvcluster.trace.render", "pvcluster.trace.compare", "pvcluster.trace.plots",
             "pvcluster.trace.perfetto", "pvcluster.top",
             "pvcluster.check", "pvcluster.rundiff", "pvcluster.runrecord", "pvcluster.tracequery",
             "pvcluster.pytest_plugin")
# What a domain process must not load: the assembler (the toolstack puts the built-in kernel in the on-disk cache
# before the domains start), the terminal UI and the toolstack. Every domain process pays for each import again.
DOMAIN_PROCESS_FORBIDDEN = ("keystone", "rich", *TOOLSTACK)
# The simulation core: everything in hypervisor/ but the transport shell (sockets, their authentication) and the
# process entry point.
# the transport shell: trio, sockets, processes (boundary.py holds the clock; saving.py moves state between
# processes; gdbstub.py serves gdb; coredumps.py dumps ending domains)
SHELL = ("hypervisor/shell.py", "hypervisor/control.py", "hypervisor/auth.py", "hypervisor/__main__.py",
         "hypervisor/boundary.py", "hypervisor/gdbstub.py", "hypervisor/saving.py", "hypervisor/coredumps.py")
_MUTATING = {"append", "extend", "insert", "add", "update", "setdefault", "pop", "popitem", "clear", "remove",
             "discard", "appendleft", "__setitem__", "__delitem__"}
_CONTAINER_CALLS = {"dict", "list", "set", "defaultdict", "deque", "Counter", "OrderedDict", "bytearray"}


def _modules() -> Iterator[tuple[Path, ast.Module]]:
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imports(tree: ast.Module) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _is_container(value: ast.expr | None) -> bool:
    if isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)):
        return True
    if isinstance(value, ast.Call):
        func = value.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        return name in _CONTAINER_CALLS
    return False


def module_state(tree: ast.Module) -> list[str]:
    """Problems: module-level names bound to mutable containers that the module mutates or that are not
    constants by name, and every ``global`` statement (a function rebinding module state)."""
    problems: list[str] = []
    containers: dict[str, int] = {}
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if _is_container(value):
            for t in targets:
                if isinstance(t, ast.Name):
                    containers[t.id] = node.lineno
    for name, line in containers.items():
        if not name.isupper() and not (name.startswith("__") and name.endswith("__")):
            problems.append(f"line {line}: module-level container {name!r} is not a constant (UPPER_CASE)")
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            problems.append(f"line {node.lineno}: global {', '.join(node.names)}")
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATING:
            target = node.func.value
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            for t in node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]:
                if isinstance(t, ast.Subscript):
                    target = t.value
        if isinstance(target, ast.Name) and target.id in containers:
            problems.append(f"line {node.lineno}: module-level {target.id!r} is mutated")
    return problems


def test_no_module_level_simulation_state() -> None:
    found = {str(path.relative_to(ROOT)): p for path, tree in _modules() if (p := module_state(tree))}
    assert found == {}


def test_the_state_scan_catches_what_it_looks_for() -> None:
    sample = ast.parse(
        "_tables = {}\nPORTS = {}\nCONST = (1, 2)\n"
        "def f():\n    global _n\n    PORTS[3] = 1\n    _tables.setdefault(1, 2)\n"
    )
    problems = module_state(sample)
    assert any("'_tables' is not a constant" in p for p in problems)
    assert any("global _n" in p for p in problems)
    assert any("'PORTS' is mutated" in p for p in problems)
    assert not any("CONST" in p for p in problems)


@pytest.mark.parametrize(("pkg", "forbidden"), [("domains", "hypervisor"), ("hypervisor", "domains")])
def test_the_two_processes_meet_only_in_shared_code(pkg: str, forbidden: str) -> None:
    offenders = {str(p.relative_to(ROOT)): sorted(i for i in _imports(t) if i.split(".")[0] == forbidden)
                 for p, t in _modules() if p.is_relative_to(ROOT / pkg)}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("pkg", ["domains", "hypervisor"])
def test_neither_process_imports_the_toolstack(pkg: str) -> None:
    offenders = {str(p.relative_to(ROOT)): sorted(i for i in _imports(t) if i.startswith(TOOLSTACK))
                 for p, t in _modules() if p.is_relative_to(ROOT / pkg)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_simulation_core_is_trio_free() -> None:
    offenders = {}
    for path, tree in _modules():
        rel = str(path.relative_to(ROOT))
        if rel.startswith("hypervisor/") and rel not in SHELL:
            bad = sorted(i for i in _imports(tree) if i.split(".")[0] in ("trio", "zmq", "socket", "subprocess"))
            if bad:
                offenders[rel] = bad
    assert offenders == {}


def _modules_loaded_by(*modules: str) -> list[str]:
    """The names in sys.modules of a fresh interpreter after it imports ``modules`` (and nothing else)."""
    code = f"import json, sys\nfor m in {list(modules)!r}:\n    __import__(m)\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    loaded: list[str] = json.loads(out.stdout)
    return loaded


@pytest.mark.parametrize("module", ["domains.runtime", "domains.__main__"])
def test_a_domain_process_imports_only_what_it_runs(module: str) -> None:
    """A domain process is a blocking ZeroMQ loop that writes its own trace lines: nothing ``python -m domains``
    imports brings in trio or structlog (their imports cost start-up time and memory in every domain process, and
    their machinery every message), keystone (the kernel image is assembled once, by the toolstack), rich or the
    toolstack."""
    loaded = _modules_loaded_by(module)
    assert module in loaded
    forbidden = (*DOMAIN_PROCESS_FORBIDDEN, "trio", "structlog")
    assert sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)) == []

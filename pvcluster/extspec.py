"""The spec's ``[[extension]]`` tables: which hypercall extensions a cluster loads (``pvcluster/extensions.py``).

::

    [[extension]]
    module = "batched_flush_ext"   # a Python module with register(reg), or:
    # entry_point = "batched-flush"  # the name of a `pvcluster.extensions` entry point of an installed package
    path = "."                     # optional: the directory the module file is in (relative = from the spec file)
    override = false               # may it replace a built-in hypercall number? (default false)

Only the spec says what is loaded: installed entry points are not loaded unless a table names them, so one spec
runs the same machine wherever it runs. Checked here as every other part of the spec is (every problem reported,
unknown keys refused); whether the module imports and registers sensibly is checked when it is loaded
(``pvcluster.extensions.load``), by the hypervisor at start and by ``pvcluster sdk``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from pvcluster.spec import _Checker

MAX_EXTENSIONS = 16
MODULE_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
ENTRY_POINT_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}"
_MODULE_RE = re.compile(MODULE_PATTERN)
_ENTRY_RE = re.compile(ENTRY_POINT_PATTERN)
KEYS = ("module", "entry_point", "path", "override")


@attrs.frozen
class ExtensionSpec:
    module: str = ""  # a dotted module name, or "" when ``entry_point`` names it
    entry_point: str = ""  # a `pvcluster.extensions` entry point's name
    path: str = ""  # "" (import normally) or an absolute directory holding the module's file
    override: bool = False

    @property
    def label(self) -> str:
        """How errors and traces name it."""
        return self.module or f"entry point {self.entry_point}"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def check(checker: _Checker, raw: object) -> tuple[ExtensionSpec, ...]:
    """Validate the ``extension`` array of tables."""
    if not isinstance(raw, list | tuple):
        checker.error("extension", "must be an array of tables ([[extension]])")
        return ()
    if len(raw) > MAX_EXTENSIONS:
        checker.error("extension", f"at most {MAX_EXTENSIONS} extensions are allowed, got {len(raw)}")
        return ()
    out: list[ExtensionSpec] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        path = f"extension[{i}]"
        t: Mapping[str, Any] = checker.table(item, path, KEYS)
        if not isinstance(item, Mapping):
            continue
        module = checker.string(t, path, "module", "") or ""
        entry = checker.string(t, path, "entry_point", "") or ""
        where = checker.string(t, path, "path", "") or ""
        override = checker.boolean(t, path, "override", False)
        if bool(module) == bool(entry):
            checker.error(path, "give exactly one of module (a Python module name) and entry_point")
            continue
        if module and not _MODULE_RE.fullmatch(module):
            checker.error(f"{path}.module", f"must be a dotted Python module name ({MODULE_PATTERN}), got '{module}'")
            continue
        if entry and not _ENTRY_RE.fullmatch(entry):
            checker.error(f"{path}.entry_point", f"must match {ENTRY_POINT_PATTERN}, got '{entry}'")
            continue
        if where and entry:
            checker.error(f"{path}.path", "only for a module (an entry point's package is installed)")
            continue
        if where:
            resolved = checker.local_path(where, f"{path}.path")
            if resolved is None:
                continue
            where = str(resolved)
        key = module or f"entry_point:{entry}"
        if key in seen:
            checker.error(path, f"duplicate extension '{module or entry}' (also extension[{seen[key]}])")
            continue
        seen[key] = i
        out.append(ExtensionSpec(module, entry, where, override))
    return tuple(out)


def from_file(path: str) -> tuple[ExtensionSpec, ...]:
    """Only the ``[[extension]]`` tables of a spec file, checked as ``load_spec`` checks them, without the rest (a
    guest's spec names the kernel file it is about to be built into: ``pvcluster sdk --cflags --spec`` runs first).
    Raises ``SpecError``."""
    import tomllib
    from pathlib import Path

    from pvcluster.spec import SpecError, _Checker

    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(str(p), [f"cannot read it: {exc}"]) from None
    checker = _Checker(p.absolute().parent)
    exts = check(checker, data.get("extension", []))
    if checker.problems:
        raise SpecError(str(p), checker.problems)
    return exts

"""Trace-analysis tables that a run's hypercall extensions add (``Registry.trace_table``, pvcluster/extensions.py).

A run directory's ``spec.json`` names the extensions it loaded; each is loaded again here, in the toolstack, and
each table it registered gets the run's events it asked for (merged by virtual time, one streaming pass per table)
and returns its rows. ``pvcluster trace`` prints them after the built-in tables and puts them under ``extensions``
in ``--json``. An extension that no longer loads, or a table that raises, is reported in place of its rows, never
fatal: the built-in analysis of the run stands on its own.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pvcluster.extensions import ExtensionError, load
from pvcluster.extspec import ExtensionSpec
from pvcluster.trace.run import Run


def _specs(run: Run) -> list[ExtensionSpec]:
    path = run.path / "spec.json"
    try:
        raw = json.loads(path.read_text()).get("extension", []) if path.exists() else []
        return [ExtensionSpec(**e) for e in raw]
    except (OSError, ValueError, TypeError, AttributeError):
        return []


def tables(run: Run) -> list[dict[str, Any]]:
    """``[{"title", "extension", "rows"} or {"title", "extension", "error"}]`` for the run's extensions."""
    specs = _specs(run)
    if not specs:
        return []
    try:
        exts = load(specs)
    except ExtensionError as exc:
        return [{"title": "extensions", "extension": ", ".join(s.label for s in specs), "error": str(exc)}]
    out: list[dict[str, Any]] = []
    for t in exts.tables:
        try:
            wanted = frozenset(t.events)  # the reader adds its own bookkeeping events (trace.start)
            rows = t.build(e for e in run.events(names=wanted) if e.get("event") in wanted)
            out.append({"title": t.title, "extension": t.extension, "rows": [dict(r) for r in rows]})
        except Exception as exc:  # an extension's bug: its table says so, the rest of the report stands
            out.append({"title": t.title, "extension": t.extension, "error": f"{exc!r}"})
    return out


def _cell(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else escape(str(v))


def render(docs: list[dict[str, Any]], out: Console) -> None:
    for d in docs:
        if "error" in d:
            out.print(f"[yellow]{escape(d['title'])} ({escape(d['extension'])}): {escape(d['error'])}[/yellow]")
            continue
        rows = d["rows"]
        if not rows:
            out.print(f"{escape(d['title'])}: no rows")
            continue
        t = Table(title=d["title"], title_justify="left")
        for c in rows[0]:
            t.add_column(str(c), justify="right")
        for r in rows:
            t.add_row(*(_cell(r.get(c, "")) for c in rows[0]))
        out.print(t)

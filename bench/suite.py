"""The benchmark suite's frame: sections that each measure once, targets judged pass/miss, tables and one JSON
document. What each section measures is in bench/sections.py."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs


@attrs.frozen
class Options:
    only: tuple[str, ...]  # the sections to run, in suite order
    quick: bool = False
    ping_rounds: int = 10_000
    scale_domains: tuple[int, ...] = (1, 2, 4, 8, 16)
    scale_vcpus: tuple[int, ...] = (2, 4)
    timeout_s: float = 3600.0  # per cluster run


@attrs.frozen
class Target:
    """One of the issue's goals next to what was measured: ``measured OP limit`` passes."""

    what: str
    measured: float | None  # None: not measured in this run (the note says why)
    unit: str
    op: str  # "<=", ">=" or "<"
    limit: float
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.measured is None:
            return None
        return {"<=": self.measured <= self.limit, ">=": self.measured >= self.limit,
                "<": self.measured < self.limit}[self.op]

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "pass": self.passed}


@attrs.define
class Section:
    name: str
    title: str
    status: str = "ok"  # ok | not available | skipped | error
    note: str = ""
    headers: list[str] = attrs.Factory(list)
    rows: list[list[str]] = attrs.Factory(list)
    text: str = ""  # a table the section's own module printed (pvops, multicall)
    data: dict[str, Any] = attrs.Factory(dict)  # the measurements, for the JSON document
    targets: list[Target] = attrs.Factory(list)
    seconds: float = 0.0  # how long the section took

    def to_json(self) -> dict[str, Any]:
        out = {"title": self.title, "status": self.status, "note": self.note, "seconds": round(self.seconds, 3),
               "data": self.data}
        if self.text:
            out["text"] = self.text
        return out


Runner = Callable[[Options, Callable[[str], None]], Section]


def run_sections(opts: Options, runners: Mapping[str, Runner], say: Callable[[str], None]) -> list[Section]:
    """Each selected section once, in order. A section that fails is reported as an error and the others still
    run: a suite of long runs must not lose everything to one."""
    out = []
    for name in opts.only:
        say(f"{name}: running")
        start = time.perf_counter()
        try:
            section = runners[name](opts, say)
        except Exception as exc:  # noqa: BLE001 - reported in the section, with the traceback on stderr
            say("".join(traceback.format_exception(exc)).rstrip())
            section = Section(name, name, status="error", note=f"{type(exc).__name__}: {exc}")
        section.seconds = time.perf_counter() - start
        say(f"{name}: {section.status} in {section.seconds:.1f} s")
        out.append(section)
    return out


def document(sections: Sequence[Section], machine: Mapping[str, Any], opts: Options) -> dict[str, Any]:
    """The one JSON document of a suite run."""
    return {
        "machine": dict(machine),
        "options": attrs.asdict(opts),
        "sections": {s.name: s.to_json() for s in sections},
        "targets": [{"section": s.name, **t.to_json()} for s in sections for t in s.targets],
    }


# -- text ----------------------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> str:
    """Columns padded to their widest cell: those in ``left`` left-aligned (text), the others right-aligned (numbers).
    A short row (a failed run's) leaves its last columns empty."""
    widths = [max(len(str(r[i])) if i < len(r) else 0 for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = [*cells, *[""] * (len(widths) - len(cells))][: len(widths)]
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(padded, widths, strict=True))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _verdict(t: Target) -> str:
    return {True: "pass", False: "MISS", None: "-"}[t.passed]


def _num(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    return f"{x:.3g} {unit}".strip() if abs(x) < 1000 else f"{x:,.0f} {unit}".strip()


def targets_table(sections: Sequence[Section]) -> str:
    rows = [[t.what, _num(t.measured, t.unit), f"{t.op} {_num(t.limit, t.unit)}", _verdict(t), t.note]
            for s in sections for t in s.targets]
    return table(["target", "measured", "goal", "verdict", "note"], rows, left=(0, 3, 4)) if rows else "none"


def render(sections: Sequence[Section], machine: Mapping[str, Any]) -> str:
    parts = [
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable); Python "
        f"{machine['python']}, unicorn {machine['unicorn']}, pyzmq {machine['pyzmq']} (libzmq {machine['libzmq']}); "
        f"{machine['platform']}; commit {machine['commit']}; {machine['date']}"
    ]
    for s in sections:
        head = f"== {s.title} [{s.name}]" + (f": {s.status}" if s.status != "ok" else "") + f" ({s.seconds:.1f} s)"
        body = [head]
        if s.note:
            body.append(s.note)
        if s.rows:
            body.append(table(s.headers, s.rows))
        if s.text:
            body.append(s.text.rstrip())
        parts.append("\n".join(body))
    parts.append("== targets\n" + targets_table(sections))
    return "\n\n".join(parts) + "\n"

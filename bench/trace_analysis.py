"""Trace analysis speed (issue 11): `pvcluster trace --json` on synthetic runs of 100k, 300k and 1M events.

Each run directory is tiled from one real run (bench/synthetic_trace.py) and analysed in a fresh child process,
as a user runs it: the wall time is the child's from fork to exit (interpreter start-up included; the real
template run's own row shows that fixed cost) and the memory is the child's own peak RSS (``ru_maxrss`` from
``os.wait4``). The goals: 1M events in <= 10 s, peak RSS < 200 MB, and memory flat in the number of events.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from bench import childrun, synthetic_trace
from bench.suite import Options, Section, Target

Say = Callable[[str], None]

SIZES = (100_000, 300_000, 1_000_000)
QUICK_SIZES = (100_000,)
GOAL_EVENTS, GOAL_WALL_S, GOAL_RSS_MB = 1_000_000, 10.0, 200.0
# "Flat across the three sizes": the peak at 1M events may exceed the peak at 100k by at most this factor (the
# interpreter and its imports, ~30-40 MB, are most of a streaming pass's peak; what grows is per-shootdown data).
FLAT_RATIO = 1.25
TITLE = "trace analysis: `pvcluster trace --json` on synthetic runs (tiled from one real run), in a fresh process"
HEADERS = ["run", "events", "wall s", "CPU s", "events/s", "peak RSS MB", "shootdowns", "counts"]


@attrs.frozen
class Analysed:
    """One analysis child: what it read and what it cost."""

    events: int  # events in the run directory's trace files
    wall_s: float
    maxrss_kib: int
    doc: dict[str, Any]  # what `pvcluster trace --json` printed
    cpu_s: float = 0.0  # the child's user + system time

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s > 0 else float("inf")

    @property
    def rss_mb(self) -> float:
        """Peak RSS in MB (10^6 bytes), the unit the goal is stated in."""
        return self.maxrss_kib * 1024 / 1e6

    def shootdowns_by_mode(self) -> dict[str, int]:
        return {row["mode"]: int(row["shootdowns"]) for row in self.doc.get("shootdowns", [])}


def analyse(run_dir: Path, events: int, *, timeout_s: float) -> Analysed:
    """`pvcluster trace --run-dir RUN_DIR --json` in a fresh interpreter (this one's: the project's venv)."""
    argv = [sys.executable, "-m", "pvcluster.cli", "trace", "--run-dir", str(run_dir), "--json"]
    child = childrun.run(argv, timeout_s=timeout_s)
    return Analysed(events, child.wall_s, child.maxrss_kib, json.loads(child.stdout), child.cpu_s)


def count_events(run_dir: Path) -> int:
    """Lines in a run directory's trace files (the template's; the tiled ones are counted as they are written)."""
    total = 0
    for path in (Path(run_dir) / "trace").glob("*.jsonl"):
        with open(path, "rb") as f:
            total += sum(1 for _ in f)
    return total


def _row(label: str, a: Analysed, check: str) -> list[str]:
    return [label, f"{a.events:,}", f"{a.wall_s:.2f}", f"{a.cpu_s:.2f}", f"{a.events_per_s:,.0f}", f"{a.rss_mb:.1f}",
            f"{sum(a.shootdowns_by_mode().values()):,}", check]


def _data(a: Analysed, **extra: Any) -> dict[str, Any]:
    return {"events": a.events, "wall_s": a.wall_s, "cpu_s": a.cpu_s, "events_per_s": a.events_per_s,
            "maxrss_kib": a.maxrss_kib, "rss_mb": a.rss_mb, "shootdowns": a.shootdowns_by_mode(),
            "trace": a.doc.get("trace"), **extra}


def _load() -> float:
    """The 1-minute load average (0 where there is none): a busy machine stretches wall times, not CPU times."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _label(size: int) -> str:
    return f"{size // 1_000_000}M" if size % 1_000_000 == 0 else f"{size // 1000}k"


def measure(sizes: Sequence[int], *, timeout_s: float, say: Say, work_dir: Path | None = None) -> Section:
    """Record the template, then tile and analyse one size at a time (each directory is removed once analysed:
    1M events take ~230 MB of disk)."""
    section = Section("trace", TITLE, headers=HEADERS)
    base = work_dir or Path(os.environ.get("PVC_TEST_TMP", "/tmp"))
    results: dict[int, Analysed] = {}
    busiest = 0.0
    with tempfile.TemporaryDirectory(prefix="pvt-", dir=base) as tmp:
        say("trace: recording the template run")
        template_dir = synthetic_trace.record_template(Path(tmp) / "tmpl", timeout_s=timeout_s)
        template = synthetic_trace.Template.read(template_dir)
        # Once untimed first: a fresh install compiles its bytecode on first import, which no later run pays.
        analyse(template_dir, 0, timeout_s=timeout_s)
        real = analyse(template_dir, count_events(template_dir), timeout_s=timeout_s)
        section.rows.append(_row("template (real run)", real, "-"))
        section.data["template"] = _data(real, span_ns=template.span_ns, per_copy=template.per_copy)
        for size in sizes:
            copies = template.copies_for(size)
            out = Path(tmp) / f"synth-{size}"
            say(f"trace: writing {template.events_for(copies):,} events ({copies} copies of the template)")
            start = time.perf_counter()
            written = synthetic_trace.tile(template, out, copies)
            generate_s = time.perf_counter() - start
            say(f"trace: analysing {written:,} events")
            load = _load()
            a = analyse(out, written, timeout_s=timeout_s)
            load = max(load, _load())
            shutil.rmtree(out)
            # Every copy repeats the template's shootdowns, so the analysis must find exactly copies x as many.
            want = {mode: n * copies for mode, n in real.shootdowns_by_mode().items()}
            check = "ok" if a.shootdowns_by_mode() == want else f"expected {want}"
            section.rows.append(_row(_label(size), a, check))
            section.data[str(size)] = _data(a, copies=copies, generate_s=generate_s, counts_ok=check == "ok",
                                            load_average=load)
            results[size] = a
            busiest = max(busiest, load)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if busiest > cores:
        section.note = (f"the machine was busy (1-minute load average up to {busiest:.1f} on {cores} usable cores): "
                        "wall times include waiting for a CPU; CPU s is the analysis child's own time")
    section.targets = targets(results)
    return section


def targets(results: dict[int, Analysed]) -> list[Target]:
    goal, small = results.get(GOAL_EVENTS), results.get(SIZES[0])
    note = "" if goal is not None else "1M events not run (--quick)"
    ratio = goal.maxrss_kib / small.maxrss_kib if goal is not None and small is not None else None
    return [
        Target("1M trace events analysed, wall", goal.wall_s if goal else None, "s", "<=", GOAL_WALL_S, note),
        Target("1M trace events analysed, peak RSS", goal.rss_mb if goal else None, "MB", "<", GOAL_RSS_MB, note),
        Target("trace analysis peak RSS, 1M / 100k events", ratio, "x", "<=", FLAT_RATIO,
               note or "flat: memory must not grow with the run"),
    ]


def section(opts: Options, say: Say) -> Section:
    return measure(QUICK_SIZES if opts.quick else SIZES, timeout_s=opts.timeout_s, say=say)

"""A run directory as the analysis sees it: ``spec.json`` (which domain runs which design) and ``trace/*.jsonl``.

Nothing else in the directory is needed, so a run copied off another machine analyses the same.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from pathlib import Path

import attrs

from pvcluster.designs import mode_of
from pvcluster.trace.analyse import Analyser, Analysis
from pvcluster.trace.reader import ReadStats, merged, merged_batches, trace_domain, trace_files
from pvcluster.trace.records import Record, to_record


class RunError(ValueError):
    """A directory that is not an analysable run (no traces, an unreadable spec)."""


@attrs.frozen
class Run:
    path: Path
    designs: dict[int, tuple[str, str]]  # domid -> (name, shootdown design)

    def events(self, stats: ReadStats | None = None, names: Collection[str] | None = None) -> Iterator[dict]:
        """Every trace event (or those named in ``names``) as its JSON object, merged by virtual time (one streaming
        pass)."""
        return merged(self.path / "trace", stats, events=names)

    def records(self, stats: ReadStats | None = None) -> Iterator[Record]:
        """Every trace event as a typed record (``pvcluster.trace.records``), merged by virtual time."""
        return (to_record(e) for e in self.events(stats))

    def analyse(self, *, slowest: int = 10, keep_shootdowns: bool = False) -> Analysis:
        """Every table, in one pass. ``keep_shootdowns`` keeps each ``Shootdown`` record (memory per shootdown)."""
        stats = ReadStats()
        analyser = Analyser(self.designs, stats, slowest=slowest, keep_shootdowns=keep_shootdowns)
        return analyser.run(merged_batches(self.path / "trace", stats, events=analyser.events))


def load(path: str | Path) -> Run:
    """The run at ``path`` (a run directory). Raises ``RunError`` when it has no traces or a bad ``spec.json``."""
    path = Path(path)
    if not trace_files(path / "trace"):
        raise RunError(f"no traces in {path / 'trace'}")
    return Run(path, _designs(path))


def _designs(path: Path) -> dict[int, tuple[str, str]]:
    """domid -> (name, design), from the domains' trace file names and the spec's domain tables."""
    spec_path = path / "spec.json"
    try:
        spec = json.loads(spec_path.read_text()) if spec_path.exists() else {}
    except (OSError, ValueError) as exc:
        raise RunError(f"{spec_path}: {exc}") from None
    by_name = {d.get("name"): d for d in spec.get("domain", []) if isinstance(d, dict)} if isinstance(
        spec, dict) else {}
    designs = {}
    for f in trace_files(path / "trace"):
        dom = trace_domain(f)
        if dom is not None:
            designs[dom[0]] = (dom[1], mode_of(by_name.get(dom[1], {})))
    return designs

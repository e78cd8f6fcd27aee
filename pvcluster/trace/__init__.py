"""pvcluster's traces: how every process writes them, and how a run's traces are analysed.

Writing (``pvcluster.trace.log``, stdlib only, imported by the hypervisor and every domain process): one JSON-lines
file per process, each event a flat JSON object (``docs/trace.md`` is the schema).

Analysis (for the toolstack, notebooks and test scripts; loaded on first use, so a domain process never imports it)::

    from pvcluster.trace import load
    run = load("/tmp/pvcluster-0/default")       # a run directory: spec.json and trace/*.jsonl
    for rec in run.records():                    # typed records, merged by virtual time, in one streaming pass
        ...
    result = run.analyse()                       # every table `pvcluster trace` prints
    result.shootdowns[0].breakdown               # where that shootdown's latency went
    result.to_json()                             # what `pvcluster trace --json` prints
"""

from __future__ import annotations

import importlib
from typing import Any

from pvcluster.trace.log import (
    SCHEMA_VERSION,
    WALL_FIELDS,
    TraceFile,
    TraceLogger,
    configure,
    no_flush,
    read_events,
    virtual_view,
)

# name -> the analysis module that defines it; imported on first access (PEP 562)
_LAZY = {
    "load": "pvcluster.trace.run",
    "Run": "pvcluster.trace.run",
    "Analysis": "pvcluster.trace.analyse",
    "analyse": "pvcluster.trace.analyse",
    "records": "pvcluster.trace.records",
}

__all__ = [
    "SCHEMA_VERSION", "WALL_FIELDS", "TraceFile", "TraceLogger", "configure", "no_flush", "read_events",
    "virtual_view", *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pvcluster.trace' has no attribute {name!r}")
    mod = importlib.import_module(module)
    return mod if name == "records" else getattr(mod, name)

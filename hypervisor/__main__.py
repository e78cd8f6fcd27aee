"""``python -m hypervisor --spec-json FILE --run-dir DIR``: the hypervisor process (started by the toolstack)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from hypervisor.shell import HypervisorProcess
from pvcluster import savefile, trace
from pvcluster.extensions import ExtensionError, load
from pvcluster.faults import KINDS, Kind, request
from pvcluster.spec import ClusterSpec, SpecError
from pvcluster.statepickle import StateError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hypervisor", description=__doc__)
    ap.add_argument("--spec-json", required=True, type=Path, help="validated cluster spec, as ClusterSpec.to_dict()")
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--replay", type=Path, help="JSON list of recorded interactive faults to act at their steps")
    ap.add_argument("--restore", type=Path, help="a save file (pvcluster save): continue the cluster saved in it")
    args = ap.parse_args(argv)
    try:
        spec = ClusterSpec.from_dict(json.loads(args.spec_json.read_text()))
    except (OSError, ValueError, SpecError) as exc:
        print(f"hypervisor: bad spec: {exc}", file=sys.stderr)
        return 2
    try:
        replay = read_replay(args.replay, spec) if args.replay is not None else []
    except (OSError, ValueError) as exc:
        print(f"hypervisor: bad replay file: {exc}", file=sys.stderr)
        return 2
    try:
        image = savefile.read(args.restore) if args.restore is not None else None
    except savefile.SaveFileError as exc:
        print(f"hypervisor: cannot restore: {exc}", file=sys.stderr)
        return 2
    log, sink = trace.configure(args.run_dir / "trace" / "hypervisor.jsonl", "hypervisor")
    # Ctrl-C lands between two bytecodes of unprotected code; inside a flush it could drop the lines being
    # written. Under KI protection trio delivers it at the next checkpoint instead.
    trio.lowlevel.enable_ki_protection(trace.TraceFile.flush)
    try:
        hv = HypervisorProcess(spec, args.run_dir, log, replay, flush_trace=sink.flush, restore=image)
    except ExtensionError as exc:  # the spec's [[extension]] cannot be loaded: say which and why, not a traceback
        print(f"hypervisor: {exc}", file=sys.stderr)
        sink.flush()
        return 2
    except StateError as exc:
        print(f"hypervisor: cannot restore: {exc}", file=sys.stderr)
        return 2

    def on_term(signum: int, _frame: object) -> None:
        # The toolstack died or gave up on a clean `down`: take the domain processes down at once. Doing it
        # here, not by raising into trio, cannot be lost in whatever the event loop was doing.
        hv.kill_all()
        (args.run_dir / "hypervisor.json").unlink(missing_ok=True)
        sink.flush_and_exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        trio.run(hv.run)
    except KeyboardInterrupt:
        return 130
    finally:
        sink.flush()  # a crash too: everything traced before it is on disk
    return 0


def read_replay(path: Path, spec: ClusterSpec) -> list[dict[str, Any]]:
    """The recorded faults to replay, each checked against the fault catalog before the run starts: the built-in
    kinds, and (only when a record names another kind) those the spec's extensions add."""
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise ValueError("not a JSON list")
    keys = ("fid", "step", "planned_vt_ns", "after")
    kinds: Mapping[str, Kind] = KINDS
    for r in records:
        if not isinstance(r, dict) or not all(isinstance(r.get(k), int) for k in keys) or r.get("point") not in (
                "open", "close"):
            raise ValueError(f"not a fault record: {str(r)[:200]}")
        if r.get("kind") not in kinds and spec.extensions and kinds is KINDS:
            try:
                kinds = load(spec.extensions).fault_catalog()
            except ExtensionError as exc:
                raise ValueError(f"fault kind {r.get('kind')!r} is not built in and the extensions do not load: "
                                 f"{exc}") from None
        request(r.get("kind"), r.get("target"), r.get("at_ns"), r.get("params"), kinds)
    return records


if __name__ == "__main__":
    sys.exit(main())

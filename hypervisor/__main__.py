"""``python -m hypervisor --spec-json FILE --run-dir DIR``: the hypervisor process (started by the toolstack)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import trio

from hypervisor.shell import HypervisorProcess
from pvcluster import trace
from pvcluster.spec import ClusterSpec, SpecError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hypervisor", description=__doc__)
    ap.add_argument("--spec-json", required=True, type=Path, help="validated cluster spec, as ClusterSpec.to_dict()")
    ap.add_argument("--run-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    try:
        spec = ClusterSpec.from_dict(json.loads(args.spec_json.read_text()))
    except (OSError, ValueError, SpecError) as exc:
        print(f"hypervisor: bad spec: {exc}", file=sys.stderr)
        return 2
    log = trace.configure(args.run_dir / "trace" / "hypervisor.jsonl", "hypervisor")
    hv = HypervisorProcess(spec, args.run_dir, log)

    def on_term(signum: int, _frame: object) -> None:
        # The toolstack died or gave up on a clean `down`: take the domain processes down at once. Doing it
        # here, not by raising into trio, cannot be lost in whatever the event loop was doing.
        hv.kill_all()
        (args.run_dir / "hypervisor.json").unlink(missing_ok=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        trio.run(hv.run)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

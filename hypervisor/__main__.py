"""``python -m hypervisor --spec-json FILE --run-dir DIR``: the hypervisor process (started by the toolstack)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import trio

from hypervisor.server import Hypervisor
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
    # SIGTERM (the toolstack going away) must still run the clean-up that kills the domain processes.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        trio.run(Hypervisor(spec, args.run_dir, log).run)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

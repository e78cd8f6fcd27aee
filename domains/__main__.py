"""``python -m domains``: one guest-domain process, started by the hypervisor with the identity it assigned."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import trio

from domains.runtime import DomainProcess
from pvcluster import trace


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m domains", description=__doc__)
    ap.add_argument("--endpoint", required=True, help="the hypervisor's domain bus endpoint")
    ap.add_argument("--identity", required=True, help="socket identity assigned by the hypervisor")
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--domid", required=True, type=int)
    ap.add_argument("--name", required=True)
    args = ap.parse_args(argv)
    log = trace.configure(args.run_dir / "trace" / f"dom{args.domid}-{args.name}.jsonl", f"dom{args.domid}")
    # Terminated by the hypervisor: nothing is owed, every trace line is already on disk (each is flushed as
    # written), so leave at once rather than raise into the event loop. (The hypervisor's death is a signal of its
    # own, handled inside the event loop: DomainProcess._watch_hypervisor.)
    signal.signal(signal.SIGTERM, lambda signum, _frame: os._exit(128 + signum))
    proc = DomainProcess(args.endpoint, args.identity.encode(), args.domid, args.name, log)
    try:
        return trio.run(proc.run)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

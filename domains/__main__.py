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

EXIT_HYPERVISOR_GONE = 5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m domains", description=__doc__)
    ap.add_argument("--endpoint", required=True, help="the hypervisor's domain bus endpoint")
    ap.add_argument("--identity", required=True, help="socket identity assigned by the hypervisor")
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--domid", required=True, type=int)
    ap.add_argument("--name", required=True)
    args = ap.parse_args(argv)
    log = trace.configure(args.run_dir / "trace" / f"dom{args.domid}-{args.name}.jsonl", f"dom{args.domid}")
    # Terminated by the hypervisor, or because it died (the death signal the launcher set): nothing is owed, every
    # trace line is already on disk (each is flushed as written), so leave at once rather than raise into the
    # event loop, saying which it was.
    parent = os.getppid()

    def on_term(signum: int, _frame: object) -> None:
        if os.getppid() != parent:  # reparented: the hypervisor process is gone
            log.error("domain.hypervisor_gone", dom=args.domid, hypervisor_pid=parent)
            print(f"domain {args.domid} ({args.name}): the hypervisor (pid {parent}) is gone; trace flushed, exiting",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_HYPERVISOR_GONE)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    proc = DomainProcess(args.endpoint, args.identity.encode(), args.domid, args.name, log)
    try:
        return trio.run(proc.run)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``python -m domains``: one guest-domain process, started by the hypervisor with the identity it assigned.

No event loop and no trio (tests/test_structure.py keeps it so): the process is a blocking ZeroMQ loop
(domains/runtime.py) and its signals are plain ``signal`` handlers, each of which flushes the buffered trace before
the process ends.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from domains.runtime import DomainProcess
from pvcluster import trace
from pvcluster.launch import HYPERVISOR_GONE_SIGNAL


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m domains", description=__doc__)
    ap.add_argument("--endpoint", required=True, help="the hypervisor's domain bus endpoint")
    ap.add_argument("--identity", required=True, help="socket identity assigned by the hypervisor")
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--domid", required=True, type=int)
    ap.add_argument("--name", required=True)
    args = ap.parse_args(argv)
    log, sink = trace.configure(args.run_dir / "trace" / f"dom{args.domid}-{args.name}.jsonl", f"dom{args.domid}")
    proc = DomainProcess(args.endpoint, args.identity.encode(), args.domid, args.name, log,
                         flush_trace=sink.flush, exit_now=sink.flush_and_exit)

    def leave(signum: int, _frame: object) -> None:
        # Terminated by the hypervisor (or interrupted by hand): nothing more is owed than the trace so far.
        sink.flush_and_exit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    signal.signal(HYPERVISOR_GONE_SIGNAL, proc.on_hypervisor_gone)
    return proc.run()


if __name__ == "__main__":
    sys.exit(main())

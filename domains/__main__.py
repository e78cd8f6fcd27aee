"""``python -m domains``: one guest-domain process. It joins the cluster as the domain it names (domains/join.py)
and runs it; whoever started it (the hypervisor's local launcher, `pvcluster join`, a container) passes no secret
on the command line: on tcp the key pair is read from the key directory (--keys).

No event loop and no trio (tests/test_structure.py keeps it so): the process is a blocking ZeroMQ loop
(domains/runtime.py) and its signals are plain ``signal`` handlers, each of which flushes the buffered trace before
the process ends.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from domains import capture
from domains.join import JOIN_WAIT_S, JoinError, StoppedBeforeBuild, join
from domains.runtime import DomainProcess
from pvcluster import trace
from pvcluster.bus import codec
from pvcluster.bus.messages import Restore
from pvcluster.launch import HYPERVISOR_GONE_SIGNAL

EXIT_REFUSED = 6


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m domains", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True, help="the hypervisor's domain bus endpoint (tcp://HOST:PORT, ipc://)")
    ap.add_argument("--name", required=True, help="the declared domain this process joins as")
    ap.add_argument("--keys", type=Path, help="tcp: key directory with cluster.key and domain-NAME.key_secret")
    ap.add_argument("--trace-dir", required=True, type=Path, help="where this domain's trace file goes")
    ap.add_argument("--join-wait", type=float, default=JOIN_WAIT_S, metavar="S",
                    help=f"seconds to wait for the hypervisor's answer (default {JOIN_WAIT_S:g})")
    ap.add_argument("--spawned", action="store_true", help=argparse.SUPPRESS)  # started by the hypervisor
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Until the join is answered a signal just ends the process: there is no trace yet.
    signal.signal(signal.SIGTERM, lambda signum, _f: sys.exit(128 + signum))
    try:
        conn, build_frame = join(args.endpoint, args.name, args.keys, args.join_wait)
    except JoinError as exc:
        print(f"domain {args.name}: cannot join: {exc}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    except StoppedBeforeBuild as exc:
        print(f"domain {args.name}: stopped before it was built ({exc})", file=sys.stderr, flush=True)
        return 0
    first = codec.decode(build_frame).body
    build = first.build if isinstance(first, Restore) else first
    log, sink = trace.configure(args.trace_dir / f"dom{build.domid}-{build.name}.jsonl", f"dom{build.domid}")
    proc = DomainProcess(conn, build.domid, build.name, log, flush_trace=sink.flush, exit_now=sink.flush_and_exit,
                         spawned=args.spawned)

    def leave(signum: int, _frame: object) -> None:
        # Terminated by the hypervisor (or interrupted by hand): nothing more is owed than the trace so far.
        sink.flush_and_exit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    if args.spawned:
        signal.signal(HYPERVISOR_GONE_SIGNAL, proc.on_hypervisor_gone)
    if isinstance(first, Restore):  # a restored or migrated domain: its state instead of a build
        restored = capture.receive(proc, first)
        proc.send(restored)
        if not restored.ok:
            print(f"domain {args.name}: cannot restore: {restored.error}", file=sys.stderr, flush=True)
            return EXIT_REFUSED
        return proc.run(None)
    return proc.run(build_frame)


if __name__ == "__main__":
    sys.exit(main())

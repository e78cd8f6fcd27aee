"""`python -m bench` (`python3 dev.py bench`): every benchmark once, as tables with the issue's targets beside the
measurements (pass / MISS), and with --json one JSON document of it all.

Sections (in this order; --only picks some):
  mips       guest MIPS on a vCPU against bare Unicorn: tight, 32-instruction and pause loops (bench/guest_mips.py)
  rtt        hypercall round trip against a raw pyzmq ping-pong, in the same run (bench/hypercall_rtt.py)
  ping       round trips per second of the interdomain ping-pong (two domains, `pvcluster up --json`)
  slowdown   wall seconds per virtual second of the default cluster
  scale      1..16 domains x 2 and 4 vCPUs of the shootdown workload: wall and virtual time, windows, peak memory
  pvops      guest cost of each paravirt op, with and without call-site patching (virtual)
  multicall  page-table updates one hypercall each against batched in multicalls
  trace      `pvcluster trace --json` on synthetic runs of 100k, 300k and 1M events: events/s, peak RSS
             (bench/trace_analysis.py; --quick: 100k only)
  overcommit native IPIs against pv flushes at 1:1, 2:1 and 3:1 overcommit, beside KVM's published pv TLB flush
             gains (bench/overcommit.py; --quick: 1:1 and 2:1)
  calibration the default cost model's primitives (flushes, IPI, shootdowns of 1/2/4/8 targets, hypercall and
             event-channel round trips) beside the published figures they approximate (bench/calibration.py;
             --quick: 1 and 2 targets)

Wall-clock figures are this machine's (recorded at the top); every cluster's wall time is that of its windows
(start-up excluded). Memory is the peak over 0.2 s samples of the sum of VmRSS: "cluster RSS" over the hypervisor
and its domain processes (the simulated machine, which the memory target is about), "RSS sum" with `pvcluster up`
too (a shared page counts in every process that maps it; PSS, which divides it among them, is shown beside).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from bench import machine, sections
from bench.suite import Options, Runner, document, render, run_sections

QUICK = {"ping_rounds": 1000, "scale_domains": (1, 2, 4), "scale_vcpus": (2,)}


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in sections.SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section {', '.join(unknown) or text!r}; "
                                         f"sections: {', '.join(sections.SECTIONS)}")
    return tuple(n for n in sections.SECTIONS if n in names)  # suite order, each once


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", type=_names, metavar="SECTIONS",
                    help=f"comma-separated sections to run (default: all): {','.join(sections.SECTIONS)}")
    ap.add_argument("--quick", action="store_true",
                    help="smaller sizes to iterate with: 1,000 ping-pongs, scale 1,2,4 domains x 2 vCPUs, trace 100k "
                    "events only, overcommit 1:1 and 2:1, calibration 1 and 2 targets (explicit "
                    "--ping-rounds / --scale-* still win); targets measured at full size only are then '-'")
    ap.add_argument("--ping-rounds", type=int, metavar="N", help="ping-pong round trips (default 10000)")
    ap.add_argument("--scale-domains", type=_sizes, metavar="N,N,...", help="domain counts (default 1,2,4,8,16)")
    ap.add_argument("--scale-vcpus", type=_sizes, metavar="V,V,...", help="vCPUs per domain (default 2,4)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="wall seconds per cluster run (3600)")
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE",
                    help="also write one JSON document to FILE; without FILE (or -) to stdout, the tables then "
                    "going to stderr")
    return ap


def options(args: argparse.Namespace) -> Options:
    base = Options(only=args.only or tuple(sections.SECTIONS), quick=args.quick, timeout_s=args.timeout)
    sizes: dict[str, Any] = dict(QUICK) if args.quick else {}
    given = {"ping_rounds": args.ping_rounds, "scale_domains": args.scale_domains, "scale_vcpus": args.scale_vcpus}
    sizes.update({k: v for k, v in given.items() if v is not None})
    return attrs.evolve(base, **sizes)


def _say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run(opts: Options, runners: Mapping[str, Runner], json_to: str | None) -> int:
    """Run, print the tables, write the JSON document; 1 when a section failed (a missed target is not a failure:
    the table says so)."""
    info = machine.describe()
    done = run_sections(opts, runners, _say)
    text = render(done, info)
    doc = document(done, info, opts)
    if json_to == "-":
        print(text, file=sys.stderr)
        print(json.dumps(doc, indent=1))
    else:
        print(text)
        if json_to is not None:
            Path(json_to).write_text(json.dumps(doc, indent=1) + "\n")
            _say(f"JSON written to {json_to}")
    return 1 if any(s.status == "error" for s in done) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.ping_rounds is not None and args.ping_rounds < 1:
        build_parser().error("--ping-rounds must be >= 1")
    return run(options(args), sections.SECTIONS, args.json)


if __name__ == "__main__":
    sys.exit(main())

"""pvcluster: launch and inspect a simulated Xen-style paravirtualized cluster."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from pvcluster.analysis import latency_table, shootdowns, stale_reads
from pvcluster.cluster import Cluster, ClusterError
from pvcluster.control import ControlClient, ControlError
from pvcluster.spec import SpecError, load_spec
from pvcluster.summary import hypercall_stats, render

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


def _run_dir(args: argparse.Namespace) -> Path:
    if args.run_dir:
        return Path(args.run_dir).absolute()
    return load_spec(getattr(args, "spec", None)).resolved_run_dir()


def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient.for_run_dir(_run_dir(args))


def cmd_up(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    run_dir = Path(args.run_dir).absolute() if args.run_dir else None
    say = (lambda m: None) if args.quiet else (lambda m: err.print(f"[dim]pvcluster:[/] {m}"))
    cluster = Cluster.start(spec, run_dir=run_dir, detach=args.detach, progress=say)
    if args.detach:
        say(f"cluster running in {cluster.run_dir}; `pvcluster list`, `pvcluster down` to stop")
        return 0
    last: dict[int, str] = {}

    def progress(st: dict[str, Any]) -> None:
        for d in st["domains"]:
            if last.get(d["domid"]) != d["state"]:
                last[d["domid"]] = d["state"]
                say(f"d{d['domid']} {d['name']}: {d['state']} (vt {st['vt_ns'] / 1000:.1f} us, window {st['window']})")

    try:
        final = cluster.wait(timeout_s=args.timeout, on_status=progress)
        if final["idle"] and not all(d["state"] in ("dead", "crashed") for d in final["domains"]):
            say("[yellow]the cluster is idle: no vCPU can run and no event is pending[/]")
        if not args.quiet:
            render(final, cluster.run_dir, cluster.wall_s, out)
        if args.json:
            print(json.dumps(final))
        ok = all(d["state"] == "dead" for d in final["domains"])
    except KeyboardInterrupt:
        say("interrupted: bringing the cluster down")
        ok = False
    finally:
        cluster.down()
    return 0 if ok else 1


def cmd_list(args: argparse.Namespace) -> int:
    doms = _client(args).call("list")
    if args.json:
        print(json.dumps(doms))
        return 0
    out.print(f"{'ID':>3}  {'Name':<16} {'State':<14} {'VCPUs':>5}  {'Hypercalls':>10}  Reason")
    for d in doms:
        reason = d["shutdown_reason"] or d["crash"] or ""
        out.print(f"{d['domid']:>3}  {d['name']:<16} {d['state']:<14} {d['vcpus']:>5}  {d['hypercalls']:>10}  {reason}")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    client = _client(args)
    shown = 0
    while True:
        lines = client.call("console", dom=args.dom)
        for line in lines[shown:]:
            print(line)
        shown = len(lines)
        if not args.follow:
            return 0
        time.sleep(0.2)


def cmd_dmesg(args: argparse.Namespace) -> int:
    for line in _client(args).call("dmesg"):
        print(line)
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    d = _client(args).call("destroy", dom=args.dom)
    out.print(f"domain {d['domid']} ({d['name']}): {d['state']}")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    d = _client(args).call(args.command, dom=args.dom)
    out.print(f"domain {d['domid']} ({d['name']}): {d['state']}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """Merge a run's trace files and report shootdown latency (works on a finished run too)."""
    run_dir = _run_dir(args)
    if not (run_dir / "trace" / "hypervisor.jsonl").exists():
        err.print(f"[red]error:[/] no traces in {run_dir / 'trace'}")
        return 1
    rows = latency_table(shootdowns(run_dir))
    if args.json:
        print(json.dumps({"shootdowns": rows, "stale_reads": stale_reads(run_dir),
                          "hypercalls": hypercall_stats(run_dir)}))
        return 0
    if not rows:
        out.print("no shootdowns in this run")
    for r in rows:
        out.print(f"{r['mode']:<16} n={r['shootdowns']:<4} p50 {r['p50_us']:9.3f} us  p90 {r['p90_us']:9.3f} us  "
                  f"p99 {r['p99_us']:9.3f} us  max {r['max_us']:9.3f} us  "
                  f"messages {r['messages_per_shootdown']:.2f}  preempted {r['preempted_targets']:.2f}")
    out.print(f"stale reads: {stale_reads(run_dir)}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args)
    client = ControlClient.for_run_dir(run_dir)
    client.call("down")
    out.print(f"cluster in {run_dir} is down")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pvcluster",
        description=__doc__,
        epilog="Without a SPEC, `up` runs the embedded default cluster (2 domains x 2 vCPUs of the built-in "
        "pvkern guest). Run directories hold traces (trace/*.jsonl), process logs (logs/) and sockets.",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, spec: bool = True) -> None:
        p.add_argument("--run-dir", help="the cluster's run directory (default: from the spec's cluster.run_dir)")
        if spec:
            p.add_argument("--spec", help="spec file used only to locate the run directory")

    p = sub.add_parser("up", help="start a cluster and run it until every domain has shut down")
    p.add_argument("spec", nargs="?", help="cluster spec (TOML); default: the embedded default spec")
    p.add_argument("--run-dir", help="override cluster.run_dir")
    p.add_argument("--detach", action="store_true", help="leave the cluster running and return at once")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many wall seconds (600)")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary table")
    p.add_argument("--json", action="store_true", help="print the final status as JSON")
    p.set_defaults(fn=cmd_up)

    p = sub.add_parser("list", help="domains, their states and vCPUs")
    common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("console", help="a domain's console output")
    common(p)
    p.add_argument("dom", help="domain id or name")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.set_defaults(fn=cmd_console)

    p = sub.add_parser("dmesg", help="the hypervisor's log")
    common(p)
    p.set_defaults(fn=cmd_dmesg)

    p = sub.add_parser("destroy", help="stop a domain at once")
    common(p)
    p.add_argument("dom", help="domain id or name")
    p.set_defaults(fn=cmd_destroy)

    for name, text in (("pause", "stop running a domain's vCPUs"), ("unpause", "resume a paused domain")):
        p = sub.add_parser(name, help=text)
        common(p)
        p.add_argument("dom", help="domain id or name")
        p.set_defaults(fn=cmd_pause)

    p = sub.add_parser("trace", help="shootdown latency by design from a run's traces (running or finished)")
    common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_trace)

    p = sub.add_parser("down", help="destroy every domain and stop the hypervisor")
    common(p)
    p.set_defaults(fn=cmd_down)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.fn(args)
        return rc
    except SpecError as exc:
        err.print(f"[red]error:[/] {exc}", markup=True, highlight=False)
        return 2
    except (ClusterError, ControlError) as exc:
        err.print(f"[red]error:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

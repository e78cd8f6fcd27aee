"""pvcluster: launch and inspect a simulated Xen-style paravirtualized cluster."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
import tomllib
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from pvcluster import cli_join, cli_sdk, faults
from pvcluster.check import check_run, format_report
from pvcluster.cluster import Cluster, ClusterError
from pvcluster.control import ControlClient, ControlError
from pvcluster.keys import KeyFileError
from pvcluster.rundiff import first_divergence, format_divergence
from pvcluster.runrecord import ReplayError, load_replay, replay_dir
from pvcluster.spec import SpecError, load_spec
from pvcluster.summary import render, run_report

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
# Set (non-empty) to print the traceback of an unexpected error, as --debug does.
DEBUG_ENV = "PVCLUSTER_DEBUG"


def _error(message: str) -> None:
    # Messages carry user text (spec keys, paths, domain names): "[/]" or "[[domain]]" must print as written,
    # not be taken for rich markup. No wrapping either: paths in messages must stay copy-pasteable.
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)


def _report(args: argparse.Namespace, doc: Any, text: str) -> int:
    """What a verb reports: exactly one JSON document under --json, else ``text`` for a person."""
    if args.json:
        print(json.dumps(doc))
    else:
        out.print(text, markup=False)
    return 0


def _run_dir(args: argparse.Namespace) -> Path:
    if args.run_dir:
        return Path(args.run_dir).absolute()
    return load_spec(getattr(args, "spec", None)).resolved_run_dir()


def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient.for_run_dir(_run_dir(args))


def cmd_up(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).absolute() if args.run_dir else None
    say = (lambda m: None) if args.quiet else (lambda m: err.print(f"[dim]pvcluster:[/] {escape(m)}"))
    replay, source = None, None
    if args.replay:
        if args.spec:
            raise ClusterError("give either a SPEC or --replay RUN_DIR: a replay reruns the spec recorded there")
        source = Path(args.replay).absolute()
        spec, replay = load_replay(source)
        run_dir = run_dir or replay_dir(source)
        # printed even with --quiet: the replay's run directory is the one thing the user must learn
        text = f"replaying {source} ({len(replay)} interactive faults) into {run_dir}"
        err.print(f"[dim]pvcluster:[/] {escape(text)}",
                  soft_wrap=True)
    else:
        spec = load_spec(args.spec)
    cluster = Cluster.start(spec, run_dir=run_dir, detach=args.detach, progress=say, replay=replay,
                            replayed_from=source)
    return _run(args, cluster, say)


def _run(args: argparse.Namespace, cluster: Cluster, say: Any) -> int:
    """What `up` and `restore` do with a started cluster: return (--detach), or wait for its end and report."""
    if args.detach:
        say(f"cluster running in {cluster.run_dir}; `pvcluster list`, `pvcluster down` to stop")
        if args.json:
            print(json.dumps({"run_dir": str(cluster.run_dir), "detached": True}))
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
            if not args.quiet:
                err.print("[dim]pvcluster:[/] [yellow]the cluster is idle: no vCPU can run and no event is pending[/]")
        ok = all(d["state"] == "dead" for d in final["domains"])
        if not args.quiet:
            # with --json, stdout carries the one JSON document and nothing else
            render(final, cluster.run_dir, cluster.wall_s, err if args.json else out)
        if args.json:
            print(json.dumps(run_report(final, cluster.run_dir, cluster.wall_s, ok)), flush=True)
        if args.serve:
            _serve(cluster, say)
    except KeyboardInterrupt:
        say("interrupted: bringing the cluster down")
        ok = False
    finally:
        cluster.down()
    return 0 if ok else 1


def _serve(cluster: Cluster, say: Any) -> None:
    """``up --serve``: the run is over; keep the hypervisor (and its traces, its control socket) up until someone
    runs `pvcluster down` or this process is terminated (a container being stopped)."""
    import signal

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    say(f"serving {cluster.run_dir} until `pvcluster down --run-dir {cluster.run_dir}` (or SIGTERM)")
    if cluster.proc is not None:
        cluster.proc.wait()


def cmd_save(args: argparse.Namespace) -> int:
    """Save the running cluster at a window boundary (hypervisor/saving.py; the file: pvcluster/savefile.py)."""
    path = Path(args.file).absolute()
    call: dict[str, Any] = {"path": str(path), "wait_s": args.wait}
    if args.at is not None:
        call["at_ns"] = args.at
    info = _client(args).call("save", timeout_s=args.wait + 60.0, **call)
    return _report(args, info, f"saved {info['path']}: virtual time {info['vt_ns']} ns, {info['bytes']} bytes, "
                               f"{len(info['domains'])} domain processes, {info['wall_s']:.3f} s")


def cmd_restore(args: argparse.Namespace) -> int:
    """Start a cluster from a save file: into the run directory it was saved from unless --run-dir says otherwise."""
    from pvcluster import savefile
    from pvcluster.spec import ClusterSpec

    path = Path(args.file).absolute()
    try:
        image = savefile.read(path)
        spec = ClusterSpec.from_dict(image["spec"])
    except savefile.SaveFileError as exc:
        _error(f"cannot restore {path}: {exc}")
        return 2
    run_dir = Path(args.run_dir).absolute() if args.run_dir else Path(image["run_dir"])
    say = (lambda m: None) if args.quiet else (lambda m: err.print(f"[dim]pvcluster:[/] {escape(m)}"))
    cluster = Cluster.start(spec, run_dir=run_dir, detach=args.detach, progress=say, restore=(path, image))
    return _run(args, cluster, say)


def cmd_migrate(args: argparse.Namespace) -> int:
    """Move a domain to a new process (on another host with --to) at a window boundary."""
    call: dict[str, Any] = {"dom": args.dom}
    if args.to:
        call["to"] = args.to
    info = _client(args).call("migrate", timeout_s=args.timeout, **call)
    return _report(args, info, f"migrated d{info['domid']} ({info['name']}) to process {info['pid']} on "
                               f"{info['host']} at virtual time {info['vt_ns']} ns ({info['wall_s']:.3f} s)")


def cmd_list(args: argparse.Namespace) -> int:
    doms = _client(args).call("list")
    if args.json:
        print(json.dumps(doms))
        return 0
    out.print(f"{'ID':>3}  {'Name':<16} {'State':<14} {'VCPUs':>5}  {'Hypercalls':>10}  Reason")
    for d in doms:
        reason = d["shutdown_reason"] or d["crash"] or ""
        out.print(f"{d['domid']:>3}  {d['name']:<16} {d['state']:<14} {d['vcpus']:>5}  {d['hypercalls']:>10}  {reason}",
                  markup=False)
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.json:
        if args.follow:
            _error("--json prints one document: it cannot --follow")
            return 2
        print(json.dumps(client.call("console", dom=args.dom)))
        return 0
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
    lines = _client(args).call("dmesg")
    if args.json:
        print(json.dumps(lines))
        return 0
    for line in lines:
        print(line)
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    return _domain_state(args, _client(args).call("destroy", dom=args.dom))


def cmd_pause(args: argparse.Namespace) -> int:
    return _domain_state(args, _client(args).call(args.command, dom=args.dom))


def cmd_shutdown(args: argparse.Namespace) -> int:
    """xl shutdown / xl reboot: the toolstack ends the domain with that reason at the next step."""
    reason = "reboot" if args.command == "reboot" else args.reason
    return _domain_state(args, _client(args).call("shutdown", dom=args.dom, reason=reason))


def _domain_state(args: argparse.Namespace, d: dict[str, Any]) -> int:
    """What destroy, pause and unpause report: the domain's record after the command."""
    return _report(args, d, f"domain {d['domid']} ({d['name']}): {d['state']}")


def cmd_trace(args: argparse.Namespace) -> int:
    """Analyse a run's traces (running or finished): every table, or a comparison of two runs, plots, Perfetto."""
    from pvcluster.trace import compare, render
    from pvcluster.trace.run import RunError, load

    try:
        if args.compare:
            a, b = (Path(p).absolute() for p in args.compare)
            doc = compare.compare(load(a).analyse(slowest=0).to_json(), load(b).analyse(slowest=0).to_json(),
                                  str(a), str(b))
            if args.json:
                print(json.dumps(doc))
            else:
                compare.render(doc, out)
            return 0
        run = load(_run_dir(args))
        # the plots' timeline is drawn around the slowest shootdown
        analysis = run.analyse(slowest=max(args.slowest, 1) if args.plot else args.slowest)
        doc = analysis.to_json()
        from pvcluster.trace import exttables  # loads the run's extension modules: only for `trace` itself

        doc["extensions"] = exttables.tables(run)
        bad = sum(doc["trace"]["corrupt_lines"].values()) + len(doc["trace"]["torn_files"])
        if bad and not doc["trace"]["events"]:  # torn lines are skipped, but a run with nothing else is no run
            _error(f"cannot analyse the run in {run.path}: none of its trace lines is a trace event ({bad} bad)")
            return 1
        if args.json:
            print(json.dumps(doc))
        else:
            render.render(doc, out)
            exttables.render(doc["extensions"], out)
        for path in _trace_outputs(args, run, analysis):
            err.print(f"wrote {escape(str(path))}")
    except (OSError, RunError) as exc:
        _error(f"cannot analyse the run: {exc}")
        return 1
    except RuntimeError as exc:  # an optional extra (matplotlib, perfetto) that is not installed
        _error(str(exc))
        return 1
    return 0


def _trace_outputs(args: argparse.Namespace, run: Any, analysis: Any) -> list[Path]:
    """The files --plot and --perfetto ask for (each needs an optional extra, imported only then)."""
    written: list[Path] = []
    if args.plot:
        from pvcluster.trace.plots import write_plots

        written += write_plots(run, analysis, Path(args.plot))
    if args.perfetto:
        from pvcluster.trace.perfetto import write_perfetto

        write_perfetto(run, Path(args.perfetto))
        written.append(Path(args.perfetto))
    return written


def _param(text: str) -> tuple[str, int]:
    name, eq, value = text.partition("=")
    try:
        if not eq:
            raise ValueError
        return name, int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=INTEGER, got {text!r}") from None


def cmd_inject(args: argparse.Namespace) -> int:
    try:
        req = faults.checked_here(args.kind, args.target, args.at, dict(args.params))
    except faults.FaultError as exc:
        _error(str(exc))
        return 2
    rec = _client(args).call("inject", timeout_s=args.wait + 10, kind=req.kind, target=req.target, at_ns=req.at_ns,
                             params=dict(req.params), wait_s=args.wait)
    if args.json:
        print(json.dumps(rec))
        return 0
    when = f"at vt {rec['vt_ns'] / 1000:.3f} us (step {rec['step']})" if "step" in rec else "planned"
    out.print(f"fault {rec['fid']}: {req.kind} {req.target} {dict(req.params) or ''} {when}: {rec['outcome']}",
              markup=False)
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    """xl create: every [[domain]] of a TOML file (a whole spec, or just domain tables) joins the running cluster."""
    try:
        tables = tomllib.loads(Path(args.file).read_text()).get("domain")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        _error(f"cannot read {args.file}: {exc}")
        return 2
    if not isinstance(tables, list) or not tables:
        _error(f"{args.file} has no [[domain]] table")
        return 2
    client = _client(args)
    created = [client.call("create", domain=table) for table in tables]
    return _report(args, created, "\n".join(f"domain {d['domid']} ({d['name']}): created" for d in created))


def cmd_vcpu_pin(args: argparse.Namespace) -> int:
    """xl vcpu-pin: the vCPU's hard affinity becomes one pCPU, until pinned again (the ``pin`` fault, no duration)."""
    target = f"{args.dom}.{args.vcpu}"
    try:
        req = faults.request("pin", target, None, {"pcpu": args.pcpu, "duration_ns": 0})
    except faults.FaultError as exc:
        _error(str(exc))
        return 2
    rec = _client(args).call("inject", timeout_s=20, kind=req.kind, target=req.target, at_ns=None,
                             params=dict(req.params), wait_s=10)
    return _report(args, rec, f"vCPU {target} on pCPU {args.pcpu}: {rec['outcome']}")


def cmd_sched(args: argparse.Namespace) -> int:
    """xl sched-credit: the scheduler's parameters; with --slice, set the slice first (the ``sched`` fault)."""
    call: dict[str, Any] = {} if args.slice is None else {"slice_ns": args.slice}
    info = _client(args).call("sched", timeout_s=20, **call)
    if args.json:
        print(json.dumps(info))
        return 0
    change = info.get("change")
    if change is not None:
        out.print(f"slice: {change['outcome']}", markup=False)
    out.print(f"pcpus {info['pcpus']}, slice {info['slice_ns']} ns, window {info['window_ns']} ns", markup=False)
    for d in info["domains"]:
        pins = ", ".join(f"vcpu {v['vcpu']}: pcpus {v['affinity']}" for v in d["vcpus"])
        out.print(f"  {d['domid']:>3} {d['name']:<16} {d['state']:<14} {pins}", markup=False)
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    """An ELF core of the domain (gdb KERNEL.elf FILE reads it), written by the hypervisor at a window boundary."""
    path = Path(args.file).expanduser().absolute()
    rec = _client(args).call("dump", timeout_s=args.timeout, dom=args.dom, path=str(path), force=args.force)
    return _report(args, rec, f"domain {rec['dom']} ({rec['name']}): {rec['size']} bytes, {rec['vcpus']} vCPUs, "
                              f"{rec['segments']} segments at vt {rec['vt_ns'] / 1000:.3f} us -> {rec['path']}")


def cmd_gdb(args: argparse.Namespace) -> int:
    """Have the hypervisor serve the GDB remote protocol for a domain on a loopback port; print where."""
    rec = _client(args).call("gdb", dom=args.dom, port=args.port)
    return _report(args, rec, f"domain {rec['dom']} ({rec['name']}): gdb stub on {rec['host']}:{rec['port']}\n"
                              f"  gdb KERNEL.elf -ex 'target remote {rec['host']}:{rec['port']}'")


def cmd_faults(args: argparse.Namespace) -> int:
    data = _client(args).call("faults")
    if args.json:
        print(json.dumps(data))
        return 0
    out.print(f"{'FID':>4}  {'VT (us)':>12}  {'Kind':<15} {'Target':<12} {'Origin':<12} Outcome / parameters",
              markup=False)
    for r in data["done"]:
        out.print(f"{r['fid']:>4}  {r['vt_ns'] / 1000:>12.3f}  {r['kind']:<15} {r['target']:<12} {r['origin']:<12} "
                  f"{r['outcome']}  {r['params'] or ''}", markup=False)
    for r in data["pending"]:
        out.print(f"{r['fid']:>4}  {'(planned)':>12}  {r['kind']:<15} {r['target']:<12} {r['origin']:<12} "
                  f"at vt {r['planned_vt_ns'] / 1000:.3f} us  {r['params'] or ''}", markup=False)
    if not data["done"] and not data["pending"]:
        out.print("no faults injected or planned", markup=False)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Verify a run's invariants from its traces alone (running or finished); exit 1 with violations."""
    run_dir = _run_dir(args)
    if not (run_dir / "trace" / "hypervisor.jsonl").exists():
        _error(f"no traces in {run_dir / 'trace'}")
        return 2
    try:
        report = check_run(run_dir)
    except (OSError, ValueError) as exc:
        _error(f"cannot check the run in {run_dir}: {exc}")
        return 2
    print(report.to_json() if args.json else format_report(report))
    return 0 if report.ok else 1


def cmd_diff(args: argparse.Namespace) -> int:
    """The first event where two runs' virtual-time traces diverge; exit 1 when they do."""
    a, b = Path(args.run_a).absolute(), Path(args.run_b).absolute()
    for d in (a, b):
        if not (d / "trace").is_dir():
            _error(f"no traces in {d / 'trace'}")
            return 2
    try:
        div = first_divergence(a, b, upto_shortest=not args.strict)
    except (OSError, ValueError) as exc:
        _error(f"cannot compare {a} and {b}: {exc}")
        return 2
    print(format_divergence(div))
    return 0 if div is None else 1


def cmd_top(args: argparse.Namespace) -> int:
    """A live view of a running cluster (``pvcluster/top.py``); with --once, one frame."""
    from pvcluster import top

    if args.json and not args.once:
        _error("--json needs --once: the live view is for a terminal")
        return 2
    if not args.interval > 0:
        _error(f"--interval must be more than 0 seconds, got {args.interval}")
        return 2
    return top.run(_run_dir(args), interval=args.interval, once=args.once, as_json=args.json, console=out)


def cmd_down(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args)
    client = ControlClient.for_run_dir(run_dir)
    client.call("down")
    return _report(args, {"run_dir": str(run_dir), "down": True}, f"cluster in {run_dir} is down")


def cmd_deploy(args: argparse.Namespace) -> int:
    """Container deployments of a spec (``pvcluster/deploy.py``)."""
    from pvcluster.deploy import DeployError, run

    try:
        return run(args)
    except DeployError as exc:
        _error(str(exc))
        return 2


def _version() -> str:
    """The installed package's version (pyproject.toml), or "unknown" when run from a tree that was never installed."""
    try:
        return importlib.metadata.version("pvcluster")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pvcluster",
        description=__doc__,
        epilog="Without a SPEC, `up` runs the embedded default cluster (2 domains x 2 vCPUs of the built-in "
        "pvkern guest). Run directories hold traces (trace/*.jsonl), process logs (logs/) and sockets.",
    )
    debug_help = f"on an unexpected error, print its traceback (or set {DEBUG_ENV}=1)"
    ap.add_argument("--debug", action="store_true", help=debug_help)
    ap.add_argument("--version", action="version", version=f"pvcluster {_version()}",
                    help="print pvcluster's version and exit")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Accepted after the command too; SUPPRESS keeps a subcommand from resetting a --debug given before it.
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)

    def common(p: argparse.ArgumentParser, spec: bool = True) -> None:
        p.add_argument("--run-dir", help="the cluster's run directory (default: from the spec's cluster.run_dir)")
        if spec:
            p.add_argument("--spec", help="spec file used only to locate the run directory")

    p = sub.add_parser("up", parents=[after], help="start a cluster and run it until every domain has shut down")
    p.add_argument("spec", nargs="?", help="cluster spec (TOML); default: the embedded default spec")
    p.add_argument("--run-dir", help="override cluster.run_dir (with --replay: default RUN_DIR-replay-N)")
    p.add_argument("--replay", metavar="RUN_DIR", help="rerun a recorded run: its spec, seed and every fault "
                   "injected into it, at the same virtual times; the trace comes out identical")
    p.add_argument("--detach", action="store_true", help="leave the cluster running and return at once")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many wall seconds (600)")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary table")
    p.add_argument("--serve", action="store_true",
                   help="after the run, keep the hypervisor up (control socket, traces) until `pvcluster down` or "
                   "SIGTERM: for a container whose exit would restart it")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document on stdout: the final status (every domain's state, vt_ns), "
                   "windows, wall_run_s (wall seconds from the first window to the last, start-up excluded), "
                   "wall_s, run_dir and ok; progress and the summary table go to stderr")
    p.set_defaults(fn=cmd_up)

    p = sub.add_parser("list", parents=[after], help="domains, their states and vCPUs")
    common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("console", parents=[after], help="a domain's console output")
    common(p)
    p.add_argument("dom", help="domain id or name")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("--json", action="store_true", help="the lines so far as one JSON array")
    p.set_defaults(fn=cmd_console)

    p = sub.add_parser("dmesg", parents=[after], help="the hypervisor's log")
    common(p)
    p.add_argument("--json", action="store_true", help="the lines as one JSON array")
    p.set_defaults(fn=cmd_dmesg)

    p = sub.add_parser("destroy", parents=[after], help="stop a domain at once")
    common(p)
    p.add_argument("dom", help="domain id or name")
    p.add_argument("--json", action="store_true", help="the domain's record afterwards, as JSON")
    p.set_defaults(fn=cmd_destroy)

    for name, text in (("pause", "stop running a domain's vCPUs"), ("unpause", "resume a paused domain")):
        p = sub.add_parser(name, help=text, parents=[after])
        common(p)
        p.add_argument("dom", help="domain id or name")
        p.add_argument("--json", action="store_true", help="the domain's record afterwards, as JSON")
        p.set_defaults(fn=cmd_pause)

    p = sub.add_parser("create", parents=[after], help="add the domains of a TOML file ([[domain]] tables) to the "
                       "running cluster")
    common(p)
    p.add_argument("file", help="TOML with one or more [[domain]] tables, as in a cluster spec")
    p.add_argument("--json", action="store_true", help="the domains created, as one JSON array")
    p.set_defaults(fn=cmd_create)

    p = sub.add_parser("vcpu-pin", parents=[after], help="pin a vCPU to one pCPU (its hard affinity)")
    common(p)
    p.add_argument("dom", help="domain id or name")
    p.add_argument("vcpu", type=int, help="the vCPU")
    p.add_argument("pcpu", type=int, help="the pCPU")
    p.add_argument("--json", action="store_true", help="the fault record that did it, as JSON")
    p.set_defaults(fn=cmd_vcpu_pin)

    p = sub.add_parser("sched", parents=[after], help="the scheduler's parameters (pCPUs, slice, vCPU affinities); "
                       "--slice sets the slice (xl sched-credit)")
    common(p)
    p.add_argument("--slice", type=int, metavar="NS", help="set the time slice, in virtual ns (>= window_ns)")
    p.add_argument("--json", action="store_true", help="the parameters afterwards (and the change), as JSON")
    p.set_defaults(fn=cmd_sched)

    for name, text in (("shutdown", "shut a domain down (as dom0's SCHEDOP_remote_shutdown), reason poweroff "
                                    "unless --reason says otherwise"),
                       ("reboot", "shut a domain down with reason reboot")):
        p = sub.add_parser(name, help=text, parents=[after])
        common(p)
        p.add_argument("dom", help="domain id or name")
        if name == "shutdown":
            p.add_argument("--reason", default="poweroff",
                           choices=["poweroff", "reboot", "suspend", "crash", "watchdog"])
        p.add_argument("--json", action="store_true", help="the domain's record afterwards, as JSON")
        p.set_defaults(fn=cmd_shutdown)

    p = sub.add_parser(
        "trace", parents=[after], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="analyse a run's traces: shootdown latency and where it went, hypercalls, run states, faults",
        description="Analyse a run's traces (running or finished) in one streaming pass: shootdown latency by "
        "design, by number of targets and of preempted targets; the breakdown of each shootdown's latency along its "
        "critical path (initiator, initiator_preempted, hypercall, wait_pcpu, delivery, handler, ack; they sum to "
        "the latency); the slowest shootdowns with their vCPUs' run states; hypercalls by number; multicall batch "
        "sizes; event-channel delivery and ping round trips; stale reads; faults; per-vCPU run-state totals. Only "
        "the run directory's spec.json and trace/*.jsonl are read; torn or corrupt lines are counted and skipped. "
        "docs/trace.md describes the events and the JSON document.",
        epilog="examples:\n  pvcluster trace --run-dir RUN            tables\n"
        "  pvcluster trace --run-dir RUN --json     one JSON document (shootdowns, breakdown, slowest, ...)\n"
        "  pvcluster trace --compare RUN_A RUN_B    side by side, B/A ratios and B-A deltas\n"
        "  pvcluster trace --run-dir RUN --plot figures/ --perfetto run.pftrace",
    )
    common(p)
    p.add_argument("--json", action="store_true", help="one JSON document on stdout instead of tables")
    p.add_argument("--slowest", type=int, default=10, metavar="N",
                   help="list the N slowest shootdowns with their breakdown (default 10; 0: none)")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="compare two run directories instead (ratios B/A, deltas B-A)")
    p.add_argument("--plot", metavar="DIR", help="also write PNG figures to DIR (needs the 'plot' extra: matplotlib)")
    p.add_argument("--perfetto", metavar="FILE",
                   help="also write a Perfetto trace to FILE for ui.perfetto.dev (needs the 'perfetto' extra)")
    p.set_defaults(fn=cmd_trace)

    p = sub.add_parser(
        "inject", parents=[after], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="inject a fault into a running cluster",
        description="Inject a fault into a running cluster. It acts at the next step (or at virtual time --at); "
        "kill, crash and destroy act at once. Every injection is traced (fault.inject, fault.outcome) and recorded "
        "in the run directory's faults.jsonl, so `pvcluster up --replay` reproduces it.",
        epilog="kinds (TARGET is a domain name or id, DOM.VCPU for vCPU faults; [NAME=default]):\n"
        + faults.describe_kinds() + "\n  ...and the kinds the cluster's extensions add (Registry.fault_kind)")
    common(p)
    p.add_argument("kind", metavar="KIND", help="the fault kind (listed below)")
    p.add_argument("target", metavar="TARGET", help="domain name or id, or DOM.VCPU (e.g. alpha.1)")
    p.add_argument("params", nargs="*", type=_param, metavar="NAME=VALUE", help="the kind's parameters (integers)")
    p.add_argument("--at", type=int, metavar="VT_NS", help="virtual time to act at (default: the next step)")
    p.add_argument("--wait", type=float, default=10.0, help="wall seconds to wait for the outcome (10; 0: do not)")
    p.add_argument("--json", action="store_true", help="print the fault's record as JSON")
    p.set_defaults(fn=cmd_inject)

    p = sub.add_parser("dump", parents=[after], help="write a domain's ELF core (memory and vCPU registers) for gdb",
                       description="Write DOM's memory (the RAM its vCPU 0's page tables map, at their virtual "
                       "addresses) and every vCPU's registers (one NT_PRSTATUS each: gdb threads) as an ELF32 core; "
                       "`gdb KERNEL.elf FILE` reads it. The hypervisor holds the cluster at a window boundary "
                       "while it writes (virtual time does not move), and creates FILE with mode 0600.")
    common(p)
    p.add_argument("dom", help="domain id or name")
    p.add_argument("file", help="the core file to write (relative to this directory)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.add_argument("--timeout", type=float, default=120.0, help="wall seconds to wait for the dump (120)")
    p.add_argument("--json", action="store_true", help="what was written, as one JSON document")
    p.set_defaults(fn=cmd_dump)

    p = sub.add_parser("gdb", parents=[after], help="serve the GDB remote protocol for a domain (one thread per "
                       "vCPU) on 127.0.0.1", description="The hypervisor serves the GDB remote protocol for DOM on "
                       "a loopback TCP port (to its own user only) and this prints the port: `target remote "
                       "127.0.0.1:PORT` in gdb. While gdb has the domain stopped the whole cluster is held at a "
                       "window boundary (no virtual time passes); breakpoints and steps stop a vCPU at its "
                       "instruction in virtual time. The stub serves one debugger at a time until the domain ends.")
    common(p)
    p.add_argument("dom", help="domain id or name")
    p.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: any free port)")
    p.add_argument("--json", action="store_true", help='{"dom", "name", "host", "port"} as one JSON document')
    p.set_defaults(fn=cmd_gdb)

    p = sub.add_parser("faults", parents=[after], help="faults injected into a running cluster, and their outcomes")
    common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_faults)

    p = sub.add_parser(
        "check", parents=[after], help="verify a run's invariants from its traces (exit 1 with violations)",
        description="Check, from the traces alone, the invariants that must survive any fault: no stale TLB read; "
        "every event sent delivered exactly once (or its loss explained by its receiver ending); every hypercall "
        "answered exactly once; every acknowledged effect applied and every result delivered as decided. Each "
        "violation is printed with its span or event id. Exit 0 when clean, 1 with violations, 2 on unreadable "
        "traces.")
    common(p)
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser(
        "diff", parents=[after], help="the first event where two runs' virtual-time traces diverge",
        description="Compare two run directories' virtual-time traces (wall-clock fields, pids and socket paths "
        "ignored) and report the first event where they diverge. A trace that merely ends early (a killed process's "
        "ends at its last completed window) is not a divergence unless --strict. Exit 0 when identical, 1 when not.")
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument("--strict", action="store_true", help="a trace that ends early is a divergence too")
    p.set_defaults(fn=cmd_diff)

    from pvcluster import top  # here, not at the top of the file: one block to merge

    p = sub.add_parser("top", parents=[after], formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="a live view of a running cluster: domains, vCPU run states, rates, faults",
                       description=top.DESCRIPTION, epilog=top.COLUMNS)
    common(p)
    p.add_argument("--interval", type=float, default=0.5, metavar="S", help="seconds between refreshes (0.5)")
    p.add_argument("--once", action="store_true", help="print one frame and exit (for scripts)")
    p.add_argument("--json", action="store_true", help="with --once: the frame's data as one JSON document")
    p.set_defaults(fn=cmd_top)

    cli_join.add_parsers(sub, after)
    cli_sdk.add_parsers(sub, after)

    p = sub.add_parser("save", parents=[after], help="save the whole cluster at a window boundary to a file")
    common(p)
    p.add_argument("file", help="the save file to write (restore it with `pvcluster restore FILE`)")
    p.add_argument("--at", type=int, metavar="VT_NS", help="at the first window boundary at or after this virtual "
                                                            "time (default: the next one)")
    p.add_argument("--wait", type=float, default=60.0, metavar="S",
                   help="wall seconds to wait for that boundary (60)")
    p.add_argument("--json", action="store_true", help="what was saved, as one JSON document")
    p.set_defaults(fn=cmd_save)

    p = sub.add_parser("restore", parents=[after], help="start a cluster from a save file, where it was saved")
    p.add_argument("file", help="a file written by `pvcluster save`")
    p.add_argument("--run-dir", help="restore into this run directory (default: the one it was saved from)")
    p.add_argument("--detach", action="store_true", help="leave the cluster running and return at once")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many wall seconds (600)")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary table")
    p.add_argument("--serve", action="store_true", help="as `up --serve`: keep the hypervisor up after the run")
    p.add_argument("--json", action="store_true", help="as `up --json`: one JSON document on stdout")
    p.set_defaults(fn=cmd_restore)

    p = sub.add_parser("migrate", parents=[after], help="move a domain to a new process (another host) at a "
                                                         "window boundary")
    common(p)
    p.add_argument("dom", help="domain id or name")
    p.add_argument("--to", metavar="HOST", help="the host whose `pvcluster join` process takes it over (default: a "
                                                "new local process)")
    p.add_argument("--timeout", type=float, default=180.0, help="wall seconds to wait for the migration (180)")
    p.add_argument("--json", action="store_true", help="what was moved where, as one JSON document")
    p.set_defaults(fn=cmd_migrate)

    p = sub.add_parser("down", parents=[after], help="destroy every domain and stop the hypervisor")
    common(p)
    p.add_argument("--json", action="store_true", help='{"run_dir": ..., "down": true} once it is down')
    p.set_defaults(fn=cmd_down)

    from pvcluster import deploy  # here, not at the top of the file: one block to merge

    p = sub.add_parser("deploy", parents=[after], help="generate a Docker Compose file or Kubernetes manifests "
                       "for a spec", description=deploy.DESCRIPTION)
    deploy.add_arguments(p)
    p.set_defaults(fn=cmd_deploy)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.fn(args)
        return rc
    except SpecError as exc:
        _error(str(exc))
        return 2
    except (ClusterError, ControlError, ReplayError, KeyFileError) as exc:
        _error(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a user never gets a bare traceback
        return _unexpected(exc, debug=args.debug or bool(os.environ.get(DEBUG_ENV)))


def _unexpected(exc: Exception, *, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc)
        return 1
    _error(f"{type(exc).__name__}: {exc} (unexpected; run again with --debug or {DEBUG_ENV}=1 for the traceback)")
    return 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

"""The end-of-run summary `pvcluster up` prints, built from the hypervisor's final status and the traces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pvcluster.analysis import latency_table, shootdowns, stale_reads
from pvcluster.trace import read_events


def hypercall_stats(run_dir: Path) -> dict[str, Any]:
    """Counts by hypercall name and the virtual cost (trap to result) from the hypervisor trace."""
    by_name: dict[str, int] = {}
    costs: list[int] = []
    for ev in read_events(run_dir / "trace" / "hypervisor.jsonl"):
        if ev["event"] == "hypercall":
            by_name[ev["name"]] = by_name.get(ev["name"], 0) + 1
            costs.append(ev["done_vt_ns"] - ev["vt_ns"])
    costs.sort()
    pct = (lambda p: costs[min(len(costs) - 1, int(p * len(costs)))]) if costs else (lambda p: 0)
    return {
        "by_name": dict(sorted(by_name.items())),
        "count": len(costs),
        "p50_ns": pct(0.5),
        "p99_ns": pct(0.99),
    }


def run_report(status: dict[str, Any], run_dir: Path, wall_s: float, ok: bool) -> dict[str, Any]:
    """What `pvcluster up --json` prints: the final status with the run's measures under plain names."""
    return {
        **status,
        "windows": status["window"],  # steps run, as the summary's "windows"
        "wall_s": wall_s,  # since the hypervisor came up, building included; wall_run_s (in status): the windows alone
        "run_dir": str(run_dir),
        "ok": ok,
    }


def render(status: dict[str, Any], run_dir: Path, wall_s: float, console: Console) -> None:
    table = Table(title="pvcluster run summary", title_justify="left")
    for col in ("dom", "name", "state", "reason", "vcpus", "hypercalls", "instructions", "virtual time"):
        table.add_column(col, justify="right" if col in ("dom", "vcpus", "hypercalls", "instructions") else "left")
    for d in status["domains"]:
        end = d["ended_vt_ns"] if d["ended_vt_ns"] is not None else status["vt_ns"]
        # a crash detail quotes the guest (disassembly, console text): never rich markup
        reason = escape(d["shutdown_reason"] or (d["crash"][:60] if d["crash"] else "-"))
        table.add_row(
            str(d["domid"]),
            d["name"],
            d["state"],
            reason,
            str(d["vcpus"]),
            str(d["hypercalls"]),
            str(d["instructions"]),
            f"{(end - d['started_vt_ns']) / 1000:.3f} us",
        )
    console.print(table)
    stats = hypercall_stats(run_dir)
    names = ", ".join(f"{k} {v}" for k, v in stats["by_name"].items())
    console.print(
        f"hypercalls: {stats['count']} ({names}); virtual cost p50 {stats['p50_ns']} ns, p99 {stats['p99_ns']} ns"
    )
    console.print(
        f"windows: {status['window']}, virtual time {status['vt_ns'] / 1000:.3f} us, wall time {wall_s:.2f} s"
    )
    rows = latency_table(shootdowns(run_dir))
    if rows:
        sd = Table(title="TLB shootdown latency (virtual µs, from request to the last target's flush)",
                   title_justify="left")
        for col in ("design", "shootdowns", "p50", "p90", "p99", "max", "messages", "preempted targets"):
            sd.add_column(col, justify="left" if col == "design" else "right")
        for r in rows:
            sd.add_row(r["mode"], str(r["shootdowns"]), f"{r['p50_us']:.3f}", f"{r['p90_us']:.3f}",
                       f"{r['p99_us']:.3f}", f"{r['max_us']:.3f}", f"{r['messages_per_shootdown']:.2f}",
                       f"{r['preempted_targets']:.2f}")
        console.print(sd)
        stale = stale_reads(run_dir)
        console.print(f"stale TLB reads detected: {stale}" + ("  [red](a flush was missed)[/]" if stale else ""))
    else:
        console.print("TLB shootdowns: none in this run (the guests' workload=shootdown measures them)")
    console.print(f"traces: {run_dir / 'trace'}", markup=False)

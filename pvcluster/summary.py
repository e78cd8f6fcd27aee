"""The end-of-run summary `pvcluster up` prints, built from the hypervisor's final status and the traces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pvcluster.trace.render import breakdown_table, shootdown_table
from pvcluster.trace.run import load


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
    doc = load(run_dir).analyse(slowest=0).to_json()
    stats = doc["hypercalls"]
    names = ", ".join(f"{k} {v}" for k, v in stats["by_name"].items())
    console.print(
        f"hypercalls: {stats['count']} ({names}); virtual cost p50 {stats['p50_ns']} ns, p99 {stats['p99_ns']} ns"
    )
    console.print(
        f"windows: {status['window']}, virtual time {status['vt_ns'] / 1000:.3f} us, wall time {wall_s:.2f} s"
    )
    if doc["shootdowns"]:
        console.print(shootdown_table(doc["shootdowns"]))
        console.print(breakdown_table(doc["breakdown"]))
        stale = doc["stale_reads"]
        console.print(f"stale TLB reads detected: {stale}" + ("  [red](a flush was missed)[/]" if stale else ""))
        console.print("more: pvcluster trace (slowest shootdowns, hypercalls, run states; --plot, --perfetto)")
    else:
        console.print("TLB shootdowns: none in this run (the guests' workload=shootdown measures them)")
    console.print(f"traces: {run_dir / 'trace'}", markup=False)

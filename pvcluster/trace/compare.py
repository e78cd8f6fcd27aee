"""A/B comparison of two runs' analyses: the same tables side by side, with B/A ratios and B-A deltas.

Rows are matched by design (and hypercalls by number); a design present in one run only is shown with the other
side empty rather than dropped, since "this design vanished" is itself a finding.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from pvcluster.trace.shootdowns import COMPONENTS

METRICS = ("p50_us", "p90_us", "p99_us", "p99_9_us", "max_us", "messages_per_shootdown",
           "hypercalls_per_shootdown", "preempted_targets", "per_vms")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a == 0:
        return None
    return b / a


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def _side(a: dict[str, Any] | None, b: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for k in keys:
        va, vb = (a or {}).get(k), (b or {}).get(k)
        out[k] = {"a": va, "b": vb, "ratio": _ratio(va, vb), "delta": _delta(va, vb)}
    return out


def compare(doc_a: dict[str, Any], doc_b: dict[str, Any], name_a: str, name_b: str) -> dict[str, Any]:
    """The comparison document ``trace --compare --json`` prints."""
    rows_a = {r["mode"]: r for r in doc_a["shootdowns"]}
    rows_b = {r["mode"]: r for r in doc_b["shootdowns"]}
    bd_a = {r["mode"]: r["components_us"] for r in doc_a["breakdown"]}
    bd_b = {r["mode"]: r["components_us"] for r in doc_b["breakdown"]}
    hc_a = {r["nr"]: r for r in doc_a["hypercalls_by_nr"]}
    hc_b = {r["nr"]: r for r in doc_b["hypercalls_by_nr"]}
    modes = sorted(set(rows_a) | set(rows_b))
    return {
        "a": name_a,
        "b": name_b,
        "shootdowns": [{"mode": m, "shootdowns": {"a": rows_a.get(m, {}).get("shootdowns", 0),
                                                  "b": rows_b.get(m, {}).get("shootdowns", 0)},
                        **_side(rows_a.get(m), rows_b.get(m), METRICS)} for m in modes],
        "breakdown": [{"mode": m, **_side(bd_a.get(m), bd_b.get(m), COMPONENTS)} for m in modes],
        "hypercalls_by_nr": [
            {"nr": nr, "name": (hc_a.get(nr) or hc_b[nr])["name"],
             **_side(hc_a.get(nr), hc_b.get(nr), ("count", "cost_mean_ns", "cost_p99_ns"))}
            for nr in sorted(set(hc_a) | set(hc_b))
        ],
        "stale_reads": {"a": doc_a["stale_reads"], "b": doc_b["stale_reads"]},
    }


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ratio_text(r: float | None) -> str:
    if r is None:
        return "-"
    colour = "green" if r < 0.95 else "red" if r > 1.05 else "default"
    return f"[{colour}]{r:.2f}x[/{colour}]"


def render(cmp: dict[str, Any], out: Console) -> None:
    out.print(f"A = {cmp['a']}\nB = {cmp['b']}")
    for row in cmp["shootdowns"]:
        n = row["shootdowns"]
        t = Table(title=f"{row['mode']}: shootdowns A {n['a']}, B {n['b']} (virtual µs; B/A; B-A)",
                  title_justify="left")
        for col in ("metric", "A", "B", "B/A", "B-A"):
            t.add_column(col, justify="left" if col == "metric" else "right")
        for k in METRICS:
            c = row[k]
            t.add_row(k, _fmt(c["a"]), _fmt(c["b"]), _ratio_text(c["ratio"]), _fmt(c["delta"]))
        bd = next(b for b in cmp["breakdown"] if b["mode"] == row["mode"])
        for comp in COMPONENTS:
            c = bd[comp]
            t.add_row(f"  {comp} (mean)", _fmt(c["a"]), _fmt(c["b"]), _ratio_text(c["ratio"]), _fmt(c["delta"]))
        out.print(t)
    if cmp["hypercalls_by_nr"]:
        t = Table(title="Hypercalls (count, mean virtual cost ns)", title_justify="left")
        for col in ("nr", "name", "count A", "count B", "B/A", "mean A", "mean B", "B/A"):
            t.add_column(col, justify="left" if col == "name" else "right")
        for r in cmp["hypercalls_by_nr"]:
            c, m = r["count"], r["cost_mean_ns"]
            t.add_row(str(r["nr"]), r["name"], _fmt(c["a"], 0), _fmt(c["b"], 0), _ratio_text(c["ratio"]),
                      _fmt(m["a"], 0), _fmt(m["b"], 0), _ratio_text(m["ratio"]))
        out.print(t)
    out.print(f"stale TLB reads: A {cmp['stale_reads']['a']}, B {cmp['stale_reads']['b']}")

"""What a multicall saves: page-table updates one hypercall each against batched in lazy MMU mode, in one run.

Every domain runs the built-in kernel's `workload=mcbench` on the xen backend: `mcupdates` updates of one PTE in
lazy-MMU sections of `mcbatch` updates, each section sent as one multicall (a section of one update is a plain
mmu_update, as Linux sends a one-entry batch). Guest marks on MARK_PORT bracket the updates; the domain trace
gives each mark's virtual time (`vt_ns`) and the wall-clock time the domain process recorded it (`wall_ns`), so
per-update costs need no subtraction of boot time. Every domain has its own pCPU, so no vCPU waits for one.

* 32 updates as 32 hypercalls (batch 1) against one multicall of 32 (batch 32): per-update cost and ratio.
* The amortization curve: 64 updates in batches of 1, 2, 4, 8, 16, 32, 64.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import attrs

from pvcluster.abi.platform import Mark
from pvcluster.cluster import Cluster
from pvcluster.spec import parse_spec
from pvcluster.trace import read_events

HEAD_TO_HEAD = 32
CURVE_UPDATES = 64
CURVE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
MARK_START, MARK_END, MARK_FAIL = Mark.MCBENCH_START, Mark.MCBENCH_END, Mark.MCBENCH_FAIL
MIN_WALL_RATIO = 10.0  # what batching must save at least, per update in wall time (32 vs 1)


@attrs.frozen
class Cost:
    updates: int
    batch: int
    vt_ns: int  # virtual time from the first update to the last
    wall_ns: int  # wall-clock time between the same two marks
    hypercalls: int  # the domain's hypercalls over its whole run (boot included)
    multicalls: int  # multicall hypercalls the hypervisor traced for it

    @property
    def vt_per_update(self) -> float:
        return self.vt_ns / self.updates

    @property
    def wall_us_per_update(self) -> float:
        return self.wall_ns / self.updates / 1000


def _domains() -> list[tuple[str, int, int]]:
    doms = [(f"h2h-b{b}", HEAD_TO_HEAD, b) for b in (1, HEAD_TO_HEAD)]
    return doms + [(f"curve-b{b}", CURVE_UPDATES, b) for b in CURVE_BATCHES]


def run() -> dict[str, Cost]:
    doms = _domains()
    text = f'[cluster]\nname = "mcbench"\n[hypervisor]\npcpus = {len(doms)}\n' + "".join(
        f'[[domain]]\nname = "{n}"\nvcpus = 1\nbackend = "xen"\n'
        f'cmdline = "workload=mcbench mcupdates={u} mcbatch={b} shutdown=poweroff"\n'
        for n, u, b in doms
    )
    with tempfile.TemporaryDirectory(prefix="pvb-") as d:
        run_dir = Path(d)
        with Cluster.start(parse_spec(text), run_dir=run_dir) as c:
            final = {dom["name"]: dom for dom in c.wait(timeout_s=600)["domains"]}
        bad = [n for n, dom in final.items() if dom["shutdown_reason"] != "poweroff"]
        if bad:
            raise RuntimeError(f"benchmark domains did not finish cleanly: {bad}")
        multicalls: dict[int, int] = {}
        for e in read_events(run_dir / "trace" / "hypervisor.jsonl"):
            if e["event"] == "hypercall" and e.get("name") == "multicall":
                multicalls[e["dom"]] = multicalls.get(e["dom"], 0) + 1
        out = {}
        for name, updates, batch in doms:
            dom = final[name]
            start, end = _marks(run_dir, dom)
            out[name] = Cost(
                updates=updates,
                batch=batch,
                vt_ns=end["vt_ns"] - start["vt_ns"],
                wall_ns=end["wall_ns"] - start["wall_ns"],
                hypercalls=dom["hypercalls"],
                multicalls=multicalls.get(dom["domid"], 0),
            )
    return out


def _marks(run_dir: Path, dom: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    (path,) = (run_dir / "trace").glob(f"dom{dom['domid']}-*.jsonl")
    marks = {e["code"]: e for e in read_events(path) if e["event"] == "guest.mark"}
    if MARK_FAIL in marks or MARK_START not in marks or MARK_END not in marks:
        raise RuntimeError(f"{dom['name']}: the guest's checks failed or its marks are missing: {sorted(marks)}")
    return marks[MARK_START], marks[MARK_END]


def main() -> None:
    costs = run()
    render(costs)
    if (ratio := wall_ratio(costs)) < MIN_WALL_RATIO:
        raise SystemExit(f"multicall saved only {ratio:.1f}x per update in wall time (< {MIN_WALL_RATIO:.0f}x)")


def wall_ratio(costs: dict[str, Cost]) -> float:
    """Wall time per update, one hypercall each over batched in one multicall (the head-to-head pair)."""
    return costs["h2h-b1"].wall_ns / costs[f"h2h-b{HEAD_TO_HEAD}"].wall_ns


def render(costs: dict[str, Cost]) -> None:
    """The head-to-head and the amortization curve of ``run()``, on stdout."""
    one, batched = costs["h2h-b1"], costs[f"h2h-b{HEAD_TO_HEAD}"]
    print(f"{HEAD_TO_HEAD} page-table updates (xen backend), per update, from one run")
    print(f"  {'':<28} {'virtual ns':>11} {'wall us':>9} {'hypercalls (whole run)':>23}")
    for label, cost in ((f"{HEAD_TO_HEAD} hypercalls (batch 1)", one), (f"1 multicall of {HEAD_TO_HEAD}", batched)):
        print(f"  {label:<28} {cost.vt_per_update:11.1f} {cost.wall_us_per_update:9.2f} {cost.hypercalls:23d}")
    print(f"  multicall is {one.vt_ns / batched.vt_ns:.1f}x cheaper per update in virtual time, "
          f"{wall_ratio(costs):.1f}x in wall time (needs >= {MIN_WALL_RATIO:.0f}x)")
    print(f"\namortization: {CURVE_UPDATES} updates in lazy-MMU batches of N (one multicall per batch)")
    print(f"  {'N':>3} {'multicalls':>10} {'virtual ns/update':>18} {'wall us/update':>15} {'wall vs N=1':>12}")
    base = costs["curve-b1"]
    for b in CURVE_BATCHES:
        c = costs[f"curve-b{b}"]
        print(f"  {b:>3} {c.multicalls:>10} {c.vt_per_update:18.1f} {c.wall_us_per_update:15.2f} "
              f"{base.wall_ns / c.wall_ns:11.1f}x")


if __name__ == "__main__":
    main()

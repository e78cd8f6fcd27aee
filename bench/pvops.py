"""What each paravirt op costs per backend, and what call-site patching saves (guest instructions, virtual ns).

Every figure is a difference between two domains of one cluster run that differ only in the work measured, so
boot costs cancel: `workload=irqbench` (1000 irq_disable/irq_enable pairs through patchable call sites) against
a plain boot, and `opbench=<slot>` (200 calls of one op through the pv_ops table) against the empty op.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from domains.kernel.build import PV_OPS
from pvcluster.cluster import Cluster
from pvcluster.spec import parse_spec

BACKENDS = ("native", "xen", "vmi")
IRQ_PAIRS = 1000
OP_ROUNDS = 200
# lazy_mmu_begin/end are measured by bench/multicall.py (a begin without its end would leave the mode on)
BENCH_OPS = tuple(op for op in PV_OPS if op not in ("init", "halt", "send_ipi", "lazy_mmu_begin", "lazy_mmu_end"))
EMPTY_OP_SLOT = len(PV_OPS)


def _run(domains: list[tuple[str, str, str, bool]]) -> dict[str, dict[str, Any]]:
    # one pCPU per vCPU: scheduling must not add waiting time to the differences the bench takes
    text = f'[cluster]\nname = "bench"\n[hypervisor]\npcpus = {len(domains)}\n' + "".join(
        f'[[domain]]\nname = "{n}"\nvcpus = 1\nbackend = "{b}"\ncmdline = "{c}"\npatching = {str(p).lower()}\n'
        for n, b, c, p in domains
    )
    with tempfile.TemporaryDirectory(prefix="pvb-") as d, Cluster.start(parse_spec(text), run_dir=Path(d)) as c:
        final = c.wait(timeout_s=600)
    out = {dom["name"]: dom for dom in final["domains"]}
    bad = [n for n, dom in out.items() if dom["shutdown_reason"] != "poweroff"]
    if bad:
        raise RuntimeError(f"benchmark domains did not finish cleanly: {bad}")
    return out


def _cost(doms: dict[str, dict[str, Any]], name: str, base: str, n: int) -> tuple[float, float]:
    a, b = doms[name], doms[base]
    instr = (a["instructions"] - b["instructions"]) / n
    vt = ((a["ended_vt_ns"] - a["started_vt_ns"]) - (b["ended_vt_ns"] - b["started_vt_ns"])) / n
    return instr, vt


def irq_pairs() -> dict[tuple[str, bool], tuple[float, float]]:
    doms: list[tuple[str, str, str, bool]] = []
    for b in BACKENDS:
        for patch in (True, False):
            tag = f"{b}-{'p' if patch else 'u'}"
            doms.append((f"{tag}-base", b, "shutdown=poweroff", patch))
            doms.append((f"{tag}-irq", b, "workload=irqbench shutdown=poweroff", patch))
    res = _run(doms)
    return {
        (b, p): _cost(res, f"{b}-{'p' if p else 'u'}-irq", f"{b}-{'p' if p else 'u'}-base", IRQ_PAIRS)
        for b in BACKENDS
        for p in (True, False)
    }


def op_costs() -> dict[tuple[str, str], tuple[float, float]]:
    doms = [(f"{b}-empty", b, f"opbench={EMPTY_OP_SLOT:02d} shutdown=poweroff", True) for b in BACKENDS]
    doms += [
        (f"{b}-{op}", b, f"opbench={PV_OPS.index(op):02d} shutdown=poweroff", True)
        for b in BACKENDS
        for op in BENCH_OPS
    ]
    res = _run(doms)
    return {(b, op): _cost(res, f"{b}-{op}", f"{b}-empty", OP_ROUNDS) for b in BACKENDS for op in BENCH_OPS}


def main() -> None:
    render(irq_pairs(), op_costs())


def render(pairs: dict[tuple[str, bool], tuple[float, float]],
           costs: dict[tuple[str, str], tuple[float, float]]) -> None:
    """The tables of ``irq_pairs()`` and ``op_costs()``, on stdout."""
    print("guest instructions (virtual ns) per irq_disable + irq_enable pair, from one run; unpatched/patched in\n"
          "virtual time (the cost model prices the indirect call patching removes) and in instructions")
    print(f"  {'backend':<8} {'patched':>16} {'unpatched':>16} {'ratio (ns)':>11} {'ratio (ins)':>12}")
    for b in BACKENDS:
        (pi, pv), (ui, uv) = pairs[(b, True)], pairs[(b, False)]
        print(f"  {b:<8} {pi:8.1f} ({pv:5.1f}) {ui:8.1f} ({uv:5.1f}) {uv / pv if pv else float('inf'):10.2f}x"
              f" {ui / pi if pi else float('inf'):11.2f}x")
    print(f"\ncost per op through the pv_ops table, beyond an empty op's call/ret ({OP_ROUNDS} calls each)")
    print(f"  {'op':<18}" + "".join(f"{b:>22}" for b in BACKENDS))
    for op in BENCH_OPS:
        cells = "".join(f"{costs[(b, op)][0]:9.1f} ins {costs[(b, op)][1]:7.0f} ns" for b in BACKENDS)
        print(f"  {op:<18}{cells}")


if __name__ == "__main__":
    main()

"""The overcommit sweep (issue 11): native IPIs against paravirtual flushes as vCPUs outnumber pCPUs.

k = 1, 2, 3 domains of 2 vCPUs each on 2 pCPUs (1:1, 2:1, 3:1 overcommit) run the shootdown workload, every domain
of a run with the same design: native IPIs (backend native: the initiator waits for every target, preempted ones
included, to take the IPI) or pv (backend xen: one hypercall; the hypervisor flushes a preempted target before it
next runs). Each run is analysed as a user would (`pvcluster trace --json`) for the design's p50/p99 latency and
its throughput: shootdowns completed per virtual ms.

Beside it, the published effect of the same idea in KVM: Wanpeng Li's "[PATCH v8 0/4] KVM: X86: Add Paravirt TLB
Shootdown" (LKML / kvm@vger.kernel.org, 12 Dec 2017, Message-ID 1513128784-5924-1-git-send-email-wanpeng.li@
hotmail.com; merged as 858a43aae236 "KVM: X86: use paravirtualized TLB Shootdown"): ebizzy -M records/s on a
64-pCPU Xeon Gold 6142 host with 64-vCPU VMs, vanilla against pv TLB flush, +4% with one VM, +78% with two, +132%
with three. Their workload is a whole benchmark (ebizzy), ours the shootdowns alone, so the figures sit side by
side as the same trend, not as a like-for-like comparison.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import childrun, clusterrun
from bench.suite import Options, Section

Say = Callable[[str], None]

RATIOS = (1, 2, 3)  # domains of VCPUS each on PCPUS: 1:1, 2:1, 3:1 vCPUs per pCPU
QUICK_RATIOS = (1, 2)
PCPUS, VCPUS = 2, 2
# Shootdown rounds per domain: enough for a steady state across many 30 us slices (with the default 40, a pv domain
# finishes in a few slices and the throughput measures how the domains' boot and slices happen to line up)
ROUNDS = 400
# design label -> (backend, the mode the analysis names it by, extra kernel command line)
DESIGNS = {"native": ("native", "native", ""), "cr3": ("native", "cr3 (native)", " tlbflush=cr3"),
           "pv": ("xen", "pv", "")}
PUBLISHED_GAIN_PCT = {1: 4.0, 2: 78.0, 3: 132.0}  # KVM pv TLB flush, ebizzy -M, 1..3 VMs per host (see above)
PUBLISHED_SOURCE = ('Wanpeng Li, "[PATCH v8 0/4] KVM: X86: Add Paravirt TLB Shootdown", kvm@vger.kernel.org, '
                    "2017-12-12 (<1513128784-5924-1-git-send-email-wanpeng.li@hotmail.com>; merged as 858a43aae236): "
                    "ebizzy -M, 64 pCPUs, 64-vCPU VMs")
TITLE = (f"overcommit sweep: workload=shootdown, k domains x {VCPUS} vCPUs on {PCPUS} pCPUs, "
         "one design per run (virtual time)")
HEADERS = ["overcommit", "native p50 us", "native p99 us", "cr3 p50 us", "cr3 p99 us", "pv p50 us", "pv p99 us",
           "native per_vms", "cr3 per_vms", "pv per_vms", "pv gain", "published KVM gain"]


def spec(domains: int, backend: str, extra: str = "") -> str:
    text = f'[cluster]\nname = "oc{domains}{backend}"\nseed = 1\n[hypervisor]\npcpus = {PCPUS}\n'
    for i in range(domains):
        text += (f'[[domain]]\nname = "d{i}"\nvcpus = {VCPUS}\nbackend = "{backend}"\n'
                 f'cmdline = "workload=shootdown sdrounds={ROUNDS} shutdown=poweroff{extra}"\n')
    return text


def trace_json(run_dir: Path, *, timeout_s: float) -> dict[str, Any]:
    """What `pvcluster trace --json` says of a run directory (in a child, as a user runs it)."""
    argv = [sys.executable, "-m", "pvcluster.cli", "trace", "--run-dir", str(run_dir), "--json"]
    doc: dict[str, Any] = json.loads(childrun.run(argv, timeout_s=timeout_s).stdout)
    return doc


def design_row(doc: dict[str, Any], mode: str, vt_ns: int) -> dict[str, Any]:
    """The design's latency and throughput from the analysis. ``per_vms`` is the analysis's when it has one; else
    shootdowns over the run's virtual time (`up --json`'s ``vt_ns``), said so in ``per_vms_from``."""
    rows = [r for r in doc.get("shootdowns", []) if r.get("mode") == mode]
    if not rows:
        raise clusterrun.RunFailed(f"no {mode!r} shootdowns in the analysis: {doc.get('shootdowns')}")
    row = rows[0]
    out = {"shootdowns": row["shootdowns"], "p50_us": row["p50_us"], "p99_us": row["p99_us"], "vt_ns": vt_ns}
    if row.get("per_vms") is not None:
        out.update(per_vms=row["per_vms"], per_vms_from="analysis")
    else:
        out.update(per_vms=row["shootdowns"] / (vt_ns / 1e6) if vt_ns else 0.0, per_vms_from="run virtual time")
    return out


def analysed_run(spec_text: str, *, timeout_s: float) -> tuple[dict[str, Any], clusterrun.UpRun]:
    """One cluster run, and what `pvcluster trace --json` says of it (taken before its run directory goes)."""
    found: dict[str, Any] = {}

    def analyse(run_dir: Path, doc: dict[str, Any]) -> None:
        found["doc"] = trace_json(run_dir, timeout_s=timeout_s)

    run = clusterrun.up(spec_text, timeout_s=timeout_s, check=analyse)
    return found["doc"], run


def run_one(domains: int, design: str, *, timeout_s: float) -> dict[str, Any]:
    """One cluster run of ``domains`` domains of ``design``, analysed."""
    backend, mode, extra = DESIGNS[design]
    doc, run = analysed_run(spec(domains, backend, extra), timeout_s=timeout_s)
    return {**design_row(doc, mode, run.vt_ns), "wall_run_s": run.wall_run_s}


def gain_pct(pv: float, native: float) -> float | None:
    return (pv / native - 1) * 100 if native > 0 else None


def _us(x: float) -> str:
    return f"{x:,.3g}" if x < 1000 else f"{x:,.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.0f}%"


def sweep(ratios: Sequence[int], *, timeout_s: float, say: Say) -> Section:
    section = Section("overcommit", TITLE, headers=HEADERS, note=f"published: {PUBLISHED_SOURCE}")
    for k in ratios:
        label = f"{k * VCPUS // PCPUS}:1" if (k * VCPUS) % PCPUS == 0 else f"{k * VCPUS}:{PCPUS}"
        got: dict[str, dict[str, Any]] = {}
        for design in DESIGNS:  # one run at a time: each has the machine to itself
            say(f"overcommit: {label}, {k} {design} domain{'s' if k > 1 else ''}")
            try:
                got[design] = run_one(k, design, timeout_s=timeout_s)
            except (clusterrun.RunFailed, childrun.ChildFailed) as exc:
                got[design] = {"error": str(exc)}
        section.data[label] = {"domains": k, "pcpus": PCPUS, "vcpus_per_domain": VCPUS, **got,
                               "published_gain_pct": PUBLISHED_GAIN_PCT.get(k)}
        nat, cr3, pv = got["native"], got["cr3"], got["pv"]
        failed = next((d["error"] for d in (nat, cr3, pv) if "error" in d), None)
        if failed is not None:
            section.rows.append([label, f"failed: {failed}"[:70]])
            continue
        gain = gain_pct(pv["per_vms"], nat["per_vms"])
        section.data[label]["pv_gain_pct"] = gain
        published = PUBLISHED_GAIN_PCT.get(k)
        section.rows.append([label, _us(nat["p50_us"]), _us(nat["p99_us"]), _us(cr3["p50_us"]), _us(cr3["p99_us"]),
                             _us(pv["p50_us"]), _us(pv["p99_us"]), f"{nat['per_vms']:.2f}", f"{cr3['per_vms']:.2f}",
                             f"{pv['per_vms']:.2f}", _pct(gain),
                             _pct(published) if published is not None else "-"])
    sources = {d.get("per_vms_from") for v in section.data.values() for d in v.values() if isinstance(d, dict)}
    if "run virtual time" in sources:
        section.note += "\nper_vms: shootdowns over the run's virtual ms (the analysis has no per_vms in this tree)"
    return section


def section(opts: Options, say: Say) -> Section:
    return sweep(QUICK_RATIOS if opts.quick else RATIOS, timeout_s=opts.timeout_s, say=say)

"""The calibration table: what the default cost model (pvcluster/costs.py) makes each primitive cost, measured in
virtual time through real clusters, beside the published figure it is meant to approximate and where that comes
from.

Each figure is read from a run the way a user reads it (`pvcluster trace --json`, the pvops bench's op table):
a native and a paravirtual shootdown of 1, 2, 4 and 8 targets with one pCPU per vCPU (no overcommit), an
interdomain ping-pong, and the op costs of the native backend. Published figures are orders of magnitude for the
2006-era x86 parts the defaults model (~2.5 GHz, 0.4 ns a cycle); where no published figure was found the row says
what the model rests on instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.overcommit import analysed_run
from bench.suite import Options, Section

Say = Callable[[str], None]

TARGETS = (1, 2, 4, 8)
QUICK_TARGETS = (1, 2)
HEADERS = ["primitive", "simulated", "published", "source"]

SOURCES = {
    "[1]": "the orders of magnitude issue 12 names: Intel SDM; Agner Fog, instruction tables (P4/Core 2)",
    "[2]": "N. Amit, \"Optimizing the TLB Shootdown Algorithm with Page Access Tracking\", USENIX ATC 2017: a "
           "remote acknowledgement costs thousands of cycles and a shootdown grows with its targets",
    "[3]": "a model assumption: ring transitions (INT/IRET ~100 cycles each) plus Xen's entry and exit paths",
    "[4]": "no published figure found: two crossings of the modelled hypervisor-domain link (link_ns)",
}
PUBLISHED = {
    "local full flush, with its refill": ("~100 cycles + serialisation (~0.1 us), then page walks", "[1]"),
    "local single-page flush (INVLPG)": ("a few hundred cycles: ~0.1 us", "[1]"),
    "IPI delivery (send to handler)": ("~1 us (ICR write, APIC bus, interrupt entry)", "[2]"),
    "IPI round trip (send to ack seen)": ("1000+ cycles a remote ack: 0.5-3 us", "[2]"),
    "hypercall round trip": ("~1000 cycles: ~0.4 us", "[3]"),
    "event-channel round trip (2 domains)": ("-", "[4]"),
}


# design -> (backend, extra command line, the mode the analysis names it by)
DESIGNS = {"native": ("native", "", "native"), "cr3": ("native", " tlbflush=cr3", "cr3 (native)"),
           "pv": ("xen", "", "pv")}


def _shootdown_spec(design: str, targets: int) -> str:
    backend, extra, _ = DESIGNS[design]
    vcpus = targets + 1
    return (f'[cluster]\nname = "cal{design}{targets}"\nseed = 1\n[hypervisor]\npcpus = {vcpus}\n'
            f'[[domain]]\nname = "d"\nvcpus = {vcpus}\nbackend = "{backend}"\n'
            f'cmdline = "workload=shootdown shutdown=poweroff{extra}"\n')


PING_SPEC = ('[cluster]\nname = "calping"\nseed = 1\n[hypervisor]\npcpus = 2\n'
             '[[domain]]\nname = "srv"\nvcpus = 1\nbackend = "xen"\n'
             'cmdline = "workload=pingserver peer=2 rounds=200 shutdown=poweroff"\n'
             '[[domain]]\nname = "cli"\nvcpus = 1\nbackend = "xen"\n'
             'cmdline = "workload=pingclient peer=1 port=4 rounds=200 shutdown=poweroff"\n')


def _analysed(spec: str, timeout_s: float) -> dict[str, Any]:
    return analysed_run(spec, timeout_s=timeout_s)[0]


def measure(targets: tuple[int, ...], *, timeout_s: float, say: Say) -> dict[str, Any]:
    out: dict[str, Any] = {"shootdown": {}}
    for design, (_, _, mode) in DESIGNS.items():
        for n in targets:
            say(f"calibration: {design} shootdown, {n} target{'s' if n > 1 else ''}, no overcommit")
            doc = _analysed(_shootdown_spec(design, n), timeout_s)
            row = next(r for r in doc["shootdowns"] if r["mode"] == mode)
            bd = next(b for b in doc["breakdown"] if b["mode"] == mode)["components_us"]
            out["shootdown"][f"{design}/{n}"] = {"p50_us": row["p50_us"], "p99_us": row["p99_us"], "breakdown": bd}
    say("calibration: interdomain ping-pong")
    ping = _analysed(PING_SPEC, timeout_s)
    out["ping_rtt_p50_us"] = ping["evtchn"]["ping_round_trips"]["p50_us"]
    evtchn = next(r for r in ping["hypercalls_by_nr"] if r["name"] == "event_channel_op")
    out["hypercall_mean_ns"] = evtchn["cost_mean_ns"]
    say("calibration: native op costs (pvops bench)")
    from bench import pvops

    costs = pvops.op_costs()
    out["flush_full_ns"] = costs[("native", "flush_tlb_user")][1]
    out["flush_page_ns"] = costs[("native", "flush_tlb_single")][1]
    return out


def section(opts: Options, say: Say) -> Section:
    targets = QUICK_TARGETS if opts.quick else TARGETS
    got = measure(targets, timeout_s=opts.timeout_s, say=say)
    one = got["shootdown"]["native/1"]["breakdown"]
    rows: list[list[str]] = []

    def row(name: str, simulated: str) -> None:
        published, source = PUBLISHED.get(name, ("", ""))
        rows.append([name, simulated, published, source])

    row("local full flush, with its refill", f"{got['flush_full_ns']:.0f} ns")
    row("local single-page flush (INVLPG)", f"{got['flush_page_ns']:.0f} ns")
    row("IPI delivery (send to handler)", f"{one['delivery']:.3f} us")
    row("IPI round trip (send to ack seen)", f"{one['delivery'] + one['handler'] + one['ack']:.3f} us")
    for design in DESIGNS:
        for n in targets:
            sd = got["shootdown"][f"{design}/{n}"]
            rows.append([f"remote shootdown, {design}, {n} target{'s' if n > 1 else ''}",
                         f"p50 {sd['p50_us']:.3f} us", "one hypercall plus one wait for the remote acks"
                         if design == "pv" else "a few us, growing with the targets", "[2]"])
    row("hypercall round trip", f"{got['hypercall_mean_ns']:.0f} ns")
    row("event-channel round trip (2 domains)", f"p50 {got['ping_rtt_p50_us']:.3f} us")
    note = "\n".join(f"{k} {v}" for k, v in SOURCES.items())
    return Section("calibration", "calibration: the default cost model's primitives beside published figures "
                   "(virtual time)", headers=HEADERS, rows=rows, data=got, note=note)

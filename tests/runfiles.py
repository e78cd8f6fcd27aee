"""Synthetic run directories for the checker and run-diff tests: spec.json, the traces and faults.jsonl, written by
hand in the trace vocabulary the core emits, so each test states exactly the history it judges."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

WINDOW_NS = 10_000
LINK_NS = 10_000


class SyntheticRun:
    """Events are recorded in call order; ``write`` puts them in place. Wall-clock fields are filled in from
    ``wall_base`` so two runs can differ in exactly those."""

    def __init__(self, root: Path, *, domains: tuple[str, ...] = ("alpha", "beta"), window_ns: int = WINDOW_NS,
                 wall_base: int = 1_700_000_000_000_000_000, pid_base: int = 4000) -> None:
        self.root = root
        self.window_ns = window_ns
        self.names = {i + 1: name for i, name in enumerate(domains)}
        self.hv: list[dict[str, Any]] = []
        self.doms: dict[int, list[dict[str, Any]]] = {d: [] for d in self.names}
        self.faults: list[dict[str, Any]] | None = None
        self._wall = itertools.count(wall_base, 1000)
        self.pid_base = pid_base

    # -- raw events --------------------------------------------------------------------------------------------

    def hyp(self, event: str, vt_ns: int, **fields: Any) -> dict[str, Any]:
        e = {"proc": "hypervisor", "vt_ns": vt_ns, **fields, "event": event, "level": "info",
             "wall_ns": next(self._wall)}
        self.hv.append(e)
        return e

    def dom(self, domid: int, event: str, vt_ns: int, **fields: Any) -> dict[str, Any]:
        e = {"proc": f"dom{domid}", "dom": domid, "vt_ns": vt_ns, **fields, "event": event, "level": "info",
             "wall_ns": next(self._wall)}
        self.doms[domid].append(e)
        return e

    # -- the vocabulary ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """What a real hypervisor trace opens with: host-dependent events the run diff must ignore."""
        self.hyp("hypervisor.listening", 0, pid=self.pid_base, bus=f"ipc://{self.root}/bus.sock",
                 control=f"ipc://{self.root}/control.sock")
        self.hyp("dmesg", 0, text="pvcluster hypervisor up: 2 pcpus, window 10000 ns, seed 1")
        for d, name in self.names.items():
            self.hyp("control.request", 0, cmd="create")
            self.hyp("dmesg", 0, dom=d, text=f"d{d} ({name}): created, process {self.pid_base + d}")
            self.dom(d, "domain.built", 0, backend="xen", vcpus=2)

    def event(self, dom: int, eid: int, vt_ns: int, *, port: int = 3, vcpu: int = 0, deliveries: int = 1) -> int:
        """An event-channel notification sent at ``vt_ns``, delivered ``deliveries`` times at its arrival."""
        arrival = vt_ns + LINK_NS
        self.hyp("event.sent", vt_ns, dom=dom, arrival_vt_ns=arrival, eid=eid, port=port, vcpu=vcpu)
        for _ in range(deliveries):
            self.dom(dom, "event.delivered", arrival, eid=eid, port=port, vcpu=vcpu)
        return arrival

    def hypercall(self, dom: int, seq: int, vt_ns: int, *, vcpu: int = 0, name: str = "mmuext_op", nr: int = 26,
                  result: int = 0, effects: int = 1, deferred: bool = False, continued: bool = False,
                  answers: int = 1, got: int | None = None, applied: int | None = None,
                  complete: bool | None = None) -> str:
        """A hypercall and (``answers`` times) its answer; ``got``/``applied``/``complete`` override what the
        domain saw."""
        span = f"hc-d{dom}v{vcpu}-{seq}"
        done = vt_ns + 400
        arrival = done + LINK_NS
        self.hyp("hypercall", vt_ns, dom=dom, vcpu=vcpu, span=span, nr=nr, name=name, args=[1, 0, 0, 0, 0],
                 result=result, done_vt_ns=done, arrival_vt_ns=arrival, effects=effects, deferred=deferred,
                 continued=continued)
        for _ in range(answers):
            self.dom(dom, "hypercall.done", arrival, vcpu=vcpu, span=span,
                     value=(result & 0xFFFFFFFF) if got is None else got,
                     complete=(not deferred) if complete is None else complete,
                     effects=effects if applied is None else applied)
        return span

    def shootdown(self, dom: int, rnd: int, vt_ns: int, *, stale: bool = False) -> str:
        span = f"sd-d{dom}-r{rnd}"
        self.dom(dom, "guest.mark", vt_ns, vcpu=0, code=1, round=rnd, span=span)
        if stale:
            self.dom(dom, "guest.mark", vt_ns + 500, vcpu=1, code=3, round=rnd, span=span)
        self.dom(dom, "guest.mark", vt_ns + 1000, vcpu=0, code=2, round=rnd, span=span)
        return span

    def shutdown(self, dom: int, seq: int, vt_ns: int) -> None:
        """SCHEDOP_shutdown: the hypercall that ends its domain has no answer; the process is stopped cleanly."""
        self.hypercall(dom, seq, vt_ns, name="sched_op", nr=29, effects=0, answers=0)
        self.hyp("domain.shutdown", vt_ns, dom=dom, reason="poweroff")
        self.dom(dom, "domain.stop", vt_ns, reason="poweroff")
        self.hyp("domain.process_exit", vt_ns, dom=dom, returncode=0)

    def fault(self, fid: int, kind: str, target: str, at_ns: int, *, outcome: str = "injected",
              traced: bool = True) -> None:
        """A fault in faults.jsonl and (``traced``) its injection in the hypervisor trace."""
        record = {"fid": fid, "kind": kind, "target": target, "at_ns": at_ns, "params": {}, "origin": "test",
                  "step": 0, "point": "hypercall-effects", "vt_ns": at_ns, "outcome": outcome}
        self.faults = (self.faults or []) + [record]
        if traced:
            dom = next((d for d, n in self.names.items() if n == target), None)
            self.hyp("fault.inject", at_ns, dom=dom, fid=fid, kind=kind, target=target, params={}, origin="test",
                     step=0, at_ns=at_ns)
            self.hyp("fault.outcome", at_ns, dom=dom, fid=fid, kind=kind, outcome=outcome)

    # -- the files ---------------------------------------------------------------------------------------------

    def write(self) -> Path:
        spec = {"cluster": {"name": "synthetic", "seed": 1}, "hypervisor": {"window_ns": self.window_ns},
                "domain": [{"name": n} for n in self.names.values()]}
        trace = self.root / "trace"
        trace.mkdir(parents=True, exist_ok=True)
        (self.root / "spec.json").write_text(json.dumps(spec))
        write_jsonl(trace / "hypervisor.jsonl", self.hv)
        for d, events in self.doms.items():
            write_jsonl(self.dom_path(d), events)
        if self.faults is not None:
            write_jsonl(self.root / "faults.jsonl", self.faults)
        return self.root

    def dom_path(self, dom: int) -> Path:
        return self.root / "trace" / f"dom{dom}-{self.names[dom]}.jsonl"


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))


def clean_run(root: Path, **kw: Any) -> SyntheticRun:
    """A run that keeps every invariant: two domains, each with a shootdown, hypercalls (one failing, one
    deferred), an event each way, and a clean shutdown."""
    run = SyntheticRun(root, **kw)
    run.start()
    for d in run.names:
        run.shootdown(d, 1, 20_000)
        run.hypercall(d, 1, 20_100, effects=3)
        run.hypercall(d, 2, 40_000, result=-22, effects=0)  # -EINVAL: the guest sees 0xFFFFFFEA
        run.hypercall(d, 3, 60_000, vcpu=1, name="sched_op", nr=29, effects=0, deferred=True)  # SCHEDOP_block
        run.event(d, 1, 70_000)
    run.shutdown(1, 4, 200_000)
    run.shutdown(2, 4, 210_000)
    return run

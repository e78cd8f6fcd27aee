"""Random hypercalls through the in-process core: no number and no argument word may make the hypervisor raise.

Each example is a short sequence of hypercalls from one vCPU of a domain, with argument words biased towards the
values handlers look at (small numbers, ports, pointers) and guest memory that is random bytes, unmapped in places;
the buffers each call copies in are named by the real copy-in descriptors (``pvcluster/abi/copyin.py``), exactly
as a domain process would send them. Every outcome must also cross the bus: the result encodes and decodes.
And when a handler does raise (a hypervisor bug), only its domain ends.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from fakes import Cluster, Op, shutdown_op, version_op
from helpers import RecordingLog, core
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor import timers, trap
from hypervisor.clock import next_activity
from hypervisor.hypercalls import FAMILIES
from pvcluster.abi.copyin import copy_in
from pvcluster.abi.xen import Hypercall
from pvcluster.bus import codec
from pvcluster.bus.messages import BuildResult, Hello, HypercallReq, Region, Window
from pvcluster.spec import parse_spec

POINTERS = (0x1000, 0x2000, 0x2FFC, 0xFFFFF000, 0xFFFFFFFC)
_words = st.one_of(
    st.integers(0, 15), st.integers(0, 2**32 - 1), st.sampled_from(POINTERS), st.sampled_from([0x7FF0, 0xFFFFFFFF]),
    st.integers(1, 1023),
)
_numbers = st.one_of(st.sampled_from(sorted(FAMILIES)), st.integers(0, 63), st.integers(0, 2**32 - 1))
_call = st.tuples(_numbers, st.lists(_words, min_size=5, max_size=5), st.integers(0, 1))


def _memory(seed: int) -> Any:
    """Guest memory: the same random bytes for the same address, a tenth of it unmapped."""

    def read(addr: int, length: int) -> bytes | None:
        rng = random.Random(f"{seed}/{addr}")
        if rng.random() < 0.1:
            return None
        head = [0, 1, 2, 3, 4, 7, 0x7FF0, rng.randrange(1 << 32)]
        words = [rng.choice(head) if rng.random() < 0.5 else rng.randrange(1 << 32) for _ in range(length // 4 + 1)]
        return b"".join(w.to_bytes(4, "little") for w in words)[:length]

    return read


def _running_domain(hv: Any) -> Any:
    spec = parse_spec('[[domain]]\nname = "fuzz"\nvcpus = 2\n[[domain]]\nname = "peer"\n')
    doms = [hv.create_domain(d) for d in spec.domains]
    for d in doms:
        hv.receive(d, Hello(pid=0))
        hv.receive(d, BuildResult(ok=True, error_code="", error="", entry=0, start_info=0, guest_os="fuzz"))
    hv.outbox.clear()
    return doms[0]


@settings(max_examples=2000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(calls=st.lists(_call, min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_random_hypercalls_never_raise_and_every_result_crosses_the_bus(calls: list[Any], seed: int) -> None:
    hv = core(log=RecordingLog())
    dom = _running_domain(hv)
    read = _memory(seed)
    for i, (nr, args, vcpu) in enumerate(calls):
        regions = [Region(s.addr, s.length, read(s.addr, s.length), s.writable) for s in copy_in(nr, args, read)]
        req = HypercallReq(vcpu=vcpu, seq=i + 1, vt_ns=1000 * (i + 1), nr=nr, args=args, regions=regions)
        out = trap.apply(hv, dom, req)
        results = [out.result] if out.result is not None else []
        frame = codec.encode(Window(index=1, end_ns=10_000, results=results), seq=1, vt_ns=0)
        assert codec.decode(frame).body.results == results
        for target, effect in out.remote:
            assert hv.domains.get(target) is not None, effect
        if out.shutdown is not None:
            break
    # whatever the calls armed, the window that reaches it can be opened and sent, and its timers fired
    for d in hv.domains:
        times = [t for v in d.vcpus if (t := v.timers.next_deadline()) is not None]
        times += [dl.vt_ns for dl in d.deliveries]
        if next_activity(d) is None or not times:
            continue
        assert all(0 <= t < timers.END_OF_TIME for t in times), times
        end = (max(times) // hv.clock.window_ns + 1) * hv.clock.window_ns
        expired = timers.due(d.vcpus, end)
        assert all(0 <= e.vt_ns <= end for e in expired)
        codec.encode(Window(index=2, end_ns=end, results=[], events=d.take_deliveries(end)), seq=2, vt_ns=end)


def test_a_handler_that_raises_ends_its_domain_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(call: Any) -> int:
        if call.dom.name == "alpha":
            raise RuntimeError("a bug in the hypervisor")
        return 0

    monkeypatch.setitem(FAMILIES, int(Hypercall.xen_version), broken)
    spec = parse_spec('[cluster]\nname = "bug"\n[[domain]]\nname = "alpha"\n[[domain]]\nname = "beta"\n')
    prog: list[Op] = [("compute", 1000), version_op(), ("compute", 1000), version_op(), shutdown_op()]
    log = RecordingLog()
    c = Cluster(spec, {"alpha": [prog], "beta": [prog]}, log)
    c.run()
    alpha, beta = c.hv.domains.get("alpha"), c.hv.domains.get("beta")
    assert alpha is not None and beta is not None
    assert alpha.state.value == "crashed" and "a bug in the hypervisor" in alpha.crash_detail
    assert beta.state.value == "dead" and beta.shutdown_reason is not None
    crash = [kw for e, kw in log.events if e == "domain.crash" and kw["dom"] == alpha.domid]
    assert crash and "RuntimeError" in crash[0]["traceback"]

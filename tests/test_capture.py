"""A domain process's state captured between two windows and restored into a fresh process (domains/capture.py),
in-process: the restored process answers the same windows with the same reports, to the byte of guest memory; a
state that is not this domain's, or whose attributes are not what a fresh process has, is refused."""

from __future__ import annotations

import hashlib
from typing import Any

import attrs
import pytest
from helpers import RecordingLog

from domains import capture
from domains.runtime import DomainProcess
from hypervisor.core import Hypervisor
from pvcluster import statepickle
from pvcluster.bus.messages import Build, CapturedState, HypercallReq, HypercallResult, ReadRam, Restore, Window
from pvcluster.spec import parse_spec

W = 10_000


def built(backend: str) -> tuple[DomainProcess, Build]:
    spec = parse_spec(f"""
[[domain]]
name = "solo"
vcpus = 2
backend = "{backend}"
cmdline = "workload=shootdown"
""")
    hv = Hypervisor(spec, RecordingLog())
    build = hv._build_message(hv.create_domain(spec.domains[0]))
    proc = DomainProcess(None, 1, "solo", RecordingLog())  # type: ignore[arg-type]
    assert proc._build(build).ok
    return proc, build


def step(proc: DomainProcess, i: int, pending: list[HypercallReq]) -> Any:
    """Window ``i``, every hypercall of the last one answered 0 (no hypervisor here: both sides get the same)."""
    results = [HypercallResult(vcpu=r.vcpu, seq=r.seq, vt_ns=max(r.vt_ns + 400, i * W), value=0, writes=[],
                               effects=[], complete=True) for r in pending]
    return proc._window(Window(index=i, end_ns=(i + 1) * W, results=results, run=[0, 1], start_ns=i * W))


def captured(proc: DomainProcess) -> tuple[CapturedState, bytes]:
    cap = capture.capture(proc)
    ram = b"".join(capture.read_ram(proc, ReadRam(o, statepickle.CHUNK_BYTES)).data
                   for o in range(0, cap.ram_size, statepickle.CHUNK_BYTES))
    assert len(ram) == cap.ram_size and hashlib.sha256(ram).digest() == cap.ram_sha256
    return cap, ram


@pytest.mark.parametrize("backend", ["xen", "native"])
def test_a_restored_domain_process_answers_every_later_window_as_the_original(backend: str) -> None:
    proc, build = built(backend)
    pending: list[HypercallReq] = []
    for i in range(25):
        pending = step(proc, i, pending).hypercalls
    cap, ram = captured(proc)
    twin = DomainProcess(None, 1, "solo", RecordingLog())  # type: ignore[arg-type]
    capture.restore(twin, Restore(build=build, state=cap.state, ram_size=cap.ram_size, ram_sha256=cap.ram_sha256),
                    ram)
    assert [v.clock_ps for v in twin.vcpus] == [v.clock_ps for v in proc.vcpus]
    assert [v.reg("eip") for v in twin.vcpus] == [v.reg("eip") for v in proc.vcpus]
    mine, theirs = list(pending), list(pending)
    ran = 0
    for i in range(25, 70):
        a, b = step(proc, i, mine), step(twin, i, theirs)
        assert a == b, i
        mine, theirs = a.hypercalls, b.hypercalls
        ran += len(a.hypercalls)
    assert ran  # the guest went on trapping after the capture
    assert hashlib.sha256(proc.memory.buf).digest() == hashlib.sha256(twin.memory.buf).digest()


def test_a_state_that_is_not_this_domains_or_not_what_a_process_holds_is_refused() -> None:
    proc, build = built("xen")
    cap, ram = captured(proc)

    def restore(state: bytes, b: Build = build, memory: bytes = ram) -> None:
        fresh = DomainProcess(None, 1, "solo", RecordingLog())  # type: ignore[arg-type]
        capture.restore(fresh, Restore(build=b, state=state, ram_size=len(memory),
                                       ram_sha256=hashlib.sha256(memory).digest()), memory)

    state = statepickle.loads(cap.state, modules=statepickle.DOMAIN_MODULES)
    with pytest.raises(capture.RestoreError, match="domain 1's, not 2's"):
        restore(cap.state, attrs.evolve(build, domid=2))
    with pytest.raises(capture.RestoreError, match="unknown attribute 'bogus'"):
        restore(statepickle.dumps({**state, "proc": {**state["proc"], "bogus": 2}}))
    with pytest.raises(capture.RestoreError, match="unknown attribute 'exit_now'"):  # wiring is never restored
        restore(statepickle.dumps({**state, "proc": {**state["proc"], "exit_now": 1}}))
    with pytest.raises(capture.RestoreError, match=r"process.vt_ns: str, expected int"):
        restore(statepickle.dumps({**state, "proc": {**state["proc"], "vt_ns": "soon"}}))
    with pytest.raises(capture.RestoreError, match="bad clock state"):
        bad = [{**state["vcpus"][0], "hook": {"clock_ps": -1}}, state["vcpus"][1]]
        restore(statepickle.dumps({**state, "vcpus": bad}))
    with pytest.raises(capture.RestoreError, match="another size"):
        bad = [{**state["vcpus"][0], "cpu": b"short"}, state["vcpus"][1]]
        restore(statepickle.dumps({**state, "vcpus": bad}))
    with pytest.raises(capture.RestoreError, match="memory of"):
        restore(cap.state, memory=ram[:-4096])

"""Unit tests of the hypervisor's pure parts: the domain life cycle, guest-memory checks, the hypercall page."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from helpers import core

from hypervisor.core import Refusal
from hypervisor.domain import TRANSITIONS, Domain, DomainState, IllegalTransition
from hypervisor.guestmem import GuestFault, GuestView, NotCopied
from hypervisor.hypercall_page import hypercall_page
from hypervisor.vcpu import RunState
from pvcluster.bus.messages import BuildResult, Hello, Region


def _core_with_domain() -> tuple[Any, Domain]:
    hv = core()
    return hv, hv.create_domain(hv.spec.domains[0])


def test_every_illegal_transition_raises_and_leaves_the_state_alone() -> None:
    for src, allowed in TRANSITIONS.items():
        for dst in DomainState:
            _, dom = _core_with_domain()
            dom.state = src
            if dst in allowed:
                dom.move(dst, "test")
                assert dom.state is dst
            else:
                with pytest.raises(IllegalTransition):
                    dom.move(dst, "test")
                assert dom.state is src


def test_dead_is_final_and_ids_and_identities_are_unique() -> None:
    hv = core()
    spec = hv.spec
    a, b = hv.create_domain(spec.domains[0]), hv.create_domain(spec.domains[1])
    assert (a.domid, b.domid) == (1, 2)
    assert hv.claim(b"peer-a", Hello(pid=1, name=a.name), None) is a
    assert hv.claim(b"peer-b", Hello(pid=2, name=b.name), None) is b
    assert hv.domains.by_identity(b"peer-b") is b and hv.domains.by_identity(b"peer-forged") is None
    assert TRANSITIONS[DomainState.DEAD] == frozenset()
    with pytest.raises(ValueError, match="already exists"):
        hv.create_domain(spec.domains[0])
    # ids are never reused: a third domain gets 3 even once the first is gone
    a.move(DomainState.CRASHED, "test")
    a.move(DomainState.DEAD, "test")
    c = hv.create_domain(spec.domains[0])  # a dead domain's name is free again
    assert c.domid == 3 and hv.domains.get("alpha") is c and hv.domains.get(1) is a


def test_domains_are_found_by_id_or_name_and_anything_else_is_none() -> None:
    hv = core()
    a, b = hv.create_domain(hv.spec.domains[0]), hv.create_domain(hv.spec.domains[1])
    assert (hv.domains.get(1), hv.domains.get("2"), hv.domains.get("beta")) == (a, b, b)
    # "²" is a digit to Python's str.isdigit but no number: no domain, and no crash
    for key in ("²", "٣", "1.0", "-1", "", " 1", "0x1", "9" * 20, True, 1.0, None, b"1", 7):
        assert hv.domains.get(key) is None, key
    assert [d.domid for d in hv.domains] == [1, 2]


def test_summary_shows_each_vcpus_run_state_as_the_scheduler_keeps_it() -> None:
    hv, dom = _core_with_domain()
    assert dom.summary()["vcpu_states"] == ["offline", "offline"]
    hv.receive(dom, Hello(pid=1))
    hv.receive(dom, BuildResult(ok=True, error_code="", error="", entry=0xC0100000, start_info=0xC0200000,
                                guest_os="linux", l2_mfn=0xF0, l1_mfns=[0xF1]))
    summary = dom.summary()
    assert (summary["state"], summary["vcpu_states"]) == ("running", ["runnable", "offline"])
    assert dom.vcpus[0].runstate is RunState.RUNNABLE and dom.vcpus[1].runstate is RunState.OFFLINE


def test_guest_view_only_allows_copied_in_spans() -> None:
    view = GuestView(
        [Region(0x1000, 8, b"abcdefgh", False), Region(0x2000, 4, b"\0" * 4, True), Region(0x3000, 4, None, True),
         Region(0x4000, 8, b"abcd", False)]
    )
    assert view.read(0x1002, 3) == b"cde"
    with pytest.raises(GuestFault):
        view.write(0x1000, b"x")  # read-only span
    with pytest.raises(GuestFault):
        view.read(0x3000, 4)  # unmapped in the guest
    with pytest.raises(GuestFault):
        view.read(0x4000, 2)  # a span copied short: not mapped whole
    with pytest.raises(GuestFault):
        view.read(0xFFFFFFFE, 4)  # wraps
    view.write_u32(0x2000, 0xDEADBEEF)
    assert [(w.addr, w.data) for w in view.writes] == [(0x2000, b"\xef\xbe\xad\xde")]


def test_guest_view_reports_a_span_nobody_copied_in_as_not_copied() -> None:
    view = GuestView([Region(0x1000, 8, b"abcdefgh", False), Region(0x2000, 4, None, True)])
    # A span no region covers was not copied in by the domain process: NotCopied, which is not a GuestFault (the
    # guest did nothing wrong; batch hypercalls continue from there). It used to be a GuestFault.
    assert not issubclass(NotCopied, GuestFault)
    for addr, length in ((0x1006, 4), (0x0FFF, 2), (0x5000, 4), (0x1FFF, 4)):  # past a span, before it, nowhere
        with pytest.raises(NotCopied) as info:
            view.read(addr, length)
        assert (info.value.addr, info.value.length) == (addr, length)
    with pytest.raises(NotCopied):
        view.write(0x5000, b"x")
    with pytest.raises(NotCopied):
        view.check(0x1006, 4)
    assert view.writes == []


def test_hypercall_page_stubs_follow_xen() -> None:
    page = hypercall_page()
    assert len(page) == 4096
    # entry n: mov eax, n; int 0x82; ret
    assert page[18 * 32 : 18 * 32 + 8] == b"\xb8\x12\x00\x00\x00\xcd\x82\xc3"
    # iret (23) pushes eax first and does not return
    assert page[23 * 32 : 23 * 32 + 8] == b"\x50\xb8\x17\x00\x00\x00\xcd\x82"


def test_a_second_domain_with_another_name_gets_its_own_state() -> None:
    hv, alpha = _core_with_domain()
    gamma = hv.create_domain(attrs.evolve(hv.spec.domains[0], name="gamma"))
    assert gamma.domid == 2 and gamma.evtchn is not alpha.evtchn and gamma.frames is not alpha.frames
    assert all(v.domid == 2 for v in gamma.vcpus) and gamma.trace is not alpha.trace


def test_the_run_wall_time_spans_the_windows_only() -> None:
    hv = core()
    assert hv.status()["wall_run_s"] == 0.0  # no window yet: start-up is not the run
    wall = hv.run_wall
    wall.note(closed=False, opened=True)
    wall.note(closed=True, opened=False)  # the last window closed: the span stops growing
    done = wall.seconds(window_open=False)
    assert done >= 0 and wall.seconds(window_open=False) == done
    assert wall.seconds(window_open=True) >= done  # a status read while a window runs counts up to now


def test_a_claim_binds_one_process_per_domain_and_only_with_the_domain_s_key() -> None:
    hv = core()
    a = hv.create_domain(hv.spec.domains[0])
    assert hv.claim(b"p1", Hello(pid=1, name=a.name), "beta") == Refusal(
        "refused", f"its key is domain 'beta''s, not {a.name!r}'s")
    assert hv.claim(b"p1", Hello(pid=1, name="nosuch"), None) == Refusal(
        "not-declared", "no domain named 'nosuch' was declared")
    assert hv.claim(b"p1", Hello(pid=1, name=a.name), a.name) is a
    # a second process cannot take the domain over, whatever its key
    assert hv.claim(b"p2", Hello(pid=2, name=a.name), a.name) == Refusal(
        "refused", f"domain {a.name!r} has already joined")
    assert hv.domains.by_identity(b"p2") is None and a.identity == b"p1"
    refused = [kw for e, kw in hv.log.events if e == "domain.join_refused"]
    assert [r["reason"] for r in refused][-1] == f"domain {a.name!r} has already joined"

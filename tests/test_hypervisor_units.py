"""Unit tests of the hypervisor's pure parts: the domain life cycle, guest-memory checks, the hypercall page."""

from __future__ import annotations

import pytest

from hypervisor.domain import TRANSITIONS, DomainState, DomainTable, IllegalTransition
from hypervisor.guestmem import GuestFault, GuestView
from hypervisor.hypercall_page import hypercall_page
from pvcluster.bus.messages import Region
from pvcluster.spec import load_spec


def _table_with_domain() -> tuple[DomainTable, object]:
    table = DomainTable()
    return table, table.create(load_spec().domains[0])


def test_every_illegal_transition_raises_and_leaves_the_state_alone() -> None:
    for src, allowed in TRANSITIONS.items():
        for dst in DomainState:
            _, dom = _table_with_domain()
            dom.state = src  # type: ignore[attr-defined]
            if dst in allowed:
                dom.move(dst, "test")  # type: ignore[attr-defined]
                assert dom.state is dst  # type: ignore[attr-defined]
            else:
                with pytest.raises(IllegalTransition):
                    dom.move(dst, "test")  # type: ignore[attr-defined]
                assert dom.state is src  # type: ignore[attr-defined]


def test_dead_is_final_and_ids_and_identities_are_unique() -> None:
    table = DomainTable()
    spec = load_spec()
    a, b = table.create(spec.domains[0]), table.create(spec.domains[1])
    assert (a.domid, b.domid) == (1, 2)
    assert a.identity != b.identity and table.by_identity(b.identity) is b
    assert table.by_identity(b"dom2-forged") is None
    assert TRANSITIONS[DomainState.DEAD] == frozenset()
    with pytest.raises(ValueError, match="already exists"):
        table.create(spec.domains[0])


def test_guest_view_only_allows_copied_in_spans() -> None:
    view = GuestView(
        [Region(0x1000, 8, b"abcdefgh", False), Region(0x2000, 4, b"\0" * 4, True), Region(0x3000, 4, None, True)]
    )
    assert view.read(0x1002, 3) == b"cde"
    with pytest.raises(GuestFault):
        view.read(0x1006, 4)  # runs past the span
    with pytest.raises(GuestFault):
        view.write(0x1000, b"x")  # read-only span
    with pytest.raises(GuestFault):
        view.read(0x3000, 4)  # unmapped in the guest
    with pytest.raises(GuestFault):
        view.read(0xFFFFFFFE, 4)  # wraps
    view.write_u32(0x2000, 0xDEADBEEF)
    assert [(w.addr, w.data) for w in view.writes] == [(0x2000, b"\xef\xbe\xad\xde")]


def test_hypercall_page_stubs_follow_xen() -> None:
    page = hypercall_page()
    assert len(page) == 4096
    # entry n: mov eax, n; int 0x82; ret
    assert page[18 * 32 : 18 * 32 + 8] == b"\xb8\x12\x00\x00\x00\xcd\x82\xc3"
    # iret (23) pushes eax first and does not return
    assert page[23 * 32 : 23 * 32 + 8] == b"\x50\xb8\x17\x00\x00\x00\xcd\x82"

"""The start-of-day contract in-process: the paravirtual clock's arithmetic, vcpu_time_info and RDTSC agreeing,
the builder's shared_info and start_info, and the console and xenstore backends' ports and ring draining.
(tests/test_start_of_day.py checks the same from a C guest built against Xen's headers, in a real cluster.)"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from helpers import assert_matches_xen_headers, call_events, core, make_call, run_handler
from hypothesis import given
from hypothesis import strategies as st
from test_native_hook import BASE, CODE, asm, machine, vcpu_at
from test_paging import _build

from domains import timeinfo
from domains.builder import build_domain
from domains.memory import GuestRam
from domains.vcpu import InsnCounter, VcpuState
from hypervisor import backends
from hypervisor.core import Hypervisor, boot_wallclock
from hypervisor.domain import Domain
from hypervisor.evtchn import PortState
from hypervisor.hypercalls import event_channel_op
from hypervisor.hypercalls.base import Call
from pvcluster.abi import layouts
from pvcluster.abi.copyin import notified_port
from pvcluster.abi.layouts import SHARED_INFO, VCPU_INFO, XENCONS_INTERFACE, XENCONS_OUT_SIZE
from pvcluster.abi.platform import BACKEND_DOMID
from pvcluster.abi.pvclock import TimeScale, drifted, scale_delta, set_time_scale
from pvcluster.abi.xen import PAGE_SIZE, XEN_LEGACY_MAX_VCPUS, EvtchnOp, EvtchnStat, Hypercall
from pvcluster.bus.effects import SetPending, WriteMachine
from pvcluster.bus.messages import Build, BuildResult, Hello, Region
from pvcluster.costs import CLOCK_READ_PS, PS_PER_TSC_TICK, TSC_HZ

# -- the clock's arithmetic ---------------------------------------------------------------------------------------


def test_set_time_scale_is_xens() -> None:
    # 2.5 GHz: halve once into (1, 2] GHz; 10^9 / 1.25e9 as a 32-bit fraction
    assert set_time_scale(TSC_HZ) == TimeScale(mul_frac=(10**9 << 32) // 1_250_000_000, shift=-1)
    assert set_time_scale(10**9) == TimeScale(mul_frac=1 << 31, shift=1)  # 1 GHz: doubled to 2 GHz, times 1/2
    assert set_time_scale(3_000_000).shift == 9  # a slow counter is shifted up into range


@given(st.integers(1_000_000, 10**10), st.integers(0, 1 << 40))
def test_scale_delta_turns_ticks_into_nanoseconds(hz: int, ticks: int) -> None:
    exact = ticks * 10**9 // hz
    got = scale_delta(ticks, set_time_scale(hz))
    # set_time_scale rounds mul_frac to the nearest, so the product may land a ns above the exact quotient (found by
    # hypothesis: hz=2075631251, ticks=631026088); the truncations after it lose well under a ns per 10^8
    slack = 1 + exact // 10**8
    assert exact - 1 - slack <= got <= exact + slack


def test_a_drifting_scale_runs_fast_or_slow_by_its_ppm() -> None:
    base = set_time_scale(TSC_HZ)
    second = TSC_HZ
    assert abs(scale_delta(second, drifted(base, 500)) - 1_000_500_000) <= 2
    assert abs(scale_delta(second, drifted(base, -2000)) - 998_000_000) <= 2
    assert drifted(base, 1_000_000).mul_frac <= 0xFFFFFFFF  # twice as fast: a bit moves into the shift
    assert scale_delta(second, drifted(base, -1_000_000)) == 0  # a stopped clock


# -- vcpu_time_info and RDTSC -------------------------------------------------------------------------------------


def _guest_time(ram: GuestRam, vid: int, tsc: int) -> tuple[int, int]:
    """(version, ns) as a guest reads vcpu_time_info and extrapolates to ``tsc``."""
    at = ram.shared_info_paddr + SHARED_INFO.offset("vcpu_info") + vid * VCPU_INFO.size
    version, _, stamp, system, mul, shift = struct.unpack_from("<IIQQIb", ram.buf, at + VCPU_INFO.offset("time"))
    return version, system + scale_delta(tsc - stamp, TimeScale(mul, shift))


def test_published_time_extrapolated_over_rdtsc_is_the_vcpus_clock() -> None:
    """vCPU 1's vcpu_time_info is published at 1 ms; the guest then runs and reads RDTSC: system_time plus the
    scaled TSC delta is the vCPU's virtual clock at that instruction, within a ns."""
    ram, cr3, counter = machine(InsnCounter())
    ram.write_pa(CODE - BASE, asm("mov ecx, 5000\nl: dec ecx\n jnz l\n rdtsc\n mov [0xc0003000], eax\n"
                                  "mov [0xc0003004], edx\n hlt", CODE))
    vcpu = vcpu_at(ram, cr3, counter, CODE, vid=1)
    vcpu.advance_to(1_000_000)
    timeinfo.publish(ram, 1, vcpu.clock_ps)
    version, ns = _guest_time(ram, 1, TSC_HZ // 1000)  # the publish instant itself: 1 ms in ticks
    assert version == 2 and ns == 1_000_000
    vcpu.run(2_000_000)
    assert vcpu.state is VcpuState.BLOCKED
    (tsc,) = struct.unpack_from("<Q", ram.buf, 0x3000)
    before_hlt = vcpu.clock_ps - 2 * 2000 - CLOCK_READ_PS - 60_000  # back over the stores, RDTSC itself and hlt
    assert tsc == before_hlt // PS_PER_TSC_TICK
    assert before_hlt // 1000 - 1 <= _guest_time(ram, 1, tsc)[1] <= before_hlt // 1000


def test_publishing_keeps_the_version_protocol_and_the_skew_moves_only_what_the_guest_reads() -> None:
    ram, _, _ = machine(InsnCounter())
    timeinfo.publish(ram, 0, 5_000_000_000)
    timeinfo.publish(ram, 0, 5_000_000_000, skew=(7000, 500))
    version, ns = _guest_time(ram, 0, timeinfo.tsc_at(5_000_000_000))
    assert version == 4 and ns == 5_000_000 + 7000 + 5_000_000 * 500 // 10**6
    # a virtual ms later the guest's clock has run 500 ppm fast
    later = _guest_time(ram, 0, timeinfo.tsc_at(6_000_000_000))[1]
    assert abs(later - ns - 1_000_500) <= 2


def test_rdtsc_reads_the_instant_of_its_own_instruction_and_costs_what_the_clock_port_does() -> None:
    ram, cr3, counter = machine(InsnCounter())
    ram.write_pa(CODE - BASE, asm("nop\n rdtsc\n mov esi, eax\n nop\n nop\n rdtsc\n hlt", CODE))
    vcpu = vcpu_at(ram, cr3, counter, CODE, ps=3000)  # a slow CPU: every price scaled the same way
    vcpu.advance_to(10_000)
    vcpu.run(20_000)
    first, second = vcpu.reg("esi"), vcpu.reg("eax")
    # the first after one nop; the second after the first RDTSC itself, a mov and two nops: each at ps_per_instr 3x
    assert first == (10_000_000 + 3 * 1000) // PS_PER_TSC_TICK
    assert second == (10_000_000 + 3 * 1000 + 3 * (CLOCK_READ_PS + 3 * 1000)) // PS_PER_TSC_TICK
    assert vcpu._st.tsc_reads == 2  # answered in C; each site's prefix priced once by Python
    vcpu.set_regs({"eip": CODE})
    vcpu.state = VcpuState.RUNNING
    vcpu.run(40_000)
    assert vcpu._st.tsc_reads == 4 and vcpu._st.tsc_priced == 2


def test_rdtscp_reads_the_virtual_tsc_too() -> None:
    ram, cr3, counter = machine(InsnCounter())
    ram.write_pa(CODE - BASE, asm("mov ecx, 0x55\n rdtscp\n mov esi, eax\n mov edi, ecx\n hlt", CODE))
    vcpu = vcpu_at(ram, cr3, counter, CODE, ps=1000)
    vcpu.advance_to(10_000)
    vcpu.run(20_000)
    # after the mov: the host's counter would be far larger; TSC_AUX is 0, as Xen's for a PV vCPU that never set it
    assert vcpu.reg("esi") == (10_000_000 + 1000) // PS_PER_TSC_TICK
    assert vcpu.reg("edi") == 0 and vcpu._st.tsc_reads == 1


# -- the builder ---------------------------------------------------------------------------------------------------


def _sod_build() -> Build:
    import attrs

    return attrs.evolve(_build("xen"), store_evtchn=1, console_evtchn=2, wc_sec=1_234_567_890, wc_nsec=987)


def test_shared_info_starts_masked_with_the_wallclock_and_start_info_names_the_rings() -> None:
    ram, boot = build_domain(_sod_build())
    si = ram.shared_info_paddr
    masks = [ram.buf[si + v * VCPU_INFO.size + VCPU_INFO.offset("evtchn_upcall_mask")]
             for v in range(XEN_LEGACY_MAX_VCPUS)]
    assert masks == [1] * XEN_LEGACY_MAX_VCPUS
    assert struct.unpack_from("<III", ram.buf, si + SHARED_INFO.offset("wc_version")) == (2, 1_234_567_890, 987)
    start = boot.start_info - BASE
    fields = {name: struct.unpack_from("<I", ram.buf, start + layouts.START_INFO.offset(name))[0]
              for name in ("store_mfn", "store_evtchn", "console.domU.mfn", "console.domU.evtchn")}
    assert fields == {"store_mfn": boot.store_mfn, "store_evtchn": 1, "console.domU.mfn": boot.console_mfn,
                      "console.domU.evtchn": 2}
    for mfn in (boot.store_mfn, boot.console_mfn):  # zeroed pages of the guest's own, inside its RAM
        assert 0 < mfn < ram.nr_pages and ram.read_pa(mfn * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)


def test_the_wallclock_is_one_per_seed() -> None:
    assert boot_wallclock(1) == boot_wallclock(1) != boot_wallclock(2)
    sec, nsec = boot_wallclock(1)
    assert 946_684_800 <= sec < 1 << 32 and 0 <= nsec < 10**9


# -- the backends ------------------------------------------------------------------------------------------------

STORE_MFN, CONSOLE_MFN = 0x20, 0x21
RING_PA = CONSOLE_MFN * PAGE_SIZE + XENCONS_INTERFACE.offset("out")
RING_LEN = XENCONS_INTERFACE.size - XENCONS_INTERFACE.offset("out")
SEND_AT = 0x10000


def _built() -> tuple[Hypervisor, Domain, Build]:
    hv = core()
    dom = hv.create_domain(hv.spec.domains[0])
    hv.receive(dom, Hello(pid=0))
    [(_, build)] = hv.outbox
    assert isinstance(build, Build)
    assert [(p.number, p.state, p.remote_dom) for p in dom.evtchn.in_use()] == [
        (1, PortState.UNBOUND, BACKEND_DOMID), (2, PortState.UNBOUND, BACKEND_DOMID)]
    hv.receive(dom, BuildResult(ok=True, error_code="", error="", entry=0, start_info=0, guest_os="t",
                                store_mfn=STORE_MFN, console_mfn=CONSOLE_MFN))
    return hv, dom, build


def test_the_toolstack_allocates_the_ring_ports_and_the_backends_bind_them() -> None:
    hv, dom, build = _built()
    assert (build.store_evtchn, build.console_evtchn) == (1, 2)
    assert (build.wc_sec, build.wc_nsec) == boot_wallclock(hv.spec.cluster.seed)
    assert [(p.number, p.state, p.remote_dom) for p in dom.evtchn.in_use()] == [
        (1, PortState.INTERDOMAIN, BACKEND_DOMID), (2, PortState.INTERDOMAIN, BACKEND_DOMID)]
    assert (dom.store_mfn, dom.console_mfn) == (STORE_MFN, CONSOLE_MFN)
    status = struct.pack("<HxxIIIII", 0x7FF0, 2, 0, 0, 0, 0)
    call = make_call(hv, dom, Hypercall.event_channel_op, [EvtchnOp.status, SEND_AT],
                     [Region(SEND_AT, len(status), status, True)])
    assert run_handler(event_channel_op, call) == 0
    st_, _, rdom, rport = struct.unpack_from("<IIHxxI", call.mem.writes[0].data, 8)
    assert (st_, rdom, rport) == (EvtchnStat.interdomain, BACKEND_DOMID, 2)


def _ring(text: bytes, cons: int = 0) -> bytes:
    """The ring's out[] with ``text`` written from index ``cons`` (masked), and the indices after it."""
    out = bytearray(XENCONS_OUT_SIZE)
    for i, b in enumerate(text):
        out[(cons + i) % XENCONS_OUT_SIZE] = b
    return bytes(out) + struct.pack("<IIII", 0, 0, cons, cons + len(text))


def _send(hv: Hypervisor, dom: Domain, port: int, rings: list[Region]) -> Call:
    send = struct.pack("<I", port)
    call = make_call(hv, dom, Hypercall.event_channel_op, [EvtchnOp.send, SEND_AT],
                     [Region(SEND_AT, 4, send, False)])
    call.rings = rings
    assert run_handler(event_channel_op, call) == 0
    return call


def test_a_console_notification_drains_the_ring_as_xenconsoled_does() -> None:
    hv, dom, _ = _built()
    call = _send(hv, dom, 2, [Region(RING_PA, RING_LEN, _ring(b"hello ring\npart"), False)])
    assert dom.console == ["hello ring"]
    assert ("console", "hello ring") in [(e, kw.get("text")) for e, kw in call_events(call)]
    out_cons = RING_PA + XENCONS_INTERFACE.offset("out_cons") - XENCONS_INTERFACE.offset("out")
    assert call.effects == [WriteMachine(addr=out_cons, data=struct.pack("<I", 15)),
                            SetPending(vcpu=0, port=2)]
    # the next chunk wraps the ring: read at masked indices, from where the backend left off
    start = XENCONS_OUT_SIZE * 3 - 4
    dom.console_cons = start
    _send(hv, dom, 2, [Region(RING_PA, RING_LEN, _ring(b" ends\n", start), False)])
    assert dom.console == ["hello ring", "part ends"] and dom.console_cons == start + 6


def test_a_broken_or_missing_ring_is_read_as_nothing() -> None:
    hv, dom, _ = _built()
    ring = bytearray(_ring(b"x"))
    struct.pack_into("<I", ring, XENCONS_OUT_SIZE + 12, XENCONS_OUT_SIZE + 1)  # out_prod past what out[] holds
    broken = _send(hv, dom, 2, [Region(RING_PA, RING_LEN, bytes(ring), False)])
    missing = _send(hv, dom, 2, [])  # a send the domain process copied nothing for (from a multicall, say)
    empty = _send(hv, dom, 2, [Region(RING_PA, RING_LEN, _ring(b""), False)])
    assert dom.console == [] and dom.console_cons == 0
    for call, why in ((broken, "console.ring_broken"), (missing, "console.ring_not_copied")):
        assert call.effects == [] and why in [e for e, _ in call_events(call)]
    assert empty.effects == []


def test_the_xenstore_port_is_heard_but_nobody_answers_yet() -> None:
    hv, dom, _ = _built()
    call = _send(hv, dom, 1, [])
    assert call.effects == [] and "xenstore.notify" in [e for e, _ in call_events(call)]


def test_the_domain_process_copies_the_ring_only_for_a_send_on_a_port() -> None:
    mem = {0x5000: struct.pack("<I", 2)}

    def read(va: int, n: int) -> bytes | None:
        return mem.get(va)

    assert notified_port(Hypercall.event_channel_op, [EvtchnOp.send, 0x5000], read) == 2
    assert notified_port(Hypercall.event_channel_op, [EvtchnOp.status, 0x5000], read) is None
    assert notified_port(Hypercall.event_channel_op, [EvtchnOp.send, 0x6000], read) is None  # unmapped
    assert notified_port(Hypercall.console_io, [EvtchnOp.send, 0x5000], read) is None


def test_a_closed_ring_port_is_freed_and_a_dying_domain_leaves_nothing() -> None:
    hv, dom, _ = _built()
    close = struct.pack("<I", 2)
    call = make_call(hv, dom, Hypercall.event_channel_op, [EvtchnOp.close, SEND_AT], [Region(SEND_AT, 4, close, False)])
    assert run_handler(event_channel_op, call) == 0 and dom.evtchn.ports[2].state is PortState.FREE
    hv.crash(dom, "test")
    assert dom.evtchn.in_use() == []
    assert backends.is_backend_port(dom.evtchn.ports[1]) is False


def test_xencons_interface_matches_xen_headers(tmp_path: Path) -> None:
    checks = [("sizeof(struct xencons_interface)", XENCONS_INTERFACE.size)]
    checks += [(f"offsetof(struct xencons_interface, {m})", off) for m, off in XENCONS_INTERFACE.members.items()]
    checks += [("sizeof(((struct xencons_interface *)0)->out)", XENCONS_OUT_SIZE)]
    if not Path("/usr/include/xen/io/console.h").exists():
        pytest.skip("xen/io/console.h is absent")
    assert_matches_xen_headers(tmp_path, ("xen", "io/console"), checks)

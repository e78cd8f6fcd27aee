"""The bus codec (pvcluster/bus/codec.py): round trips, and every way a hostile frame is rejected."""

from __future__ import annotations

from typing import Any

import attrs
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvcluster.bus import codec
from pvcluster.bus.codec import MAX_FRAME_BYTES, PROTO_VERSION, EncodeError, FrameError, decode, encode
from pvcluster.bus.effects import (
    EFFECTS,
    Block,
    ClearPending,
    Effect,
    FlushTlb,
    Invlpg,
    Poll,
    PollTimeout,
    RestartHypercall,
    SetCallback,
    SetClockSkew,
    SetContext,
    SetCr3,
    SetGdt,
    SetKernelStack,
    SetPending,
    SetSpeed,
    SetTrapTable,
    SetTs,
    SetVaPte,
    Unmask,
    VcpuDown,
    VcpuRegs,
    VcpuUp,
    WriteMachine,
)
from pvcluster.bus.messages import (
    Build,
    BuildResult,
    CapturedState,
    CaptureState,
    CtlReply,
    CtlRequest,
    DebugAck,
    DebugArm,
    DebugData,
    DebugMaps,
    DebugMapsReq,
    DebugRead,
    DebugRegs,
    DebugRegsReq,
    DebugStop,
    DebugVcpu,
    DebugWrite,
    Delivery,
    Error,
    Hello,
    HypercallReq,
    HypercallResult,
    Ipi,
    Leaving,
    MapRun,
    MemWrite,
    RamChunk,
    ReadRam,
    Region,
    Restore,
    Restored,
    RestoreRam,
    Retire,
    Stop,
    VcpuFault,
    VcpuReport,
    Window,
    WindowDone,
)

REGS = VcpuRegs(eax=0, ebx=1, ecx=2, edx=3, esi=4, edi=5, ebp=6, esp=0x2000, eip=0xC0100000, eflags=0x202)

# Hand-built samples: several per message type, covering empty and non-empty lists, optional fields set and
# unset, and the edges of integer ranges a frame may legitimately carry.
SAMPLES: dict[type, list[Any]] = {
    Error: [
        Error(kind="malformed", detail="not a msgpack message", ref_seq=-1),
        Error(kind="unknown-peer", detail="ünïcode détail ✓", ref_seq=2**63 - 1),
    ],
    Hello: [Hello(pid=1), Hello(pid=4_194_304, name="alpha", host="node-7.example")],
    Leaving: [Leaving(code=0), Leaving(code=-9)],
    Build: [
        Build(domid=1, name="alpha", vcpus=2, memory_bytes=4 << 20, kernel="pvkern", cmdline="shutdown=poweroff",
              backend="xen", boot="ebx", patching=True, hypercall_page=bytes(range(256)) * 16, ps_per_instr=1000,
              rom=b""),
        Build(domid=7, name="x", vcpus=32, memory_bytes=256 << 20, kernel="/tmp/k.elf", cmdline="", backend="vmi",
              boot="entry", patching=False, hypercall_page=b"", ps_per_instr=1, rom=b"\xcc" * 4096),
    ],
    BuildResult: [
        BuildResult(ok=True, error_code="", error="", entry=0xC0100000, start_info=0xC0200000, guest_os="linux"),
        BuildResult(ok=False, error_code="ENOEXEC", error="not an ELF image", entry=0, start_info=0, guest_os=""),
    ],
    Window: [
        Window(index=0, end_ns=10_000, results=[]),
        Window(index=12, end_ns=120_000, results=[
            HypercallResult(vcpu=0, seq=3, vt_ns=110_400, value=0xFFFFFFEA, writes=[], effects=[], complete=True),
            HypercallResult(
                vcpu=1, seq=9, vt_ns=111_000, value=0,
                writes=[MemWrite(addr=0x1000, data=b"\x00\xff" * 8), MemWrite(addr=0, data=b"")],
                effects=[SetContext(vcpu=1, regs=REGS), SetCallback(vcpu=1, eip=0xC0101000), VcpuUp(vcpu=1),
                         Block(vcpu=0)],
                complete=False,
            ),
            HypercallResult(
                vcpu=0, seq=10, vt_ns=112_000, value=26, writes=[],
                effects=[WriteMachine(addr=0x100000, data=b"\x63\x00\x20\x00"),
                         SetVaPte(vcpu=0, va=0xC0123000, value=0x200063), FlushTlb(vcpu=0),
                         Invlpg(vcpu=1, va=0xFFFFF000), SetCr3(vcpu=0, cr3=0x101000),
                         RestartHypercall(vcpu=0, nr=26, args=[0x30018, 0x80000002, 0x20000, 0x7FF0])],
                complete=True,
            ),
            HypercallResult(
                vcpu=1, seq=11, vt_ns=113_000, value=0, writes=[],
                effects=[Poll(vcpu=1, ports=[1, 5, 1023]), Poll(vcpu=0, ports=[]), SetPending(vcpu=0, port=3),
                         Unmask(vcpu=1, port=3), ClearPending(port=4), VcpuDown(vcpu=1),
                         SetGdt(vcpu=1, frames=[0x300, 0x301], entries=600), SetTs(vcpu=1, ts=True),
                         SetTrapTable(vcpu=1, traps=[[14, 0, 0xE019, 0xC0001000]], clear=True),
                         SetKernelStack(vcpu=1, ss=0xE021, esp=0xC0200000)],
                complete=False,
            ),
        ]),
        Window(index=13, end_ns=130_000, results=[], run=[0], irqs=[Ipi(src=0, dest=1, vector=0xF0, vt_ns=125_500)],
               events=[Delivery(vt_ns=125_000, effect=SetPending(vcpu=0, port=3)),
                       Delivery(vt_ns=126_000, effect=PollTimeout(vcpu=1, trap_vt=7)),
                       Delivery(vt_ns=126_500, effect=SetSpeed(vcpu=1, ps_per_instr=5000), seq=9),
                       Delivery(vt_ns=127_000, effect=SetClockSkew(offset_ns=-3000, ppm=250), seq=10),
                       Delivery(vt_ns=2**62, effect=SetPending(vcpu=1, port=1023, eid=77))]),
    ],
    WindowDone: [
        WindowDone(index=0, vcpus=[], hypercalls=[], faults=[]),
        WindowDone(
            index=5,
            vcpus=[VcpuReport(vcpu=0, state="hypercall", clock_ns=50_000, instructions=123),
                   VcpuReport(vcpu=1, state="down", clock_ns=0, instructions=0)],
            hypercalls=[HypercallReq(vcpu=0, seq=4, vt_ns=49_600, nr=18, args=[0, 1, 0xFFFFFFFF, 0, 0, 0],
                                     regions=[Region(addr=0x3000, length=16, data=b"hello, console\n\x00",
                                                     writable=False, walk=[0xF0000, 0xF1000 + 12], frames=[0x3]),
                                              Region(addr=0xDEAD0000, length=8, data=None, writable=True)])],
            faults=[VcpuFault(vcpu=1, vt_ns=49_000, kind="invalid-opcode", detail="#UD", eip=0xC0100123,
                              disasm="ud2")],
            ipis=[Ipi(src=0, dest=-1, vector=0xFB, vt_ns=49_500)],
        ),
        WindowDone(index=6, vcpus=[], hypercalls=[], faults=[],
                   debug_stops=[DebugStop(vcpu=1, eip=0xC0000258, why="breakpoint", vt_ns=60_000)]),
    ],
    DebugRegsReq: [DebugRegsReq(), DebugRegsReq(vcpu=3)],
    DebugRegs: [DebugRegs(vcpus=[]), DebugRegs(vcpus=[DebugVcpu(vcpu=0, state="running", regs=list(range(16)),
                                                                cr3=0x5000, clock_ns=10_000)])],
    DebugMapsReq: [DebugMapsReq(vcpu=0)],
    DebugMaps: [DebugMaps(runs=[]), DebugMaps(runs=[MapRun(vaddr=0xC0000000, paddr=0, size=0x1000, writable=True)])],
    DebugRead: [DebugRead(vcpu=0, addr=0xC0000000, length=16), DebugRead(vcpu=0, addr=0, length=1 << 20,
                                                                       physical=True)],
    DebugData: [DebugData(data=None), DebugData(data=b"\x90" * 16)],
    DebugWrite: [DebugWrite(vcpu=1, addr=0xC0001000, data=b"\xcc"), DebugWrite(vcpu=0, addr=0, data=b"",
                                                                              regs=[0] * 16)],
    DebugAck: [DebugAck(ok=True, detail=""), DebugAck(ok=False, detail="not mapped")],
    DebugArm: [DebugArm(breakpoints=[]), DebugArm(breakpoints=[0xC0000000, 0xC0001000], step=1)],
    Stop: [Stop(reason="poweroff"), Stop(reason="destroy")],
    CtlRequest: [
        CtlRequest(cmd="status", args={}),
        CtlRequest(cmd="create", args={"domain": {"name": "gamma", "vcpus": 2, "patching": False,
                                                  "tags": ["a", None, 1.5]}}),
    ],
    CtlReply: [
        CtlReply(ok=True, data=None, error=""),
        CtlReply(ok=True, data={"domains": [{"domid": 1, "state": "dead", "ended_vt_ns": None}], "idle": False},
                 error=""),
        CtlReply(ok=False, data=[1, "two", b"three", 4.0, True], error="unknown command 'frob'"),
    ],
}

# save, restore and migrate (hypervisor/saving.py, domains/capture.py)
SAMPLES.update({
    CaptureState: [CaptureState(), CaptureState(reason="migrate")],
    CapturedState: [CapturedState(state=b"\x80\x05N.", ram_size=4 << 20, ram_sha256=bytes(32))],
    ReadRam: [ReadRam(offset=0, length=1 << 20), ReadRam(offset=3 << 20, length=4096)],
    RamChunk: [RamChunk(offset=1 << 20, data=b"\x00\xff" * 512)],
    Restore: [Restore(build=SAMPLES[Build][0], state=b"state", ram_size=8192, ram_sha256=bytes(range(32)))],
    RestoreRam: [RestoreRam(offset=0, data=b"page" * 1024)],
    Restored: [Restored(ok=True), Restored(ok=False, error="memory does not match its checksum")],
    Retire: [Retire(), Retire(reason="not taken")],
})

ALL_SAMPLES = [s for samples in SAMPLES.values() for s in samples]


def _ids(samples: list[Any]) -> list[str]:
    return [f"{type(s).__name__}-{i}" for i, s in enumerate(samples)]


def frame(*items: Any) -> bytes:
    """A hand-built wire frame (possibly invalid), packed exactly as given."""
    return msgpack.packb(list(items), use_bin_type=True)


def rejects(data: bytes, kind: str, **kw: Any) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode(data, **kw)
    assert info.value.kind == kind, f"expected {kind!r}, got {info.value.kind!r} ({info.value.detail})"
    return info.value


def code_of(cls: type) -> int:
    return next(c for c, t in codec.message_types().items() if t is cls)


# ------------------------------------------------------------------------------------------------ round trips


def test_samples_cover_every_registered_message_type() -> None:
    assert set(SAMPLES) == set(codec.message_types().values())


def _effects_in(body: Any) -> set[type]:
    if isinstance(body, Window):
        return {type(e) for r in body.results for e in r.effects} | {type(d.effect) for d in body.events}
    return set()


def test_samples_cover_every_effect_kind() -> None:
    assert set().union(*(_effects_in(s) for s in ALL_SAMPLES)) == set(EFFECTS)


@pytest.mark.parametrize("body", ALL_SAMPLES, ids=_ids(ALL_SAMPLES))
def test_round_trip(body: Any) -> None:
    data = encode(body, seq=42, vt_ns=1_000_000)
    env = decode(data)
    assert env.seq == 42 and env.vt_ns == 1_000_000
    assert type(env.body) is type(body)
    assert env.body == body
    # re-encoding the decoded message gives the same bytes: nothing is lost or reinterpreted
    assert encode(env.body, seq=42, vt_ns=1_000_000) == data


def test_wire_layout_is_version_code_seq_vt_fields() -> None:
    raw = msgpack.unpackb(encode(Hello(pid=99), seq=3, vt_ns=5), raw=False)
    assert raw == [PROTO_VERSION, code_of(Hello), 3, 5, [99, "", ""]]


def test_encode_refuses_an_unregistered_type() -> None:
    with pytest.raises(TypeError, match="not a registered bus message"):
        encode(VcpuReport(vcpu=0, state="running", clock_ns=0, instructions=0), seq=1, vt_ns=0)


def test_message_codes_are_unique_and_stable() -> None:
    codes = {t: c for c, t in codec.message_types().items()}
    # wire codes are protocol: a renumbering breaks every peer built from an older tree
    assert codes == {Error: 1, Hello: 2, Build: 3, BuildResult: 4, Window: 5, WindowDone: 6, Stop: 7,
                     Leaving: 8, CtlRequest: 20, CtlReply: 21,
                     # the debugger and dumps: 30-39
                     DebugRegsReq: 30, DebugRegs: 31, DebugMapsReq: 32, DebugMaps: 33, DebugRead: 34, DebugData: 35,
                     DebugWrite: 36, DebugAck: 37, DebugArm: 38,
                     # save, restore and migrate: 40-49
                     CaptureState: 40, CapturedState: 41, ReadRam: 42, RamChunk: 43, Restore: 44, RestoreRam: 45,
                     Restored: 46, Retire: 47}


# ------------------------------------------------------------------------------------------- frame-level rejects


def test_empty_frame() -> None:
    err = rejects(b"", "empty")
    assert err.seq is None


@pytest.mark.parametrize("data", [b"\xc1", b"\xc1\xc1\xc1", bytes([0xD9, 0x03]) + b"\xff\xfe\xfd"],
                         ids=["reserved-byte", "reserved-bytes", "invalid-utf8-str"])
def test_garbage_bytes_are_malformed(data: bytes) -> None:
    err = rejects(data, "malformed")
    assert err.detail.startswith("not a msgpack message")
    assert err.seq is None


@pytest.mark.parametrize("data", [
    msgpack.packb({"version": 1}),
    msgpack.packb("hello"),
    msgpack.packb(17),
    msgpack.packb([1, 2, 3, 4]),
    msgpack.packb([1, 2, 3, 4, [], 6]),
], ids=["map", "str", "int", "4-array", "6-array"])
def test_msgpack_that_is_not_a_5_element_array_is_malformed(data: bytes) -> None:
    err = rejects(data, "malformed")
    assert "5-element" in err.detail


@pytest.mark.parametrize("body", ALL_SAMPLES, ids=_ids(ALL_SAMPLES))
def test_truncated_frame(body: Any) -> None:
    data = encode(body, seq=1, vt_ns=0)
    for cut in (1, 2, len(data) // 2, len(data) - 1):
        err = rejects(data[:-cut], "truncated")
        assert err.detail.startswith("not a msgpack message (")
        assert err.seq is None


def test_trailing_bytes_after_a_valid_frame() -> None:
    for tail in (b"\x00", b"\xc0", encode(Hello(pid=1), seq=2, vt_ns=0)):
        err = rejects(encode(Hello(pid=1), seq=1, vt_ns=0) + tail, "malformed")
        assert err.detail == "trailing bytes after the message"


def test_oversized_frame() -> None:
    data = encode(Stop(reason="x" * 100), seq=1, vt_ns=0)
    assert decode(data, max_bytes=len(data)).body == Stop(reason="x" * 100)  # the limit itself is allowed
    err = rejects(data, "oversized", max_bytes=len(data) - 1)
    assert err.detail == f"frame of {len(data)} bytes exceeds the {len(data) - 1}-byte limit"
    # the size check comes before any parsing: even a frame of garbage is reported as oversized
    rejects(b"\xc1" * 65, "oversized", max_bytes=64)


def test_default_limit_is_max_frame_bytes() -> None:
    err = rejects(b"\x00" * (MAX_FRAME_BYTES + 1), "oversized")
    assert str(MAX_FRAME_BYTES) in err.detail


@pytest.mark.parametrize("code", [0, 9, 19, 22, 99, 2**32, -1, "2", None, True, 2.0],
                         ids=lambda c: repr(c))
def test_unknown_type_code(code: Any) -> None:
    err = rejects(frame(PROTO_VERSION, code, 11, 0, [1]), "unknown-type")
    assert err.detail == f"unknown message type {code!r}"
    assert err.seq == 11  # the sequence number was readable, so the Error reply can refer to it


@pytest.mark.parametrize("version", [0, 2, 255, -1, "1", None], ids=lambda v: repr(v))
def test_wrong_protocol_version(version: Any) -> None:
    err = rejects(frame(version, code_of(Hello), 9, 0, [1]), "bad-version")
    assert err.detail == f"protocol version {version!r}, this side speaks {PROTO_VERSION}"
    assert err.seq == 9


@pytest.mark.parametrize("version", [True, 1.0], ids=lambda v: repr(v))
def test_version_must_be_an_integer_not_a_bool_or_float(version: Any) -> None:
    # both compare equal to 1 in Python; a bare `version != PROTO_VERSION` would let them through
    err = rejects(frame(version, code_of(Hello), 9, 0, [1]), "bad-version")
    assert err.detail == f"protocol version {version!r}, this side speaks {PROTO_VERSION}"


@pytest.mark.parametrize("seq", [-1, -(2**63), True, False, 1.0, "1", None, [1]], ids=lambda s: repr(s))
def test_bad_sequence_number(seq: Any) -> None:
    err = rejects(frame(PROTO_VERSION, code_of(Hello), seq, 0, [1]), "malformed")
    assert err.detail == "sequence number is not a non-negative integer"
    assert err.seq is None


def test_sequence_number_is_checked_before_version_and_type() -> None:
    rejects(frame(99, 99, -5, 0, [1]), "malformed")


@pytest.mark.parametrize("vt_ns", [-1, True, 0.5, "0", None], ids=lambda v: repr(v))
def test_bad_virtual_timestamp(vt_ns: Any) -> None:
    err = rejects(frame(PROTO_VERSION, code_of(Hello), 4, vt_ns, [1]), "malformed")
    assert err.detail == "virtual timestamp is not a non-negative integer"
    assert err.seq == 4


def test_large_sequence_numbers_are_accepted() -> None:
    for seq in (0, 2**32, 2**64 - 1):
        assert decode(frame(PROTO_VERSION, code_of(Hello), seq, 2**63, [1, "", ""])).seq == seq


# ------------------------------------------------------------------------------------------- field-level rejects


def bad_field(body_code: int, fields: Any, seq: int = 77) -> FrameError:
    err = rejects(frame(PROTO_VERSION, body_code, seq, 0, fields), "bad-field")
    assert err.seq == seq
    return err


def test_str_where_int_expected_nested_in_a_list_of_hypercall_results() -> None:
    good = [0, 1, 100, 0, [], [], True, 0]
    bad = [1, 2, 200, "0xffffffea", [], [], True, 0]
    err = bad_field(code_of(Window), [3, 30_000, [good, bad], [], [], [], 20_000, 0, 0])
    assert err.detail == "Window.results[1].value: expected int, got str"


def test_wrong_type_deep_inside_a_window() -> None:
    effect = [SetContext.TAG, [0, "not a record"]]
    result = [0, 1, 100, 0, [[0x1000, b"ab"]], [effect], True, 0]
    err = bad_field(code_of(Window), [3, 30_000, [result], [], [], [], 20_000, 0, 0])
    assert err.detail == "Window.results[0].effects[0]<SetContext>.regs: VcpuRegs needs 10 fields, got str"
    write = [0x1000, "ab"]  # str where bytes expected
    err = bad_field(code_of(Window), [3, 30_000, [[0, 1, 100, 0, [write], [], True, 0]], [], [], [], 20_000, 0, 0])
    assert err.detail == "Window.results[0].writes[0].data: expected bytes, got str"


@pytest.mark.parametrize("fields, detail", [
    ([], "Leaving: Leaving needs 1 fields, got 0"),
    ([1, 2], "Leaving: Leaving needs 1 fields, got 2"),
    ({"code": 1}, "Leaving: Leaving needs 1 fields, got dict"),
    (5, "Leaving: Leaving needs 1 fields, got int"),
    (None, "Leaving: Leaving needs 1 fields, got NoneType"),
], ids=["none", "extra", "map", "scalar", "nil"])
def test_wrong_field_count(fields: Any, detail: str) -> None:
    assert bad_field(code_of(Leaving), fields).detail == detail


def test_wrong_field_count_in_a_nested_record() -> None:
    report = [0, "running", 0]  # VcpuReport has 4 fields
    err = bad_field(code_of(WindowDone), [1, [report], [], [], [], []])
    assert err.detail == "WindowDone.vcpus[0]: VcpuReport needs 4 fields, got 3"


@pytest.mark.parametrize("value", [True, False], ids=repr)
def test_bool_where_int_expected(value: bool) -> None:
    assert bad_field(code_of(Leaving), [value]).detail == "Leaving.code: expected int, got bool"


def test_bool_where_int_expected_inside_an_int_list() -> None:
    req = [0, 1, 0, 18, [0, True, 0], [], [], False]
    err = bad_field(code_of(WindowDone), [1, [], [req], [], [], []])
    assert err.detail == "WindowDone.hypercalls[0].args[1]: expected int, got bool"


def test_int_where_bool_expected() -> None:
    err = bad_field(code_of(BuildResult), [1, "", "", 0, 0, "linux", 0, [], 0, 0, b"", False, []])
    assert err.detail == "BuildResult.ok: expected bool, got int"


@pytest.mark.parametrize("pid", [1.0, "1", None, b"\x01", [1]], ids=repr)
def test_other_types_where_int_expected(pid: Any) -> None:
    assert bad_field(code_of(Hello), [pid, "", ""]).detail.startswith("Hello.pid: expected int, got ")


def test_optional_field_accepts_none_and_its_type_but_nothing_else() -> None:
    def req(data: Any) -> bytes:
        fields = [1, [], [[0, 1, 0, 18, [], [[0, 4, data, True, [], [], False]], [], False]], [], [], []]
        return frame(PROTO_VERSION, code_of(WindowDone), 1, 0, fields)

    assert decode(req(None)).body.hypercalls[0].regions[0].data is None
    assert decode(req(b"abcd")).body.hypercalls[0].regions[0].data == b"abcd"
    err = rejects(req("abcd"), "bad-field")
    assert err.detail == "WindowDone.hypercalls[0].regions[0].data: expected bytes, got str"


def test_none_where_a_required_str_is_expected() -> None:
    assert bad_field(code_of(Stop), [None]).detail == "Stop.reason: expected str, got NoneType"


def test_list_where_a_list_is_expected_but_got_a_map() -> None:
    err = bad_field(code_of(Window), [1, 10, {"0": []}, [], [], [], 0, 0, 0])
    assert err.detail == "Window.results: expected a list, got dict"


def test_map_keys_must_be_strings() -> None:
    # bytes keys get past msgpack's strict_map_key; the codec refuses them
    err = bad_field(code_of(CtlRequest), ["status", {b"dom": 1}])
    assert err.detail == "CtlRequest.args: expected a map with string keys"
    # integer keys are refused by msgpack itself, before the codec sees the frame
    err = rejects(frame(PROTO_VERSION, code_of(CtlRequest), 1, 0, ["status", {1: 1}]), "malformed")
    assert "map key" in err.detail


def test_any_field_passes_through_but_the_frame_is_still_checked() -> None:
    body = decode(frame(PROTO_VERSION, code_of(CtlReply), 1, 0, [True, {"x": [None, b"\x00"]}, ""])).body
    assert body == CtlReply(ok=True, data={"x": [None, b"\x00"]}, error="")


@pytest.mark.parametrize("value, got", [("0xc0100000", "str"), (True, "bool"), (1.5, "float"), (None, "NoneType")],
                         ids=["str", "bool", "float", "nil"])
def test_nested_record_values_are_checked_against_the_annotation(value: Any, got: str) -> None:
    regs = [0, 0, 0, 0, 0, 0, 0, 0x2000, value, 0x202]  # VcpuRegs: eax .. esp, eip, eflags, all int
    effect = [SetContext.TAG, [0, regs]]
    err = bad_field(code_of(Window), [3, 30_000, [[0, 1, 100, 0, [], [effect], True, 0]], [], [], [], 20_000, 0, 0])
    assert err.detail == f"Window.results[0].effects[0]<SetContext>.regs.eip: expected int, got {got}"


def test_list_items_inside_an_effect_are_checked() -> None:
    delivery = [125_000, [Poll.TAG, [0, [1, "2"]]], 0]
    err = bad_field(code_of(Window), [3, 30_000, [], [], [], [delivery], 20_000, 0, 0])
    assert err.detail == "Window.events[0].effect<Poll>.ports[1]: expected int, got str"


# ------------------------------------------------------------------------------------------- tagged effects


def test_effect_tags_are_unique_and_stable() -> None:
    # tags are protocol, like wire codes: never renumbered, only added
    assert {cls: cls.TAG for cls in EFFECTS} == {  # type: ignore[attr-defined]
        SetPending: 1, Unmask: 2, ClearPending: 3, FlushTlb: 4, Invlpg: 5, SetCr3: 6, WriteMachine: 7, SetVaPte: 8,
        SetContext: 9, SetCallback: 10, VcpuUp: 11, VcpuDown: 12, Block: 13, Poll: 14, PollTimeout: 15,
        RestartHypercall: 16, SetSpeed: 17, SetClockSkew: 18, SetGdt: 19, SetTs: 20,
        SetTrapTable: 21, SetKernelStack: 22,
    }
    assert set(EFFECTS) == set(Effect.__args__)  # type: ignore[attr-defined]


def test_an_effect_travels_as_its_tag_and_its_fields() -> None:
    result = HypercallResult(vcpu=0, seq=1, vt_ns=5, value=0, writes=[], complete=True,
                             effects=[SetPending(vcpu=1, port=7), SetContext(vcpu=1, regs=REGS)])
    raw = msgpack.unpackb(encode(Window(index=1, end_ns=10, results=[result]), seq=1, vt_ns=0), raw=False)
    assert raw[4][2][0][5] == [[1, [1, 7, 0]], [9, [1, [0, 1, 2, 3, 4, 5, 6, 0x2000, 0xC0100000, 0x202]]]]


def _in_a_result(effect: Any) -> Any:
    return [3, 30_000, [[0, 1, 100, 0, [], [effect], True, 0]], [], [], [], 20_000, 0, 0]


def _in_a_delivery(effect: Any) -> Any:
    return [3, 30_000, [], [], [], [[125_000, effect, 0]], 20_000, 0, 0]


@pytest.mark.parametrize("tag", [0, 23, 99, -1, 2**32], ids=repr)
def test_an_effect_with_an_unknown_tag_is_rejected(tag: int) -> None:
    err = bad_field(code_of(Window), _in_a_result([tag, [0, 1]]))
    assert err.detail == f"Window.results[0].effects[0]: unknown record tag {tag}"
    err = bad_field(code_of(Window), _in_a_delivery([tag, [0, 1]]))
    assert err.detail == f"Window.events[0].effect: unknown record tag {tag}"


@pytest.mark.parametrize("effect, detail", [
    ([SetPending.TAG, []], "<SetPending>: SetPending needs 3 fields, got 0"),
    ([SetPending.TAG, [0]], "<SetPending>: SetPending needs 3 fields, got 1"),
    ([SetPending.TAG, [0, 3, 9, 1]], "<SetPending>: SetPending needs 3 fields, got 4"),
    ([ClearPending.TAG, [0, 3]], "<ClearPending>: ClearPending needs 1 fields, got 2"),
    ([Poll.TAG, [0]], "<Poll>: Poll needs 2 fields, got 1"),
    ([RestartHypercall.TAG, [0, 26]], "<RestartHypercall>: RestartHypercall needs 3 fields, got 2"),
    ([SetContext.TAG, [0, [1, 2, 3]]], "<SetContext>.regs: VcpuRegs needs 10 fields, got 3"),
    ([SetPending.TAG, {"vcpu": 0, "port": 3}], "<SetPending>: SetPending needs 3 fields, got dict"),
], ids=["none", "short", "long", "long-1", "poll-short", "restart-short", "regs-short", "map"])
def test_an_effect_with_a_wrong_length_field_list_is_rejected(effect: Any, detail: str) -> None:
    assert bad_field(code_of(Window), _in_a_result(effect)).detail == f"Window.results[0].effects[0]{detail}"
    assert bad_field(code_of(Window), _in_a_delivery(effect)).detail == f"Window.events[0].effect{detail}"


@pytest.mark.parametrize("effect, detail", [
    ([FlushTlb.TAG, [0, 3]], "<FlushTlb>: FlushTlb needs 1 fields, got 2"),  # SetPending's fields
    ([WriteMachine.TAG, [0, 3]], "<WriteMachine>.data: expected bytes, got int"),  # SetPending's fields
    ([SetContext.TAG, [1, 0xC0101000]], "<SetContext>.regs: VcpuRegs needs 10 fields, got int"),  # SetCallback's
    ([Poll.TAG, [1, 5]], "<Poll>.ports: expected a list, got int"),  # Unmask's fields
    ([PollTimeout.TAG, [0, 26, [1, 2]]], "<PollTimeout>: PollTimeout needs 2 fields, got 3"),  # RestartHypercall's
    ([SetVaPte.TAG, [0x1000, b"\x01\x00\x00\x00"]], "<SetVaPte>: SetVaPte needs 3 fields, got 2"),  # WriteMachine's
], ids=["flush-as-pending", "write-as-pending", "context-as-callback", "poll-as-unmask", "timeout-as-restart",
        "va-pte-as-write"])
def test_a_tag_with_another_records_fields_is_rejected(effect: Any, detail: str) -> None:
    assert bad_field(code_of(Window), _in_a_result(effect)).detail == f"Window.results[0].effects[0]{detail}"


def test_the_tag_not_the_shape_picks_the_record() -> None:
    # FlushTlb, VcpuUp, VcpuDown and Block all carry one int: only the tag tells them apart
    for cls in (FlushTlb, VcpuUp, VcpuDown, Block):
        body = decode(frame(PROTO_VERSION, code_of(Window), 1, 0, _in_a_result([cls.TAG, [1]]))).body
        assert body.results[0].effects == [cls(vcpu=1)]


@pytest.mark.parametrize("effect", [[True, [0, 3]], ["1", [0, 3]], [1], [1, [0, 3], 0], [0, 3, 1], 1, None],
                         ids=["bool-tag", "str-tag", "no-fields", "extra", "bare-fields", "scalar", "nil"])
def test_an_effect_that_is_not_a_tagged_record_is_rejected(effect: Any) -> None:
    err = bad_field(code_of(Window), _in_a_result(effect))
    assert err.detail == "Window.results[0].effects[0]: expected a tagged record [tag, fields]"


def test_an_effects_bare_fields_are_not_taken_for_a_tagged_record() -> None:
    # SetPending(vcpu=1, port=3) sent without its tag reads as tag 1 with the fields 3
    err = bad_field(code_of(Window), _in_a_result([1, 3]))
    assert err.detail == "Window.results[0].effects[0]<SetPending>: SetPending needs 3 fields, got int"


# ------------------------------------------------------------------------------------------- encode errors


@pytest.mark.parametrize("body", [
    Hello(pid=2**64),
    Hello(pid=-(2**63) - 1),
    Window(index=1, end_ns=10, results=[], events=[Delivery(vt_ns=2**64, effect=SetPending(vcpu=0, port=1))]),
    Window(index=1, end_ns=10, results=[HypercallResult(vcpu=0, seq=1, vt_ns=0, value=0, writes=[], complete=False,
                                                        effects=[RestartHypercall(vcpu=0, nr=26, args=[2**70])])]),
], ids=["2^64", "below-int64", "delivery-time", "restart-args"])
def test_encode_of_an_int_outside_msgpacks_range_raises_encode_error(body: Any) -> None:
    with pytest.raises(EncodeError, match=f"cannot encode {type(body).__name__}"):
        encode(body, seq=1, vt_ns=0)


def test_encode_of_the_largest_ints_msgpack_carries() -> None:
    for pid in (2**64 - 1, -(2**63)):
        assert decode(encode(Hello(pid=pid), seq=1, vt_ns=0)).body == Hello(pid=pid)
    with pytest.raises(EncodeError):
        encode(Hello(pid=1), seq=2**64, vt_ns=0)  # the envelope too


@pytest.mark.parametrize("body", [
    WindowDone(index=1, vcpus=[VcpuReport(vcpu=v, state="running", clock_ns=0, instructions=0) for v in range(32)],
               hypercalls=[], faults=[]),
    Build(domid=1, name="alpha", vcpus=2, memory_bytes=4 << 20, kernel="pvkern", cmdline="x" * 300, backend="xen",
          boot="ebx", patching=True, hypercall_page=b"\xcc" * 4096, ps_per_instr=1000, rom=b""),
], ids=["long-array", "long-bin"])
def test_every_proper_prefix_is_truncated(body: Any) -> None:
    # msgpack caps a declared array/str/bin length at the buffer size; a frame cut off before the end of a
    # long container must still be reported as truncated, not malformed
    data = encode(body, seq=1, vt_ns=0)
    kinds: dict[str, int] = {}
    for n in range(1, len(data)):
        with pytest.raises(FrameError) as info:
            decode(data[:n])
        kinds.setdefault(info.value.kind, n)
    assert set(kinds) == {"truncated"}, kinds


# ----------------------------------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_scalars = st.one_of(st.none(), st.booleans(), _ints, st.floats(allow_nan=True), st.text(max_size=20),
                     st.binary(max_size=20))
_keys = st.one_of(st.text(max_size=8), st.binary(max_size=4), st.integers(-5, 5))
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=30,
)


def decode_or_frame_error(data: bytes) -> None:
    """decode either returns a well-formed Envelope or raises FrameError; anything else is a bug."""
    try:
        env = decode(data)
    except FrameError as exc:
        assert exc.kind in {"empty", "malformed", "truncated", "oversized", "unknown-type", "bad-version",
                            "bad-field"}, exc.kind
        assert exc.seq is None or (isinstance(exc.seq, int) and exc.seq >= 0)
        return
    assert isinstance(env.seq, int) and env.seq >= 0
    assert isinstance(env.vt_ns, int) and env.vt_ns >= 0
    assert type(env.body) in codec.message_types().values()


@FUZZ
@given(st.binary(max_size=256))
def test_fuzz_random_bytes(data: bytes) -> None:
    decode_or_frame_error(data)


@FUZZ
@given(st.sampled_from([encode(s, seq=1, vt_ns=0) for s in ALL_SAMPLES]), st.data())
def test_fuzz_mutated_valid_frames(data: bytes, draw: st.DataObject) -> None:
    buf = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        op = draw.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw.draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] = draw.draw(st.integers(0, 255))
        elif op == "cut":
            del buf[pos:pos + draw.draw(st.integers(1, 8))]
        else:
            buf[pos:pos] = draw.draw(st.binary(min_size=1, max_size=8))
    decode_or_frame_error(bytes(buf))


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


@FUZZ
@given(_values)
def test_fuzz_random_msgpack_structures(value: Any) -> None:
    decode_or_frame_error(_pack(value))


@FUZZ
@given(st.one_of(st.just(PROTO_VERSION), _scalars), st.sampled_from(sorted(codec.message_types())),
       st.one_of(_ints, _scalars), st.one_of(_ints, _scalars), _values)
def test_fuzz_frame_shaped_structures(version: Any, code: int, seq: Any, vt_ns: Any, fields: Any) -> None:
    decode_or_frame_error(_pack([version, code, seq, vt_ns, fields]))


def _replace_somewhere(tree: Any, draw: st.DataObject) -> Any:
    """Replace one randomly chosen node of a wire structure with a random value."""
    if isinstance(tree, list) and tree and draw.draw(st.booleans()):
        i = draw.draw(st.integers(0, len(tree) - 1))
        return [*tree[:i], _replace_somewhere(tree[i], draw), *tree[i + 1:]]
    if isinstance(tree, dict) and tree and draw.draw(st.booleans()):
        k = draw.draw(st.sampled_from(sorted(tree, key=repr)))
        return {**tree, k: _replace_somewhere(tree[k], draw)}
    return draw.draw(_values)


@FUZZ
@given(st.sampled_from(ALL_SAMPLES), st.data())
def test_fuzz_valid_frames_with_one_subtree_replaced(body: Any, draw: st.DataObject) -> None:
    """Reaches the field validators at every depth: the frame shape stays valid except at one random node."""
    wire = msgpack.unpackb(encode(body, seq=1, vt_ns=0), raw=False)
    fields = _replace_somewhere(wire[4], draw)
    data = _pack([*wire[:4], fields])
    decode_or_frame_error(data)
    try:
        env = decode(data)
    except FrameError:
        return
    # whatever was accepted re-encodes, and decodes again to the same message (compared as bytes: NaN != NaN)
    again = encode(env.body, seq=env.seq, vt_ns=env.vt_ns)
    assert encode(decode(again).body, seq=env.seq, vt_ns=env.vt_ns) == again


# ----------------------------------------------------------------------------------- the fast path's contract


@pytest.mark.parametrize("body", ALL_SAMPLES, ids=_ids(ALL_SAMPLES))
def test_every_sample_decodes_and_encodes_on_the_fast_path(body: Any) -> None:
    # the fast path is what makes the bus cheap: no registered message may fall back to reflection
    wire = msgpack.unpackb(encode(body, seq=1, vt_ns=0), raw=False)
    assert codec._fast_decoder(type(body))(wire[4]) == body
    assert codec._fast_encoder(type(body))(body) == codec._to_wire(body)


def _reference(cls: type, fields: Any) -> tuple[str, Any]:
    try:
        return "ok", codec._from_wire(cls, fields, cls.__name__, 0)
    except FrameError as exc:
        return "error", exc.detail


@FUZZ
@given(st.sampled_from(ALL_SAMPLES), st.data())
def test_fuzz_the_fast_path_accepts_only_what_the_reference_accepts(body: Any, draw: st.DataObject) -> None:
    wire = msgpack.unpackb(encode(body, seq=1, vt_ns=0), raw=False)
    try:  # as decode reads it: a map with other than string keys never reaches the validators
        fields = msgpack.unpackb(_pack(_replace_somewhere(wire[4], draw)), raw=False, strict_map_key=True)
    except ValueError:
        return
    try:
        fast = codec._fast_decoder(type(body))(fields)
    except Exception:
        return  # declined: decode asks the reference, whose verdict the other tests check
    assert _reference(type(body), fields) == ("ok", fast)


@attrs.frozen
class _Checked:
    n: int = attrs.field(validator=attrs.validators.ge(0))


@attrs.frozen
class _Hooked:
    n: int

    def __attrs_post_init__(self) -> None:
        if self.n == 13:
            raise ValueError("unlucky")


@pytest.mark.parametrize("cls", [_Checked, _Hooked])
def test_the_fast_path_builds_a_record_with_checks_of_its_own_through_its_init(cls: type) -> None:
    # slot stores skip __init__, so they are only for records whose __init__ stores and nothing else
    assert codec._slot_setters(cls, codec._fields(cls)) is None
    assert codec._fast_decoder(cls)([5]) == cls(5)
    with pytest.raises(ValueError):
        codec._fast_decoder(cls)([-1 if cls is _Checked else 13])


def test_records_built_by_slot_stores_are_the_records_init_builds() -> None:
    assert all(codec._slot_setters(cls, codec._fields(cls)) is not None for cls in codec.message_types().values())
    for body in ALL_SAMPLES:
        decoded = decode(encode(body, seq=1, vt_ns=0)).body
        assert decoded == body and repr(decoded) == repr(body)
    effect = decode(encode(SAMPLES[Window][1], seq=1, vt_ns=0)).body.results[1].effects[2]
    assert effect == VcpuUp(vcpu=1) and hash(effect) == hash(VcpuUp(vcpu=1))  # frozen records stay hashable

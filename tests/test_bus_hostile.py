"""Hostile peers on the hypervisor's sockets, end to end: real processes, real ZeroMQ.

A module-scoped default cluster is started once; the tests connect their own DEALER sockets to the domain bus
and to the control socket while the guests run, send frames no well-behaved peer would, and check the exact
Error / CtlReply each one gets and the trace event the hypervisor wrote. The last test checks that the cluster
came through it all: the default guests finish normally and a new domain can still be created and run.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from pvcluster.bus import codec
from pvcluster.bus.messages import CtlReply, CtlRequest, Error, Hello
from pvcluster.cluster import FINAL_STATES, Cluster, ClusterError
from pvcluster.control import ControlError
from pvcluster.spec import load_spec
from pvcluster.trace import read_events

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

RECV_TIMEOUT_MS = 10_000
OVERSIZED = codec.MAX_FRAME_BYTES + 1024
UNKNOWN_PEER_DETAIL = "this peer has not joined as a domain (send Hello first)"


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # ipc:// socket paths must stay under ~100 bytes, which pytest's tmp_path does not promise
    with tempfile.TemporaryDirectory(prefix="pvh-", dir=os.environ.get("PVC_TEST_TMP", "/tmp")) as d:
        with Cluster.start(load_spec(), run_dir=Path(d) / "c") as c:
            yield c
            # Let the guests finish before `down`: destroying a domain whose process has not connected yet
            # costs the hypervisor's whole stop grace period (see the report on hypervisor/server.py destroy).
            with contextlib.suppress(ClusterError, ControlError):
                c.wait(timeout_s=30)


@pytest.fixture(scope="module")
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture(scope="module")
def endpoints(cluster: Cluster) -> dict[str, Any]:
    info: dict[str, Any] = json.loads((cluster.run_dir / "hypervisor.json").read_text())
    assert info["pid"] == cluster.proc.pid  # type: ignore[union-attr]
    return info


def dealer(ctx: zmq.Context, endpoint: str, identity: bytes | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
    sock.setsockopt(zmq.SNDTIMEO, RECV_TIMEOUT_MS)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(endpoint)
    return sock


def exchange(sock: zmq.Socket, *parts: bytes) -> list[bytes]:
    """Send one (possibly multi-part) message and return the reply's frames; zmq.Again if none comes."""
    sock.send_multipart(list(parts))
    return sock.recv_multipart()  # type: ignore[no-any-return]


def new_identity(tag: str) -> bytes:
    # looks like the hypervisor's "domN-<hex>" identities, but was never assigned
    return f"dom1-{tag}-".encode() + os.urandom(8).hex().encode()


def peer(identity: bytes) -> str:
    """How the hypervisor names an unknown peer in its trace: the first 32 bytes of the identity, in hex."""
    return identity[:32].hex()


def trace(cluster: Cluster, event: str) -> list[dict[str, Any]]:
    # The hypervisor flushes each trace line before it sends the reply, so a received reply means it is there.
    return [e for e in read_events(cluster.run_dir / "trace" / "hypervisor.jsonl") if e["event"] == event]


def truncated_request() -> bytes:
    data = codec.encode(CtlRequest(cmd="status", args={"verbose": True}), seq=1, vt_ns=0)
    return data[:-3]


def frame(*items: Any) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True)


# ------------------------------------------------------------------------------------------------ the domain bus


def bus_error(frames: list[bytes]) -> Error:
    assert len(frames) == 1, frames
    env = codec.decode(frames[0])
    assert isinstance(env.body, Error), env.body
    return env.body


@pytest.mark.parametrize(("name", "why"), [
    ("", "no domain named '' was declared"),
    ("nosuch", "no domain named 'nosuch' was declared"),
])
def test_a_hello_that_claims_no_claimable_domain_is_refused(
        cluster: Cluster, ctx: zmq.Context, endpoints: dict[str, Any], name: str, why: str) -> None:
    ident = new_identity("hello")
    sock = dealer(ctx, endpoints["bus"], ident)
    try:
        reply = exchange(sock, codec.encode(Hello(pid=os.getpid(), name=name, host="test"), seq=1, vt_ns=0))
    finally:
        sock.close()
    assert bus_error(reply) == Error(kind="not-declared", detail=why, ref_seq=-1)
    events = [e for e in trace(cluster, "domain.join_refused") if e["name"] == name and e["pid"] == os.getpid()]
    assert events and events[-1]["reason"] == why and events[-1]["level"] == "warning"


BUS_PAYLOADS = {
    "garbage": b"\xc1\xc1\xc1 definitely not msgpack",
    "truncated": codec.encode(Hello(pid=1), seq=1, vt_ns=0)[:-1],
    "oversized": b"\x00" * OVERSIZED,
    "empty": b"",
    "bad-version": frame(99, 2, 1, 0, [1]),
    "unknown-type": frame(codec.PROTO_VERSION, 99, 1, 0, []),
    "bad-field": frame(codec.PROTO_VERSION, 2, 1, 0, ["not a pid"]),
}


@pytest.mark.parametrize("name", sorted(BUS_PAYLOADS))
def test_bad_frames_from_an_unassigned_identity_are_unknown_peer(
        cluster: Cluster, ctx: zmq.Context, endpoints: dict[str, Any], name: str) -> None:
    # The identity is checked before the frame is decoded: an unknown peer learns nothing about its frame.
    decode_kind = "malformed" if name == "garbage" else name
    decode_events = len(trace(cluster, f"bus.{decode_kind}"))
    ident = new_identity(name)
    sock = dealer(ctx, endpoints["bus"], ident)
    try:
        reply = exchange(sock, BUS_PAYLOADS[name])
    finally:
        sock.close()
    assert bus_error(reply) == Error(kind="unknown-peer", detail=UNKNOWN_PEER_DETAIL, ref_seq=-1)
    events = [e for e in trace(cluster, "bus.unknown-peer") if e["peer"] == peer(ident)]
    assert len(events) == 1, events
    # nothing was decoded, so no decode-failure event was written for it
    assert len(trace(cluster, f"bus.{decode_kind}")) == decode_events


def test_multi_part_message_from_an_unassigned_identity_is_unknown_peer(
        cluster: Cluster, ctx: zmq.Context, endpoints: dict[str, Any]) -> None:
    # The identity is checked before anything else, so an unknown peer learns nothing about its frames.
    before_malformed = len(trace(cluster, "bus.malformed"))
    identity = new_identity("multi")
    sock = dealer(ctx, endpoints["bus"], identity)
    try:
        hello = codec.encode(Hello(pid=1), seq=1, vt_ns=0)
        reply = exchange(sock, hello, b"\xc1", hello)
    finally:
        sock.close()
    assert bus_error(reply) == Error(kind="unknown-peer", detail=UNKNOWN_PEER_DETAIL, ref_seq=-1)
    assert [e for e in trace(cluster, "bus.unknown-peer") if e["peer"] == identity[:32].hex()]
    assert len(trace(cluster, "bus.malformed")) == before_malformed


def test_a_burst_from_peers_that_vanish_does_not_stop_the_bus(
        cluster: Cluster, ctx: zmq.Context, endpoints: dict[str, Any]) -> None:
    # Fire and forget: the hypervisor's replies go to identities that have already disconnected
    # (ROUTER_MANDATORY makes that an EHOSTUNREACH the hypervisor must survive).
    payloads = list(BUS_PAYLOADS.values())
    for i in range(20):
        sock = dealer(ctx, endpoints["bus"], new_identity(f"burst{i}"))
        sock.send(payloads[i % len(payloads)])
        sock.close()
    # a later well-formed exchange from another unknown peer is still answered
    ident = new_identity("after-burst")
    sock = dealer(ctx, endpoints["bus"], ident)
    try:
        reply = exchange(sock, codec.encode(Hello(pid=1), seq=1, vt_ns=0))
    finally:
        sock.close()
    assert bus_error(reply).kind == "not-declared"  # a Hello claiming no domain: refused, not unknown
    assert cluster.proc is not None and cluster.proc.poll() is None


# ----------------------------------------------------------------------------------------- the control socket


def ctl_reply(frames: list[bytes], envelope: tuple[bytes, ...] = ()) -> CtlReply:
    assert len(frames) == len(envelope) + 1, frames
    assert tuple(frames[:-1]) == envelope
    env = codec.decode(frames[-1])
    assert isinstance(env.body, CtlReply), env.body
    reply = env.body
    assert reply.ok is False and reply.data is None, reply
    return reply


@pytest.fixture
def ctl(ctx: zmq.Context, endpoints: dict[str, Any]) -> Iterator[zmq.Socket]:
    sock = dealer(ctx, endpoints["control"], b"hostile-toolstack-" + os.urandom(4).hex().encode())
    yield sock
    sock.close()


CTL_DECODE_FAILURES = [
    ("malformed", b"\xc1\xc1 garbage", "not a msgpack message ("),
    ("malformed", codec.encode(CtlRequest(cmd="status", args={}), seq=1, vt_ns=0) + b"\x00",
     "trailing bytes after the message"),
    ("truncated", truncated_request(), "not a msgpack message (Unpack failed: incomplete input)"),
    ("malformed", frame(codec.PROTO_VERSION, 20, 5, 0, ["status", {1: 2}]), "not a msgpack message ("),
    ("oversized", codec.encode(CtlRequest(cmd="status", args={"pad": "x" * OVERSIZED}), seq=1, vt_ns=0),
     None),
    ("empty", b"", "empty frame"),
    ("unknown-type", frame(codec.PROTO_VERSION, 99, 5, 0, ["status", {}]), "unknown message type 99"),
    ("bad-version", frame(2, 20, 5, 0, ["status", {}]), f"protocol version 2, this side speaks {codec.PROTO_VERSION}"),
    ("bad-field", frame(codec.PROTO_VERSION, 20, 5, 0, ["status", ["not", "a", "map"]]),
     "CtlRequest.args: expected a map with string keys"),
    ("bad-field", frame(codec.PROTO_VERSION, 20, 5, 0, [7, {}]), "CtlRequest.cmd: expected str, got int"),
    ("malformed", frame(codec.PROTO_VERSION, 20, -1, 0, ["status", {}]),
     "sequence number is not a non-negative integer"),
]


@pytest.mark.parametrize("kind, payload, detail", CTL_DECODE_FAILURES,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(CTL_DECODE_FAILURES)])
def test_control_socket_rejects_undecodable_frames(
        cluster: Cluster, ctl: zmq.Socket, kind: str, payload: bytes, detail: str | None) -> None:
    if detail is None:  # oversized: the detail names the size
        detail = f"frame of {len(payload)} bytes exceeds the {codec.MAX_FRAME_BYTES}-byte limit"
    before = len(trace(cluster, f"control.{kind}"))
    reply = ctl_reply(exchange(ctl, payload))
    if detail.endswith("("):  # msgpack's own wording follows; it differs between msgpack versions
        assert reply.error.startswith(f"{kind}: {detail}"), reply.error
        detail = reply.error.removeprefix(f"{kind}: ")
    else:
        assert reply.error == f"{kind}: {detail}"
    events = trace(cluster, f"control.{kind}")
    assert len(events) == before + 1, events
    assert events[-1]["detail"] == detail
    assert events[-1]["level"] == "warning"


def test_control_socket_echoes_a_hostile_envelope(cluster: Cluster, ctl: zmq.Socket) -> None:
    # Every frame but the last is treated as a routing envelope (REQ-style) and sent back unchanged.
    reply = ctl_reply(exchange(ctl, b"", b"\xff\x00envelope", b"\xc1"), envelope=(b"", b"\xff\x00envelope"))
    assert reply.error.startswith("malformed: not a msgpack message")


def test_control_socket_rejects_a_bus_message_that_is_not_a_request(ctl: zmq.Socket) -> None:
    reply = ctl_reply(exchange(ctl, codec.encode(Hello(pid=1), seq=1, vt_ns=0)))
    assert reply.error == "expected CtlRequest, got Hello"


def request(cmd: str, **args: Any) -> bytes:
    return codec.encode(CtlRequest(cmd=cmd, args=args), seq=1, vt_ns=0)


@pytest.mark.parametrize("cmd", ["frobnicate", "", "_domain", "create ", "__init__", "handle"])
def test_control_socket_rejects_an_unknown_command(cluster: Cluster, ctl: zmq.Socket, cmd: str) -> None:
    reply = ctl_reply(exchange(ctl, request(cmd, dom="alpha")))
    assert reply.error == f"unknown command {cmd!r}"
    assert not [e for e in trace(cluster, "control.request") if e["cmd"] == cmd]


@pytest.mark.parametrize("domain, problem", [
    ({"name": "delta", "vcpus": -1}, "domain.vcpus: must be an integer between 1 and 32, got -1"),
    ({"name": "delta", "vcpus": 33}, "domain.vcpus: must be an integer between 1 and 32, got 33"),
    ({"name": "delta", "vcpus": True}, "domain.vcpus: must be an integer between 1 and 32, got boolean true"),
    ({"name": "Delta!"}, 'domain.name: must be a string matching [a-z0-9][a-z0-9_-]{0,31}, got "Delta!"'),
    ({"name": "delta", "memory_mib": 0}, "domain.memory_mib: must be an integer between 1 and 256, got 0"),
    ({"name": "delta", "kernel": "a\x00b"}, "domain.kernel: must not contain NUL characters"),
    (None, "domain: must be a table, got null"),
    ([1, 2], "domain: must be a table, got an array"),
])
def test_control_create_rejects_an_invalid_domain(
        cluster: Cluster, ctl: zmq.Socket, domain: Any, problem: str) -> None:
    reply = ctl_reply(exchange(ctl, request("create", domain=domain)))
    assert reply.error.startswith("invalid cluster spec <create>:\n  - "), reply.error
    assert problem in reply.error.splitlines()[1], reply.error
    # nothing was created
    names = [d["name"] for d in cluster.status()["domains"]]
    assert "delta" not in names and "Delta!" not in names


def test_control_create_rejects_several_problems_at_once(ctl: zmq.Socket) -> None:
    reply = ctl_reply(exchange(ctl, request("create", domain={"name": "delta", "vcpus": -1, "memory_mib": 0,
                                                               "bogus": 1})))
    problems = reply.error.splitlines()[1:]
    assert len(problems) == 3, reply.error
    assert any(p.startswith("  - domain.bogus: ") for p in problems), problems


@pytest.mark.parametrize("cmd, args, error", [
    ("destroy", {}, "missing 'dom': a domain id or name"),
    ("destroy", {"dom": True}, "missing 'dom': a domain id or name"),
    ("destroy", {"dom": [1]}, "missing 'dom': a domain id or name"),
    ("destroy", {"dom": "nosuchdomain"}, "no domain 'nosuchdomain'"),
    ("pause", {"dom": 999}, "no domain 999"),
    ("console", {"dom": "0"}, "no domain '0'"),
])
def test_control_commands_reject_bad_arguments(ctl: zmq.Socket, cmd: str, args: dict[str, Any],
                                               error: str) -> None:
    assert ctl_reply(exchange(ctl, request(cmd, **args))).error == error


def test_the_toolstack_is_still_answered_between_hostile_requests(cluster: Cluster, ctl: zmq.Socket) -> None:
    for _ in range(3):
        assert ctl_reply(exchange(ctl, b"\xc1")).error.startswith("malformed:")
        st = cluster.status()
        assert {d["name"] for d in st["domains"]} >= {"alpha", "beta"}
    with pytest.raises(ControlError, match="unknown command 'frobnicate'"):
        cluster.client.call("frobnicate")


# ------------------------------------------------------------------------------------------------- afterwards


def test_the_cluster_still_works_after_the_hostile_traffic(cluster: Cluster) -> None:
    final = cluster.wait(timeout_s=60)
    by_name = {d["name"]: d for d in final["domains"]}
    assert by_name["alpha"]["state"] == "dead" and by_name["alpha"]["shutdown_reason"] == "poweroff", by_name
    assert by_name["beta"]["state"] == "dead" and by_name["beta"]["shutdown_reason"] == "reboot", by_name
    assert by_name["alpha"]["crash"] == "" and by_name["beta"]["crash"] == ""

    created = cluster.client.call("create", domain={"name": "gamma", "vcpus": 2, "cmdline": "shutdown=poweroff"})
    assert created["name"] == "gamma" and created["domid"] not in {by_name["alpha"]["domid"],
                                                                   by_name["beta"]["domid"]}
    deadline = time.monotonic() + 60
    while True:
        gamma = next(d for d in cluster.status()["domains"] if d["name"] == "gamma")
        if gamma["state"] in FINAL_STATES:
            break
        assert time.monotonic() < deadline, f"gamma did not finish: {gamma}"
        time.sleep(0.05)
    assert gamma["state"] == "dead", gamma
    assert gamma["shutdown_reason"] == "poweroff" and gamma["crash"] == "", gamma
    assert gamma["vcpus"] == 2 and gamma["hypercalls"] > 0
    console = cluster.client.call("console", dom="gamma")
    assert "pvkern: vcpu 1 of 2 online" in console, console
    assert cluster.proc is not None and cluster.proc.poll() is None

    # the real domains never tripped the bus checks: every rejected bus frame came from this module's sockets
    for kind in ("malformed", "truncated", "oversized", "empty", "unknown-type", "bad-version", "bad-field",
                 "unexpected"):
        real = [e for e in trace(cluster, f"bus.{kind}") if e.get("dom") is not None]
        assert not real, real
    assert not trace(cluster, "bus.peer_error")

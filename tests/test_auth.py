"""The hypervisor's authentication (hypervisor/auth.py): CurveZMQ with a ZAP handler on tcp, the peer's uid on ipc.

Real ZeroMQ over tcp 127.0.0.1: the Authenticator and two echoing ROUTER sockets run in trio, blocking clients in
threads. An echo carries the User-Id the ZAP handler gave the sender, so a test sees who the bus thinks it is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import zmq
from zmq.utils import z85

from hypervisor.auth import Authenticator, restrict_ipc, role_of, user_id
from pvcluster.keys import KeyFileError, KeyStore, Role, secure_client

HANG_S = 10  # a hang guard only: every wait here ends in well under a second when things work
REFUSED_WAIT_S = 0.5  # how long a refused client waits for the echo that must not come
USER = "tester"


class ListLog:
    """A trace logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, /, **fields: Any) -> None:
        self.events.append(("info", event, fields))

    def warning(self, event: str, /, **fields: Any) -> None:
        self.events.append(("warning", event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for _, name, fields in self.events if name == event]

    async def wait_for(self, event: str, **match: Any) -> dict[str, Any]:
        with trio.fail_after(HANG_S):
            while True:
                for fields in self.named(event):
                    if all(fields.get(k) == v for k, v in match.items()):
                        return fields
                await trio.sleep(0.01)


@attrs.frozen
class Server:
    ctx: zmq.Context[Any]
    keys: KeyStore
    log: ListLog
    auth: Authenticator
    bus: zmq.Socket[Any]
    control: zmq.Socket[Any]
    bus_endpoint: str
    control_endpoint: str


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    store = KeyStore(tmp_path / "keys")
    store.ensure_cluster()
    store.ensure_domain("alpha")
    store.ensure_toolstack(USER)
    return store


@pytest.fixture
def server(keys: KeyStore) -> Iterator[Server]:
    ctx: zmq.Context[Any] = zmq.Context()
    log = ListLog()
    auth = Authenticator(ctx, keys, log, now_ns=lambda: 42, reload_s=0.0)
    bus, control = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    auth.secure(bus, "bus")
    auth.secure(control, "control")
    bus_port = bus.bind_to_random_port("tcp://127.0.0.1")
    control_port = control.bind_to_random_port("tcp://127.0.0.1")
    yield Server(ctx, keys, log, auth, bus, control, f"tcp://127.0.0.1:{bus_port}",
                 f"tcp://127.0.0.1:{control_port}")
    bus.close(linger=0)
    control.close(linger=0)
    auth.close()
    ctx.term()


async def echo(sock: zmq.Socket[Any]) -> None:
    """Answer every message with the sender's ZAP User-Id and the message (receiving with copy=False: the
    metadata lives on the frames)."""
    fd = int(sock.getsockopt(zmq.FD))  # type: ignore[arg-type]
    while True:
        try:
            identity, *body = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            with trio.move_on_after(0.02):  # the descriptor is edge-triggered: the timeout covers a lost edge
                await trio.lowlevel.wait_readable(fd)
            continue
        who = user_id(body[-1]) or "none"
        assert user_id(identity) == user_id(body[0])  # libzmq puts the metadata on the routing-id frame too
        sock.send_multipart([identity.bytes, who.encode(), *(f.bytes for f in body)])


def run_server(server: Server, scenario: Callable[[], Awaitable[None]]) -> None:
    async def body() -> None:
        with trio.fail_after(HANG_S * 3):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.auth.run)
                nursery.start_soon(echo, server.bus)
                nursery.start_soon(echo, server.control)
                await scenario()
                nursery.cancel_scope.cancel()

    trio.run(body)


def exchange(endpoint: str, server_key: bytes | None = None, keypair: tuple[bytes, bytes] | None = None,
             wait_s: float = HANG_S, as_role: tuple[KeyStore, Role] | None = None) -> list[bytes] | None:
    """One request from a blocking client (its own context, as another process would have): the echo, or None.
    The client uses CURVE with the keys given, or as ``as_role`` the way the cluster's processes do."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if as_role is not None:
        secure_client(sock, *as_role)
    elif server_key is not None and keypair is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keypair[0])
        sock.setsockopt(zmq.CURVE_SECRETKEY, keypair[1])
    try:
        sock.connect(endpoint)
        sock.send(b"ping")
        return sock.recv_multipart() if sock.poll(int(wait_s * 1000)) else None
    finally:
        sock.close(linger=0)
        ctx.term()


async def client(endpoint: str, server_key: bytes | None = None, keypair: tuple[bytes, bytes] | None = None,
                 wait_s: float = HANG_S, as_role: tuple[KeyStore, Role] | None = None) -> list[bytes] | None:
    return await trio.to_thread.run_sync(lambda: exchange(endpoint, server_key, keypair, wait_s, as_role))


def cluster_key(server: Server) -> bytes:
    return server.keys.public(Role.cluster())


# -- who gets through --------------------------------------------------------------------------------------------


def test_a_domain_key_reaches_the_bus_as_its_domain(server: Server) -> None:
    async def scenario() -> None:
        reply = await client(server.bus_endpoint, as_role=(server.keys, Role.domain("alpha")))
        assert reply == [b"domain:alpha", b"ping"]
        accepted = await server.log.wait_for("auth.accepted")
        assert accepted == {"vt_ns": 42, "socket": "bus", "address": "127.0.0.1", "who": "domain:alpha"}

    run_server(server, scenario)
    assert not server.log.named("auth.refused") and not server.log.named("auth.handshake_failed")


def test_a_toolstack_key_reaches_the_control_socket_as_its_user(server: Server) -> None:
    async def scenario() -> None:
        reply = await client(server.control_endpoint, as_role=(server.keys, Role.toolstack(USER)))
        assert reply == [f"toolstack:{USER}".encode(), b"ping"]

    run_server(server, scenario)


def test_a_client_without_curve_gets_nothing_through(server: Server) -> None:
    async def scenario() -> None:
        assert await client(server.bus_endpoint, wait_s=REFUSED_WAIT_S) is None
        failed = await server.log.wait_for("auth.handshake_failed", socket="bus")
        # libzmq drops a mechanism mismatch itself: no ZAP request, only the monitor sees it. Both ends see the
        # mismatch in the greetings; when the client hangs up first, the server's write fails (EPIPE, ECONNRESET).
        assert (failed["event"], failed["error"]) == ("HANDSHAKE_FAILED_PROTOCOL", "ZMTP_MECHANISM_MISMATCH") or \
            failed["event"] == "HANDSHAKE_FAILED_NO_DETAIL"

    run_server(server, scenario)
    assert not server.log.named("auth.accepted") and not server.log.named("auth.refused")


def test_an_unknown_key_pair_is_refused(server: Server) -> None:
    stranger = zmq.curve_keypair()

    async def scenario() -> None:
        assert await client(server.bus_endpoint, cluster_key(server), stranger, REFUSED_WAIT_S) is None
        refused = await server.log.wait_for("auth.refused")
        assert refused == {"vt_ns": 42, "socket": "bus", "address": "127.0.0.1", "key": stranger[0].decode(),
                           "reason": "unknown key"}
        failed = await server.log.wait_for("auth.handshake_failed")  # the ZAP verdict, as the monitor sees it
        assert (failed["event"], failed["error"]) == ("HANDSHAKE_FAILED_AUTH", "ZAP 400")

    run_server(server, scenario)
    assert not server.log.named("auth.accepted")


def test_a_domain_key_on_the_control_socket_is_refused(server: Server) -> None:
    async def scenario() -> None:
        alpha = server.keys.keypair(Role.domain("alpha"))
        assert await client(server.control_endpoint, cluster_key(server), alpha, REFUSED_WAIT_S) is None
        refused = await server.log.wait_for("auth.refused")
        assert refused["socket"] == "control" and refused["reason"] == "domain key on the control socket"
        assert refused["key"] == alpha[0].decode()

    run_server(server, scenario)


def test_a_toolstack_key_on_the_bus_is_refused(server: Server) -> None:
    async def scenario() -> None:
        user = server.keys.keypair(Role.toolstack(USER))
        assert await client(server.bus_endpoint, cluster_key(server), user, REFUSED_WAIT_S) is None
        refused = await server.log.wait_for("auth.refused")
        assert refused["socket"] == "bus" and refused["reason"] == "toolstack key on the bus"

    run_server(server, scenario)


def test_the_cluster_key_is_no_client_key(server: Server) -> None:
    async def scenario() -> None:
        own = server.keys.keypair(Role.cluster())
        assert await client(server.bus_endpoint, cluster_key(server), own, REFUSED_WAIT_S) is None
        assert (await server.log.wait_for("auth.refused"))["reason"] == "unknown key"

    run_server(server, scenario)


def test_a_client_with_the_wrong_server_key_gets_nothing_through(server: Server) -> None:
    async def scenario() -> None:
        impostor_server, _ = zmq.curve_keypair()
        alpha = server.keys.keypair(Role.domain("alpha"))
        assert await client(server.bus_endpoint, impostor_server, alpha, REFUSED_WAIT_S) is None
        # HELLO does not decrypt: libzmq drops the connection before any ZAP request
        failed = await server.log.wait_for("auth.handshake_failed", socket="bus")
        assert (failed["event"], failed["error"]) == ("HANDSHAKE_FAILED_PROTOCOL", "ZMTP_CRYPTOGRAPHIC")

    run_server(server, scenario)
    assert not server.log.named("auth.accepted") and not server.log.named("auth.refused")


def test_a_key_created_while_running_is_admitted(server: Server) -> None:
    async def scenario() -> None:
        server.keys.ensure_domain("late")
        reply = await client(server.bus_endpoint, cluster_key(server), server.keys.keypair(Role.domain("late")))
        assert reply == [b"domain:late", b"ping"]

    run_server(server, scenario)


def test_a_socket_secured_while_running_is_watched(server: Server) -> None:
    extra = server.ctx.socket(zmq.ROUTER)

    async def scenario() -> None:
        await trio.sleep(0)  # run() has started
        server.auth.secure(extra, "control")
        port = extra.bind_to_random_port("tcp://127.0.0.1")
        assert await client(f"tcp://127.0.0.1:{port}", wait_s=REFUSED_WAIT_S) is None
        await server.log.wait_for("auth.handshake_failed", socket="control")

    try:
        run_server(server, scenario)
    finally:
        extra.close(linger=0)


# -- the ZAP handler on its own ----------------------------------------------------------------------------------


class CountingStore(KeyStore):
    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.reads = 0

    def clients(self) -> dict[bytes, Role]:
        self.reads += 1
        return super().clients()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.term()


def zap_request(key: bytes, domain: bytes = b"bus", mechanism: bytes = b"CURVE") -> list[bytes]:
    return [b"1.0", b"7", domain, b"10.0.0.1", b"dom1-secret", mechanism, z85.decode(key)]


def test_malformed_requests_are_answered_not_raised(ctx: zmq.Context[Any], keys: KeyStore) -> None:
    log = ListLog()
    auth = Authenticator(ctx, keys, log, now_ns=lambda: 1)
    try:
        alpha = keys.public(Role.domain("alpha"))
        assert auth.answer([b"1.0"]) == [b"1.0", b"", b"500", b"malformed request", b"", b""]
        assert auth.answer([b"2.0", b"1", b"bus", b"a", b"", b"CURVE", b"x" * 32])[2] == b"500"
        assert auth.answer(zap_request(alpha)[:6] + [b"short"])[2] == b"500"
        assert auth.answer(zap_request(alpha)[:6])[2] == b"500"  # no credentials at all
        assert len(log.named("auth.malformed")) == 4
        assert auth.answer([b"1.0", b"8", b"bus", b"a", b"", b"NULL"])[:4] == [b"1.0", b"8", b"400", b"not CURVE"]
        assert auth.answer(zap_request(alpha, domain=b"other"))[3] == b"unknown socket"
        assert [f["reason"] for f in log.named("auth.refused")] == ["not CURVE", "unknown socket"]
        assert auth.answer(zap_request(alpha)) == [b"1.0", b"7", b"200", b"OK", b"domain:alpha", b""]
        assert all("dom1-secret" not in str(fields) for _, _, fields in log.events)  # identities stay out
    finally:
        auth.close()


def test_the_key_directory_is_read_again_only_when_it_changed_or_the_interval_passed(
        ctx: zmq.Context[Any], tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "keys")
    store.ensure_cluster()
    store.ensure_domain("alpha")
    clock = FakeClock()
    auth = Authenticator(ctx, store, ListLog(), now_ns=lambda: 1, reload_s=1.0, clock=clock)
    try:
        assert store.reads == 1
        stranger, _ = zmq.curve_keypair()
        for _ in range(100):  # a flood of unknown keys
            assert auth.answer(zap_request(stranger))[2] == b"400"
        assert store.reads == 1
        store.ensure_domain("late")  # the directory changed: the new key counts at its first handshake
        assert auth.answer(zap_request(store.public(Role.domain("late"))))[2] == b"200"
        assert store.reads == 2
        for _ in range(100):  # and then the flood reads nothing again
            assert auth.answer(zap_request(stranger))[2] == b"400"
        assert store.reads == 2
        alpha = store.keypair(Role.domain("alpha"))[0]
        store.public_path(Role.domain("alpha")).unlink()  # revoked: refused from the next handshake
        store.secret_path(Role.domain("alpha")).unlink()
        assert auth.answer(zap_request(alpha))[2] == b"400"
        clock.now += 1.0  # the interval alone also reads it again
        assert auth.answer(zap_request(stranger))[2] == b"400"
        assert store.reads == 4
    finally:
        auth.close()


def test_trace_events_are_rate_limited_and_the_rest_counted(ctx: zmq.Context[Any], keys: KeyStore) -> None:
    log = ListLog()
    clock = FakeClock()
    auth = Authenticator(ctx, keys, log, now_ns=lambda: 1, trace_burst=3, trace_per_s=1.0, clock=clock)
    try:
        stranger, _ = zmq.curve_keypair()
        for _ in range(10):
            assert auth.answer(zap_request(stranger))[2] == b"400"  # every request is still answered
        assert len(log.named("auth.refused")) == 3
        clock.now += 1.0
        auth.answer(zap_request(stranger))
        assert log.named("auth.suppressed") == [{"vt_ns": 1, "count": 7}]
        assert len(log.named("auth.refused")) == 4
    finally:
        auth.close()


def test_securing_needs_the_cluster_key(ctx: zmq.Context[Any], tmp_path: Path) -> None:
    auth = Authenticator(ctx, KeyStore(tmp_path / "empty"), ListLog(), now_ns=lambda: 1)
    sock = ctx.socket(zmq.ROUTER)
    try:
        with pytest.raises(KeyFileError, match="pvcluster keys create --dir DIR"):
            auth.secure(sock, "bus")
    finally:
        sock.close(linger=0)
        auth.close()


def test_close_closes_a_secured_socket_left_open(ctx: zmq.Context[Any], keys: KeyStore) -> None:
    """Without its ZAP handler a CURVE server admits any client: close() must not leave one listening."""
    auth = Authenticator(ctx, keys, ListLog(), now_ns=lambda: 1)
    sock = ctx.socket(zmq.ROUTER)
    auth.secure(sock, "bus")
    sock.bind_to_random_port("tcp://127.0.0.1")
    auth.close()
    assert sock.closed


def test_one_handler_per_context(ctx: zmq.Context[Any], keys: KeyStore) -> None:
    auth = Authenticator(ctx, keys, ListLog(), now_ns=lambda: 1)
    try:
        with pytest.raises(zmq.ZMQError):
            Authenticator(ctx, keys, ListLog(), now_ns=lambda: 1)
    finally:
        auth.close()


def test_frames_without_zap_metadata_have_no_user(ctx: zmq.Context[Any]) -> None:
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.bind("inproc://no-zap")
        dealer.connect("inproc://no-zap")
        dealer.send(b"hi")
        assert router.poll(HANG_S * 1000)
        frames = router.recv_multipart(copy=False)
        assert [user_id(f) for f in frames] == [None, None]
        assert role_of(frames[-1]) is None
    finally:
        router.close(linger=0)
        dealer.close(linger=0)


# -- ipc: the peer's uid -----------------------------------------------------------------------------------------

NOBODY = 65534
_IPC_CLIENT = textwrap.dedent("""
    import sys, zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(sys.argv[1])
    sock.send(b"from " + str(__import__("os").getuid()).encode())
    print("answered" if sock.poll(int(float(sys.argv[2]) * 1000)) else "silence")
""")


def _as_nobody(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _IPC_CLIENT, *args], user=NOBODY, group=NOBODY,
                            stdout=subprocess.PIPE, text=True)


@pytest.fixture
def nobody_can_run_python() -> None:
    if os.getuid() != 0:
        pytest.skip("needs root, to run a client under another uid")
    probe = subprocess.run([sys.executable, "-c", "import zmq"], user=NOBODY, group=NOBODY, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("this Python and pyzmq cannot run as nobody here")


@pytest.mark.usefixtures("nobody_can_run_python")
@pytest.mark.parametrize("restricted", [False, True])
def test_restrict_ipc_admits_only_our_uid(ctx: zmq.Context[Any], run_dir: Path, restricted: bool) -> None:
    """Unrestricted, nobody's message arrives (so the socket file is reachable for it); restricted, nothing from
    nobody arrives while our own uid still gets through."""
    os.chmod(run_dir, 0o755)
    router = ctx.socket(zmq.ROUTER)
    if restricted:
        restrict_ipc(router)
    endpoint = f"ipc://{run_dir / 'bus.sock'}"
    router.bind(endpoint)
    os.chmod(run_dir / "bus.sock", 0o777)
    proc = _as_nobody([endpoint, "1" if restricted else str(HANG_S)])
    try:
        if restricted:
            # The client has sent and waited a second for an answer when it exits: its message had its chance.
            out, _ = proc.communicate(timeout=HANG_S)
            assert out.strip() == "silence" and not router.poll(100)
            assert _own_uid_gets_through(router, endpoint)
        else:
            assert router.poll(HANG_S * 1000)
            got = router.recv_multipart()
            router.send_multipart([got[0], b"ack"])
            out, _ = proc.communicate(timeout=HANG_S)
            assert got[1] == f"from {NOBODY}".encode() and out.strip() == "answered"
    finally:
        proc.kill()
        proc.wait()
        router.close(linger=0)


def _own_uid_gets_through(router: zmq.Socket[Any], endpoint: str) -> bool:
    ctx: zmq.Context[Any] = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    try:
        dealer.connect(endpoint)
        dealer.send(b"mine")
        return bool(router.poll(HANG_S * 1000)) and router.recv_multipart()[1] == b"mine"
    finally:
        dealer.close(linger=0)
        ctx.term()

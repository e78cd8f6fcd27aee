"""Who may talk to the hypervisor: CurveZMQ with a ZAP handler on tcp, the peer's uid on ipc.

On tcp, ``Authenticator.secure`` makes the bus and the control socket CURVE servers with the cluster key pair, and
``Authenticator.run`` answers ZeroMQ's authentication requests (ZAP, RFC 27) from ``KeyStore.clients()``: a domain
key may use the bus, a toolstack key the control socket, nothing else gets in. An admitted connection's messages
carry the role as their ZAP User-Id (``user_id(frame)``, ``role_of(frame)``: "domain:alpha", "toolstack:root").

Two properties of libzmq this module is built around:

* A CURVE server whose context has no ZAP handler bound admits every client that completes the handshake, with
  any key. So the handler's socket is bound in ``Authenticator.__init__``, before any socket can be secured, and
  ``close`` closes the secured sockets (if their owner has not) before it unbinds the handler. A handler that is
  bound but not answering (``run`` not started yet, or stopped) fails closed: handshakes wait, then time out.
* A refused handshake reaches the handler only when the client's CURVE handshake is sound. A client without CURVE
  (a mechanism mismatch) or one that has the wrong server key (HELLO does not decrypt) is dropped by libzmq
  before any ZAP request; only the socket monitor sees those (``auth.handshake_failed``). Such a client retries
  every reconnect interval (100 ms by default) forever, so every trace event here goes through a token bucket:
  a misconfigured or hostile peer costs a bounded number of trace lines, and the count suppressed is reported.

On ipc there is no CURVE: ``restrict_ipc`` makes the kernel-checked peer uid the gate instead.

Lifecycle: ``Authenticator(...)`` (binds the handler), ``secure`` each server socket, bind them, run ``run()`` in
the nursery; at the end cancel ``run()``, close the server sockets, ``close()``, then ``ctx.term()``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterator
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol

import attrs
import trio
import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from pvcluster.bus.zsock import TrioSocket
from pvcluster.keys import KeyStore, Role

SocketName = Literal["bus", "control"]
ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"  # fixed by RFC 27: libzmq connects here in the socket's context
ZAP_VERSION: Final = b"1.0"
# Which role kind each secured socket admits; the socket is the ZAP request's domain (ZAP_DOMAIN).
ADMITS: Final = MappingProxyType({"bus": "domain", "control": "toolstack"})
WRONG_SOCKET: Final = MappingProxyType({
    ("bus", "toolstack"): "toolstack key on the bus",
    ("control", "domain"): "domain key on the control socket",
})
HANDSHAKE_FAILURES: Final = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
)
# MONITOR_STOPPED: the monitored socket closed, so the monitor's reader can end.
_MONITOR_EVENTS: Final = sum(HANDSHAKE_FAILURES) | zmq.EVENT_MONITOR_STOPPED
_PROTOCOL_ERRORS: Final = MappingProxyType(
    {getattr(zmq, n): n.removeprefix("PROTOCOL_ERROR_") for n in dir(zmq) if n.startswith("PROTOCOL_ERROR_")}
)
_MAX_FIELD = 64  # longest request field traced (an address is at most 45 characters)


class Log(Protocol):
    def info(self, event: str, /, **fields: Any) -> None: ...

    def warning(self, event: str, /, **fields: Any) -> None: ...


@attrs.frozen
class Verdict:
    """The handler's answer to one ZAP request, and the trace event that records it."""

    status: bytes  # b"200" | b"400" | b"500"
    text: str
    user_id: str
    event: str
    fields: dict[str, Any]

    @property
    def allowed(self) -> bool:
        return self.status == b"200"


@attrs.define
class TraceBudget:
    """A token bucket on the handler's trace events, in wall-clock seconds: ``burst`` events at once, then
    ``per_s`` a second. What it refuses is counted until the next event it lets through reports it."""

    burst: float
    per_s: float
    clock: Callable[[], float]
    tokens: float = attrs.field(init=False)
    last: float = attrs.field(init=False)
    suppressed: int = 0

    def __attrs_post_init__(self) -> None:
        self.tokens = self.burst
        self.last = self.clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.per_s)
        self.last = now
        if self.tokens < 1:
            self.suppressed += 1
            return False
        self.tokens -= 1
        return True


@attrs.frozen
class _Watched:
    name: SocketName
    server: zmq.Socket[Any]
    monitor: TrioSocket


class Authenticator:
    """The hypervisor's ZAP handler and handshake-failure monitor, as trio tasks (``run``).

    The client table is ``keys.clients()``, cached: it is read again when a handshake finds it older than
    ``reload_s``, or when the key directory changed (so keys created or removed while the cluster runs count at
    once), never more often otherwise,
    so a flood of handshakes with unknown keys cannot make every one of them read the key directory."""

    def __init__(self, ctx: zmq.Context[Any], keys: KeyStore, log: Log, now_ns: Callable[[], int], *,
                 reload_s: float = 1.0, trace_burst: int = 64, trace_per_s: float = 4.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.keys = keys
        self.log = log
        self.now_ns = now_ns
        self.reload_s = reload_s
        self._clock = clock
        self._budget = TraceBudget(trace_burst, trace_per_s, clock)
        self._clients = keys.clients()
        self._loaded_at = clock()
        self._stamp = self._dir_stamp()
        self._watched: list[_Watched] = []
        self._nursery: trio.Nursery | None = None
        zap = ctx.socket(zmq.REP)
        zap.setsockopt(zmq.LINGER, 0)
        zap.bind(ZAP_ENDPOINT)  # EADDRINUSE if the context already has a handler: one Authenticator per context
        self._zap = TrioSocket(zap)

    # -- securing sockets ----------------------------------------------------------------------------------------

    def secure(self, sock: zmq.Socket[Any], socket_name: SocketName) -> None:
        """Make ``sock`` (not bound yet) a CURVE server with the cluster key pair whose clients this handler
        judges as ``socket_name``, and watch its handshake failures. KeyFileError if the cluster key is missing
        or insecure."""
        public, secret = self.keys.keypair(Role.cluster())
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.ZAP_DOMAIN, socket_name.encode())
        watched = _Watched(socket_name, sock, TrioSocket(sock.get_monitor_socket(_MONITOR_EVENTS)))
        self._watched.append(watched)
        if self._nursery is not None:  # secured while run() is running
            self._start_watching(self._nursery, watched)

    # -- the tasks -----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Answer ZAP requests and trace handshake failures until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                nursery.start_soon(_poll, self._zap)
                nursery.start_soon(self._serve)
                for watched in self._watched:
                    self._start_watching(nursery, watched)
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def _start_watching(self, nursery: trio.Nursery, watched: _Watched) -> None:
        nursery.start_soon(_poll, watched.monitor)
        nursery.start_soon(self._watch, watched)

    async def _serve(self) -> None:
        with _until_closed(self._zap):
            while True:
                request = await self._zap.recv_multipart()
                await self._zap.send_multipart(self.answer(request))

    async def _watch(self, watched: _Watched) -> None:
        with _until_closed(watched.monitor):
            while True:
                frames = await watched.monitor.recv_multipart()
                if not self._on_monitor_event(watched.name, frames):
                    return

    # -- ZAP -----------------------------------------------------------------------------------------------------

    def answer(self, request: list[bytes]) -> list[bytes]:
        """The reply frames to one ZAP request, tracing the verdict. Never raises: a request this handler cannot
        read is answered 500, so libzmq refuses that handshake and the handler goes on."""
        verdict = self.judge(request)
        self._trace(verdict.event, verdict.fields, warn=not verdict.allowed)
        request_id = request[1] if len(request) > 1 else b""
        return [ZAP_VERSION, request_id, verdict.status, verdict.text.encode(), verdict.user_id.encode(), b""]

    def judge(self, request: list[bytes]) -> Verdict:
        """The policy: a CURVE client whose public key is a domain key on the bus, a toolstack key on the control
        socket; everything else refused."""
        if len(request) < 6 or request[0] != ZAP_VERSION:
            return _malformed("not a ZAP 1.0 request", frames=len(request))
        _version, _request_id, domain, address, _identity, mechanism, *credentials = request
        # The identity is not traced: a domain process's routing id carries a secret part (shell.send).
        socket, where = _text(domain), _text(address)
        if mechanism != b"CURVE":
            return _refused(socket, where, "", "not CURVE", mechanism=_text(mechanism))
        if len(credentials) != 1 or len(credentials[0]) != 32:
            return _malformed("CURVE credentials are not one 32-byte key", socket=socket, address=where)
        key = z85.encode(credentials[0])
        role = self._lookup(key)
        reason = _refusal(socket, role)
        if reason is not None or role is None:
            return _refused(socket, where, key.decode(), reason or "unknown key")
        return Verdict(b"200", "OK", role.user_id, "auth.accepted",
                       {"socket": socket, "address": where, "who": role.user_id})

    def _lookup(self, key: bytes) -> Role | None:
        stamp = self._dir_stamp()
        if stamp != self._stamp or self._clock() - self._loaded_at >= self.reload_s:
            self._clients = self.keys.clients()
            self._loaded_at, self._stamp = self._clock(), stamp
        return self._clients.get(key)

    def _dir_stamp(self) -> int:
        """The key directory's mtime: a key created or removed changes it, so it counts at its first handshake
        (a stat, which no client can make costlier; a key rewritten in place waits for ``reload_s``)."""
        try:
            return os.stat(self.keys.directory).st_mtime_ns
        except OSError:
            return 0

    # -- monitors ------------------------------------------------------------------------------------------------

    def _on_monitor_event(self, socket: SocketName, frames: list[bytes]) -> bool:
        """Trace one monitor event; False once the monitored socket has closed (no event follows)."""
        try:
            event = parse_monitor_message(frames)
        except RuntimeError:  # not the two frames of a monitor event: nothing libzmq sends
            self._trace("auth.malformed", {"socket": socket, "detail": "monitor event", "frames": len(frames)})
            return True
        kind, value = int(event["event"]), int(event["value"])
        if kind == zmq.EVENT_MONITOR_STOPPED:
            return False
        if kind in HANDSHAKE_FAILURES:
            self._trace("auth.handshake_failed",
                        {"socket": socket, "event": zmq.Event(kind).name, "error": _error_name(kind, value),
                         "code": value})
        return True

    # -- tracing -------------------------------------------------------------------------------------------------

    def _trace(self, event: str, fields: dict[str, Any], warn: bool = True) -> None:
        if not self._budget.take():
            return
        vt_ns = self.now_ns()
        if self._budget.suppressed:
            self.log.warning("auth.suppressed", vt_ns=vt_ns, count=self._budget.suppressed)
            self._budget.suppressed = 0
        (self.log.warning if warn else self.log.info)(event, vt_ns=vt_ns, **fields)

    def close(self) -> None:
        """Close the handler's sockets (cancel ``run`` first). A secured socket still open is closed first: once
        the handler is gone libzmq would admit any client."""
        for watched in self._watched:
            watched.server.close(linger=0)  # a no-op if its owner closed it already
            watched.monitor.close()
        self._zap.close()


# -- the policy's pieces -----------------------------------------------------------------------------------------


def _refusal(socket: str, role: Role | None) -> str | None:
    """Why ``role`` may not use ``socket``, or None if it may."""
    if socket not in ADMITS:
        return "unknown socket"
    if role is None:
        return "unknown key"
    if ADMITS[socket] == role.kind:
        return None
    return WRONG_SOCKET.get((socket, role.kind), f"{role.kind} key on the {socket} socket")


def _refused(socket: str, address: str, key: str, reason: str, **extra: Any) -> Verdict:
    fields = {"socket": socket, "address": address, "key": key, "reason": reason, **extra}
    return Verdict(b"400", reason, "", "auth.refused", fields)


def _malformed(detail: str, **fields: Any) -> Verdict:
    return Verdict(b"500", "malformed request", "", "auth.malformed", {"detail": detail, **fields})


def _text(field: bytes) -> str:
    return field[:_MAX_FIELD].decode("ascii", errors="replace")


def _error_name(event: int, value: int) -> str:
    """What a handshake-failure event's value means: an errno, a ZMQ_PROTOCOL_ERROR_* code, or a ZAP status."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return errno.errorcode.get(value, str(value))
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return _PROTOCOL_ERRORS.get(value, hex(value))
    return f"ZAP {value}"  # EVENT_HANDSHAKE_FAILED_AUTH: the status code the handler answered


# -- the trio plumbing -------------------------------------------------------------------------------------------


async def _poll(sock: TrioSocket) -> None:
    """The socket's safety poll (pvcluster.bus.zsock), ending quietly when the socket is closed under it."""
    with _until_closed(sock):
        await sock.safety_poll()


@contextlib.contextmanager
def _until_closed(sock: TrioSocket) -> Iterator[None]:
    """A reader of a socket that ``close`` closed ends instead of failing: trio reports the closed descriptor,
    ZeroMQ the closed socket (ENOTSOCK)."""
    try:
        yield
    except (trio.ClosedResourceError, zmq.ZMQError):
        if not sock.sock.closed:
            raise


# -- frames and ipc ----------------------------------------------------------------------------------------------


def user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id of a received frame (receive with copy=False), or None: the frame came over a connection no
    ZAP handler admitted (ipc, inproc). Every frame of a message carries it, a ROUTER's routing-id frame too."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:  # EINVAL: the message has no such property
        return None
    return value if isinstance(value, str) and value else None


def role_of(frame: zmq.Frame) -> Role | None:
    """The role the sender of ``frame`` authenticated as, or None (see ``user_id``)."""
    uid = user_id(frame)
    return Role.parse(uid) if uid is not None else None


def restrict_ipc(sock: zmq.Socket[Any]) -> None:
    """Admit only ipc peers running as this process's uid (checked by the kernel: SO_PEERCRED), before ``bind``.

    The ipc counterpart of CURVE: without it, any local user who can reach the socket file may drive the cluster.
    The run directory is 0700 as well; this holds even if its mode is loosened. Raises zmq.ZMQError if this
    libzmq was built without the option, rather than running unguarded."""
    sock.setsockopt(zmq.IPC_FILTER_UID, os.getuid())

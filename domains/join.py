"""Joining a cluster: connect to the hypervisor's bus, authenticate, claim a declared domain.

Whoever starts a domain process (the hypervisor's local launcher, a container, a Kubernetes pod, ``srun``, ssh) it
joins the same way: it connects to the bus endpoint (on tcp as a CurveZMQ client with its domain's key pair and the
cluster's public key, read from a key directory: never from the command line), says Hello with the name of the
domain it claims, and waits for the hypervisor's answer: the Build of that domain (or, for a domain restored from a
save file or migrating, its saved state: Restore), or a refusal.

The socket's monitor tells why nothing comes back when the hypervisor's side turns the connection down (an unknown
key, a wrong cluster key): the wait then ends with that reason instead of a silent timeout. After the join, the
same monitor lets a process that the hypervisor did not start notice that the hypervisor is gone
(``Connection.gone``): it has no parent to watch.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import zmq
from zmq.utils.monitor import parse_monitor_message

from pvcluster.bus import codec
from pvcluster.bus.messages import Build, Error, Hello, Leaving, Restore, Stop
from pvcluster.keys import KeyStore, Role

# How long a process waits for the hypervisor's answer to its Hello (the hypervisor may not be up yet).
JOIN_WAIT_S = 120.0
# How soon a process whose domain is not declared yet asks again.
ASK_AGAIN_S = 0.5
# A remote process takes the hypervisor for gone once its connection has been down this long.
GONE_AFTER_S = 30.0
_FAILED: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed (protocol: a wrong cluster key, or no CURVE)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the hypervisor refused this key",
}
_WATCHED = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | sum(_FAILED)


class JoinError(Exception):
    pass


class StoppedBeforeBuild(Exception):
    """The domain was destroyed before this process joined: the hypervisor's answer was its Stop."""


class Connection:
    """The bus socket of a joined (or joining) domain process, and its monitor."""

    def __init__(self, endpoint: str, name: str, keys: Path | None) -> None:
        self.endpoint = endpoint
        self.name = name
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        if endpoint.startswith("tcp://"):
            self._curve(keys)
        self.monitor = self.sock.get_monitor_socket(_WATCHED)
        self.up = False
        self.down_since: float | None = time.monotonic()
        self.last_failure = ""

    def _curve(self, keys: Path | None) -> None:
        if keys is None:
            raise JoinError(f"{self.endpoint} is tcp: give the key directory (--keys DIR) holding cluster.key and "
                            f"this domain's domain-{self.name}.key_secret")
        store = KeyStore(keys)
        try:
            public, secret = store.keypair(Role("domain", self.name))
            server = store.public(Role.cluster())
        except (KeyError, OSError, ValueError) as exc:
            raise JoinError(str(exc)) from None
        self.sock.curve_publickey, self.sock.curve_secretkey, self.sock.curve_serverkey = public, secret, server

    def poll_monitor(self) -> None:
        """Take in what the monitor reported: connection up or down, and the last handshake failure."""
        while self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up, self.down_since = True, None
            elif kind == zmq.EVENT_DISCONNECTED:
                self.up = False
                self.down_since = self.down_since or time.monotonic()
            elif kind in _FAILED:
                self.last_failure = _FAILED[kind]

    def gone(self) -> bool:
        """Whether the hypervisor looks gone: the connection has been down for GONE_AFTER_S."""
        self.poll_monitor()
        return self.down_since is not None and time.monotonic() - self.down_since >= GONE_AFTER_S

    def close(self, linger_ms: int) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.setsockopt(zmq.LINGER, linger_ms)
        self.sock.close()
        self.ctx.term()


def join(endpoint: str, name: str, keys: Path | None, wait_s: float = JOIN_WAIT_S) -> tuple[Connection, bytes]:
    """Connect and claim domain ``name``. Returns the connection and the raw frame of its Build; JoinError with
    the reason when the hypervisor refuses, turns the connection down, or does not answer within ``wait_s``."""
    conn = Connection(endpoint, name, keys)
    try:
        conn.sock.connect(endpoint)
        hello = codec.encode(Hello(pid=os.getpid(), name=name, host=socket.gethostname()), seq=1, vt_ns=0)
        conn.sock.send(hello)
        return conn, _answer(conn, hello, wait_s)
    except StoppedBeforeBuild:
        conn.close(1000)  # the goodbye goes out
        raise
    except BaseException:
        conn.close(0)
        raise


def _answer(conn: Connection, hello: bytes, wait_s: float) -> bytes:
    """Wait for the answer to ``hello``; a domain not declared yet (this process started before the toolstack's
    `create`) is asked for again every ASK_AGAIN_S."""
    deadline = time.monotonic() + wait_s
    undeclared = ""
    while (left := deadline - time.monotonic()) > 0:
        if not conn.sock.poll(int(min(left, 0.5) * 1000)):
            conn.poll_monitor()
            if conn.last_failure and not conn.up:
                raise JoinError(f"{conn.endpoint}: {conn.last_failure}")
            continue
        frame = conn.sock.recv_multipart()[-1]
        try:
            body = codec.decode(frame).body
        except codec.FrameError as exc:
            raise JoinError(f"bad answer from the hypervisor: {exc}") from None
        if isinstance(body, Build | Restore):  # Restore: a restored or migrated domain (domains/capture.py)
            return frame  # type: ignore[no-any-return]
        if isinstance(body, Stop):
            conn.sock.send(codec.encode(Leaving(code=0), seq=2, vt_ns=0))
            raise StoppedBeforeBuild(body.reason)
        if isinstance(body, Error) and body.kind == "not-declared":
            undeclared = body.detail
            time.sleep(min(ASK_AGAIN_S, max(0.0, deadline - time.monotonic())))
            conn.sock.send(hello)
            continue
        if isinstance(body, Error):
            raise JoinError(f"the hypervisor refused to let this process join as {conn.name!r}: {body.detail}")
        raise JoinError(f"unexpected answer {type(body).__name__} from the hypervisor")
    if undeclared:
        raise JoinError(f"the hypervisor at {conn.endpoint} answers, but within {wait_s:g} s: {undeclared}")
    conn.poll_monitor()
    why = f" ({conn.last_failure})" if conn.last_failure else ""
    raise JoinError(f"no answer from the hypervisor at {conn.endpoint} within {wait_s:g} s{why}")

"""The toolstack's side of the control socket, and how it finds a running cluster.

On tcp the control socket is a CurveZMQ server that admits toolstack keys only: the client reads the invoking
user's key pair (``toolstack-USER``) and the cluster's public key from the key directory that ``hypervisor.json``
names, and a refused handshake is reported as such (from the socket's monitor) rather than as a silent timeout.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from pvcluster.bus import codec
from pvcluster.bus.messages import CtlReply, CtlRequest
from pvcluster.keys import KeyStore, Role, current_user

_REFUSED: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the handshake failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the handshake failed (a wrong cluster key?)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the hypervisor refused this key",
}


class ControlError(Exception):
    pass


def read_hypervisor_info(run_dir: Path) -> dict[str, Any] | None:
    """The hypervisor's pid and endpoints, or None if no live hypervisor owns ``run_dir``."""
    try:
        info = json.loads((run_dir / "hypervisor.json").read_text())
    except (OSError, ValueError):
        return None
    pid = info.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    if _is_zombie(pid):
        return None
    return info if isinstance(info.get("control"), str) else None


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def toolstack_keys(keys_dir: Path, user: str | None = None) -> tuple[bytes, bytes, bytes]:
    """(public, secret, cluster public) for ``user``'s toolstack key; ControlError saying how to get one."""
    store = KeyStore(keys_dir)
    user = user or current_user()
    try:
        public, secret = store.keypair(Role("toolstack", user))
        return public, secret, store.public(Role.cluster())
    except (KeyError, OSError, ValueError) as exc:
        raise ControlError(f"no usable toolstack key for user {user!r} in {keys_dir}: {exc}") from None


class ControlClient:
    def __init__(self, endpoint: str, timeout_s: float = 30.0, curve: tuple[bytes, bytes, bytes] | None = None
                 ) -> None:
        self.endpoint = endpoint
        self.timeout_ms = int(timeout_s * 1000)
        self.curve = curve  # (public, secret, server public) on tcp
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._seq = itertools.count(1)
        self._monitor: zmq.Socket | None = None
        self._sock = self._connect()
        # set by an owner that can tell when the hypervisor process has exited: a wait for a reply then ends at once
        self.hypervisor_exited: Callable[[], bool] = lambda: False

    @classmethod
    def for_run_dir(cls, run_dir: Path, timeout_s: float = 30.0) -> ControlClient:
        info = read_hypervisor_info(run_dir)
        if info is None:
            raise ControlError(f"no cluster is running in {run_dir} (start one with `pvcluster up`)")
        keys = info.get("keys")
        curve = toolstack_keys(Path(keys)) if isinstance(keys, str) and info.get("transport") == "tcp" else None
        return cls(info["control"], timeout_s, curve)

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self.curve
            self._monitor = sock.get_monitor_socket(sum(_REFUSED) | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sock.connect(self.endpoint)
        return sock

    def _refused(self) -> str:
        """Why the hypervisor turned this client's connection down, if its monitor said so."""
        why = ""
        while self._monitor is not None and self._monitor.poll(0):
            event = parse_monitor_message(self._monitor.recv_multipart())["event"]
            why = _REFUSED.get(event, "") if event != zmq.EVENT_HANDSHAKE_SUCCEEDED else ""
        return why

    def _wait_reply(self, timeout_ms: int) -> bool:
        deadline = time.monotonic() + timeout_ms / 1000
        while (left := deadline - time.monotonic()) > 0:
            if self._sock.poll(int(min(left, 0.25) * 1000) + 1):
                return True
            if why := self._refused():
                self._reconnect()
                raise ControlError(f"{self.endpoint}: {why}")
            if self.hypervisor_exited():
                self._reconnect()
                raise ControlError("the hypervisor exited")
        return False

    def _reconnect(self) -> None:
        # A reply that arrives after we gave up must not be taken for the next request's answer.
        self.close()
        self._sock = self._connect()

    def call(self, cmd: str, timeout_s: float | None = None, **args: Any) -> Any:
        self._sock.send(codec.encode(CtlRequest(cmd=cmd, args=args), seq=next(self._seq), vt_ns=0))
        timeout = self.timeout_ms if timeout_s is None else int(timeout_s * 1000)
        if not self._wait_reply(timeout):
            self._reconnect()
            raise ControlError(f"the hypervisor did not answer {cmd!r} within {timeout / 1000:.0f} s")
        try:
            env = codec.decode(self._sock.recv())
        except codec.FrameError as exc:
            raise ControlError(f"bad reply from the hypervisor: {exc}") from None
        reply = env.body
        if not isinstance(reply, CtlReply):
            raise ControlError(f"unexpected reply {type(reply).__name__}")
        if not reply.ok:
            raise ControlError(reply.error)
        return reply.data

    def close(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        self._sock.close()

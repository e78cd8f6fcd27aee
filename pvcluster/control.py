"""The toolstack's side of the control socket, and how it finds a running cluster."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import zmq

from pvcluster.bus import codec
from pvcluster.bus.messages import CtlReply, CtlRequest


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


class ControlClient:
    def __init__(self, endpoint: str, timeout_s: float = 30.0) -> None:
        self.endpoint = endpoint
        self.timeout_ms = int(timeout_s * 1000)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._seq = itertools.count(1)
        self._sock = self._connect()

    @classmethod
    def for_run_dir(cls, run_dir: Path, timeout_s: float = 30.0) -> ControlClient:
        info = read_hypervisor_info(run_dir)
        if info is None:
            raise ControlError(f"no cluster is running in {run_dir} (start one with `pvcluster up`)")
        return cls(info["control"], timeout_s)

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    def call(self, cmd: str, timeout_s: float | None = None, **args: Any) -> Any:
        self._sock.send(codec.encode(CtlRequest(cmd=cmd, args=args), seq=next(self._seq), vt_ns=0))
        timeout = self.timeout_ms if timeout_s is None else int(timeout_s * 1000)
        if not self._sock.poll(timeout):
            # A reply that arrives after we gave up must not be taken for the next request's answer.
            self._sock.close()
            self._sock = self._connect()
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
        self._sock.close()

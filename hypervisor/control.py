"""The toolstack's control socket: one request, one reply; every command validated before it acts.

No command can take the hypervisor down: a command's arguments are checked before it acts, a refusal is a
``CtlReply`` with ``ok=False`` and an error saying what was wrong, and an exception inside a command (a bug) is
caught, traced with its traceback and answered as an internal error, just the same.
"""

from __future__ import annotations

import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import zmq

from hypervisor.domain import Domain
from pvcluster.bus import codec
from pvcluster.bus.messages import CtlReply, CtlRequest
from pvcluster.spec import SpecError, parse_domain_dict

if TYPE_CHECKING:
    from hypervisor.shell import HypervisorProcess

# A request names a command in the toolstack's vocabulary; anything longer is not one.
MAX_COMMAND_LEN = 64


class CommandError(Exception):
    pass


class ControlServer:
    def __init__(self, hvp: HypervisorProcess) -> None:
        self.hvp = hvp
        self.core = hvp.core
        self._seq = 0
        self.commands: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "create": self.cmd_create,
            "list": self.cmd_list,
            "status": self.cmd_status,
            "console": self.cmd_console,
            "dmesg": self.cmd_dmesg,
            "destroy": self.cmd_destroy,
            "pause": self.cmd_pause,
            "unpause": self.cmd_unpause,
            "down": self.cmd_down,
        }

    async def serve(self) -> None:
        """Answer requests until a ``down`` request has been carried out."""
        sock = self.hvp.control
        assert sock is not None
        while True:
            frames = await sock.recv_multipart()
            identity = frames[0]
            # DEALER peers send [payload]; REQ peers send ["", payload]
            envelope, payload = (frames[1:-1], frames[-1]) if len(frames) >= 2 else ([], b"")
            reply, done = await self._handle(payload)
            self._seq += 1
            try:
                frame = codec.encode(reply, seq=self._seq, vt_ns=self.core.clock.now_ns)
            except codec.EncodeError as exc:
                frame = codec.encode(CtlReply(ok=False, data=None, error=f"reply not encodable: {exc}"),
                                     seq=self._seq, vt_ns=self.core.clock.now_ns)
            try:
                await sock.send_multipart([identity, *envelope, frame])
            except zmq.ZMQError as exc:  # the client went away; the command itself was carried out
                self.hvp.log.warning("control.reply_failed", vt_ns=self.core.clock.now_ns, error=str(exc))
            await self.hvp.flush()
            if done:
                return

    async def _handle(self, payload: bytes) -> tuple[CtlReply, bool]:
        try:
            env = codec.decode(payload)
        except codec.FrameError as exc:
            self.hvp.log.warning(f"control.{exc.kind}", vt_ns=self.core.clock.now_ns, detail=exc.detail)
            return CtlReply(ok=False, data=None, error=f"{exc.kind}: {exc.detail}"), False
        if not isinstance(env.body, CtlRequest):
            return CtlReply(ok=False, data=None, error=f"expected CtlRequest, got {type(env.body).__name__}"), False
        req = env.body
        handler = self.commands.get(req.cmd) if len(req.cmd) <= MAX_COMMAND_LEN else None
        if handler is None:
            return CtlReply(ok=False, data=None, error=f"unknown command {req.cmd[:MAX_COMMAND_LEN]!r}"), False
        self.hvp.log.info("control.request", vt_ns=self.core.clock.now_ns, cmd=req.cmd)
        try:
            data = await handler(req.args)
        except CommandError as exc:
            return CtlReply(ok=False, data=None, error=str(exc)), False
        except Exception as exc:  # a bug in a command: the hypervisor answers and carries on
            self.hvp.log.error("control.error", vt_ns=self.core.clock.now_ns, cmd=req.cmd, error=repr(exc),
                               traceback="".join(traceback.format_exception(exc))[-4000:])
            return CtlReply(ok=False, data=None, error=f"internal error in {req.cmd!r}: {exc!r}"), False
        return CtlReply(ok=True, data=data, error=""), req.cmd == "down"

    def _domain(self, args: dict[str, Any]) -> Domain:
        key = args.get("dom")
        if not isinstance(key, (int, str)) or isinstance(key, bool):
            raise CommandError("missing 'dom': a domain id or name")
        dom = self.core.domains.get(key)
        if dom is None:
            shown = key if isinstance(key, int) else key[:64]
            raise CommandError(f"no domain {shown!r}")
        return dom

    async def cmd_create(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            spec = parse_domain_dict(args.get("domain"), pcpus=self.core.spec.hypervisor.pcpus)
        except SpecError as exc:
            raise CommandError(str(exc)) from None
        try:
            dom = self.hvp.create_domain(spec)
        except (ValueError, OSError) as exc:
            raise CommandError(str(exc)) from None
        return {"domid": dom.domid, "name": dom.name}

    async def cmd_list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [d.summary() for d in self.core.domains]

    async def cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.core.status()

    async def cmd_console(self, args: dict[str, Any]) -> list[str]:
        return list(self._domain(args).console)

    async def cmd_dmesg(self, args: dict[str, Any]) -> list[str]:
        return list(self.core.dmesg)

    async def cmd_destroy(self, args: dict[str, Any]) -> dict[str, Any]:
        dom = self._domain(args)
        await self.hvp.destroy(dom)
        return dom.summary()

    async def cmd_pause(self, args: dict[str, Any]) -> dict[str, Any]:
        dom = self._domain(args)
        try:
            self.core.pause(dom)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.hvp.poke()
        return dom.summary()

    async def cmd_unpause(self, args: dict[str, Any]) -> dict[str, Any]:
        dom = self._domain(args)
        try:
            self.core.unpause(dom)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.hvp.poke()
        return dom.summary()

    async def cmd_down(self, args: dict[str, Any]) -> dict[str, Any]:
        for dom in list(self.core.domains):
            await self.hvp.destroy(dom)
        return {"domains": [d.summary() for d in self.core.domains]}

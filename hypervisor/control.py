"""The toolstack's control socket: one request, one reply; every command validated before it acts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import zmq

from hypervisor.domain import Domain, DomainState
from pvcluster.bus import codec
from pvcluster.bus.messages import CtlReply, CtlRequest
from pvcluster.spec import SpecError, parse_domain_dict

if TYPE_CHECKING:
    from hypervisor.server import Hypervisor


class CommandError(Exception):
    pass


class ControlServer:
    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self._seq = 0

    async def serve(self) -> None:
        """Answer requests until a ``down`` request has been carried out."""
        sock = self.hv.control
        assert sock is not None
        while True:
            frames = await sock.recv_multipart()
            identity = frames[0]
            # DEALER peers send [payload]; REQ peers send ["", payload]
            envelope, payload = (frames[1:-1], frames[-1]) if len(frames) >= 2 else ([], b"")
            reply, done = await self._handle(payload)
            self._seq += 1
            try:
                await sock.send_multipart(
                    [identity, *envelope, codec.encode(reply, seq=self._seq, vt_ns=self.hv.conductor.end_ns)]
                )
            except zmq.ZMQError as exc:  # the client went away; the command itself was carried out
                self.hv.log.warning("control.reply_failed", vt_ns=self.hv.conductor.end_ns, error=str(exc))
            if done:
                return

    async def _handle(self, payload: bytes) -> tuple[CtlReply, bool]:
        try:
            env = codec.decode(payload)
        except codec.FrameError as exc:
            self.hv.log.warning(f"control.{exc.kind}", vt_ns=self.hv.conductor.end_ns, detail=exc.detail)
            return CtlReply(ok=False, data=None, error=f"{exc.kind}: {exc.detail}"), False
        if not isinstance(env.body, CtlRequest):
            return CtlReply(ok=False, data=None, error=f"expected CtlRequest, got {type(env.body).__name__}"), False
        req = env.body
        handler = getattr(self, f"cmd_{req.cmd}", None)
        if handler is None:
            return CtlReply(ok=False, data=None, error=f"unknown command {req.cmd!r}"), False
        self.hv.log.info("control.request", vt_ns=self.hv.conductor.end_ns, cmd=req.cmd)
        try:
            data = await handler(req.args)
        except CommandError as exc:
            return CtlReply(ok=False, data=None, error=str(exc)), False
        return CtlReply(ok=True, data=data, error=""), req.cmd == "down"

    def _domain(self, args: dict[str, Any]) -> Domain:
        key = args.get("dom")
        if not isinstance(key, (int, str)) or isinstance(key, bool):
            raise CommandError("missing 'dom': a domain id or name")
        dom = self.hv.table.get(key)
        if dom is None:
            raise CommandError(f"no domain {key!r}")
        return dom

    async def cmd_create(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            spec = parse_domain_dict(args.get("domain"))
        except SpecError as exc:
            raise CommandError(str(exc)) from None
        try:
            dom = self.hv.create_domain(spec)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        return {"domid": dom.domid, "name": dom.name}

    async def cmd_list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [d.summary() for d in self.hv.table]

    async def cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        c = self.hv.conductor
        return {
            "vt_ns": c.end_ns,
            "window": c.index,
            "idle": self.hv.idle,
            "hypercalls": c.hypercalls,
            "domains": [d.summary() for d in self.hv.table],
        }

    async def cmd_console(self, args: dict[str, Any]) -> list[str]:
        return list(self._domain(args).console)

    async def cmd_dmesg(self, args: dict[str, Any]) -> list[str]:
        return list(self.hv.dmesg)

    async def cmd_destroy(self, args: dict[str, Any]) -> dict[str, Any]:
        dom = self._domain(args)
        await self.hv.destroy(dom)
        return dom.summary()

    async def cmd_pause(self, args: dict[str, Any]) -> dict[str, Any]:
        dom = self._domain(args)
        if dom.state is not DomainState.RUNNING:
            raise CommandError(f"domain {dom.domid} is {dom.state.value}, not running")
        dom.move(DomainState.PAUSED, "paused by the toolstack")
        self.hv.printk(f"d{dom.domid} ({dom.name}): paused", dom=dom.domid)
        return dom.summary()

    async def cmd_unpause(self, args: dict[str, Any]) -> dict[str, Any]:
        dom = self._domain(args)
        if dom.state is not DomainState.PAUSED:
            raise CommandError(f"domain {dom.domid} is {dom.state.value}, not paused")
        dom.move(DomainState.RUNNING, "unpaused by the toolstack")
        self.hv.printk(f"d{dom.domid} ({dom.name}): unpaused", dom=dom.domid)
        self.hv._poke()
        return dom.summary()

    async def cmd_down(self, args: dict[str, Any]) -> dict[str, Any]:
        for dom in list(self.hv.table):
            await self.hv.destroy(dom)
        return {"domains": [d.summary() for d in self.hv.table]}

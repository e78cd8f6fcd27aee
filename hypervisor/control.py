"""The toolstack's control socket: one request, one reply; every command validated before it acts.

No command can take the hypervisor down: a command's arguments are checked before it acts, a refusal is a
``CtlReply`` with ``ok=False`` and an error saying what was wrong, and an exception inside a command (a bug) is
caught, traced with its traceback and answered as an internal error, just the same.
"""

from __future__ import annotations

import stat
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import zmq

from hypervisor import saving
from hypervisor.domain import Domain, DomainState
from hypervisor.dump import DumpError, dump_domain
from hypervisor.gdbstub import StubError
from hypervisor.kernel_files import KernelFileError, Requester
from pvcluster import savefile
from pvcluster.abi.xen import ShutdownReason
from pvcluster.bus import codec
from pvcluster.bus.messages import CtlReply, CtlRequest
from pvcluster.faults import ENDING, MAX_SLICE_NS, FaultError, FaultRequest, request
from pvcluster.spec import SpecError, parse_domain_dict

if TYPE_CHECKING:
    from hypervisor.shell import HypervisorProcess

# A request names a command in the toolstack's vocabulary; anything longer is not one.
MAX_COMMAND_LEN = 64
# How long pause/unpause wait for the next step to carry them out, and the most an inject may ask to wait.
WAIT_S = 10.0
MAX_WAIT_S = 600
MAX_PATH_LEN = 4096
# write and search permission on a directory: where a save file may go
_WRITE_DIR = (stat.S_IWUSR | stat.S_IXUSR, stat.S_IWGRP | stat.S_IXGRP, stat.S_IWOTH | stat.S_IXOTH)


class CommandError(Exception):
    pass


class ControlServer:
    def __init__(self, hvp: HypervisorProcess) -> None:
        self.hvp = hvp
        self.core = hvp.core
        self._seq = 0
        # who sent the request being served: a toolstack key's user on tcp, None (this process's user) on ipc; looked
        # up in the user database only by the command that needs it (create), not for every status poll
        self.requester_user: str | None = None
        self.commands: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "create": self.cmd_create,
            "list": self.cmd_list,
            "status": self.cmd_status,
            "console": self.cmd_console,
            "dmesg": self.cmd_dmesg,
            "destroy": self.cmd_destroy,
            "pause": self.cmd_pause,
            "unpause": self.cmd_unpause,
            "shutdown": self.cmd_shutdown,
            "inject": self.cmd_inject,
            "sched": self.cmd_sched,
            "faults": self.cmd_faults,
            "dump": self.cmd_dump,
            "gdb": self.cmd_gdb,
            "down": self.cmd_down,
            "save": self.cmd_save,
            "migrate": self.cmd_migrate,
        }

    async def serve(self) -> None:
        """Answer requests until a ``down`` request has been carried out."""
        sock = self.hvp.control
        assert sock is not None
        secured = self.hvp.secured
        while True:
            frames = await sock.recv_multipart(copy=not secured)
            user_id = None
            if secured:  # the key the ZAP handler admitted this connection with
                user_id = frames[-1].get("User-Id")  # type: ignore[attr-defined]
                frames = [f.bytes for f in frames]  # type: ignore[attr-defined]
            identity = frames[0]
            # DEALER peers send [payload]; REQ peers send ["", payload]
            envelope, payload = (frames[1:-1], frames[-1]) if len(frames) >= 2 else ([], b"")
            if secured and not str(user_id).startswith("toolstack:"):
                # the ZAP handler admits only toolstack keys here; this is the second fence
                self.hvp.log.warning("control.refused", vt_ns=self.core.clock.now_ns, key=str(user_id)[:80])
                reply, done = CtlReply(ok=False, data=None, error="only a toolstack key may send commands"), False
            else:
                self.requester_user = str(user_id)[len("toolstack:"):] if secured else None
                reply, done = await self._handle(payload)
            self.hvp.flush_trace()  # a client that got its answer can read every event that led to it
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
            spec = parse_domain_dict(args.get("domain"), pcpus=self.core.spec.hypervisor.pcpus, check_files=False)
        except SpecError as exc:
            raise CommandError(str(exc)) from None
        requester = Requester.this_process() if self.requester_user is None else Requester.named(self.requester_user)
        try:
            dom = self.hvp.create_domain(spec, requester)
        except (KernelFileError, ValueError, OSError) as exc:
            self.hvp.log.warning("control.create_refused", vt_ns=self.core.clock.now_ns, user=requester.name,
                                 error=str(exc)[:400])
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
        if dom.alive:  # recorded as a fault, so the run can be replayed
            self.core.faults.now(request("destroy", str(dom.domid)), "interactive")
        await self.hvp.destroy(dom)
        return dom.summary()

    async def cmd_pause(self, args: dict[str, Any]) -> dict[str, Any]:
        dom = self._domain(args)
        if not dom.running and dom.state is not DomainState.PAUSED:  # pauses nest, as in Xen
            raise CommandError(f"domain {dom.domid} is {dom.state.value}, not running")
        await self._planned(request("pause", str(dom.domid)), WAIT_S)
        return dom.summary()

    async def cmd_shutdown(self, args: dict[str, Any]) -> dict[str, Any]:
        """xl shutdown / xl reboot: the domain ends with the reason given (``shutdown`` fault, so a replay has it)."""
        dom = self._domain(args)
        reason = args.get("reason", ShutdownReason.poweroff.name)
        if not isinstance(reason, str) or reason not in ShutdownReason.__members__:
            raise CommandError(f"unknown shutdown reason {str(reason)[:32]!r}; reasons: "
                               f"{', '.join(ShutdownReason.__members__)}")
        if not dom.running and dom.state is not DomainState.PAUSED:
            raise CommandError(f"domain {dom.domid} is {dom.state.value}, not running")
        params = {"reason": int(ShutdownReason[reason])}
        await self._planned(request("shutdown", str(dom.domid), None, params), WAIT_S)
        return dom.summary()

    def _sched_info(self) -> dict[str, Any]:
        sched = self.core.scheduler
        return {
            "pcpus": sched.pcpus,
            "slice_ns": sched.slice_ns,
            "window_ns": self.core.clock.window_ns,
            "domains": [{"domid": d.domid, "name": d.name, "state": d.state.value,
                         "vcpus": [{"vcpu": v.vid, "affinity": list(v.affinity), "runstate": v.runstate.value}
                                   for v in d.vcpus]}
                        for d in self.core.domains],
        }

    async def cmd_sched(self, args: dict[str, Any]) -> dict[str, Any]:
        """xl sched-credit: with no ``slice_ns``, the scheduler's parameters (pCPUs, slice, each domain's vCPU
        affinities); with one, set the slice (at least a window, at most MAX_SLICE_NS) through the ``sched`` fault,
        which acts at the next window boundary of a running domain and is recorded for replay."""
        slice_ns = args.get("slice_ns")
        if slice_ns is None:
            return self._sched_info()
        window_ns = self.core.clock.window_ns
        if not isinstance(slice_ns, int) or isinstance(slice_ns, bool) or not window_ns <= slice_ns <= MAX_SLICE_NS:
            raise CommandError(f"slice_ns must be an integer from hypervisor.window_ns ({window_ns}) to "
                               f"{MAX_SLICE_NS} ns, got {str(slice_ns)[:32]}")
        # a slice changes only at a window boundary (where the scheduler decides), so the change rides on a running
        # domain's next window, as every interactive fault does
        carrier = next((d for d in self.core.domains if d.running), None)
        if carrier is None:
            raise CommandError("no domain is running: the slice changes at a running domain's window boundary")
        record = await self._planned(request("sched", carrier.name, None, {"slice_ns": slice_ns}), WAIT_S)
        return {**self._sched_info(), "change": record}

    async def cmd_unpause(self, args: dict[str, Any]) -> dict[str, Any]:
        dom = self._domain(args)
        if dom.state is not DomainState.PAUSED:
            raise CommandError(f"domain {dom.domid} is {dom.state.value}, not paused")
        await self._planned(request("unpause", str(dom.domid)), WAIT_S)
        return dom.summary()

    async def cmd_inject(self, args: dict[str, Any]) -> dict[str, Any]:
        """A fault from the toolstack: one that ends a domain acts at once; the others act at the step given
        (``at_ns``) or the next one, and with ``wait_s`` the reply waits (that long at most) for the outcome."""
        try:
            req = request(args.get("kind"), args.get("target"), args.get("at_ns"), args.get("params"),
                          self.core.fault_kinds)  # the built-in kinds and this cluster's extensions'
        except FaultError as exc:
            raise CommandError(str(exc)) from None
        dom = self._domain({"dom": req.domain})
        if not dom.alive:
            raise CommandError(f"domain {dom.domid} ({dom.name}) is {dom.state.value}: no fault can reach it")
        if req.vcpu is not None and req.vcpu >= len(dom.vcpus):
            raise CommandError(f"domain {dom.name} has {len(dom.vcpus)} vCPUs, no vCPU {req.vcpu}")
        pcpus = self.core.scheduler.pcpus
        if req.params.get("pcpu", 0) >= pcpus:
            raise CommandError(f"there is no pCPU {req.params['pcpu']} (the hypervisor has {pcpus})")
        if req.kind in ENDING and req.at_ns is None:
            record = self.core.faults.now(req, "interactive")
            if req.kind == "destroy":
                await self.hvp.destroy(dom)
            self.hvp.poke()
            return record
        wait_s = args.get("wait_s", 0)
        if not isinstance(wait_s, int | float) or isinstance(wait_s, bool) or not 0 <= wait_s <= MAX_WAIT_S:
            raise CommandError(f"wait_s must be a number of seconds between 0 and {MAX_WAIT_S}")
        return await self._planned(req, float(wait_s))

    async def _planned(self, req: FaultRequest, wait_s: float) -> dict[str, Any]:
        """Plan ``req``; wait up to ``wait_s`` wall seconds for it to act. The reply is its record once it acted,
        else what was planned."""
        fid = self.core.faults.schedule(req, "interactive")
        self.hvp.poke()
        with trio.move_on_after(wait_s):
            while (record := self._record(fid)) is None:
                await self.hvp.faults_done.wait()
            return record
        return {"fid": fid, **req.to_dict(), "origin": "interactive", "outcome": "planned",
                "planned_vt_ns": req.at_ns if req.at_ns is not None else self.core.clock.now_ns}

    def _record(self, fid: int) -> dict[str, Any] | None:
        return next((r for r in reversed(self.core.faults.log) if r["fid"] == fid), None)

    async def cmd_faults(self, args: dict[str, Any]) -> dict[str, Any]:
        """Every fault that acted (with its outcome), and those still planned."""
        pending = [{"fid": p.fid, **p.request.to_dict(), "origin": p.origin, "planned_vt_ns": p.at_ns}
                   for p in self.core.faults.pending if p.origin != "end"]
        return {"vt_ns": self.core.clock.now_ns, "done": list(self.core.faults.log), "pending": pending}

    async def cmd_dump(self, args: dict[str, Any]) -> dict[str, Any]:
        """pvcluster dump DOM FILE: the domain's ELF core, written by the hypervisor at a window boundary."""
        dom = self._domain(args)
        path, force = args.get("path"), args.get("force", False)
        if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH_LEN or "\0" in path:
            raise CommandError(f"'path' must be an absolute file name of at most {MAX_PATH_LEN} characters")
        if not isinstance(force, bool):
            raise CommandError("'force' must be true or false")
        requester = None if self.requester_user is None else Requester.named(self.requester_user)
        try:
            return await dump_domain(self.hvp, dom, Path(path), force, requester)
        except DumpError as exc:
            raise CommandError(str(exc)) from None

    async def cmd_gdb(self, args: dict[str, Any]) -> dict[str, Any]:
        """pvcluster gdb DOM [--port N]: serve the GDB remote protocol for the domain on 127.0.0.1 (hypervisor/
        gdbstub.py); the reply names the port (0 asks for any free one). A domain has one stub: asked again, the
        same one is named."""
        dom = self._domain(args)
        port = args.get("port", 0)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise CommandError("'port' must be a TCP port number, 0..65535 (0: any free port)")
        try:
            return await self.hvp.gdb.start(dom, port)
        except StubError as exc:
            raise CommandError(str(exc)) from None

    async def cmd_save(self, args: dict[str, Any]) -> dict[str, Any]:
        """Save the whole cluster at the next window boundary (``at_ns``: the first at or after that virtual time,
        waited for ``wait_s`` at most) to ``path``, a file the hypervisor's user may write (hypervisor/saving.py)."""
        path = args.get("path")
        if not isinstance(path, str) or not path or len(path) > 4096 or "\0" in path:
            raise CommandError("missing 'path': the save file to write")
        target = Path(path)
        self._check_save_target(target)
        at_ns = args.get("at_ns")
        if at_ns is not None and (not isinstance(at_ns, int) or isinstance(at_ns, bool) or not 0 <= at_ns < 1 << 63):
            raise CommandError("at_ns must be a virtual time in ns")
        wait_s = args.get("wait_s", WAIT_S)
        if not isinstance(wait_s, int | float) or isinstance(wait_s, bool) or not 0 <= wait_s <= MAX_WAIT_S:
            raise CommandError(f"wait_s must be a number of seconds between 0 and {MAX_WAIT_S}")
        try:
            return await saving.save(self.hvp, target, at_ns, float(wait_s))
        except (saving.SaveError, TimeoutError) as exc:
            raise CommandError(f"cannot save: {exc}") from None
        except OSError as exc:
            raise CommandError(f"cannot write {path[:200]}: {exc.strerror or exc}") from None

    def _check_save_target(self, target: Path) -> None:
        """The hypervisor writes the file: only where the requester may write (a remote toolstack user is not the
        hypervisor's user), and never over a file that is not a save file already."""
        if not target.is_absolute():
            raise CommandError(f"{str(target)[:200]!r}: give an absolute path")
        try:
            st = target.parent.stat()
        except OSError as exc:
            raise CommandError(f"{str(target.parent)[:200]}: {exc.strerror or exc}") from None
        requester = Requester.this_process() if self.requester_user is None else Requester.named(self.requester_user)
        if not stat.S_ISDIR(st.st_mode) or not requester.may(st, _WRITE_DIR):
            raise CommandError(f"{str(target.parent)[:200]}: not a directory {requester.name} may write in")
        try:
            if target.is_symlink() or (target.exists() and not target.is_file()):
                raise CommandError(f"{str(target)[:200]}: exists and is not a regular file")
            if target.exists():
                with open(target, "rb") as fh:
                    if fh.read(len(savefile.MAGIC)) != savefile.MAGIC:
                        raise CommandError(f"{str(target)[:200]}: exists and is not a save file: not overwritten")
        except OSError as exc:
            raise CommandError(f"{str(target)[:200]}: {exc.strerror or exc}") from None

    async def cmd_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        """Move a domain to a new process at the next boundary: a local one, or (``to``) one that joins from that
        host (hypervisor/saving.py)."""
        dom = self._domain(args)
        to = args.get("to")
        if to is not None and (not isinstance(to, str) or not to or len(to) > 255):
            raise CommandError("'to' must be a host name")
        try:
            return await saving.migrate(self.hvp, dom, to)
        except saving.SaveError as exc:
            raise CommandError(f"cannot migrate {dom.name}: {exc}") from None

    async def cmd_down(self, args: dict[str, Any]) -> dict[str, Any]:
        for dom in list(self.core.domains):
            await self.hvp.destroy(dom)
        return {"domains": [d.summary() for d in self.core.domains]}

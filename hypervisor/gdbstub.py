"""A GDB remote-protocol stub per domain, served by the hypervisor on a loopback TCP port (``pvcluster gdb DOM``).

Where it runs, and why: inside the hypervisor process, as trio tasks beside the window loop. Everything it needs is
there (holding the cluster at a boundary, asking the domain's process, the reports that say a vCPU stopped), so a
stop costs no extra hop, and a debugger that goes away (its connection closes) releases the cluster at once. The
``pvcluster gdb`` verb only asks the hypervisor to open the port (control command ``gdb``) and prints it.

Only loopback: the port is bound on 127.0.0.1 and nothing else can be asked for, and a connection is served only
when its peer socket belongs to the hypervisor's own user (looked up in ``/proc/net/tcp``, as identd does), which
is what the control socket admits on ipc. A cluster on authenticated tcp is debugged from its hypervisor's host.

Virtual time: gdb's all-stop mode maps onto holding the whole cluster at a window boundary (hypervisor/boundary.py).
While gdb has the domain stopped the cluster is held, so no virtual time passes anywhere; ``c`` / ``s`` / ``vCont``
arm the domain's process (``DebugArm``: breakpoints as Unicorn code hooks, a one-instruction step) and release the
hold; a vCPU that reaches a breakpoint, or has made its step, ends its domain's window at that instant and the
report says so (``WindowDone.debug_stops``); the shell hands it to ``on_report``, which takes the hold again before
the next window can open, and once every domain has reported (the boundary) gdb is told. Ctrl-C holds at the next
boundary. One thread per vCPU (thread id = vCPU + 1); memory by virtual address through the selected thread's page
tables; an unmapped address answers E14. Every packet is checked: a bad one is answered with an error (or ignored),
never with a dead hypervisor, and a session's failure ends that session only.

Traced on the domain: ``gdb.attach``, ``gdb.stop`` (why, vcpu, eip), ``gdb.detach``.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any

import trio

from hypervisor.boundary import AskError
from pvcluster.bus.messages import (
    DebugAck,
    DebugArm,
    DebugData,
    DebugRead,
    DebugRegs,
    DebugRegsReq,
    DebugStop,
    DebugWrite,
    WindowDone,
)
from pvcluster.gdbproto import MAX_PACKET, PacketReader, frame, hex_le32, parse_hex, parse_le32, parse_thread
from pvcluster.gdbregs import GDB_REGS

if TYPE_CHECKING:
    from hypervisor.domain import Domain
    from hypervisor.shell import HypervisorProcess

HOST = "127.0.0.1"
SIGINT, SIGTRAP, SIGKILL = 2, 5, 9
MAX_BREAKPOINTS = 64
TARGET_XML = (b'<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
              b"<target><architecture>i386</architecture></target>")
# Wall seconds between looks at whether the domain still lives while gdb waits for it (nothing simulated).
GONE_POLL_S = 0.2


class StubError(Exception):
    pass


def peer_uid(sock: socket.socket) -> int | None:
    """The uid owning the other end of a loopback TCP connection (its /proc/net/tcp entry), or None."""
    try:
        here, there = sock.getsockname(), sock.getpeername()
        with open("/proc/net/tcp", encoding="ascii") as fh:
            lines = fh.read().splitlines()[1:]
    except OSError:
        return None

    def key(addr: tuple[str, int]) -> str:
        return f"{socket.inet_aton(addr[0])[::-1].hex().upper()}:{addr[1]:04X}"

    for line in lines:
        cols = line.split()
        if len(cols) > 7 and cols[1] == key(there) and cols[2] == key(here):
            return int(cols[7])
    return None


class GdbStubs:
    """The stubs of the cluster, by domain (one each): started by the ``gdb`` control command."""

    def __init__(self, hvp: HypervisorProcess) -> None:
        self.hvp = hvp
        self.by_dom: dict[int, GdbStub] = {}

    async def start(self, dom: Domain, port: int) -> dict[str, Any]:
        stub = self.by_dom.get(dom.domid)
        if stub is not None:
            return stub.info()
        if not dom.alive:
            raise StubError(f"domain {dom.domid} ({dom.name}) is {dom.state.value}")
        try:
            listeners = await trio.open_tcp_listeners(port, host=HOST)
        except OSError as exc:
            raise StubError(f"cannot listen on {HOST}:{port}: {exc.strerror or exc}") from None
        stub = GdbStub(self.hvp, dom, listeners[0])
        self.by_dom[dom.domid] = stub
        assert self.hvp.nursery is not None
        self.hvp.nursery.start_soon(self._serve, stub)
        return stub.info()

    async def _serve(self, stub: GdbStub) -> None:
        try:
            await stub.serve()
        finally:
            self.by_dom.pop(stub.dom.domid, None)

    def on_report(self, dom: Domain, done: Any) -> None:
        """A domain's report, before the core takes it: a vCPU the debugger stopped holds the cluster now."""
        stub = self.by_dom.get(dom.domid)
        if stub is not None and isinstance(done, WindowDone) and done.debug_stops:
            stub.stopped(done.debug_stops[0])


class GdbStub:
    def __init__(self, hvp: HypervisorProcess, dom: Domain, listener: trio.SocketListener) -> None:
        self.hvp = hvp
        self.dom = dom
        self.listener = listener
        self.session: Session | None = None

    def info(self) -> dict[str, Any]:
        port = self.listener.socket.getsockname()[1]
        return {"dom": self.dom.domid, "name": self.dom.name, "host": HOST, "port": port}

    async def serve(self) -> None:
        """One debugger at a time, until the domain ends."""
        async with self.listener:
            while self.dom.alive:
                stream = None
                with trio.move_on_after(GONE_POLL_S):  # look at the domain again now and then
                    stream = await self.listener.accept()
                if stream is None:
                    continue
                uid = peer_uid(stream.socket)  # type: ignore[arg-type]
                if uid != os.getuid():
                    self.dom.trace.warning("gdb.refused", vt_ns=self.hvp.core.clock.now_ns, uid=uid)
                    await stream.aclose()
                    continue
                self.session = Session(self, stream)
                try:
                    await self.session.run()
                except Exception as exc:  # a session's bug ends the session, never the hypervisor
                    self.hvp.log.error("gdb.error", vt_ns=self.hvp.core.clock.now_ns, dom=self.dom.domid,
                                       error=repr(exc)[:400])
                finally:
                    await self.session.close()
                    self.session = None

    def stopped(self, stop: DebugStop) -> None:
        if self.session is not None:
            self.session.stopped(stop)


class Session:
    """One gdb connection: all-stop, the cluster held whenever gdb has the domain stopped."""

    def __init__(self, stub: GdbStub, stream: trio.SocketStream) -> None:
        self.stub = stub
        self.hvp = stub.hvp
        self.dom = stub.dom
        self.stream = stream
        self.holding = False
        self.running = False
        self.breakpoints: set[int] = set()
        self.g_vcpu = 0  # the thread registers and memory are read through (Hg)
        self.c_vcpu = -1  # the thread a plain step steps (Hc); -1: the one that stopped
        self.stop_vcpu = 0
        self.pending: DebugStop | None = None
        self.send_events, self.events = trio.open_memory_channel[tuple[str, Any]](1024)
        self.detached = False

    # -- the hold --------------------------------------------------------------------------------------------

    def _hold(self) -> None:
        if not self.holding:
            self.holding = True
            self.hvp.boundary.hold()

    def _release(self) -> None:
        if self.holding:
            self.holding = False
            self.hvp.boundary.release()

    def stopped(self, stop: DebugStop) -> None:
        """From the shell, as the report arrives: hold before the next window opens."""
        if not (0 <= stop.vcpu < len(self.dom.vcpus) and 0 <= stop.eip < 1 << 32 and stop.why in ("breakpoint",
                                                                                                  "step")):
            return  # the domain process's word: one that makes no sense stops nothing
        if self.running and self.pending is None:
            self._hold()
            self.pending = stop
            try:
                self.send_events.send_nowait(("stop", stop))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the session is ending (its close releases the hold) or swamped (an interrupt reports this)

    # -- the connection ---------------------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _reader(self) -> None:
        reader = PacketReader()
        try:
            async for data in self.stream:
                for event in reader.feed(bytes(data)):
                    await self.send_events.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        await self.send_events.send(("eof", b""))

    async def _watch(self) -> None:
        while self.dom.alive:
            await trio.sleep(GONE_POLL_S)
        await self.send_events.send(("gone", b""))

    async def run(self) -> None:
        self._hold()
        vt = await self.hvp.boundary.settled()
        self.dom.trace.event("gdb.attach", vt_ns=vt, vcpus=len(self.dom.vcpus))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader)
            nursery.start_soon(self._watch)
            await self._loop()
            nursery.cancel_scope.cancel()

    async def _loop(self) -> None:
        async for kind, data in self.events:
            if kind == "eof":
                self._end("disconnected")
                return
            if kind == "gone":  # exited (shut down) or killed (crashed, destroyed)
                dead = self.dom.state.value == "dead" and self.dom.shutdown_reason is not None
                await self._send(frame(b"W00" if dead else b"X%02x" % SIGKILL))
                self._end("domain ended")
                return
            if kind == "packet":
                await self._send(b"+")
                if self.running:
                    continue  # all-stop: nothing but an interrupt is asked of a running target
                reply = await self._packet(data)
                if reply is not None:
                    await self._send(frame(reply))
                if self.detached:
                    return
            elif kind == "bad":  # a packet that did not parse (its checksum): gdb sends it again
                await self._send(b"-")
            elif kind in ("interrupt", "stop") and self.running:
                await self._send(frame(await self._halt()))

    def _end(self, why: str) -> None:
        if not self.detached:
            self.detached = True
            self.dom.trace.event("gdb.detach", vt_ns=self.hvp.core.clock.now_ns, why=why)

    async def close(self) -> None:
        """However the session ended: the domain's breakpoints off, the cluster released, the socket closed."""
        self._end("closed")
        if self.dom.alive:
            if not self.holding:
                self._hold()
            with trio.move_on_after(self.hvp.unresponsive_s):
                await self.hvp.boundary.settled()
                try:
                    await self.hvp.boundary.ask(self.dom, DebugArm([]), DebugAck)
                except AskError as exc:  # its breakpoints stay armed: say so, the session ends all the same
                    self.dom.trace.warning("gdb.disarm_failed", vt_ns=self.hvp.core.clock.now_ns,
                                           error=str(exc)[:200])
        self._release()
        await self.stream.aclose()

    # -- stopping and resuming ----------------------------------------------------------------------------

    async def _halt(self) -> bytes:
        """The domain stopped (a breakpoint, a step) or gdb interrupted it: at the boundary, what gdb is told."""
        self._hold()
        await self.hvp.boundary.settled()
        self.running = False
        stop, self.pending = self.pending, None
        if stop is None:
            vcpu, why, sig = self.stop_vcpu, "interrupt", SIGINT
            eip = await self._eip(vcpu)
            vt = self.hvp.core.clock.now_ns
        else:
            vcpu, why, sig, eip, vt = stop.vcpu, stop.why, SIGTRAP, stop.eip, stop.vt_ns
        self.stop_vcpu = self.g_vcpu = vcpu
        self.dom.trace.event("gdb.stop", vt_ns=vt, vcpu=vcpu, why=why, eip=eip)
        return self._stop_reply(sig, why)

    def _stop_reply(self, sig: int, why: str = "") -> bytes:
        extra = b"swbreak:;" if why == "breakpoint" else b""
        return b"T%02xthread:%x;%s" % (sig, self.stop_vcpu + 1, extra)

    async def _eip(self, vcpu: int) -> int:
        try:
            regs = await self.hvp.boundary.ask(self.dom, DebugRegsReq(vcpu), DebugRegs)
            return regs.vcpus[0].regs[GDB_REGS.index("eip")]
        except (AskError, IndexError):
            return 0

    async def _resume(self, step: int) -> bytes | None:
        await self.hvp.boundary.ask(self.dom, DebugArm(sorted(self.breakpoints), step), DebugAck)
        self.pending = None
        self.running = True
        self._release()
        return None

    # -- packets ----------------------------------------------------------------------------------------------

    async def _packet(self, data: bytes) -> bytes | None:
        try:
            return await self._dispatch(data)
        except (ValueError, UnicodeDecodeError):
            return b"E01"
        except AskError as exc:
            self.hvp.log.warning("gdb.ask_failed", vt_ns=self.hvp.core.clock.now_ns, dom=self.dom.domid,
                                 error=str(exc)[:200])
            return b"E01"

    def _vcpu(self, tid: int) -> int:
        if not 1 <= tid <= len(self.dom.vcpus):
            raise ValueError("no such thread")
        return tid - 1

    async def _dispatch(self, data: bytes) -> bytes | None:
        boundary = self.hvp.boundary
        head = data[:1]
        if data.startswith(b"qSupported"):
            return b"PacketSize=%x;qXfer:features:read+;swbreak+;hwbreak+;vContSupported+" % MAX_PACKET
        if data.startswith(b"qXfer:features:read:target.xml:"):
            off, length = (parse_hex(x) for x in data.rsplit(b":", 1)[1].split(b","))
            chunk = TARGET_XML[off : off + length]
            return (b"l" if off + length >= len(TARGET_XML) else b"m") + chunk
        if data == b"?":
            return self._stop_reply(SIGTRAP)
        if data == b"qC":
            return b"QC%x" % (self.stop_vcpu + 1)
        if data == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % (v + 1) for v in range(len(self.dom.vcpus)))
        if data == b"qsThreadInfo":
            return b"l"
        if data.startswith(b"qThreadExtraInfo,"):
            vcpu = self._vcpu(parse_thread(data.split(b",", 1)[1]))
            return f"vCPU {vcpu}".encode().hex().encode()
        if data == b"qAttached":
            return b"1"
        if data.startswith(b"H") and len(data) > 2:
            tid = parse_thread(data[2:])
            vcpu = self.stop_vcpu if tid in (0, -1) else self._vcpu(tid)
            if data[1:2] == b"g":
                self.g_vcpu = vcpu
            elif data[1:2] == b"c":
                self.c_vcpu = -1 if tid in (0, -1) else vcpu
            else:
                return b"E01"
            return b"OK"
        if head == b"T":
            self._vcpu(parse_thread(data[1:]))
            return b"OK"
        if data == b"g":
            regs = await boundary.ask(self.dom, DebugRegsReq(self.g_vcpu), DebugRegs)
            return hex_le32(regs.vcpus[0].regs)
        if head == b"G":
            values = parse_le32(data[1:])[: len(GDB_REGS)]
            if len(values) != len(GDB_REGS):
                return b"E01"
            return await self._write(DebugWrite(self.g_vcpu, 0, b"", values))
        if head == b"p":
            n = parse_hex(data[1:])
            if n >= len(GDB_REGS):
                return b"E01"
            regs = await boundary.ask(self.dom, DebugRegsReq(self.g_vcpu), DebugRegs)
            return hex_le32([regs.vcpus[0].regs[n]])
        if head == b"P":
            num, _, value = data[1:].partition(b"=")
            n = parse_hex(num)
            if n >= len(GDB_REGS):
                return b"E01"
            values = list((await boundary.ask(self.dom, DebugRegsReq(self.g_vcpu), DebugRegs)).vcpus[0].regs)
            values[n] = parse_le32(value)[0]
            return await self._write(DebugWrite(self.g_vcpu, 0, b"", values))
        if head == b"m":
            addr, length = (parse_hex(x) for x in data[1:].split(b","))
            if length > MAX_PACKET // 2:
                return b"E01"
            got = await self._read(addr, length)
            return got.hex().encode() if got else b"E14"
        if head == b"M":
            where, _, payload = data[1:].partition(b":")
            addr, length = (parse_hex(x) for x in where.split(b","))
            raw = bytes.fromhex(payload.decode("ascii"))
            if len(raw) != length:
                return b"E01"
            return await self._write(DebugWrite(self.g_vcpu, addr, raw)) if raw else b"OK"
        if head in (b"Z", b"z") and data[1:2] in (b"0", b"1"):
            _, addr_text, _kind = data.split(b",")
            addr = parse_hex(addr_text)
            if head == b"Z":
                if addr not in self.breakpoints and len(self.breakpoints) >= MAX_BREAKPOINTS:
                    return b"E28"
                self.breakpoints.add(addr)
            else:
                self.breakpoints.discard(addr)
            return b"OK"
        if head in (b"c", b"C"):
            return await self._resume(-1)
        if head in (b"s", b"S"):
            return await self._resume(self.stop_vcpu if self.c_vcpu == -1 else self.c_vcpu)
        if data == b"vCont?":
            return b"vCont;c;C;s;S"
        if data.startswith(b"vCont;"):
            return await self._resume(self._vcont_step(data))
        if data in (b"D", b"k") or data.startswith(b"D;") or data.startswith(b"vKill"):
            self.breakpoints.clear()
            await boundary.ask(self.dom, DebugArm([]), DebugAck)
            self._end("detach" if head == b"D" else "kill")
            return b"OK" if head != b"k" else None
        return b""  # not supported: gdb then does without

    def _vcont_step(self, data: bytes) -> int:
        """The vCPU a vCont steps (-1: none; all-stop, so every other action is a continue)."""
        for action in data.split(b";")[1:]:
            verb, _, tid = action.partition(b":")
            if verb[:1] in (b"s", b"S"):
                thread = parse_thread(tid) if tid else -1
                return self.stop_vcpu if thread in (0, -1) else self._vcpu(thread)
            if verb[:1] not in (b"c", b"C", b"t"):
                raise ValueError("unknown vCont action")
        return -1

    async def _read(self, addr: int, length: int) -> bytes:
        """As much of [addr, addr+length) as is mapped, from the start (gdb reads past the end of mappings)."""
        got = await self.hvp.boundary.ask(self.dom, DebugRead(self.g_vcpu, addr, length), DebugData)
        if got.data is not None:
            return got.data
        out = b""
        while len(out) < length:  # page by page, to the first hole
            n = min(length - len(out), 4096 - ((addr + len(out)) & 4095))
            part = await self.hvp.boundary.ask(self.dom, DebugRead(self.g_vcpu, addr + len(out), n), DebugData)
            if part.data is None:
                break
            out += part.data
        return out

    async def _write(self, req: DebugWrite) -> bytes:
        ack = await self.hvp.boundary.ask(self.dom, req, DebugAck)
        return b"OK" if ack.ok else b"E14"


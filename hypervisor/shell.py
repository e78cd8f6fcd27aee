"""The hypervisor process's transport shell: sockets, domain processes and the control socket around the core.

Everything simulated happens in ``hypervisor.core.Hypervisor``; this module only moves bytes and processes. It
decodes what arrives on the domain bus and hands it to the core, sends what the core put in its outbox, ends the
processes the core wants ended, runs the window loop (``core.step`` out, reports in), and watches domain processes.

Wall-clock time judges only liveness: a domain that stays silent for ``hypervisor.unresponsive_s`` seconds of the
hypervisor's own running time while a window waits for it is crashed. Time the hypervisor process itself was not
running (stopped, or starved) is not counted against anyone: the silence clock advances at most a tick per tick.
One long-lived task (``liveness_watch``) keeps that clock, so waiting for a window's reports sets up no timer, and
the bus reader steps the clock itself when a report completes a window (``advance``): the per-window path is one
wake-up of one task, a receive, the core's work and a send per participant.

The trace is buffered (pvcluster.trace.TraceFile) and flushed at each window step, on every liveness tick, before
a control reply or a rejected frame's Error goes out (whoever got the answer can read the event behind it), and on
every way out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import zmq

from hypervisor import saving
from hypervisor.boundary import Boundary
from hypervisor.core import Hypervisor
from hypervisor.coredumps import Coredumps
from hypervisor.domain import Domain, DomainState
from hypervisor.errors import ReportError
from hypervisor.gdbstub import GdbStubs
from hypervisor.kernel_files import Requester, kernel_image
from pvcluster import launch
from pvcluster.bus import codec
from pvcluster.bus.endpoints import Endpoints
from pvcluster.bus.messages import Error, Hello, Retire, Stop
from pvcluster.bus.zsock import TrioSocket
from pvcluster.spec import ClusterSpec, DomainSpec
from pvcluster.trace import no_flush as trace_no_flush

STOP_GRACE_S = 5.0
# A domain process that has not built its guest after this much of the hypervisor's running time is crashed.
BUILD_TIMEOUT_S = 120.0
# The liveness clock's tick, and the most one tick may add to a silence (so a hypervisor that was stopped for a
# minute charges its domains at most this much for that minute).
TICK_S = 0.25
MAX_TICK_CHARGE_S = 2 * TICK_S
# How long each domain in BUILDING has waited, by (domid, joined yet)
Waited = dict[tuple[int, bool], float]



class HypervisorProcess:
    def __init__(self, spec: ClusterSpec, run_dir: Path, log: Any, replay: list[dict[str, Any]] | None = None,
                 flush_trace: Callable[[], None] = trace_no_flush, restore: dict[str, Any] | None = None) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.log = log
        self.flush_trace = flush_trace  # writes out the buffered trace (pvcluster.trace.TraceFile.flush)
        # restore: a save file's image (pvcluster/savefile.py): the core is the saved one, not a new one
        self.restore_image = restore
        self.core = saving.load_core(restore, log, self) if restore is not None else Hypervisor(spec, log)
        for record in replay or []:
            self.core.faults.replay(record)
        self.core.faults.on_record = self._record_fault
        self.faults_done = trio.Event()
        self.unresponsive_s = spec.hypervisor.unresponsive_s
        self.ctx = zmq.Context()
        self.endpoints = Endpoints.for_spec(spec, run_dir)
        # On tcp both sockets are CurveZMQ servers and every peer is authenticated by its key (hypervisor/auth.py)
        self.secured = self.endpoints.transport == "tcp"
        self.keys_dir = spec.keys_dir(run_dir)
        self.auth: Any = None  # hypervisor.auth.Authenticator, on tcp
        # remote domains stopped (or crashed) whose goodbye (Leaving) has not come yet: seconds waited so far
        self._leaving: dict[int, float] = {}
        self.bus: TrioSocket | None = None
        self.control: TrioSocket | None = None
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.changed = trio.Event()
        self._advancing = False  # advance() is running (it may wait on a full send queue)
        self._send_seq = 0
        self.nursery: trio.Nursery | None = None
        # The open window's silence, in seconds of this process's running time, and when it started counting.
        self._silence = 0.0
        self._silence_from = time.monotonic()
        # Holding the clock at a window boundary for the toolstack's dump, save, migrate and debugger
        self.boundary = Boundary(self)
        self.coredumps = Coredumps(self)
        self.gdb = GdbStubs(self)  # the gdb stubs, by domain (`pvcluster gdb`)
        # processes joining as a restored or migrating domain, until they have its state (hypervisor/saving.py)
        self.joiners = saving.Joiners(self)
        self._last_frame: Any = None

    def poke(self) -> None:
        """Something outside the bus reader changed (a control command, a process that exited, a liveness verdict):
        the window loop looks again whether the clock can step."""
        self.changed.set()
        self.changed = trio.Event()

    # -- sockets ---------------------------------------------------------------------------------------------

    def bind(self) -> None:
        bus = self.ctx.socket(zmq.ROUTER)
        bus.setsockopt(zmq.ROUTER_MANDATORY, 1)
        bus.setsockopt(zmq.LINGER, 0)
        # Frames up to twice the codec limit are read and answered "oversized"; beyond that ZeroMQ drops the
        # peer before a byte reaches us, so no peer can make the hypervisor buffer more than this.
        bus.setsockopt(zmq.MAXMSGSIZE, 2 * codec.MAX_FRAME_BYTES)
        control = self.ctx.socket(zmq.ROUTER)
        control.setsockopt(zmq.LINGER, 0)
        control.setsockopt(zmq.MAXMSGSIZE, 2 * codec.MAX_FRAME_BYTES)
        self._secure(bus, control)
        self.endpoints = self.endpoints.bind(bus, control)
        self.bus, self.control = TrioSocket(bus), TrioSocket(control)
        info: dict[str, Any] = {"pid": os.getpid(), "bus": self.endpoints.bus, "control": self.endpoints.control,
                                "transport": self.endpoints.transport}
        if self.secured:
            info["keys"] = str(self.keys_dir)
        tmp = self.run_dir / "hypervisor.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(info))
        tmp.replace(self.run_dir / "hypervisor.json")
        self.log.info("hypervisor.listening", vt_ns=0, **info)

    def _secure(self, bus: zmq.Socket, control: zmq.Socket) -> None:
        """tcp: CurveZMQ servers with a ZAP handler that admits only known keys, each to its own socket. ipc: only
        this process's user may connect (the run directory is 0700 as well)."""
        from hypervisor import auth
        from pvcluster.keys import KeyStore

        if not self.secured:
            auth.restrict_ipc(bus)
            auth.restrict_ipc(control)
            return
        self.auth = auth.Authenticator(self.ctx, KeyStore(self.keys_dir), self.log, lambda: self.core.clock.now_ns)
        self.auth.secure(bus, "bus")
        self.auth.secure(control, "control")

    async def send(self, identity: bytes, body: Any, sock: TrioSocket | None = None) -> bool:
        """Send one message; False if it could not be encoded (codec.EncodeError) or the peer is gone."""
        sock = sock or self.bus
        assert sock is not None
        self._send_seq += 1
        frame = codec.encode(body, seq=self._send_seq, vt_ns=self.core.clock.now_ns)
        try:
            await sock.send_multipart([identity, frame])
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone; its watcher reports the death
            peer = identity.split(b"-")[0][:16].decode(errors="replace")  # "domN": not the secret part
            self.log.warning("bus.send_failed", vt_ns=self.core.clock.now_ns, peer=peer, error=str(exc),
                             msg=type(body).__name__)
            return False
        return True

    def _record_fault(self, record: dict[str, Any]) -> None:
        """Every fault that acted goes to ``faults.jsonl`` at once: the run's record for `pvcluster faults`,
        `pvcluster check` and replay, complete however the run ends."""
        with open(self.run_dir / "faults.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.faults_done.set()
        self.faults_done = trio.Event()

    def _signal(self, dom: Domain, what: str, wall_ms: int) -> None:
        """A fault's signal to ``dom``'s process: kill it now, or stop it for ``wall_ms`` of wall time. A remote
        process is not ours to signal: it is told to stop (kill), or the fault is traced as not carried out."""
        if dom.spec.placement == "remote":
            if what == "kill":
                self._stop_remote(dom, "killed")
            else:
                dom.trace.warning("fault.not_carried_out", vt_ns=self.core.clock.now_ns, signal=what,
                                  reason="the domain's process runs elsewhere: it cannot be signalled")
            return
        proc = self.procs.get(dom.domid)
        if proc is None or proc.poll() is not None:
            return
        if what == "kill":
            proc.kill()
        elif what == "stop" and self.nursery is not None:
            os.kill(proc.pid, signal.SIGSTOP)
            self.nursery.start_soon(self._resume, proc, wall_ms)

    @staticmethod
    async def _resume(proc: subprocess.Popen[bytes], wall_ms: int) -> None:
        await trio.sleep(wall_ms / 1000)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)

    async def flush(self) -> None:
        """Carry out what the core asked for, and have the window loop look at the new state."""
        await self.carry_out()
        self.poke()

    async def carry_out(self) -> None:
        """Carry out what the core asked for: messages to domain processes, processes to end or signal."""
        core = self.core
        while core.outbox or core.to_kill or core.signals or core.to_launch or core.coredumps:
            dumps, core.coredumps = core.coredumps, []
            for dom in dumps:  # first: what ends their processes waits for the dump (coredump.py)
                self.coredumps.start(dom)
            launches, core.to_launch = core.to_launch, []
            for dom in launches:  # restarts the core decided (life-cycle actions, kexec, kdump)
                try:
                    self._launch(dom)
                except OSError:
                    pass  # the domain was crashed with the cause (_launch), which its trace has
            signals, core.signals = core.signals, []
            for dom, what, wall_ms in signals:
                self._signal(dom, what, wall_ms)
            outbox, core.outbox = core.outbox, []
            for dom, body in outbox:
                if self.coredumps.defer(dom, body):
                    continue
                try:
                    await self.send(dom.identity, body)
                except codec.EncodeError as exc:  # something about this domain cannot be said on the wire
                    core.crash(dom, f"hypervisor could not encode {type(body).__name__}: {exc}", exc=exc)
            kills, core.to_kill = core.to_kill, []
            for dom in kills:
                if self.coredumps.defer(dom, None):
                    continue
                if dom.spec.placement == "remote":
                    self._stop_remote(dom, "crashed")
                    continue
                proc = self.procs.get(dom.domid)
                if proc is not None and proc.poll() is None:
                    proc.terminate()

    def _stop_remote(self, dom: Domain, reason: str) -> None:
        """A remote process cannot be terminated from here: it is told to stop, and is taken for gone once it
        says goodbye or after STOP_GRACE_S (``_judge_leaving``)."""
        if dom.identity:
            self.core.outbox.append((dom, Stop(reason=reason)))
            self._leaving.setdefault(dom.domid, 0.0)

    async def _reject(self, identity: bytes, kind: str, detail: str, seq: int, **fields: Any) -> None:
        self.log.warning(f"bus.{kind}", vt_ns=self.core.clock.now_ns, detail=detail, ref_seq=seq, **fields)
        self.flush_trace()  # the peer told of its bad frame finds the event in the trace
        await self.send(identity, Error(kind=kind, detail=detail, ref_seq=seq))

    # -- the domain bus --------------------------------------------------------------------------------------

    async def bus_reader(self) -> None:
        assert self.bus is not None
        while True:
            frames = await self.bus.recv_multipart(copy=not self.secured)
            user_id = None
            if self.secured:  # the ZAP handler's verdict on the connection this message came over
                user_id = frames[-1].get("User-Id")  # type: ignore[attr-defined]
                self._last_frame = frames[-1]  # its peer's address, should a joiner need it (_peer_address)
                frames = [f.bytes for f in frames]  # type: ignore[attr-defined]
            await self.on_frames(frames, user_id)
            await self.carry_out()
            await self.advance()

    async def on_frames(self, frames: list[bytes], user_id: str | None = None) -> None:
        """One message from the bus. ``user_id``: on tcp, the key the connection authenticated with."""
        identity = frames[0]
        dom = self.core.domains.by_identity(identity)
        # Identity first: a peer that has not joined learns nothing about its frames but whether it may join.
        if dom is None:
            await self._join(identity, frames, user_id)
            return
        if self.secured and user_id != f"domain:{dom.name}":
            # another connection took over this identity: its key is not the domain's
            await self._reject(identity, "impersonation", "this connection's key is not the domain's", -1,
                               dom=dom.domid, key=str(user_id)[:80])
            return
        if len(frames) != 2:
            await self._reject(identity, "malformed", f"expected 1 payload frame, got {len(frames) - 1}", -1,
                               dom=dom.domid)
            return
        try:
            env = codec.decode(frames[1])
        except codec.FrameError as exc:
            await self._reject(identity, exc.kind, exc.detail, exc.seq if exc.seq is not None else -1, dom=dom.domid,
                               size=len(frames[1]))
            return
        if self.boundary.answer(dom, env.body):
            return
        self.gdb.on_report(dom, env.body)  # a vCPU stopped for the debugger: held before the next window opens
        try:
            self.core.receive(dom, env.body)
        except ReportError as exc:
            await self._reject(identity, "unexpected", str(exc), env.seq, dom=dom.domid)
        except Exception as exc:  # a bug while serving this domain's message ends this domain only
            self.core.crash(dom, f"hypervisor error handling {type(env.body).__name__}: {exc!r}", exc=exc)

    async def _join(self, identity: bytes, frames: list[bytes], user_id: str | None) -> None:
        """A peer that is no domain's yet: its Hello claims a declared domain (Hypervisor.claim); anything else is
        an unknown peer's."""
        try:
            body = codec.decode(frames[1]).body if len(frames) == 2 else None
        except codec.FrameError:
            body = None
        if self.joiners.take(identity, body, self._key_domain(user_id), self._peer_address()):
            return  # a process taking over a restored or migrating domain (hypervisor/saving.py)
        if not isinstance(body, Hello):
            await self._reject(identity, "unknown-peer", "this peer has not joined as a domain (send Hello first)", -1,
                               peer=identity[:32].hex())
            return
        key_domain = None
        if self.secured:
            kind, _, key_domain = str(user_id).partition(":")
            if kind != "domain":  # the ZAP handler admits only domain keys to the bus: this is a second fence
                await self._reject(identity, "refused", "only a domain's key may join", -1, key=str(user_id)[:80])
                return
        claimed = self.core.claim(identity, body, key_domain)
        if not isinstance(claimed, Domain):
            self.flush_trace()
            await self.send(identity, Error(kind=claimed.kind, detail=claimed.detail, ref_seq=-1))
            return
        self.core.printk(f"d{claimed.domid} ({claimed.name}): joined from {body.host[:64] or '?'} "
                         f"(process {body.pid})", dom=claimed.domid, hostdep=True)

    def _peer_address(self) -> str:
        """On tcp, the address the frame being handled came from (a migration's joiner must come from its host)."""
        if self._last_frame is None:
            return ""
        try:
            return str(self._last_frame.get("Peer-Address"))
        except (zmq.ZMQError, AttributeError):
            return ""

    def _key_domain(self, user_id: str | None) -> str | None:
        """On tcp, the domain whose key the connection authenticated with ("" for any other key); None on ipc."""
        if not self.secured:
            return None
        kind, _, name = str(user_id).partition(":")
        return name if kind == "domain" else ""

    def bus_has_pending(self) -> bool:
        """Whether frames wait to be read: then nobody may be judged silent yet."""
        assert self.bus is not None
        return self.bus.has_pending()

    # -- the window loop ---------------------------------------------------------------------------------------

    async def window_loop(self) -> None:
        """Steps the clock after any change that did not come in on the bus (the bus reader steps it itself)."""
        while True:
            changed = self.changed  # a poke while advance() runs is then not lost
            await self.advance()
            await changed.wait()

    async def advance(self) -> None:
        """Step the clock as far as it can go now: close the open window once every participant has reported or
        left, open the next and send its windows, until a window waits for reports or nothing can run (the cluster
        is idle, or a domain is still building).

        The bus reader calls this after every frame: the report that completes a window steps the clock right
        there, with no switch to another task on the per-window path. The window loop calls it after any other
        change. One call runs at a time; one that finds another under way leaves the work to it (that one looks
        at the state again before it returns, and nothing in between yields)."""
        if self._advancing:
            return
        self._advancing = True
        try:
            core = self.core
            while not core.clock.awaiting:
                if self.boundary.holding:  # held at this boundary (hypervisor/boundary.py)
                    self.boundary.quiet()
                    return
                windows = core.step()
                await self.carry_out()
                self.flush_trace()  # every step's events are on disk before its windows go out
                if not windows:
                    return
                self._silence, self._silence_from = 0.0, time.monotonic()
                for domid, window in windows.items():
                    dom = core.domains.get(domid)
                    if dom is None:
                        continue
                    try:
                        await self.send(dom.identity, window)
                    except codec.EncodeError as exc:
                        core.crash(dom, f"hypervisor could not encode its window: {exc}", exc=exc)
                await self.carry_out()
        finally:
            self._advancing = False

    async def liveness_watch(self) -> None:
        """Every TICK_S: flush the trace (a live run's readers see each event within a tick), and judge silence.
        Each tick charges at most MAX_TICK_CHARGE_S, so time this process did not run is nobody's silence."""
        building: Waited = {}
        last = time.monotonic()
        while True:
            await trio.sleep(TICK_S)
            now = time.monotonic()
            charge, last_tick, last = min(now - last, MAX_TICK_CHARGE_S), last, now
            self.flush_trace()
            building = await self._judge_builds(building, charge)
            await self._judge_leaving(charge)
            if self.core.clock.awaiting:
                self._silence += min(now - max(last_tick, self._silence_from), MAX_TICK_CHARGE_S)
                await self._judge_silence()

    async def _judge_builds(self, waited: Waited, charge: float) -> Waited:
        """A domain in BUILDING holds every window back (joining and building take no virtual time), so one that no
        process has joined as after ``join_timeout_s``, or whose process has not built its guest BUILD_TIMEOUT_S
        after joining, of this process's running time, is crashed. Returns the time each has waited so far, keyed
        by (domid, joined): the clock starts again when it joins."""
        building = [(d, (d.domid, bool(d.identity))) for d in self.core.domains if d.state is DomainState.BUILDING]
        waited = {key: waited.get(key, 0.0) + charge for _, key in building}
        join_s = self.spec.hypervisor.join_timeout_s
        late = [(d, joined) for d, (_, joined) in building
                if waited[(d.domid, joined)] >= (BUILD_TIMEOUT_S if joined else join_s)]
        if late and not self.bus_has_pending():
            for dom, joined in late:
                if joined:
                    self.core.crash(dom, f"not built within {BUILD_TIMEOUT_S:g} s of the hypervisor's running time")
                    continue
                dom.trace.warning("domain.join_timeout", vt_ns=self.core.clock.now_ns, timeout_s=join_s,
                                  placement=dom.spec.placement)
                self.core.crash(dom, f"no process joined as it within {join_s:g} s (hypervisor.join_timeout_s)")
            await self.flush()
        return waited

    async def _judge_leaving(self, charge: float) -> None:
        """A remote process told to stop that has not said goodbye after STOP_GRACE_S is taken for gone."""
        for domid in list(self._leaving):
            dom = self.core.domains.get(domid)
            if dom is None or not dom.identity or self.core.domains.by_identity(dom.identity) is not dom:
                del self._leaving[domid]
                continue
            self._leaving[domid] += charge
            if self._leaving[domid] >= STOP_GRACE_S and not self.bus_has_pending():
                del self._leaving[domid]
                self.core.process_exited(dom, -1)
                await self.flush()

    async def _judge_silence(self) -> None:
        """Crash every participant the open window still waits for once it has been silent for ``unresponsive_s``
        of this process's running time, unless its report is already waiting to be read."""
        core = self.core
        if self._silence < self.unresponsive_s or self.bus_has_pending():
            return
        for domid in sorted(core.clock.awaiting):
            dom = core.domains.get(domid)
            if dom is not None and dom.alive:
                core.crash(dom, f"no report for window {core.clock.index} within {self.unresponsive_s:g} s "
                                f"of the hypervisor's running time")
        await self.flush()

    # -- domain processes ------------------------------------------------------------------------------------

    def create_domain(self, spec: DomainSpec, requester: Requester | None = None) -> Domain:
        """Declare ``spec``'s domain and, when it runs locally, start its process (which joins like any other).
        The kernel is read here, as ``requester`` (default: this process's user) may read it: KernelFileError."""
        image = kernel_image(spec, self.run_dir, requester or Requester.this_process())
        dom = self.core.create_domain(spec, image)
        self._launch(dom)
        return dom

    def _launch(self, dom: Domain) -> None:
        """Start a declared domain's process when it runs locally (it joins like any other); a remote one waits for
        whatever starts it. OSError (after crashing the domain) when the process cannot be started."""
        if dom.spec.placement == "remote":
            self.core.printk(f"d{dom.domid} ({dom.name}): created, waiting for its process to join "
                             f"(`pvcluster join {dom.name} --endpoint {self.endpoints.bus}`)", dom=dom.domid,
                             hostdep=True)
            return
        try:
            proc = self._spawn(dom)
        except OSError as exc:  # a domain that never gets a process must not hold every window back
            self.core.crash(dom, f"could not start its process: {exc}")
            raise
        self.procs[dom.domid] = proc
        self.core.printk(f"d{dom.domid} ({dom.name}): created, process {proc.pid}", dom=dom.domid, hostdep=True)

    def _spawn(self, dom: Domain) -> subprocess.Popen[bytes]:
        """Start a local process that joins as ``dom``, and watch it."""
        assert self.nursery is not None
        argv = launch.python_module_argv(
            "domains", "--endpoint", self.endpoints.bus, "--name", dom.name,
            "--trace-dir", str(self.run_dir / "trace"), "--spawned",
        )
        if self.secured:  # the directory, not a key: nothing secret goes on a command line
            argv += ["--keys", str(self.keys_dir)]
        proc = launch.spawn(argv, log=self.run_dir / "logs" / f"dom{dom.domid}-{dom.name}.log",
                            death_signal=launch.HYPERVISOR_GONE_SIGNAL)
        self.nursery.start_soon(self._watch, dom, proc)
        return proc

    def start_process(self, dom: Domain, joiner: saving.Joiner) -> None:
        """A local process to take over ``dom`` from a save file or a migration; it becomes the domain's once
        restored (``adopt``). One that cannot be started fails the joiner."""
        try:
            joiner.proc = self._spawn(dom)
        except OSError as exc:
            self.joiners.failed(joiner, f"could not start its process: {exc}")
            return
        self.core.printk(f"d{dom.domid} ({dom.name}): process {joiner.proc.pid} started to take it over",
                         dom=dom.domid, hostdep=True)

    def adopt(self, dom: Domain, joiner: saving.Joiner) -> None:
        """The joiner's local process is now ``dom``'s (its exit is the domain's)."""
        if joiner.proc is not None:
            self.procs[dom.domid] = joiner.proc

    def retire(self, dom: Domain) -> None:
        """``dom``'s process no longer runs it (it migrated): its frames are unknown from now, and its exit is
        nobody's business."""
        self.core.domains.forget_identity(dom)
        dom.identity = b""
        self.procs.pop(dom.domid, None)

    async def end_joiner(self, joiner: saving.Joiner) -> None:
        """A joiner that did not become its domain: tell it to leave, and end it if it is ours."""
        if joiner.identity:
            await self.send(joiner.identity, Retire(reason="not taken"))
        proc = joiner.proc
        if proc is not None and proc.poll() is None:
            with trio.move_on_after(STOP_GRACE_S):
                await launch.wait_exit(proc)
            if proc.poll() is None:
                proc.kill()

    async def _watch(self, dom: Domain, proc: subprocess.Popen[bytes]) -> None:
        rc = await launch.wait_exit(proc)
        if self.procs.get(dom.domid) is not proc:
            # not (or no longer) the domain's process: a joiner that never took it over, or one it migrated from
            self.joiners.exited(proc, rc)
            return
        self.boundary.gone(dom)
        self.core.process_exited(dom, rc)
        await self.flush()

    async def destroy(self, dom: Domain) -> None:
        self.core.destroy(dom)
        await self.flush()
        if dom.spec.placement == "remote":
            await self._await_goodbye(dom)
        proc = self.procs.get(dom.domid)
        if proc is not None:
            with trio.move_on_after(STOP_GRACE_S):
                await launch.wait_exit(proc)
            if proc.poll() is None:
                proc.kill()
                await launch.wait_exit(proc)
        if dom.state is DomainState.SHUTTING_DOWN:
            dom.move(DomainState.DEAD, "destroyed")
        self.poke()

    async def _await_goodbye(self, dom: Domain) -> None:
        """A destroyed remote domain: its Stop went out; wait STOP_GRACE_S at most for its process's goodbye."""
        with trio.move_on_after(STOP_GRACE_S):
            while dom.identity and self.core.domains.by_identity(dom.identity) is dom:
                await trio.sleep(0.02)
        if dom.identity and self.core.domains.by_identity(dom.identity) is dom:
            self.core.process_exited(dom, -1)  # gone without a word, or never there

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()

    # -- running ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        from hypervisor.control import ControlServer

        self.bind()
        h = self.spec.hypervisor
        restoring = self.restore_image is not None
        # a restored hypervisor's start is not an event of the simulation it continues
        self.core.printk(f"pvcluster hypervisor up: {h.pcpus} pcpus, window {h.window_ns} ns, "
                         f"seed {self.spec.cluster.seed}" + (" (restored)" if restoring else ""),
                         **({"hostdep": True} if restoring else {}))
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                if self.restore_image is not None:  # no window before every domain process has its state
                    self.boundary.hold()
                    nursery.start_soon(saving.restore_domains, self, self.restore_image)
                nursery.start_soon(self.bus_reader)
                nursery.start_soon(self.window_loop)
                nursery.start_soon(self.liveness_watch)
                for sock in (self.bus, self.control):
                    assert sock is not None
                    nursery.start_soon(sock.safety_poll)
                if self.auth is not None:
                    nursery.start_soon(self.auth.run)
                await ControlServer(self).serve()
                nursery.cancel_scope.cancel()
        finally:
            self.flush_trace()
            self.kill_all()
            for sock in (self.bus, self.control):
                if sock is not None:
                    sock.close()
            if self.auth is not None:
                self.auth.close()
            self.ctx.term()
            # A stale file would make the toolstack talk to a dead hypervisor.
            (self.run_dir / "hypervisor.json").unlink(missing_ok=True)
            print("hypervisor: stopped", file=sys.stderr)

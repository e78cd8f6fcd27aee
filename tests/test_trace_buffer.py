"""Buffered traces (pvcluster/trace/log.py) and the domain process's blocking loop (domains/runtime.py): lines wait in
memory for a flush and are structlog's lines, a signal handler that exits during a flush loses and doubles
nothing, a domain process ended by any of its signals leaves every event it traced on disk, and only a hypervisor
that is gone, never silence alone, ends a domain process that hears nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import zmq
from helpers import RecordingLog, core

from domains.runtime import EXIT_HYPERVISOR_GONE, DomainProcess
from pvcluster.bus import codec
from pvcluster.bus.messages import BuildResult, Error, Hello, Leaving, Stop
from pvcluster.launch import HYPERVISOR_GONE_SIGNAL
from pvcluster.trace import log as trace


def _lines(path: Path) -> list[dict[str, object]]:
    """The events written, after the file's trace.start header (checked on its own below)."""
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert events[0]["event"] == "trace.start"
    return events[1:]


def test_each_file_starts_with_the_schema_version(tmp_path: Path, configure: Any) -> None:
    log, sink = configure(tmp_path / "t.jsonl", "dom1")
    log.info("a", vt_ns=1)
    sink.flush()
    first = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[0])
    assert first["event"] == "trace.start" and first["schema"] == trace.SCHEMA_VERSION and first["proc"] == "dom1"


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path, str], tuple[trace.TraceLogger,
                                                                                      trace.TraceFile]]]:
    """trace.configure, with every file it opened closed afterwards (and its exit-time flush withdrawn)."""
    sinks: list[trace.TraceFile] = []

    def opened(path: Path, proc: str) -> tuple[trace.TraceLogger, trace.TraceFile]:
        log, sink = trace.configure(path, proc)
        sinks.append(sink)
        return log, sink

    yield opened
    monkeypatch.undo()  # the real os._exit back before a sink that was asked to exit is closed
    for sink in sinks:
        sink._exit_code = None
        sink.close()


def test_events_wait_for_a_flush(tmp_path: Path, configure: Any) -> None:
    log, sink = configure(tmp_path / "t.jsonl", "dom1")
    log.bind(dom=1).info("a", vt_ns=5)
    assert (tmp_path / "t.jsonl").read_text() == ""
    sink.flush()
    (event,) = _lines(tmp_path / "t.jsonl")
    # structlog's key order: context, fields, then event, level and the wall-clock stamp
    assert list(event) == ["proc", "dom", "vt_ns", "event", "level", "wall_ns"]
    assert event["event"] == "a" and event["level"] == "info" and event["proc"] == "dom1"


def test_a_full_buffer_is_written_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, configure: Any) -> None:
    monkeypatch.setattr(trace.TraceFile, "MAX_BUFFERED", 3)
    log, _ = configure(tmp_path / "t.jsonl", "hypervisor")
    for i in range(7):
        log.warning("e", i=i)
    # the trace.start header was the first buffered line: 8 lines, two full buffers written
    assert [e["i"] for e in _lines(tmp_path / "t.jsonl")] == list(range(5))


class _Exited(Exception):
    pass


def test_an_exit_asked_for_during_a_flush_waits_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       configure: Any) -> None:
    """A signal handler runs between two bytecodes of whatever it interrupted, a flush included: its own event and
    everything buffered are written once each, and the process ends only then."""
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise _Exited

    monkeypatch.setattr(trace.os, "_exit", fake_exit)
    log, sink = configure(tmp_path / "t.jsonl", "dom1")
    write = sink._write
    interrupted = False

    def write_then_signal(data: bytes) -> None:
        nonlocal interrupted
        write(data)
        if not interrupted:  # the handler: an event of its own, then flush and exit
            interrupted = True
            log.info("handler")
            sink.flush_and_exit(143)
            assert codes == []  # not yet: the flush it interrupted has not written the handler's event

    monkeypatch.setattr(sink, "_write", write_then_signal)
    log.info("before")
    with pytest.raises(_Exited):
        sink.flush()
    assert codes == [143]
    assert [e["event"] for e in _lines(tmp_path / "t.jsonl")] == ["before", "handler"]


# -- a real domain process -----------------------------------------------------------------------------------------


def _blocked_count(pid: int) -> int:
    """How many times the process's main thread has gone to sleep (it sleeps in its receive between frames)."""
    status = Path(f"/proc/{pid}/task/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("voluntary_ctxt_switches")))


def _wait_until_blocked_again(pid: int, before: int) -> None:
    """Until the main thread, woken by a frame, has handled it and sleeps in its receive again. No other wake-up
    comes between: a domain process only wakes for frames (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + 60
    while _blocked_count(pid) <= before or Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "S":
        assert time.monotonic() < deadline, "the domain process did not take the frame"
        time.sleep(0.01)


@pytest.fixture
def bus() -> Iterator[tuple[zmq.Socket, str]]:
    with tempfile.TemporaryDirectory(prefix="pvt-") as d:
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.RCVTIMEO, 60_000)
        endpoint = f"ipc://{d}/bus.sock"
        router.bind(endpoint)
        yield router, d
        router.close(linger=0)
        ctx.term()


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130),
                                           (HYPERVISOR_GONE_SIGNAL, 5)], ids=["term", "int", "hypervisor-gone"])
def test_a_signalled_domain_process_leaves_every_event_on_disk(bus: tuple[zmq.Socket, str], sig: int,
                                                                code: int) -> None:
    router, d = bus
    run_dir = Path(d) / "run"
    proc = subprocess.Popen([sys.executable, "-m", "domains", "--endpoint", f"ipc://{d}/bus.sock", "--name", "t",
                             "--trace-dir", str(run_dir / "trace"), "--spawned"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ident, hello = router.recv_multipart()
        body = codec.decode(hello).body
        assert isinstance(body, Hello) and body.name == "t"
        # joined: its Build (the trace file opens with it), built and answered
        router.send_multipart([ident, _build_frame()])
        assert isinstance(codec.decode(router.recv_multipart()[1]).body, BuildResult)
        # A bad frame is traced (bus.malformed) and answered, the trace flushed first; an Error from the hypervisor
        # is traced (bus.peer_error) and answered with nothing, so its event stays in the buffer.
        router.send_multipart([ident, b"\xc1"])
        assert isinstance(codec.decode(router.recv_multipart()[1]).body, Error)
        switches = _blocked_count(proc.pid)
        router.send_multipart([ident, codec.encode(Error("unexpected", "buffered", 2), seq=2, vt_ns=0)])
        _wait_until_blocked_again(proc.pid, switches)  # it has read the Error and waits for the next frame
        assert [e["event"] for e in _lines(run_dir / "trace" / "dom1-t.jsonl")] == ["domain.built", "bus.malformed"]
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=60) == code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [e["event"] for e in _lines(run_dir / "trace" / "dom1-t.jsonl")]
    expected = ["domain.built", "bus.malformed", "bus.peer_error"]
    if sig == HYPERVISOR_GONE_SIGNAL:
        expected.append("domain.hypervisor_gone")
        assert proc.stderr is not None and b"is gone; trace flushed, exiting" in proc.stderr.read()
    assert events == expected


def _build_frame() -> bytes:
    """A Build for a one-vCPU xen domain "t" with id 1, as the hypervisor sends it (kernel image included)."""
    from domains.kernel.build import cached_kernel

    hv = core()
    dom = hv.create_domain(hv.spec.domains[1], image=cached_kernel("pvkern"))
    return codec.encode(attrs.evolve(hv._build_message(dom), name="t"), seq=1, vt_ns=0)


class _Silent:
    """A socket and its poll set: nothing to read for ``quiet`` polls, then a Stop."""

    def __init__(self, quiet: int = 1_000_000) -> None:
        self.sent: list[bytes] = []
        self.quiet = quiet

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    def poll(self, timeout_ms: int) -> list[object]:
        self.quiet -= 1
        return [] if self.quiet >= 0 else [(self, zmq.POLLIN)]

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        return [codec.encode(Stop(reason="poweroff"), seq=1, vt_ns=0)]


def _domain_process() -> tuple[DomainProcess, RecordingLog, list[int]]:
    log = RecordingLog()
    flushed: list[int] = []
    proc = DomainProcess(None, 1, "t", log, flush_trace=lambda: flushed.append(1))  # type: ignore[arg-type]
    return proc, log, flushed


def test_a_domain_process_whose_hypervisor_is_gone_without_a_signal_ends_after_a_silent_poll() -> None:
    proc, log, flushed = _domain_process()
    silent = _Silent()
    proc.parent = -1  # not our parent any more: the hypervisor died and the process was adopted
    assert proc._serve(silent, silent) == EXIT_HYPERVISOR_GONE  # type: ignore[arg-type]
    assert [e for e, _ in log.events] == ["domain.hypervisor_gone"]


def test_silence_alone_does_not_end_a_domain_process() -> None:
    proc, log, flushed = _domain_process()
    silent = _Silent(quiet=3)
    proc.parent = os.getppid()  # the hypervisor is there, only slow (or waiting for another domain)
    assert proc._serve(silent, silent) == 0  # type: ignore[arg-type]
    assert [e for e, _ in log.events] == ["domain.stop"]
    assert isinstance(codec.decode(silent.sent[-1]).body, Leaving) and flushed  # a goodbye, the trace flushed first

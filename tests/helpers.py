"""Small helpers shared by the unit tests of hypercall families."""

from __future__ import annotations

import shutil
import struct
import subprocess
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile


class RecordingLog:
    """Stands in for the trace logger the hypervisor traces to (pvcluster.trace.TraceLogger), keeping every event for
    assertions. ``bind`` returns a logger that adds its context to every event and records into the same list, as
    the real one does."""

    def __init__(self, events: list[tuple[str, dict[str, Any]]] | None = None,
                 context: dict[str, Any] | None = None) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = events if events is not None else []
        self.context = context or {}

    def bind(self, **kw: Any) -> RecordingLog:
        return RecordingLog(self.events, {**self.context, **kw})

    def info(self, event: str, **kw: Any) -> None:
        self.events.append((event, {**self.context, **kw}))

    warning = error = info


def core(spec_text: str | None = None, log: RecordingLog | None = None) -> Any:
    """An in-process hypervisor core (no sockets, no processes) for the given spec text (default: the default spec)."""
    from hypervisor.core import Hypervisor
    from pvcluster.spec import load_spec, parse_spec

    spec = load_spec() if spec_text is None else parse_spec(spec_text)
    return Hypervisor(spec, log if log is not None else RecordingLog())


def make_call(hv: Any, dom: Any, nr: int, args: list[int], regions: list[Any], *, vcpu: int = 0,
              vt: int = 0) -> Any:
    """One hypercall of ``dom``'s vCPU ``vcpu`` at virtual time ``vt``, over hand-made copied-in regions."""
    from hypervisor.guestmem import GuestView
    from hypervisor.hypercalls.base import Call

    return Call(hv=hv, dom=dom, vcpu=vcpu, vt_ns=vt, nr=nr, args=list(args), mem=GuestView(regions))


_CALL_EVENTS: weakref.WeakKeyDictionary[Any, list[tuple[str, dict[str, Any]]]] = weakref.WeakKeyDictionary()


def run_handler(handler: Any, call: Any) -> int:
    """Run a hypercall handler (a family module, or a ``handle`` function) on ``call``, keeping the events this call
    traced: a domain's log is shared by all its calls."""
    handle = handler.handle if hasattr(handler, "handle") else handler
    log = call.dom.trace.log
    start = len(log.events)
    rc = int(handle(call))
    _CALL_EVENTS[call] = [(ev, kw) for ev, kw in log.events[start:] if kw.get("dom") == call.dom.domid]
    return rc


def call_events(call: Any) -> list[tuple[str, dict[str, Any]]]:
    """The events ``run_handler`` kept for ``call``."""
    return _CALL_EVENTS[call]


def events_of(call: Any) -> list[tuple[str, dict[str, Any]]]:
    """Every event traced for the domain a call belongs to (hypercall details included)."""
    log = call.dom.trace.log
    return [(e, kw) for e, kw in log.events if kw.get("dom") == call.dom.domid]


XEN_HEADERS = Path("/usr/include/xen/xen.h")


def assert_matches_xen_headers(tmp_path: Path, headers: tuple[str, ...], checks: list[tuple[str, int]], *,
                               interface_version: int = 0x00030205) -> None:
    """Compile each C expression against Xen's public headers for x86-32 (as a guest of ``interface_version``
    sees them) and compare it with our value, as a 32-bit unsigned word.

    The values are read back from the object's .rodata, so layouts are checked as a 32-bit guest compiler sees
    them. Skips where the headers (Debian's libxen-dev) or a gcc that targets -m32 are missing: the project must
    not need them.
    """
    if not XEN_HEADERS.exists():
        pytest.skip("Xen public headers not installed (apt-get install libxen-dev)")
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc")
    src = tmp_path / "xenabi.c"
    src.write_text(
        f"#define __XEN_INTERFACE_VERSION__ {interface_version:#010x}\n"
        "#include <stddef.h>\n#include <stdint.h>\n"
        + "".join(f"#include <xen/{h}.h>\n" for h in headers)
        + "const unsigned int vals[] = {\n"
        + "".join(f"  (unsigned int)({expr}),\n" for expr, _ in checks)
        + "};\n"
    )
    obj = tmp_path / "xenabi.o"
    proc = subprocess.run([gcc, "-m32", "-ffreestanding", "-c", str(src), "-o", str(obj)], capture_output=True,
                          text=True)
    if proc.returncode != 0 and "-m32" in proc.stderr:
        pytest.skip(f"gcc cannot target x86-32 here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    with open(obj, "rb") as fh:
        rodata = ELFFile(fh).get_section_by_name(".rodata")
        assert rodata is not None
        data = rodata.data()
    got = struct.unpack_from(f"<{len(checks)}I", data)
    mismatches = [(expr, want, have) for (expr, want), have in zip(checks, got, strict=True)
                  if want & 0xFFFFFFFF != have]
    assert not mismatches, mismatches


# -- driving the real CLI and watching processes (end-to-end tests) -----------------------------------------------


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`pvcluster ARGS` in a subprocess, as a user runs it."""
    import sys

    return subprocess.run([sys.executable, "-m", "pvcluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@contextmanager
def detached_cluster(run_dir: Path, spec_text: str) -> Iterator[Path]:
    """`pvcluster up SPEC --detach` into ``run_dir``/c; its run directory, brought down on the way out."""
    spec = run_dir / "spec.toml"
    spec.write_text(spec_text)
    rd = run_dir / "c"
    up = run_cli("up", str(spec), "--run-dir", str(rd), "--detach")
    assert up.returncode == 0, up.stderr
    try:
        yield rd
    finally:
        run_cli("down", "--run-dir", str(rd))


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (dead for our purpose)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(pred: Any, timeout: float = 30.0) -> None:
    """Poll ``pred()`` until it is true; fail the test after ``timeout`` wall seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def pin_table(dom: Any, mfn: int, level: int, entries: dict[int, int] | None = None) -> None:
    """Pin ``mfn`` of ``dom`` as a level-``level`` page table holding ``entries`` (slot -> value; the rest zero),
    as a guest's MMUEXT_PIN_L*_TABLE with the frame copied in would (``hypervisor/ptops.py``)."""
    import struct as _struct

    from hypervisor import ptops

    table = [0] * 1024
    for slot, value in (entries or {}).items():
        table[slot] = value
    data = _struct.pack("<1024I", *table)
    ptops.pin(dom.frames, mfn, level, lambda m: data if m == mfn else bytes(4096))

"""Synthetic run directories of any size, tiled from one real run, to benchmark trace analysis on.

A real cluster run (the template: a native, a paravirtual and a cr3 domain, shootdown workload, a few faults) is
copied k times end to end in virtual time: copy k has every virtual-time field (``vt_ns``, every ``*_vt_ns``, a
fault's ``at_ns``) moved on by k template spans, ``wall_ns`` by k wall spans, and its ids (``round``, ``eid``,
``fid``, ``seq`` and the number that ends each string ``span``) by k id strides, so every copy's shootdowns,
hypercalls, events and faults are distinct and pair up as in the real run. One-time events keep their place once:
the start of each trace (``trace.start``, ``domain.built``, ...) in the first copy, a domain's end in the last.

The output is written one file and one copy at a time: only the template (a few thousand events) is ever in
memory, whatever the size asked for.

    python -m bench.synthetic_trace --events 1000000 DIR            # records a template run first (~10 s)
    python -m bench.synthetic_trace --events 1000000 --template RUN DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs

from pvcluster.trace.reader import trace_files

# The template cluster: three designs side by side, overcommitted (8 vCPUs on 3 pCPUs) so targets get preempted,
# with faults so the fault tables have rows.
TEMPLATE_SPEC = """
[cluster]
name = "synth"
seed = 3
[hypervisor]
pcpus = 3
[[domain]]
name = "nat"
vcpus = 3
backend = "native"
cmdline = "workload=shootdown shutdown=poweroff"
[[domain]]
name = "pv"
vcpus = 3
backend = "xen"
cmdline = "workload=shootdown shutdown=poweroff"
[[domain]]
name = "cr3"
vcpus = 2
backend = "xen"
cmdline = "workload=shootdown tlbflush=cr3 shutdown=poweroff"
[[fault]]
kind = "preempt"
target = "nat.1"
at_ns = 200000
duration_ns = 50000
[[fault]]
kind = "delay"
target = "pv"
at_ns = 300000
duration_ns = 100000
delay_ns = 5000
[[fault]]
kind = "drop"
target = "cr3"
at_ns = 400000
count = 2
"""

VT_KEYS_EXTRA = frozenset({"at_ns"})  # virtual times whose names do not end in vt_ns
ID_KEYS = frozenset({"round", "eid", "fid", "seq"})  # per-run counters a copy must not repeat
FIRST_ONLY = frozenset({"trace.start", "hypervisor.listening", "domain.built"})  # a process or domain starts once
LAST_ONLY = frozenset({"domain.stop", "domain.shutdown", "domain.process_exit", "domain.crash"})  # ... and ends once
SPAN_NUMBER = re.compile(r"^(.*?)(\d+)$")  # "hc-d1v0-17", "sd-d1-r3": the counter is the trailing number
SPAN_ROUND_NS = 100_000  # the template span is rounded up to this, so copies start at round virtual times
RUN_FILES = ("spec.json", "run.json")  # what the analysis (and a reader) needs from the run directory besides traces


def _is_vt_key(key: str) -> bool:
    return key == "vt_ns" or key.endswith("_vt_ns") or key in VT_KEYS_EXTRA


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# As pvcluster.trace.log writes events (compact separators): the reader's fast path looks for '"event":"'.
_encode = json.JSONEncoder(separators=(",", ":")).encode
# A value a copy changes, in the template's serialised line: a string JSON writes as "\u0000<n>\u0000".
_SLOT = "\x00{}\x00"
_SLOT_TEXT = re.compile(r'"\\u0000(\d+)\\u0000"')


@attrs.frozen
class _Line:
    """One template event, serialised once with a slot for every value a copy changes, so a copy is a string join
    rather than a dict copy and a JSON encoding (the tiling is then I/O bound)."""

    event: dict[str, Any]
    text: str  # the template's own line (copy 0 is the template, byte for byte)
    parts: tuple[str, ...]  # the serialised line around its slots: len(slots) + 1 pieces
    slots: tuple[tuple[str, Any], ...]  # ("vt" | "id" | "wall", int) or ("span", (prefix, number)), in line order
    vt_keys: tuple[str, ...]
    id_keys: tuple[str, ...]
    span: tuple[str, int] | None  # (prefix, number) of a numbered string span
    where: str  # "first", "last" or "every" copy

    def render(self, dv: int, dw: int, di: int) -> str:
        """This event moved on by ``dv`` virtual ns and ``dw`` wall ns, its ids by ``di``."""
        out = [self.parts[0]]
        for (kind, base), part in zip(self.slots, self.parts[1:], strict=True):
            if kind == "vt":
                out.append(str(base + dv))
            elif kind == "id":
                out.append(str(base + di))
            elif kind == "wall":
                out.append(str(base + dw))
            else:
                out.append(_encode(f"{base[0]}{base[1] + di}"))
            out.append(part)
        return "".join(out)


def _plan(text: str, event: dict[str, Any]) -> _Line:
    """``event`` (parsed from the line ``text``) and what a copy changes in it."""
    vt = tuple(k for k, v in event.items() if _is_vt_key(k) and _is_int(v))
    ids = tuple(k for k, v in event.items() if k in ID_KEYS and _is_int(v))
    span = None
    if isinstance(event.get("span"), str) and (m := SPAN_NUMBER.match(event["span"])):
        span = (m.group(1), int(m.group(2)))
    name = event.get("event")
    where = "first" if name in FIRST_ONLY else "last" if name in LAST_ONLY else "every"
    kinds: dict[str, tuple[str, Any]] = {k: ("vt", event[k]) for k in vt}
    kinds.update({k: ("id", event[k]) for k in ids})
    if _is_int(event.get("wall_ns")):
        kinds["wall_ns"] = ("wall", event["wall_ns"])
    if span is not None:
        kinds["span"] = ("span", span)
    order = list(kinds)
    slotted = {k: (_SLOT.format(order.index(k)) if k in kinds else v) for k, v in event.items()}
    pieces = _SLOT_TEXT.split(_encode(slotted))  # text, slot number, text, slot number, ..., text
    parts, numbers = tuple(pieces[0::2]), [int(n) for n in pieces[1::2]]
    slots = tuple(kinds[order[n]] for n in numbers)
    return _Line(event, text, parts, slots, vt, ids, span, where)


@attrs.frozen
class Template:
    """A real run read once: its events by file, and the strides that make each copy distinct."""

    run_dir: Path
    files: dict[str, tuple[_Line, ...]]  # trace file name -> its events, in file order
    span_ns: int  # virtual time one copy takes (past the template's latest virtual time)
    wall_span_ns: int
    id_stride: int  # added to every id per copy: a power of ten above the largest id in the template
    per_copy: int  # events every copy repeats
    once: int  # events written once (first or last copy)

    @classmethod
    def read(cls, run_dir: Path) -> Template:
        files: dict[str, tuple[_Line, ...]] = {}
        max_vt = max_id = 0
        walls: list[int] = []
        for path in trace_files(Path(run_dir) / "trace"):
            lines = []
            with open(path, encoding="utf-8") as f:
                for text in f:
                    try:
                        event = json.loads(text)
                    except json.JSONDecodeError:  # a torn last line: the tiled trace is clean
                        continue
                    if not isinstance(event, dict):
                        continue
                    line = _plan(text.rstrip("\n"), event)
                    lines.append(line)
                    max_vt = max([max_vt, *(event[k] for k in line.vt_keys)])
                    max_id = max([max_id, *(event[k] for k in line.id_keys), line.span[1] if line.span else 0])
                    if _is_int(event.get("wall_ns")):
                        walls.append(event["wall_ns"])
            files[path.name] = tuple(lines)
        if not files:
            raise ValueError(f"no trace files in {Path(run_dir) / 'trace'}")
        span_ns = (max_vt // SPAN_ROUND_NS + 1) * SPAN_ROUND_NS
        wall_span = max(walls) - min(walls) + 1 if walls else 0
        stride = 10 ** len(str(max_id))
        every = sum(1 for ls in files.values() for ln in ls if ln.where == "every")
        total = sum(len(ls) for ls in files.values())
        return cls(Path(run_dir), files, span_ns, wall_span, stride, every, total - every)

    def copies_for(self, events: int) -> int:
        """How many copies come closest to ``events`` events (at least one)."""
        return max(1, round((events - self.once) / max(1, self.per_copy)))

    def events_for(self, copies: int) -> int:
        return self.once + copies * self.per_copy


def _copy_lines(lines: tuple[_Line, ...], k: int, last: bool, t: Template) -> list[str]:
    """Copy ``k`` of one file's events, shifted, as JSON lines (without their newlines)."""
    dv, dw, di = k * t.span_ns, k * t.wall_span_ns, k * t.id_stride
    out = []
    for line in lines:
        if (line.where == "first" and k) or (line.where == "last" and not last):
            continue
        out.append(line.text if k == 0 else line.render(dv, dw, di))
    return out


def tile(template: Template, out_dir: Path, copies: int) -> int:
    """Write ``copies`` copies of the template run into ``out_dir`` (spec.json, run.json, trace/*.jsonl), one file
    at a time and streaming; the number of events written."""
    out_dir = Path(out_dir)
    trace_dir = out_dir / "trace"
    if trace_dir.is_dir() and any(trace_dir.glob("*.jsonl")):
        raise FileExistsError(f"{trace_dir} already holds trace files")
    trace_dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (template.run_dir / name).exists():
            shutil.copyfile(template.run_dir / name, out_dir / name)
    written = 0
    for name, lines in template.files.items():
        with open(trace_dir / name, "w", encoding="utf-8") as f:
            for k in range(copies):
                chunk = _copy_lines(lines, k, k == copies - 1, template)
                f.write("\n".join(chunk) + "\n" if chunk else "")
                written += len(chunk)
    return written


def build(template_run: Path, out_dir: Path, events: int) -> int:
    """A synthetic run of about ``events`` events in ``out_dir``, tiled from ``template_run``; events written."""
    template = Template.read(template_run)
    return tile(template, out_dir, template.copies_for(events))


def record_template(run_dir: Path, *, timeout_s: float = 600.0, spec: str = TEMPLATE_SPEC) -> Path:
    """Run the template cluster (``spec``, a spec TOML's text) to its end in ``run_dir`` (a short path: ipc sockets
    live there) and return it."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="synth-", delete=False) as f:
        f.write(spec)
    try:
        argv = [sys.executable, "-m", "pvcluster.cli", "up", f.name, "--json", "--quiet", "--run-dir", str(run_dir),
                "--timeout", str(timeout_s)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s + 60)
    finally:
        os.unlink(f.name)
    try:
        ok = bool(json.loads(proc.stdout).get("ok"))
    except json.JSONDecodeError:
        ok = False
    if not ok:
        raise RuntimeError(f"the template cluster did not end cleanly (exit {proc.returncode}):\n"
                           f"{proc.stdout[-1000:]}{proc.stderr[-2000:]}")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.synthetic_trace", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, help="the run directory to write (spec.json, run.json, trace/*.jsonl)")
    ap.add_argument("--events", type=int, required=True, metavar="N", help="about how many events to write")
    ap.add_argument("--template", type=Path, metavar="RUN_DIR",
                    help="a finished run to tile (default: record the built-in template cluster first)")
    args = ap.parse_args(argv)
    if args.events < 1:
        ap.error("--events must be >= 1")
    with tempfile.TemporaryDirectory(prefix="pvsyn-", dir=os.environ.get("PVC_TEST_TMP", "/tmp")) as tmp:
        template = args.template or record_template(Path(tmp) / "run")
        written = build(template, args.dir, args.events)
    print(f"{written:,} events written to {args.dir / 'trace'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

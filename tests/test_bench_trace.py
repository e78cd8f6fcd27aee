"""bench/synthetic_trace.py (run directories tiled from one real run) and the pure parts of the trace-analysis and
overcommit benchmark sections. In process and on a hand-made template; nothing here times anything."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is a directory of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import overcommit, synthetic_trace, trace_analysis  # noqa: E402
from bench.synthetic_trace import Template  # noqa: E402
from pvcluster.abi.platform import FLUSH_VECTOR, Mark  # noqa: E402
from pvcluster.trace import load  # noqa: E402

ROUNDS = 3  # shootdowns per domain in the hand-made template
STEP_NS = 20_000  # virtual time between its rounds


# -- a hand-made template: one native and one pv domain, in the trace vocabulary the core writes ----------------


class _Writer:
    def __init__(self) -> None:
        self.files: dict[str, list[dict[str, Any]]] = {"hypervisor.jsonl": [], "dom1-alpha.jsonl": [],
                                                       "dom2-beta.jsonl": []}
        self.wall = 1_700_000_000_000_000_000

    def add(self, file: str, event: str, vt_ns: int | None, **fields: Any) -> None:
        proc = "hypervisor" if file == "hypervisor.jsonl" else file.partition("-")[0]
        e: dict[str, Any] = {"proc": proc, **({"vt_ns": vt_ns} if vt_ns is not None else {}), **fields,
                             "event": event, "level": "info", "wall_ns": self.wall}
        self.wall += 1000
        self.files[file].append(e)


def write_template(root: Path) -> Path:
    """A finished run of ROUNDS native and ROUNDS pv shootdowns, with a fault and an event-channel notification."""
    w = _Writer()
    hv, a, b = "hypervisor.jsonl", "dom1-alpha.jsonl", "dom2-beta.jsonl"
    for f in w.files:
        w.add(f, "trace.start", None, schema=2)
    w.add(hv, "hypervisor.listening", 0, pid=1, bus="ipc:///x/bus.sock", control="ipc:///x/control.sock")
    w.add(a, "domain.built", 0, dom=1, backend="native", vcpus=2)
    w.add(b, "domain.built", 0, dom=2, backend="xen", vcpus=2)
    for dom in (1, 2):
        for v in (0, 1):
            w.add(hv, "vcpu.runstate", 0, dom=dom, vcpu=v, state="running", previous="offline", duration_ns=0,
                  why="boot", pcpu=v)
    w.add(hv, "fault.inject", 1_000, dom=1, fid=1, kind="preempt", target="alpha.1", params={"duration_ns": 500},
          origin="spec", step=1, at_ns=1_000)
    w.add(hv, "fault.outcome", 1_000, dom=1, fid=1, kind="preempt", outcome="vcpu 1 held")
    w.add(hv, "fault.end", 1_500, dom=1, fid=1, kind="preempt", target="alpha.1", outcome="vcpu 1 released")
    w.add(hv, "event.sent", 2_000, dom=2, eid=1, port=3, vcpu=1)
    w.add(b, "event.delivered", 3_000, dom=2, eid=1, port=3, vcpu=1)
    for r in range(1, ROUNDS + 1):
        t = r * STEP_NS
        # native: request, an IPI to vCPU 1, its handler, its acknowledgement, done
        w.add(a, "guest.mark", t, dom=1, vcpu=0, code=int(Mark.SHOOTDOWN_REQUEST), round=r, span=f"sd-d1-r{r}")
        w.add(hv, "ipi", t + 100, dom=1, vcpu=0, dest=1, vector=FLUSH_VECTOR, target_running=True)
        w.add(a, "irq.enter", t + 1_100, dom=1, vcpu=1, vector=FLUSH_VECTOR)
        w.add(a, "guest.mark", t + 1_500, dom=1, vcpu=1, code=int(Mark.FLUSH_ACK))
        w.add(a, "guest.mark", t + 2_000, dom=1, vcpu=0, code=int(Mark.SHOOTDOWN_DONE), round=r, span=f"sd-d1-r{r}")
        # pv: request, one flush hypercall (its span shared with the shootdown event), tlb.flush, done
        n = 10 + r
        w.add(b, "guest.mark", t, dom=2, vcpu=0, code=int(Mark.SHOOTDOWN_REQUEST), round=r, span=f"sd-d2-r{r}")
        w.add(hv, "hypercall", t + 100, dom=2, vcpu=0, span=f"hc-d2v0-{n}", nr=26, name="mmuext_op",
              args=[0, 1, 0, 0, 0], result=0, done_vt_ns=t + 500, arrival_vt_ns=t + 10_500, effects=1)
        w.add(hv, "shootdown", t + 100, dom=2, vcpu=0, span=f"sd-d2v0-{n}", mode="pv", targets=[1], preempted=0,
              pages=1, end_vt_ns=t + 500, latency_ns=400, messages=1)
        w.add(b, "tlb.flush", t + 10_500, dom=2, vcpu=1, by=0, span=f"hc-d2v0-{n}")
        w.add(b, "hypercall.done", t + 10_500, dom=2, vcpu=0, span=f"hc-d2v0-{n}", value=0, complete=True,
              effects=1)
        w.add(b, "guest.mark", t + 11_000, dom=2, vcpu=0, code=int(Mark.SHOOTDOWN_DONE), round=r, span=f"sd-d2-r{r}")
    end = (ROUNDS + 1) * STEP_NS
    w.add(a, "domain.stop", end, dom=1, reason="poweroff")
    w.add(b, "domain.stop", end, dom=2, reason="poweroff")
    w.add(hv, "domain.shutdown", end, dom=1, reason="poweroff")
    w.add(hv, "domain.shutdown", end, dom=2, reason="poweroff")
    (root / "trace").mkdir(parents=True)
    for name, events in w.files.items():
        (root / "trace" / name).write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events))
    spec = {"cluster": {"name": "tmpl"}, "domain": [
        {"name": "alpha", "vcpus": 2, "backend": "native", "cmdline": "workload=shootdown"},
        {"name": "beta", "vcpus": 2, "backend": "xen", "cmdline": "workload=shootdown"}]}
    (root / "spec.json").write_text(json.dumps(spec))
    return root


@pytest.fixture
def template(tmp_path: Path) -> Template:
    return Template.read(write_template(tmp_path / "tmpl"))


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _unshift(e: dict[str, Any], k: int, t: Template) -> dict[str, Any]:
    """Copy ``k`` of an event taken back to the template's (an implementation of the shift independent of the
    generator's, so the test checks each field by name)."""
    out = dict(e)
    for key, v in e.items():
        if (key == "vt_ns" or key.endswith("_vt_ns") or key == "at_ns") and isinstance(v, int):
            out[key] = v - k * t.span_ns
        elif key in ("round", "eid", "fid", "seq"):
            out[key] = v - k * t.id_stride
        elif key == "wall_ns":
            out[key] = v - k * t.wall_span_ns
    if isinstance(e.get("span"), str):
        m = re.fullmatch(r"(.*?)(\d+)", e["span"])
        assert m is not None
        out["span"] = f"{m.group(1)}{int(m.group(2)) - k * t.id_stride}"
    return out


def _copies(events: list[dict[str, Any]], t: Template) -> Iterator[tuple[int, dict[str, Any]]]:
    """(copy, event) for each event that has a virtual time."""
    for e in events:
        if "vt_ns" in e:
            yield e["vt_ns"] // t.span_ns, e


# -- the generator -------------------------------------------------------------------------------------------------


def test_the_template_is_read_with_its_span_strides_and_counts(template: Template) -> None:
    assert template.span_ns > (ROUNDS + 1) * STEP_NS  # past its latest virtual time (incl. done_vt_ns, arrival)
    assert template.span_ns % synthetic_trace.SPAN_ROUND_NS == 0
    assert template.id_stride == 100  # the largest id is span number 13
    once = {"trace.start": 3, "hypervisor.listening": 1, "domain.built": 2, "domain.stop": 2, "domain.shutdown": 2}
    assert template.once == sum(once.values())
    total = sum(len(_read(p)) for p in (template.run_dir / "trace").glob("*.jsonl"))
    assert template.per_copy == total - template.once


def test_each_copy_is_the_template_shifted_in_virtual_time_with_new_ids(template: Template, tmp_path: Path) -> None:
    copies = 4
    written = synthetic_trace.tile(template, tmp_path / "out", copies)
    assert written == template.events_for(copies)
    for name, lines in template.files.items():
        originals = [ln.event for ln in lines if ln.where == "every"]
        out = _read(tmp_path / "out" / "trace" / name)
        by_copy: dict[int, list[dict[str, Any]]] = {}
        for k, e in _copies(out, template):
            if e["event"] not in synthetic_trace.FIRST_ONLY | synthetic_trace.LAST_ONLY:
                by_copy.setdefault(k, []).append(_unshift(e, k, template))
        assert sorted(by_copy) == list(range(copies))
        for k in range(copies):
            assert by_copy[k] == originals, (name, k)


def test_lines_are_written_as_the_core_writes_them(template: Template, tmp_path: Path) -> None:
    """Compact JSON, as pvcluster.trace.log writes (the reader's fast path depends on it); copy 0 is the template
    byte for byte."""
    synthetic_trace.tile(template, tmp_path / "out", 3)
    for name in template.files:
        original = (template.run_dir / "trace" / name).read_text().splitlines()
        out = (tmp_path / "out" / "trace" / name).read_text().splitlines()
        assert all(line == json.dumps(json.loads(line), separators=(",", ":")) for line in out)
        first_copy = [ln for ln in original if json.loads(ln)["event"] not in synthetic_trace.LAST_ONLY]
        assert out[: len(first_copy)] == first_copy


def test_copies_have_distinct_spans_rounds_eids_and_fids(template: Template, tmp_path: Path) -> None:
    synthetic_trace.tile(template, tmp_path / "out", 3)
    events = [e for p in sorted((tmp_path / "out" / "trace").glob("*.jsonl")) for e in _read(p)]
    marks = [(e["dom"], e["round"], e["code"]) for e in events if e["event"] == "guest.mark" and "round" in e]
    assert len(marks) == len(set(marks)) == 3 * 2 * ROUNDS * 2
    assert sorted({r for _, r, _ in marks}) == [k * 100 + r for k in range(3) for r in range(1, ROUNDS + 1)]
    hypercalls = [e["span"] for e in events if e["event"] == "hypercall"]
    assert len(hypercalls) == len(set(hypercalls)) == 3 * ROUNDS
    assert "hc-d2v0-211" in hypercalls  # copy 2 of span 11
    # a pv shootdown and the hypercall that made it keep the same number, as in the real run
    assert {e["span"].removeprefix("sd-d2v0-") for e in events if e["event"] == "shootdown"} == {
        s.removeprefix("hc-d2v0-") for s in hypercalls}
    assert sorted(e["eid"] for e in events if e["event"] == "event.sent") == [1, 101, 201]
    assert sorted(e["fid"] for e in events if e["event"] == "fault.inject") == [1, 101, 201]
    assert sorted(e["at_ns"] for e in events if e["event"] == "fault.inject") == [
        1_000 + k * template.span_ns for k in range(3)]


def test_one_time_events_stay_once_and_each_file_keeps_its_time_order(template: Template, tmp_path: Path) -> None:
    synthetic_trace.tile(template, tmp_path / "out", 5)
    for path in (tmp_path / "out" / "trace").glob("*.jsonl"):
        out = _read(path)
        assert out[0]["event"] == "trace.start"
        assert [e["event"] for e in out].count("trace.start") == 1
        assert [e["event"] for e in out].count("domain.built") == (0 if path.name == "hypervisor.jsonl" else 1)
        stops = [e for e in out if e["event"] in ("domain.stop", "domain.shutdown")]
        assert stops and all(e["vt_ns"] // template.span_ns == 4 for e in stops)  # the last copy's only
        times = [e["vt_ns"] for e in out if "vt_ns" in e]
        assert times == sorted(times)  # the hand-made template is in order, so copies end to end must be too
        walls = [e["wall_ns"] for e in out]
        assert walls == sorted(walls)


@pytest.mark.parametrize("target", [1, 100, 1_000, 5_000])
def test_the_event_count_comes_close_to_the_target(template: Template, tmp_path: Path, target: int) -> None:
    written = synthetic_trace.build(template.run_dir, tmp_path / "out", target)
    lines = sum(len(p.read_text().splitlines()) for p in (tmp_path / "out" / "trace").glob("*.jsonl"))
    assert lines == written
    assert abs(written - target) <= template.per_copy / 2 or written == template.events_for(1)
    assert (tmp_path / "out" / "spec.json").read_text() == (template.run_dir / "spec.json").read_text()


def test_the_tiled_run_analyses_as_copies_times_the_template(template: Template, tmp_path: Path) -> None:
    copies = 7
    written = synthetic_trace.tile(template, tmp_path / "out", copies)
    one = load(template.run_dir).analyse().to_json()
    many = load(tmp_path / "out").analyse().to_json()
    assert many["trace"]["events"] + many["trace"].get("skipped", 0) == written
    assert not many["trace"]["corrupt_lines"] and not many["trace"]["torn_files"]
    assert {r["mode"]: r["shootdowns"] for r in one["shootdowns"]} == {"native": ROUNDS, "pv": ROUNDS}
    assert {r["mode"]: r["shootdowns"] for r in many["shootdowns"]} == {"native": copies * ROUNDS,
                                                                         "pv": copies * ROUNDS}
    for key in ("p50_us", "p99_us", "max_us"):  # every copy is the same history, so the same latencies
        assert [r[key] for r in many["shootdowns"]] == [r[key] for r in one["shootdowns"]]
    assert len(many["faults"]) == copies
    assert many["incomplete_shootdowns"] == 0


def test_tile_refuses_a_directory_that_already_holds_traces(template: Template, tmp_path: Path) -> None:
    synthetic_trace.tile(template, tmp_path / "out", 1)
    with pytest.raises(FileExistsError):
        synthetic_trace.tile(template, tmp_path / "out", 1)


def test_the_command_line_tiles_a_given_template(template: Template, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert synthetic_trace.main(["--events", "300", "--template", str(template.run_dir), str(tmp_path / "out")]) == 0
    assert "events written to" in capsys.readouterr().out
    doc = load(tmp_path / "out").analyse().to_json()
    assert doc["trace"]["events"] + doc["trace"].get("skipped", 0) > 250


# The bench's template, smaller: the same three designs with 2 vCPUs each on 3 pCPUs, one fault.
SMALL_TEMPLATE = """
[cluster]
name = "synthsmall"
[hypervisor]
pcpus = 3
[[domain]]
name = "nat"
vcpus = 2
backend = "native"
cmdline = "workload=shootdown shutdown=poweroff"
[[domain]]
name = "pv"
vcpus = 2
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
"""


@pytest.mark.slow
def test_a_real_template_run_tiles_into_an_analysable_run(run_dir: Path) -> None:
    tmpl = synthetic_trace.record_template(run_dir / "tmpl", timeout_s=300, spec=SMALL_TEMPLATE)
    t = Template.read(tmpl)
    copies = t.copies_for(10_000)
    synthetic_trace.tile(t, run_dir / "out", copies)
    one = {r["mode"]: r for r in load(tmpl).analyse().to_json()["shootdowns"]}
    many = {r["mode"]: r for r in load(run_dir / "out").analyse().to_json()["shootdowns"]}
    assert set(one) == {"native", "pv", "cr3 (xen)"}
    assert {m: r["shootdowns"] for m, r in many.items()} == {m: copies * r["shootdowns"] for m, r in one.items()}
    assert {m: r["p50_us"] for m, r in many.items()} == {m: r["p50_us"] for m, r in one.items()}


# -- the sections' pure parts --------------------------------------------------------------------------------------


def _analysed(events: int, wall_s: float, rss_kib: int) -> trace_analysis.Analysed:
    return trace_analysis.Analysed(events, wall_s, rss_kib, {"shootdowns": [{"mode": "pv", "shootdowns": 3}]})


def test_trace_targets_judge_the_1m_run_and_the_rss_ratio() -> None:
    results = {100_000: _analysed(100_000, 1.0, 50_000), 1_000_000: _analysed(1_000_000, 8.0, 55_000)}
    wall, rss, flat = trace_analysis.targets(results)
    assert (wall.measured, wall.passed) == (8.0, True)
    assert rss.measured == pytest.approx(55_000 * 1024 / 1e6) and rss.passed
    assert flat.measured == pytest.approx(1.1) and flat.passed
    quick = trace_analysis.targets({100_000: results[100_000]})
    assert all(t.measured is None and t.passed is None and "--quick" in t.note for t in quick)


def test_overcommit_specs_put_k_domains_of_one_design_on_two_pcpus() -> None:
    import tomllib

    spec = tomllib.loads(overcommit.spec(3, "xen"))
    assert spec["hypervisor"]["pcpus"] == 2
    assert [(d["vcpus"], d["backend"]) for d in spec["domain"]] == [(2, "xen")] * 3
    assert all("workload=shootdown" in d["cmdline"] for d in spec["domain"])
    cr3 = tomllib.loads(overcommit.spec(1, "native", " tlbflush=cr3"))
    want = f"workload=shootdown sdrounds={overcommit.ROUNDS} shutdown=poweroff tlbflush=cr3"
    assert cr3["domain"][0]["cmdline"] == want


def test_overcommit_rows_take_per_vms_from_the_analysis_or_the_run_time() -> None:
    doc = {"shootdowns": [{"mode": "pv", "shootdowns": 80, "p50_us": 0.5, "p99_us": 0.6, "per_vms": 32.0},
                          {"mode": "native", "shootdowns": 40, "p50_us": 20.0, "p99_us": 60.0}]}
    assert overcommit.design_row(doc, "pv", 4_000_000)["per_vms"] == 32.0
    native = overcommit.design_row(doc, "native", 4_000_000)
    assert (native["per_vms"], native["per_vms_from"]) == (10.0, "run virtual time")
    assert overcommit.gain_pct(32.0, 16.0) == pytest.approx(100.0)
    assert overcommit.PUBLISHED_GAIN_PCT == {1: 4.0, 2: 78.0, 3: 132.0}


def test_both_sections_are_registered_in_the_suite() -> None:
    from bench import sections

    assert list(sections.SECTIONS)[-3:] == ["trace", "overcommit", "calibration"]

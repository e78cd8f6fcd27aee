"""The run diff over synthetic run directories: host-dependent differences are not divergences, the first real one
is reported with its file, index and both events, and a prefix is one only when asked."""

from __future__ import annotations

from pathlib import Path

import pytest
from runfiles import SyntheticRun, clean_run, write_jsonl

from pvcluster.rundiff import first_divergence, format_divergence, normalize


def two_runs(tmp_path: Path) -> tuple[SyntheticRun, SyntheticRun]:
    """The same history twice, from different hosts: other wall-clock times, pids and socket paths, and one
    more control request (a client polled once more)."""
    a = clean_run(tmp_path / "a")
    b = clean_run(tmp_path / "b", wall_base=1_800_000_000_000_000_000, pid_base=9000)
    b.hv.insert(3, {**b.hv[2], "wall_ns": 1})
    return a, b


def test_identical_runs_do_not_diverge_whatever_the_host(tmp_path: Path) -> None:
    a, b = two_runs(tmp_path)
    assert a.hv != b.hv and a.doms[1] != b.doms[1]  # the files do differ, in wall-clock fields only
    assert first_divergence(a.write(), b.write()) is None
    assert format_divergence(None).startswith("no divergence")


def test_normalize_strips_host_fields_and_the_pid_in_dmesg() -> None:
    event = {"event": "dmesg", "vt_ns": 0, "proc": "hypervisor", "pid": 1, "wall_ns": 2, "level": "info",
             "path": "/tmp/x", "text": "d1 (alpha): created, process 4242"}
    assert normalize(event) == {"event": "dmesg", "vt_ns": 0, "proc": "hypervisor", "level": "info",
                                "text": "d1 (alpha): created, process <pid>"}
    assert normalize({"event": "hypervisor.listening", "vt_ns": 0}) is None
    assert normalize({"event": "control.request", "vt_ns": 0, "cmd": "list"}) is None


def test_one_changed_field_is_reported_with_its_file_index_and_both_events(tmp_path: Path) -> None:
    a, b = two_runs(tmp_path)
    index = next(i for i, e in enumerate(b.doms[2]) if e["event"] == "hypercall.done" and e["value"] != 0)
    b.doms[2][index]["value"] = 7
    div = first_divergence(a.write(), b.write())
    assert div is not None
    assert (div.file, div.index, div.first.dom) == ("dom2-beta.jsonl", index, None)
    assert div.event_a is not None and div.event_b is not None
    assert (div.event_a["value"], div.event_b["value"]) == (0xFFFFFFEA, 7)
    assert "wall_ns" not in div.event_a
    assert (div.first.line_a, div.first.line_b) == (index + 1, index + 1)
    assert div.first.differing_fields == ["value"]
    assert div.files == ["dom2-beta.jsonl"]
    text = format_divergence(div)
    assert "dom2-beta.jsonl, event #" in text and "fields that differ: value" in text and '"value": 7' in text


def test_the_earliest_divergence_by_virtual_time_comes_first_and_every_file_is_listed(tmp_path: Path) -> None:
    a, b = two_runs(tmp_path)
    late = next(e for e in b.doms[1] if e["event"] == "event.delivered")
    late["eid"] = 99
    early = next(e for e in b.hv if e["event"] == "hypercall" and e["dom"] == 2)
    early["result"] = 5
    div = first_divergence(a.write(), b.write())
    assert div is not None
    assert (div.file, div.first.dom, div.first.vt_ns) == ("hypervisor.jsonl", 2, early["vt_ns"])
    assert div.files == ["hypervisor.jsonl", "dom1-alpha.jsonl"]
    assert [s.vt_ns for s in div.streams] == sorted(s.vt_ns for s in div.streams)


def test_a_prefix_diverges_unless_upto_shortest(tmp_path: Path) -> None:
    a, b = two_runs(tmp_path)
    kept = len(b.doms[1]) - 3
    del b.doms[1][kept:]  # dom 1's process was killed: its trace stops early
    div = first_divergence(a.write(), b.write())
    assert div is not None
    assert (div.file, div.index, div.event_b) == ("dom1-alpha.jsonl", kept, None)
    assert div.event_a == normalize(a.doms[1][kept])
    assert "(B ends here)" in format_divergence(div)
    assert first_divergence(a.root, b.root, upto_shortest=True) is None
    # and the other way round
    reverse = first_divergence(b.root, a.root)
    assert reverse is not None and reverse.event_a is None and reverse.index == kept


def test_a_torn_last_line_ends_a_trace_like_a_prefix(tmp_path: Path) -> None:
    a, b = two_runs(tmp_path)
    a.write()
    b.write()
    path = b.dom_path(2)
    path.write_text(path.read_text()[:-20])  # killed mid-line: the last event is torn
    assert first_divergence(a.root, b.root, upto_shortest=True) is None
    div = first_divergence(a.root, b.root)
    assert div is not None and div.event_b is None and div.index == len(a.doms[2]) - 1


def test_a_trace_file_missing_on_one_side(tmp_path: Path) -> None:
    a, b = two_runs(tmp_path)
    a.write()
    b.write()
    b.dom_path(2).unlink()
    div = first_divergence(a.root, b.root)
    assert div is not None and (div.file, div.index, div.event_b) == ("dom2-beta.jsonl", 0, None)
    assert first_divergence(a.root, b.root, upto_shortest=True) is None


def test_the_hypervisor_trace_is_compared_per_domain(tmp_path: Path) -> None:
    """Start-up order between domains is host timing: not a divergence by default, one with by_domain=False."""
    a, b = two_runs(tmp_path)
    i = next(i for i, e in enumerate(b.hv) if e.get("dom") == 1)
    j = next(j for j, e in enumerate(b.hv) if e.get("dom") == 2)
    b.hv[i], b.hv[j] = b.hv[j], b.hv[i]
    assert first_divergence(a.write(), b.write()) is None
    div = first_divergence(a.root, b.root, by_domain=False)
    # compared: "hypervisor up" (#0), then d1's "created" in A against d2's in B (#1)
    assert div is not None and (div.file, div.first.dom, div.index) == ("hypervisor.jsonl", None, 1)
    assert div.event_a is not None and div.event_b is not None
    assert (div.event_a["dom"], div.event_b["dom"]) == (1, 2)


@pytest.mark.parametrize("by_domain", [True, False])
def test_an_extra_event_in_the_middle_is_a_divergence(tmp_path: Path, by_domain: bool) -> None:
    a, b = two_runs(tmp_path)
    at = next(i for i, e in enumerate(b.hv) if e["event"] == "event.sent")
    b.hv.insert(at, {**b.hv[at], "eid": 100})
    div = first_divergence(a.write(), b.write(), by_domain=by_domain)
    assert div is not None and div.event_b is not None and div.event_b["eid"] == 100
    assert div.event_a is not None and div.event_a["eid"] == 1


def test_garbage_in_a_trace_raises(tmp_path: Path) -> None:
    a, b = two_runs(tmp_path)
    a.write()
    b.write()
    write_jsonl(b.dom_path(1), b.doms[1])
    with open(b.dom_path(1), "a", encoding="utf-8") as fh:
        fh.write("garbage\n")
    with pytest.raises(ValueError, match="not JSON"):
        first_divergence(a.root, b.root)

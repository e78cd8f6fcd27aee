"""An extension's fault kinds through real processes: scheduled by the spec's ``[[fault]]`` tables, injected into a
running cluster with ``pvcluster inject`` (the hypervisor checks the kind against its own catalog: the built-in
kinds and its extensions'), traced and recorded in faults.jsonl as a built-in kind is, replayed by ``up --replay``
(the replayed hypervisor loads the same extensions), and an ``apply`` that raises ending only the domain it targets.
The example's fault kind, which a guest's own check catches, is tested in examples/batched_flush."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import detached_cluster, run_cli, wait_until

from pvcluster.cluster import Cluster
from pvcluster.spec import parse_spec
from pvcluster.trace import read_events

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

EXTENSION = '''
from pvcluster.faults import Param

def arm(hv, dom, params, vt_ns):
    state = dom.ext.setdefault("probe", {})
    state["armed"] = state.get("armed", 0) + params["count"]
    return f"armed {state['armed']} on {dom.name}"

def boom(hv, dom, params, vt_ns):
    raise RuntimeError("boom in apply")

def register(reg):
    reg.fault_kind("probe-arm", "arm the probe", arm, params={"count": Param("how many", 1, 1, 10)})
    reg.fault_kind("probe-boom", "an apply that raises", boom)
'''

SPEC = """
[cluster]
name = "extfault"
seed = 7
[hypervisor]
pcpus = 2
[[extension]]
module = "probe_fault_ext"
path = "{path}"
[[domain]]
name = "victim"
vcpus = 2
cmdline = "workload=shootdown sdrounds=10 shutdown=poweroff"
[[domain]]
name = "bystander"
vcpus = 2
cmdline = "workload=shootdown sdrounds=10 shutdown=poweroff"
{extra}
"""

SPINNERS = """
[cluster]
name = "extspin"
[[extension]]
module = "probe_fault_ext"
path = "{path}"
[[domain]]
name = "spinner"
vcpus = 1
cmdline = "workload=forever"
"""


def _events(run_dir: Path, event: str) -> list[dict[str, Any]]:
    return [e for f in sorted((run_dir / "trace").glob("*.jsonl")) for e in read_events(f) if e["event"] == event]


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "faults.jsonl").read_text().splitlines()]


def test_spec_faults_of_an_extension_act_are_traced_and_a_raising_apply_ends_only_its_domain(run_dir: Path) -> None:
    (run_dir / "probe_fault_ext.py").write_text(EXTENSION)
    extra = ('[[fault]]\nkind = "probe-arm"\ntarget = "bystander"\nat_ns = 0\ncount = 2\n'
             '[[fault]]\nkind = "probe-boom"\ntarget = "victim"\nat_ns = 20000\n')
    spec = parse_spec(SPEC.format(path=run_dir, extra=extra))
    with Cluster.start(spec, run_dir=run_dir / "run") as cluster:
        final = cluster.wait(timeout_s=120)
        listed = {d["name"]: d["state"] for d in cluster.client.call("list")}  # the hypervisor still answers
    doms = {d["name"]: d for d in final["domains"]}
    cause = "extension probe_fault_ext: fault kind probe-boom raised RuntimeError('boom in apply')"
    assert (doms["victim"]["state"], doms["victim"]["crash"]) == ("crashed", cause)
    assert (doms["bystander"]["state"], doms["bystander"]["shutdown_reason"]) == ("dead", "poweroff")
    assert listed == {"victim": "crashed", "bystander": "dead"}
    rd = run_dir / "run"
    assert [(e["kind"], e["extension"], e["origin"]) for e in _events(rd, "fault.inject")] == [
        ("probe-arm", "probe_fault_ext", "spec"), ("probe-boom", "probe_fault_ext", "spec")]
    assert [e["outcome"] for e in _events(rd, "fault.outcome")] == ["armed 2 on bystander", f"error: {cause}"]
    assert [(r["kind"], r["target"], r["params"], r["outcome"]) for r in _records(rd)] == [
        ("probe-arm", "bystander", {"count": 2}, "armed 2 on bystander"),
        ("probe-boom", "victim", {}, f"error: {cause}")]


def test_pvcluster_inject_takes_an_extension_kind_and_up_replay_reproduces_it(run_dir: Path) -> None:
    (run_dir / "probe_fault_ext.py").write_text(EXTENSION)
    with detached_cluster(run_dir, SPINNERS.format(path=run_dir)) as rd:
        wait_until(lambda: "spinning forever" in run_cli("console", "spinner", "--run-dir", str(rd)).stdout)
        done = run_cli("inject", "probe-arm", "spinner", "count=3", "--json", "--run-dir", str(rd))
        assert done.returncode == 0, done.stderr
        rec = json.loads(done.stdout)
        assert (rec["kind"], rec["params"], rec["origin"], rec["outcome"]) == (
            "probe-arm", {"count": 3}, "interactive", "armed 3 on spinner")
        # the hypervisor checks what the toolstack could not: its catalog is the built-in kinds and its extensions'
        for args, msg in ((("probe-arm", "spinner", "count=11"), "probe-arm: count must be an integer between 1"),
                          (("probe-nope", "spinner"), "unknown fault kind 'probe-nope'; kinds: kill,"),
                          (("drop", "spinner", "count=0"), "drop: count must be an integer between 1")):
            bad = run_cli("inject", *args, "--run-dir", str(rd))
            assert bad.returncode != 0 and msg in bad.stderr, (args, bad.stderr)
        assert "probe-arm, probe-boom" in run_cli("inject", "probe-nope", "spinner", "--run-dir", str(rd)).stderr
    assert [(r["kind"], r["outcome"]) for r in _records(rd)] == [("probe-arm", "armed 3 on spinner")]


def test_a_replay_reruns_an_interactive_extension_fault_at_the_same_step(run_dir: Path) -> None:
    (run_dir / "probe_fault_ext.py").write_text(EXTENSION)
    a = run_dir / "a"
    with Cluster.start(parse_spec(SPEC.format(path=run_dir, extra="")), run_dir=a) as cluster:
        cluster.wait_for("shootdown", dom="victim")  # under way
        rec = cluster.inject("probe-arm", "victim", count=4)
        assert rec["outcome"] == "armed 4 on victim"
        cluster.wait(timeout_s=120)
    replayed = run_cli("up", "--replay", str(a), "--quiet")
    assert replayed.returncode == 0, replayed.stderr
    b = run_dir / "a-replay-1"
    key = ("fid", "kind", "target", "params", "step", "point", "vt_ns", "outcome")
    assert [{k: f[k] for k in key} for f in _records(b)] == [{k: f[k] for k in key} for f in _records(a)]
    assert [e["extension"] for e in _events(b, "fault.inject")] == ["probe_fault_ext"]

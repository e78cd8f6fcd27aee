"""Fault kinds that extensions add (``Registry.fault_kind``), in-process: the registry's rules (no built-in kind's
name, no kind twice, parameters as ``pvcluster.faults.Param``), the spec's ``[[fault]]`` tables checked against the
built-in kinds and the spec's extensions', the toolstack passing a kind it does not know to the hypervisor, and the
``FaultPlan`` dispatching an extension's kind: traced and recorded as a built-in kind is, and an ``apply`` that raises
ends only the domain it targets. The end-to-end half is tests/test_extension_e2e.py and the batched_flush example."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from fakes import Cluster
from helpers import RecordingLog
from test_core import _ping_programs

from hypervisor.core import Hypervisor
from pvcluster.extensions import ExtensionError, load
from pvcluster.extspec import ExtensionSpec
from pvcluster.faults import KINDS, FaultError, FaultRequest, checked_here, request
from pvcluster.spec import SpecError, parse_spec

MODULE = '''
from pvcluster.faults import Param

def arm(hv, dom, params, vt_ns):
    state = dom.ext.setdefault("probe", {})
    state["armed"] = state.get("armed", 0) + params["count"]
    return f"armed {state['armed']}"

def boom(hv, dom, params, vt_ns):
    raise RuntimeError("apply failed")

def on_vcpu(hv, dom, params, vt_ns):
    return f"vcpu {params['vcpu']} of {dom.name}"

def register(reg):
    reg.fault_kind("probe-arm", "arm the probe", arm, params={"count": Param("how many", 1, 1, 10)})
    reg.fault_kind("probe-boom", "an apply that raises", boom)
    reg.fault_kind("probe-vcpu", "a vCPU kind", on_vcpu, target="vcpu")
'''

SPEC = """
[cluster]
name = "xf"
seed = 3
[hypervisor]
pcpus = 2
[[extension]]
module = "probe_ext"
path = "{path}"
[[domain]]
name = "alpha"
vcpus = 2
cpus = [0]
[[domain]]
name = "beta"
vcpus = 2
cpus = [1]
{extra}
"""


def _module(tmp_path: Path, body: str = MODULE, name: str = "probe_ext") -> ExtensionSpec:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return ExtensionSpec(module=name, path=str(tmp_path))


def _fault(kind: str, target: str, at_ns: int, **params: int) -> str:
    lines = [f'kind = "{kind}"', f'target = "{target}"', f"at_ns = {at_ns}", *(f"{k} = {v}" for k, v in params.items())]
    return "[[fault]]\n" + "\n".join(lines) + "\n"


def _spec(tmp_path: Path, extra: str = "") -> str:
    _module(tmp_path)
    return SPEC.format(path=tmp_path, extra=extra)


# -- the registry's rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "msg"), [
    ('reg.fault_kind("skip-flush", "d", f)', "fault kind skip-flush is a built-in kind"),
    ('reg.fault_kind("Bad_Name", "d", f)', "fault kind name must match"),
    ('reg.fault_kind("x-" + "y" * 60, "d", f)', "at most 48 characters"),
    ('reg.fault_kind("mine", "d", f); reg.fault_kind("mine", "d", f)', "fault kind mine registered twice"),
    ('reg.fault_kind("mine", "", f)', "needs a doc string"),
    ('reg.fault_kind("mine", "d", 3)', "apply of fault kind mine is not callable"),
    ('reg.fault_kind("mine", "d", f, target="link")', "target must be 'domain' or 'vcpu'"),
    ('reg.fault_kind("mine", "d", f, params={"count": 3})', "parameter count must be a pvcluster.faults.Param"),
    ('reg.fault_kind("mine", "d", f, params={"at_ns": Param("x")})', "parameter name must match"),
    ('reg.fault_kind("mine", "d", f, params={"vcpu": Param("x")})', "parameter name must match"),
    ('reg.fault_kind("mine", "d", f, params={"n": Param("x", 5, 1, 3)})', "needs lo <= default <= hi"),
])
def test_the_registry_refuses_a_fault_kind_it_cannot_carry_and_names_the_extension(
        tmp_path: Path, call: str, msg: str) -> None:
    ext = _module(tmp_path, f"from pvcluster.faults import Param\nf = lambda hv, dom, params, vt: 'x'\n"
                            f"def register(reg):\n    {call}\n", "bad_ext")
    with pytest.raises(ExtensionError, match=r"^extension bad_ext: .*" + msg.replace("(", r"\(")):
        load([ext])


def test_two_extensions_may_not_add_the_same_kind(tmp_path: Path) -> None:
    body = "def register(reg):\n    reg.fault_kind('shared-kind', 'd', lambda hv, dom, p, vt: 'x')\n"
    one, two = _module(tmp_path, body, "one_ext"), _module(tmp_path, body, "two_ext")
    with pytest.raises(ExtensionError, match="extension two_ext: fault kind shared-kind is also registered by "
                                             "extension one_ext"):
        load([one, two])


def test_the_catalog_of_a_cluster_is_the_built_in_one_and_its_extensions_kinds(tmp_path: Path) -> None:
    exts = load([_module(tmp_path)])
    catalog = exts.fault_catalog()
    assert list(catalog)[:len(KINDS)] == list(KINDS) and list(catalog)[len(KINDS):] == [
        "probe-arm", "probe-boom", "probe-vcpu"]
    assert catalog["probe-arm"].group == "extension" and "(extension probe_ext)" in catalog["probe-arm"].doc
    # the same checks as a built-in kind's parameters
    assert request("probe-arm", "alpha", None, None, catalog).params == {"count": 1}
    for args, msg in (((None, {"count": 11}), "count must be an integer between 1 and 10"),
                      ((None, {"cnt": 1}), r"unknown parameter cnt \(takes: count\)"),
                      ((-5, {}), "at_ns must be an integer")):
        with pytest.raises(FaultError, match=f"probe-arm: {msg}"):
            request("probe-arm", "alpha", *args, catalog)
    with pytest.raises(FaultError, match="probe-vcpu: target must be a vCPU"):
        request("probe-vcpu", "alpha", None, None, catalog)
    with pytest.raises(FaultError, match="unknown fault kind 'probe-arm'"):
        request("probe-arm", "alpha")  # the built-in catalog alone does not know it


# -- the spec ------------------------------------------------------------------------------------------------


def test_the_spec_s_faults_may_name_its_extensions_kinds_checked_as_built_in_ones(tmp_path: Path) -> None:
    spec = parse_spec(_spec(tmp_path, _fault("probe-arm", "alpha", 20000, count=3) + _fault("probe-vcpu", "beta.1", 0)))
    assert spec.faults == (FaultRequest("probe-arm", "alpha", 20000, {"count": 3}),
                           FaultRequest("probe-vcpu", "beta.1", 0, {}))
    with pytest.raises(SpecError) as bad:
        parse_spec(_spec(tmp_path, _fault("probe-arm", "alpha", 0, count=99) + _fault("probe-vcpu", "beta.5", 0)
                         + _fault("probe-nope", "alpha", 0)))
    assert bad.value.problems == [
        "fault[0]: probe-arm: count must be an integer between 1 and 10 (how many), got 99",
        "fault[1].target: domain beta has 2 vCPUs, no vCPU 5",
        "fault[2]: unknown fault kind 'probe-nope'; kinds: " + ", ".join([*KINDS, "probe-arm", "probe-boom",
                                                                          "probe-vcpu"])]


def test_an_extension_kind_without_its_extension_or_with_one_that_does_not_load_is_a_spec_error(
        tmp_path: Path) -> None:
    no_ext = SPEC.format(path=tmp_path, extra=_fault("probe-arm", "alpha", 0)).replace(
        f'[[extension]]\nmodule = "probe_ext"\npath = "{tmp_path}"\n', "")
    with pytest.raises(SpecError, match=r"fault\[0\]: unknown fault kind 'probe-arm'"):
        parse_spec(no_ext)
    (tmp_path / "probe_ext.py").write_text("def register(reg):\n    raise ValueError('nope')\n")
    with pytest.raises(SpecError, match=r"fault\[0\]\.kind: fault kind \"probe-arm\" is not built in, and the spec's "
                                        r"extensions, which might add it, do not load: extension probe_ext: "
                                        r"register\(\) raised ValueError\('nope'\)"):
        parse_spec(SPEC.format(path=tmp_path, extra=_fault("probe-arm", "alpha", 0)))
    # a spec whose faults are all built in never loads its extensions to check them (the hypervisor does, at start)
    assert parse_spec(SPEC.format(path=tmp_path, extra=_fault("drop", "alpha", 0))).faults[0].kind == "drop"


def test_the_toolstack_checks_built_in_kinds_and_leaves_the_others_to_the_hypervisor() -> None:
    with pytest.raises(FaultError, match="count must be an integer"):
        checked_here("drop", "alpha", None, {"count": 0})
    assert checked_here("probe-arm", "alpha", None, {"count": 99}) == FaultRequest("probe-arm", "alpha", None,
                                                                                   {"count": 99})


# -- the hypervisor ------------------------------------------------------------------------------------------


def test_the_plan_runs_an_extension_kind_traces_and_records_it_and_a_raising_apply_ends_only_its_domain(
        tmp_path: Path) -> None:
    extra = (_fault("probe-arm", "alpha", 20000, count=2) + _fault("probe-vcpu", "beta.1", 20000)
             + _fault("probe-boom", "beta", 40000) + _fault("probe-arm", "alpha", 60000))
    log = RecordingLog()
    programs = {"alpha": _ping_programs(20, 3000), "beta": _ping_programs(20, 4100)}
    cluster = Cluster(parse_spec(_spec(tmp_path, extra)), programs, log)
    cluster.run()
    hv = cluster.hv
    injected = [(kw["kind"], kw["extension"], kw["vt_ns"]) for e, kw in log.events if e == "fault.inject"]
    assert injected == [("probe-arm", "probe_ext", 20000), ("probe-vcpu", "probe_ext", 20000),
                        ("probe-boom", "probe_ext", 40000), ("probe-arm", "probe_ext", 60000)]
    cause = "extension probe_ext: fault kind probe-boom raised RuntimeError('apply failed')"
    assert [r["outcome"] for r in hv.faults.log] == ["armed 2", "vcpu 1 of beta", f"error: {cause}", "armed 3"]
    alpha, beta = hv.domains.get("alpha"), hv.domains.get("beta")
    assert alpha.ext["probe"] == {"armed": 3} and alpha.state.value == "dead"
    assert beta.state.value == "crashed" and beta.crash_detail == cause
    crash = [kw for e, kw in log.events if e == "domain.crash"]
    assert [c["detail"] for c in crash] == [cause] and "RuntimeError: apply failed" in crash[0]["traceback"]


def test_a_running_hypervisor_checks_against_its_own_catalog_and_replays_a_recorded_extension_fault(
        tmp_path: Path) -> None:
    hv = Hypervisor(parse_spec(_spec(tmp_path)), RecordingLog())
    assert "probe-arm" in hv.fault_kinds and "drop" in hv.fault_kinds
    dom = hv.create_domain(hv.spec.domains[0])
    rec = hv.faults.now(request("probe-arm", "alpha", None, {"count": 4}, hv.fault_kinds), "interactive")
    assert rec["outcome"] == "armed 4" and dom.ext["probe"] == {"armed": 4}
    # a replay plans the record as it was, and dispatches the kind to the extension again
    other = Hypervisor(parse_spec(_spec(tmp_path)), RecordingLog())
    odom = other.create_domain(other.spec.domains[0])
    other.faults.replay(rec)
    assert other.faults.pending[0].request == FaultRequest("probe-arm", "alpha", None, {"count": 4})
    other.faults.at_close(rec["step"], rec["vt_ns"])
    assert other.faults.log[0]["outcome"] == "armed 4" and odom.ext["probe"] == {"armed": 4}
    # a hypervisor without the extension refuses the recorded kind as an outcome, and stays up
    bare = Hypervisor(parse_spec(SPEC.format(path=tmp_path, extra="").split("[[extension]]")[0]
                                 + "[[domain]]\nname = \"alpha\"\n"), RecordingLog())
    bare.create_domain(bare.spec.domains[0])
    bare.faults.replay(rec)
    bare.faults.at_close(rec["step"], rec["vt_ns"])
    assert bare.faults.log[0]["outcome"].startswith("refused: no fault kind probe-arm in this cluster")

"""The built-in kernel's paravirt_ops under every backend x boot protocol, with and without call-site patching.

One cluster runs every combination as its own domain; each guest calls every op through its call site and checks
what the op did in guest code (`workload=ops`), then prints which backend's code each pv_ops slot runs.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from domains.kernel.build import PV_OPS
from hypervisor.vmi_rom import VMI_NULL_OPS, VMI_OPS
from pvcluster.cluster import Cluster
from pvcluster.spec import parse_spec
from pvcluster.trace import read_events

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

BACKENDS = ("xen", "vmi", "native")
PROTOCOLS = ("ebx", "ident", "entry")
BACKEND_ID = {"xen": 0, "vmi": 1, "native": 2}
PROTOCOL_ID = {"ebx": 0, "ident": 1, "entry": 2}
# NULL in the backend's table: the native code must stay in those slots (the null-entry rule).
XEN_NULL = {"set_tss_desc"}
# Slots past the VMI ROM's table (it has len(VMI_OPS) slots): the ROM has no entry, so they are NULL for vmi.
VMI_NULL = set(VMI_NULL_OPS) | (set(PV_OPS) - set(VMI_OPS))
LETTER = {"xen": "X", "vmi": "V", "native": "N"}


def expected_dump(backend: str) -> str:
    nulls = {"xen": XEN_NULL, "vmi": VMI_NULL, "native": set(PV_OPS)}[backend]
    return "".join("N" if op in nulls else LETTER[backend] for op in PV_OPS)


def _domain(name: str, backend: str, boot: str, cmdline: str, patching: bool = True, faults: str = "") -> str:
    return (
        f'[[domain]]\nname = "{name}"\nvcpus = 2\nbackend = "{backend}"\nboot = "{boot}"\n'
        f'cmdline = "{cmdline}"\npatching = {"true" if patching else "false"}\nfaults = [{faults}]\n'
    )


@pytest.fixture(scope="module")
def matrix() -> Iterator[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="pvc-") as d:
        yield _run_matrix(Path(d))


def _run_matrix(run_dir: Path) -> dict[str, Any]:
    doms = [
        _domain(f"{b}-{p}", b, p, "workload=ops shutdown=poweroff") for b, p in itertools.product(BACKENDS, PROTOCOLS)
    ]
    doms += [_domain(f"{b}-nopatch", b, "ebx", "workload=ops shutdown=poweroff", patching=False) for b in BACKENDS]
    doms.append(_domain("bad-ident", "xen", "ident", "shutdown=poweroff", faults='"ident=0xdeadbeef"'))
    spec = parse_spec('[cluster]\nname = "matrix"\n' + "".join(doms))
    with Cluster.start(spec, run_dir=run_dir) as cluster:
        final = cluster.wait(timeout_s=200)
        consoles = {d["name"]: cluster.client.call("console", dom=d["domid"]) for d in final["domains"]}
    return {"final": {d["name"]: d for d in final["domains"]}, "consoles": consoles, "run_dir": run_dir}


@pytest.mark.parametrize(("backend", "boot"), list(itertools.product(BACKENDS, PROTOCOLS)))
def test_every_op_checked_in_guest_code(matrix: dict[str, Any], backend: str, boot: str) -> None:
    name = f"{backend}-{boot}"
    dom, lines = matrix["final"][name], matrix["consoles"][name]
    assert "pvkern: ops test failures: 0" in lines, lines
    assert (dom["state"], dom["shutdown_reason"]) == ("dead", "poweroff"), dom
    proto_line = (
        f"pvkern: boot protocol {PROTOCOL_ID[boot]} (0 ebx, 1 ident, 2 entry), "
        f"backend {BACKEND_ID[backend]} (0 xen, 1 vmi, 2 native)"
    )
    assert proto_line in lines
    assert f"pvkern: pv_ops {expected_dump(backend)}" in lines
    assert "pvkern: vcpu 1 of 2 online" in lines


@pytest.mark.parametrize("backend", BACKENDS)
def test_null_entries_keep_native_code_for_exactly_those_slots(matrix: dict[str, Any], backend: str) -> None:
    dump = next(line for line in matrix["consoles"][f"{backend}-ebx"] if line.startswith("pvkern: pv_ops "))
    letters = dump.removeprefix("pvkern: pv_ops ")
    native_slots = {op for op, letter in zip(PV_OPS, letters, strict=True) if letter == "N"}
    if backend == "xen":
        assert native_slots == XEN_NULL  # set_tss_desc is NULL in the xen table
    elif backend == "vmi":
        assert native_slots == VMI_NULL and "set_tss_desc" in native_slots
        assert {"lazy_mmu_begin", "lazy_mmu_end"} <= native_slots  # past the ROM's 16 slots
    else:
        assert native_slots == set(PV_OPS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patching_rewrites_call_sites_and_can_be_switched_off(matrix: dict[str, Any], backend: str) -> None:
    patched = [line for line in matrix["consoles"][f"{backend}-ebx"] if line.startswith("pvkern: patched call sites")]
    assert len(patched) == 1
    inline, direct = (int(w) for w in patched[0].replace(",", "").split() if w.isdigit())
    if backend == "native":
        assert inline > 0  # cli, sti, pushf/pop, ... written in place of the calls
    else:
        assert inline == 0 and direct > 0
    off = matrix["consoles"][f"{backend}-nopatch"]
    assert not any(line.startswith("pvkern: patched") for line in off)
    assert "pvkern: ops test failures: 0" in off


def test_unknown_ident_panics_on_the_console_and_crashes(matrix: dict[str, Any]) -> None:
    dom, lines = matrix["final"]["bad-ident"], matrix["consoles"]["bad-ident"]
    assert f"pvkern: PANIC: unknown hypervisor ident {0xDEADBEEF - (1 << 32)}" in lines
    assert dom["state"] == "crashed" and dom["shutdown_reason"] == "crash"


def test_trace_names_protocol_and_backend(matrix: dict[str, Any]) -> None:
    run_dir: Path = matrix["run_dir"]
    for backend, boot in itertools.product(BACKENDS, PROTOCOLS):
        dom = matrix["final"][f"{backend}-{boot}"]
        built = [
            e
            for e in read_events(run_dir / "trace" / f"dom{dom['domid']}-{backend}-{boot}.jsonl")
            if e["event"] == "domain.built"
        ]
        assert len(built) == 1 and (built[0]["backend"], built[0]["boot"]) == (backend, boot)
    dmesg = [e["text"] for e in read_events(run_dir / "trace" / "hypervisor.jsonl") if e["event"] == "dmesg"]
    assert any("backend vmi, boot entry" in t for t in dmesg)

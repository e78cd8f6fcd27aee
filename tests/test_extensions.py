"""Hypercall extensions in-process: the spec's [[extension]] tables, the registry's rules (no built-in number
without override, no number twice, modules that do not load), entry-point discovery, the copy-in declared as data
and carried in Build, dispatch through the hypervisor's own table, and what a misbehaving handler does to its
call. The end-to-end halves (a real cluster) are examples/batched_flush/test_batched_flush.py and
tests/test_extension_e2e.py."""

from __future__ import annotations

import struct
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import RecordingLog, make_call

from hypervisor import hypercalls
from hypervisor.core import Hypervisor
from hypervisor.extensions import ExtensionFailed
from pvcluster import extensions
from pvcluster.abi.copyin import MAX_SPAN, copy_in
from pvcluster.abi.errno import Errno
from pvcluster.abi.extcopy import ArgSpan, ExtCopyIn, descriptors
from pvcluster.abi.xen import Hypercall
from pvcluster.bus import codec
from pvcluster.bus.messages import Build, Region
from pvcluster.designs import mode_of
from pvcluster.extensions import ExtensionError, load
from pvcluster.extspec import ExtensionSpec
from pvcluster.spec import SpecError, parse_spec

MODULE = '''
from pvcluster.abi.extcopy import ArgSpan

def handle(call):
    kind = call.arg(0)
    if kind == 1:
        raise RuntimeError("boom")
    if kind == 2:
        return call.mem.u32(call.arg(1))  # a guest pointer: GuestFault when it is not mapped
    if kind == 3:
        return "not a number"
    call.work_ns += 123
    call.record("probe", value=call.mem.u32(call.arg(1)))
    return 7

def register(reg):
    reg.hypercall({nr}, "probe", handle, copyin=[ArgSpan(addr_arg=1, size=4)])
'''


def _write(tmp_path: Path, name: str = "probe_ext", nr: int = 60, body: str | None = None) -> Path:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body if body is not None else MODULE.format(nr=nr)))
    return tmp_path


def _ext(tmp_path: Path, name: str = "probe_ext", override: bool = False) -> ExtensionSpec:
    return ExtensionSpec(module=name, path=str(tmp_path), override=override)


def _spec(tmp_path: Path, extra: str) -> Any:
    return parse_spec(f"""
[[domain]]
name = "a"
vcpus = 2
{extra}
""", base_dir=tmp_path)


# -- the spec -------------------------------------------------------------------------------------------------------


def test_extension_tables_parse_resolve_their_path_and_survive_the_process_boundary(tmp_path: Path) -> None:
    spec = _spec(tmp_path, '[[extension]]\nmodule = "pkg.mod"\npath = "sub"\noverride = true\n'
                           '[[extension]]\nentry_point = "batched-flush"\n')
    assert spec.extensions == (ExtensionSpec("pkg.mod", "", str(tmp_path / "sub"), True),
                               ExtensionSpec("", "batched-flush", "", False))
    again = type(spec).from_dict(spec.to_dict())
    assert again.extensions == spec.extensions
    assert "extension" not in _spec(tmp_path, "").to_dict()  # a spec without any keeps its old shape


@pytest.mark.parametrize(("table", "problem"), [
    ('module = "a"\nentry_point = "b"', "exactly one of module"),
    ('path = "."', "exactly one of module"),
    ('module = "not a module"', "dotted Python module name"),
    ('module = "1abc"', "dotted Python module name"),
    ('module = "os..path"', "dotted Python module name"),
    ('entry_point = "no spaces"', "entry_point: must match"),
    ('entry_point = "x"\npath = "."', "only for a module"),
    ('module = "a"\noverride = "yes"', "must be a boolean"),
    ('module = "a"\nbogus = 1', "unknown key"),
])
def test_bad_extension_tables_are_spec_errors(tmp_path: Path, table: str, problem: str) -> None:
    with pytest.raises(SpecError) as err:
        _spec(tmp_path, f"[[extension]]\n{table}\n")
    assert problem in str(err.value)


def test_the_same_extension_twice_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"extension\[1\]: duplicate extension 'a'"):
        _spec(tmp_path, '[[extension]]\nmodule = "a"\n[[extension]]\nmodule = "a"\n')


# -- the registry ---------------------------------------------------------------------------------------------------


def test_a_module_registers_its_family_with_copyin_and_c_define(tmp_path: Path) -> None:
    exts = load([_ext(_write(tmp_path))], builtin=set(hypercalls.FAMILIES))
    (fam,) = exts.families.values()
    assert (fam.nr, fam.name, fam.extension, fam.overrides) == (60, "probe", "probe_ext", False)
    assert exts.copyin() == [ExtCopyIn(60, [ArgSpan(addr_arg=1, size=4)])]
    assert exts.c_defines() == ["-D__HYPERVISOR_probe=60"]


def test_a_built_in_number_is_refused_without_override_and_replaced_with_it(tmp_path: Path) -> None:
    _write(tmp_path, nr=int(Hypercall.xen_version))
    with pytest.raises(ExtensionError, match="built-in family's number; set override = true"):
        load([_ext(tmp_path)], builtin=set(hypercalls.FAMILIES))
    exts = load([_ext(tmp_path, override=True)], builtin=set(hypercalls.FAMILIES))
    assert exts.families[Hypercall.xen_version].overrides


def test_a_number_two_extensions_register_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, "one", nr=61)
    _write(tmp_path, "two", nr=61)
    with pytest.raises(ExtensionError, match="extension two: hypercall 61 .* also registered by extension one"):
        load([_ext(tmp_path, "one"), _ext(tmp_path, "two")])


@pytest.mark.parametrize(("register", "problem"), [
    ('reg.hypercall(60, "a", h)\n    reg.hypercall(60, "b", h)', "hypercall 60 registered twice"),
    ('reg.hypercall(128, "a", h)', "must be 0..127"),
    ('reg.hypercall(-1, "a", h)', "must be 0..127"),
    ('reg.hypercall(True, "a", h)', "must be 0..127"),
    ('reg.hypercall(60, "Bad Name", h)', "name must match"),
    ('reg.hypercall(60, "a", 5)', "not callable"),
    ('reg.hypercall(60, "a", h, copyin=[ArgSpan(addr_arg=7, size=4)])', "addr_arg must be 0..4"),
    ('reg.hypercall(60, "a", h, copyin=[ArgSpan(addr_arg=0, size=8, count_arg=1, max_count=1 << 20)])',
     r"max_count \* size"),
    ('reg.hypercall(60, "a", h, copyin=[(0, 4)])', "must be ArgSpan records"),
    ('raise ValueError("nope")', "register\\(\\) raised ValueError"),
])
def test_what_a_registration_may_not_do(tmp_path: Path, register: str, problem: str) -> None:
    body = ("from pvcluster.abi.extcopy import ArgSpan\ndef h(call):\n    return 0\n"
            f"def register(reg):\n    {register}\n")
    _write(tmp_path, body=body)
    with pytest.raises(ExtensionError, match=problem):
        load([_ext(tmp_path)])


def test_modules_that_do_not_load_are_named(tmp_path: Path) -> None:
    with pytest.raises(ExtensionError, match="extension no_such_module_here: cannot import it"):
        load([ExtensionSpec(module="no_such_module_here")])
    with pytest.raises(ExtensionError, match=r"no .*missing\.py \(or package\) under path"):
        load([_ext(tmp_path, "missing")])
    _write(tmp_path, "broken", body="raise ImportError('half a module')\n")
    with pytest.raises(ExtensionError, match="importing .*broken.py raised ImportError"):
        load([_ext(tmp_path, "broken")])
    _write(tmp_path, "noreg", body="X = 1\n")
    with pytest.raises(ExtensionError, match="has no register"):
        load([_ext(tmp_path, "noreg")])


def test_each_load_gets_a_fresh_module_and_registry(tmp_path: Path) -> None:
    """No state is shared between two loads (two hypervisors in one process, a toolstack and a hypervisor)."""
    _write(tmp_path, body="N = []\ndef h(call):\n    return 0\ndef register(reg):\n    N.append(1)\n"
                          "    reg.hypercall(60 + len(N) - 1, 'a', h)\n")
    assert list(load([_ext(tmp_path)]).families) == list(load([_ext(tmp_path)]).families) == [60]


class _EntryPoint:
    def __init__(self, name: str, target: Any) -> None:
        self.name, self._target = name, target

    def load(self) -> Any:
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


def test_entry_points_are_found_by_name_in_their_group(monkeypatch: pytest.MonkeyPatch) -> None:
    def register(reg: Any) -> None:
        reg.hypercall(62, "from_ep", lambda call: 0)

    seen: list[str] = []

    def entry_points(*, group: str) -> list[_EntryPoint]:
        seen.append(group)
        return [_EntryPoint("other", RuntimeError("not this one")), _EntryPoint("mine", register),
                _EntryPoint("broken", ImportError("gone"))]

    monkeypatch.setattr(extensions.importlib.metadata, "entry_points", entry_points)
    exts = load([ExtensionSpec(entry_point="mine")])
    assert seen == ["pvcluster.extensions"] and exts.families[62].name == "from_ep"
    assert exts.families[62].extension == "entry point mine"
    with pytest.raises(ExtensionError, match="no installed package offers a 'absent' entry point"):
        load([ExtensionSpec(entry_point="absent")])
    with pytest.raises(ExtensionError, match="loading it raised ImportError"):
        load([ExtensionSpec(entry_point="broken")])


# -- copy-in as data --------------------------------------------------------------------------------------------------


def test_declared_spans_follow_the_arguments_and_are_capped() -> None:
    decl = [ArgSpan(addr_arg=0, size=8, count_arg=1, max_count=64),
            ArgSpan(addr_arg=2, size=4, writable=True, when_arg0=0x1000)]
    extra = descriptors([ExtCopyIn(60, decl)])

    def read(addr: int, n: int) -> bytes | None:
        return bytes(n)

    spans = copy_in(60, [0x1000, 3, 0x2000, 0, 0], read, extra)
    assert [(s.addr, s.length, s.writable) for s in spans] == [(0x1000, 24, False), (0x2000, 4, True)]
    assert [(s.addr, s.length) for s in copy_in(60, [0x5000, 1000, 0x2000], read, extra)] == [(0x5000, 64 * 8)]
    assert copy_in(60, [0x1001, 0, 0x2000], read, extra) == []  # no elements, not the sub-command: nothing
    assert copy_in(60, [0x1000, 3, 0], read) == []  # without the declaration the number copies nothing
    # a declaration a message carried that does not check out names nothing
    assert copy_in(61, [0x1000, 3, 0], read, descriptors([ExtCopyIn(61, [ArgSpan(0, MAX_SPAN + 1)])])) == []


def test_the_build_message_carries_the_copyin_over_the_wire() -> None:
    build = Build(domid=1, name="a", vcpus=1, memory_bytes=4 << 20, kernel="pvkern", cmdline="", backend="xen",
                  boot="ebx", patching=True, hypercall_page=b"", ps_per_instr=1000, rom=b"",
                  copyin=[ExtCopyIn(50, [ArgSpan(addr_arg=0, size=8, count_arg=1, max_count=64)])])
    decoded = codec.decode(codec.encode(build, seq=1, vt_ns=0)).body
    assert decoded == build


# -- dispatch through the hypervisor's table ---------------------------------------------------------------------------


def _hv(tmp_path: Path, nr: int = 60, override: bool = False) -> tuple[Hypervisor, Any]:
    _write(tmp_path, nr=nr)
    text = f'[[extension]]\nmodule = "probe_ext"\npath = "{tmp_path}"\noverride = {str(override).lower()}\n'
    hv = Hypervisor(_spec(tmp_path, text), RecordingLog())
    return hv, hv.create_domain(hv.spec.domains[0])


def test_the_hypervisor_dispatches_to_its_extension_and_sends_the_copyin_in_build(tmp_path: Path) -> None:
    hv, dom = _hv(tmp_path)
    call = make_call(hv, dom, 60, [0, 0x3000], [Region(0x3000, 4, struct.pack("<I", 99), False)])
    assert hypercalls.dispatch(call) == 7 and call.work_ns == 123
    assert hv._build_message(dom).copyin == [ExtCopyIn(60, [ArgSpan(addr_arg=1, size=4)])]
    # another hypervisor without the extension knows nothing of the number
    plain = Hypervisor(_spec(tmp_path, ""), RecordingLog())
    other = plain.create_domain(plain.spec.domains[0])
    assert hypercalls.dispatch(make_call(plain, other, 60, [0, 0x3000], [])) == -Errno.ENOSYS


def test_an_override_replaces_the_built_in_family(tmp_path: Path) -> None:
    hv, dom = _hv(tmp_path, nr=int(Hypercall.xen_version), override=True)
    call = make_call(hv, dom, Hypercall.xen_version, [0, 0x3000], [Region(0x3000, 4, bytes(4), False)])
    assert hypercalls.dispatch(call) == 7


def test_a_refused_extension_stops_the_hypervisor_from_being_made(tmp_path: Path) -> None:
    _write(tmp_path, nr=int(Hypercall.xen_version))
    with pytest.raises(ExtensionError, match="override = true"):
        Hypervisor(_spec(tmp_path, f'[[extension]]\nmodule = "probe_ext"\npath = "{tmp_path}"\n'), RecordingLog())


def test_a_raising_handler_is_named_in_an_extension_failure(tmp_path: Path) -> None:
    hv, dom = _hv(tmp_path)
    with pytest.raises(ExtensionFailed, match=r"extension probe_ext: hypercall probe \(60\) raised "
                                              r"RuntimeError\('boom'\)"):
        hypercalls.dispatch(make_call(hv, dom, 60, [1, 0], []))
    with pytest.raises(ExtensionFailed, match="returned 'not a number', not a 32-bit integer"):
        hypercalls.dispatch(make_call(hv, dom, 60, [3, 0], []))


def test_an_unmapped_guest_pointer_is_efault_not_a_crash(tmp_path: Path) -> None:
    hv, dom = _hv(tmp_path)
    call = make_call(hv, dom, 60, [2, 0x4000], [Region(0x4000, 4, None, False)])
    assert hypercalls.dispatch(call) == -Errno.EFAULT
    assert any(ev == "ext.guest_fault" for ev, _ in hv.log.events)


# -- the design a domain names ---------------------------------------------------------------------------------------


def test_a_domain_names_its_design_on_its_command_line() -> None:
    assert mode_of({"backend": "xen", "cmdline": "design=batched"}) == "batched"
    assert mode_of({"backend": "xen", "cmdline": "workload=shootdown"}) == "pv"
    assert mode_of({"backend": "xen", "cmdline": "design="}) == "pv"


def test_an_extension_entry_of_a_multicall_gets_its_declared_buffers(tmp_path: Path) -> None:
    """The domain process copies an extension entry's buffers with the multicall's trap, and the hypervisor runs
    the entry on them (its result written back into the entry)."""
    entries, value = 0x5000, 0x6000
    raw = struct.pack("<8I", 60, 0xA5A5A5A5, 0, value, 0, 0, 0, 0)
    memory = {entries: raw, value: struct.pack("<I", 41)}

    def read(addr: int, n: int) -> bytes | None:
        return memory.get(addr, b"")[:n] or None

    extra = load([_ext(_write(tmp_path))]).descriptors
    spans = copy_in(Hypercall.multicall, [entries, 1], read, extra)
    assert [(s.addr, s.length) for s in spans] == [(entries, 32), (value, 4)]
    assert [(s.addr, s.length) for s in copy_in(Hypercall.multicall, [entries, 1], read)] == [(entries, 32)]
    hv, dom = _hv(tmp_path)
    dom.work_left = hv.work_budget
    call = make_call(hv, dom, Hypercall.multicall, [entries, 1],
                     [Region(entries, 32, raw, True), Region(value, 4, memory[value], False)])
    assert hypercalls.dispatch(call) == 0
    assert [(w.addr, w.data) for w in call.mem.writes] == [(entries + 4, struct.pack("<I", 7))]

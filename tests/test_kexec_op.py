"""In-process tests of kexec_op (37) and the toolstack's life-cycle actions (on_poweroff / on_reboot / on_crash):
the handler's checks on a real Domain of an in-process core, over hand-made guest regions, and restarts, kexec and
the reboot-storm guard through the scripted fake domains (tests/fakes.py)."""

from __future__ import annotations

import struct
import weakref
from typing import Any

import pytest
from fakes import Cluster, shutdown_op
from helpers import RecordingLog, core, make_call, run_handler

from hypervisor import core as core_mod
from hypervisor.domain import Domain, DomainState
from hypervisor.hypercalls import kexec_op
from pvcluster.abi import layouts
from pvcluster.abi.copyin import MAX_SPAN, copy_in
from pvcluster.abi.errno import Errno
from pvcluster.abi.platform import KEXEC_MAX_IMAGE_BYTES
from pvcluster.abi.xen import EM_386, Hypercall, KexecCmd, KexecType, ShutdownReason
from pvcluster.bus.messages import Region
from pvcluster.spec import SpecError, parse_spec

LOAD, SEGS, BUF, TYPE = 0x1000, 0x2000, 0x10000, 0x3000
IMAGE = b"\x7fELF" + bytes(range(256)) * 4

_HV: weakref.WeakKeyDictionary[Domain, Any] = weakref.WeakKeyDictionary()


@pytest.fixture
def dom() -> Domain:
    hv = core()
    d = hv.create_domain(hv.spec.domains[0])
    _HV[d] = hv
    return d


def _load_struct(nr: int = 1, ktype: int = KexecType.DEFAULT, arch: int = EM_386, segs: int = SEGS,
                 entry: int = 0x100000) -> bytes:
    return struct.pack("<BBHIQQ", ktype, 0, arch, nr, segs, entry)


def _seg(buf: int = BUF, size: int = len(IMAGE), dest: int = 0x100000, dest_size: int = 0x1000) -> bytes:
    return struct.pack("<QQQQ", buf, size, dest, dest_size)


def _regions(load: bytes, segs: bytes, bufs: dict[int, bytes | None]) -> list[Region]:
    out = [Region(LOAD, len(load), load, False), Region(SEGS, len(segs), segs, False)]
    return out + [Region(a, MAX_SPAN if d is None else len(d), d, False) for a, d in bufs.items()]


def _run(dom: Domain, cmd: int, regions: list[Region], arg: int = LOAD) -> int:
    call = make_call(_HV[dom], dom, Hypercall.kexec_op, [cmd, arg], regions)
    return run_handler(kexec_op, call)


def _type_region(t: int) -> list[Region]:
    return [Region(TYPE, 4, struct.pack("<i", t), False)]


def test_load_status_unload(dom: Domain) -> None:
    assert _run(dom, KexecCmd.kexec_status, _type_region(0), TYPE) == 0
    assert _run(dom, KexecCmd.kexec_load, _regions(_load_struct(), _seg(), {BUF: IMAGE})) == 0
    assert dom.kexec_images[KexecType.DEFAULT].data == IMAGE
    assert _run(dom, KexecCmd.kexec_status, _type_region(0), TYPE) == 1
    assert _run(dom, KexecCmd.kexec_status, _type_region(1), TYPE) == 0
    assert _run(dom, KexecCmd.kexec_unload, _type_region(0), TYPE) == 0
    assert _run(dom, KexecCmd.kexec_status, _type_region(0), TYPE) == 0


@pytest.mark.parametrize(("load", "seg", "bufs", "errno"), [
    (_load_struct(ktype=2), _seg(), {BUF: IMAGE}, Errno.EINVAL),  # no such type
    (_load_struct(arch=62), _seg(), {BUF: IMAGE}, Errno.EINVAL),  # an x86-64 image
    (_load_struct(nr=0), _seg(), {BUF: IMAGE}, Errno.EINVAL),
    (_load_struct(nr=16), _seg() * 16, {BUF: IMAGE}, Errno.EINVAL),  # KEXEC_SEGMENT_MAX
    (_load_struct(segs=1 << 32), _seg(), {BUF: IMAGE}, Errno.EFAULT),  # a handle past 4 GiB
    (_load_struct(), _seg(size=0x2000), {BUF: IMAGE}, Errno.EINVAL),  # buf_size > dest_size
    (_load_struct(), _seg(dest=0x100010), {BUF: IMAGE}, Errno.EADDRNOTAVAIL),  # not page-aligned
    (_load_struct(), _seg(dest=4 << 20), {BUF: IMAGE}, Errno.EADDRNOTAVAIL),  # past the domain's 4 MiB
    (_load_struct(), _seg(dest_size=1 << 63), {BUF: IMAGE}, Errno.EADDRNOTAVAIL),
    (_load_struct(entry=0), _seg(), {BUF: IMAGE}, Errno.EADDRNOTAVAIL),  # entry outside the image
    (_load_struct(), _seg(buf=0x50000), {BUF: IMAGE}, Errno.EFAULT),  # a buffer that was not copied
    (_load_struct(), _seg(buf=1 << 40), {BUF: IMAGE}, Errno.EFAULT),
    (_load_struct(), _seg(), {BUF: None}, Errno.EFAULT),  # a buffer that is not mapped
    (_load_struct(), _seg(), {BUF: b"MZ" + IMAGE[2:]}, Errno.EINVAL),  # not an ELF image
    (_load_struct(nr=2), _seg() + _seg(dest=0x100000 + 0x1000 - 0x1000), {BUF: IMAGE}, Errno.EINVAL),  # overlap
    (_load_struct(entry=0), _seg(dest=0, dest_size=2 << 20), {BUF: IMAGE}, Errno.ENOMEM),  # > KEXEC_MAX_IMAGE
])
def test_load_refusals(dom: Domain, load: bytes, seg: bytes, bufs: dict[int, bytes | None], errno: Errno) -> None:
    assert _run(dom, KexecCmd.kexec_load, _regions(load, seg, bufs)) == -errno
    assert not dom.kexec_images


def test_struct_not_mapped_and_other_commands(dom: Domain) -> None:
    assert _run(dom, KexecCmd.kexec_load, [Region(LOAD, 24, None, False)]) == -Errno.EFAULT
    assert _run(dom, KexecCmd.kexec, [Region(TYPE, 4, None, False)], TYPE) == -Errno.EFAULT
    assert _run(dom, KexecCmd.kexec, _type_region(0), TYPE) == -Errno.ENOENT  # nothing loaded
    assert _run(dom, KexecCmd.kexec, _type_region(7), TYPE) == -Errno.EINVAL
    for cmd in (KexecCmd.kexec_load_v1, KexecCmd.kexec_unload_v1, KexecCmd.kexec_get_range, 99, 1 << 31):
        assert _run(dom, cmd, []) == -Errno.EOPNOTSUPP
    assert _run(dom, KexecCmd.kexec_status, _type_region(5), TYPE) == -Errno.EINVAL


def test_kexec_ends_the_domain_with_reason_kexec(dom: Domain) -> None:
    assert _run(dom, KexecCmd.kexec_load, _regions(_load_struct(), _seg(), {BUF: IMAGE})) == 0
    call = make_call(_HV[dom], dom, Hypercall.kexec_op, [KexecCmd.kexec, TYPE], _type_region(0))
    assert run_handler(kexec_op, call) == 0
    assert call.deferred and call.shutdown == ShutdownReason.soft_reset
    assert _run(dom, KexecCmd.kexec_status, _type_region(0), TYPE) == -Errno.EBUSY  # under way


def test_copy_in_names_the_image_in_pieces_and_caps_it() -> None:
    big = 300 * 1024  # more than one trap's usual MAX_TOTAL (256 KiB)
    mem = {LOAD: _load_struct(), SEGS: _seg(size=big, dest_size=big + 0x1000 - big % 0x1000)}

    def read(addr: int, n: int) -> bytes | None:
        return mem[addr][:n] if addr in mem else None

    spans = copy_in(Hypercall.kexec_op, [KexecCmd.kexec_load, LOAD, 0, 0, 0], read)
    pieces = [s for s in spans if s.addr >= BUF]
    assert sum(s.length for s in pieces) == big and all(s.length <= MAX_SPAN for s in pieces)
    mem[SEGS] = _seg(size=KEXEC_MAX_IMAGE_BYTES + 1, dest_size=2 << 20)
    spans = copy_in(Hypercall.kexec_op, [KexecCmd.kexec_load, LOAD, 0, 0, 0], read)
    assert [s.addr for s in spans] == [LOAD, SEGS]  # too large: not copied, refused by the handler


# -- life-cycle actions and restarts, through fake domains ------------------------------------------------------


def _spec(**keys: str) -> str:
    extra = "".join(f'{k} = "{v}"\n' for k, v in keys.items())
    return f'[[domain]]\nname = "a"\nvcpus = 1\n{extra}'


def _cluster(programs: list[list[Any]], **keys: str) -> tuple[Cluster, RecordingLog]:
    log = RecordingLog()
    c = Cluster(parse_spec(_spec(**keys)), {"a": programs}, log)
    c.run()
    return c, log


def _events(log: RecordingLog, name: str) -> list[dict[str, Any]]:
    return [kw for ev, kw in log.events if ev == name]


def test_on_reboot_restart_and_the_storm_guard() -> None:
    c, log = _cluster([[("compute", 5_000), shutdown_op(ShutdownReason.reboot)]], on_reboot="restart")
    doms = list(c.hv.domains)
    restarted = _events(log, "domain.restarted")
    assert len(restarted) == core_mod.RESTART_LIMIT
    assert [(r["old_domid"], r["new_domid"]) for r in restarted] == [(i, i + 1) for i in range(1, 6)]
    assert all(r["why"] == "on_reboot=restart" for r in restarted)
    assert len(doms) == core_mod.RESTART_LIMIT + 1 and {d.name for d in doms} == {"a"}
    refused = _events(log, "domain.restart_refused")
    assert len(refused) == 1 and refused[0]["dom"] == doms[-1].domid


def test_default_on_reboot_preserves() -> None:
    c, log = _cluster([[shutdown_op(ShutdownReason.reboot)]])
    assert [d.state for d in c.hv.domains] == [DomainState.DEAD] and not _events(log, "domain.restarted")


def test_on_crash_destroy_and_coredump_restart() -> None:
    c, _ = _cluster([[shutdown_op(ShutdownReason.crash)]], on_crash="destroy")
    (d,) = c.hv.domains
    assert d.state is DomainState.DEAD and d.history[-1] == ("dead", "destroyed")
    c, _ = _cluster([[shutdown_op(ShutdownReason.crash)]])  # preserve: listed as crashed, as before
    assert [d.state for d in c.hv.domains] == [DomainState.CRASHED]
    c, log = _cluster([[shutdown_op(ShutdownReason.crash)]], on_crash="coredump-restart")
    # the shell dumps what the core lists (hypervisor/coredumps.py) before it ends their processes
    dumped = [d.domid for d in c.hv.coredumps]
    assert dumped[:2] == [1, 2] and _events(log, "domain.restarted")[0]["new_domid"] == 2


def _kexec_program(ktype: int = KexecType.DEFAULT) -> list[Any]:
    regions = _regions(_load_struct(ktype=ktype), _seg(), {BUF: IMAGE})
    exec_region = [Region(TYPE, 4, struct.pack("<i", ktype), False)]
    return [("hc", Hypercall.kexec_op, [KexecCmd.kexec_load, LOAD, 0, 0, 0], regions),
            ("hc", Hypercall.kexec_op, [KexecCmd.kexec, TYPE, 0, 0, 0], exec_region)]


def test_kexec_builds_a_new_domain_from_the_image() -> None:
    c, log = _cluster([_kexec_program()])
    doms = list(c.hv.domains)
    first = _events(log, "domain.restarted")[0]
    assert (first["old_domid"], first["new_domid"], first["why"]) == (1, 2, "kexec")
    assert doms[0].end_reason == "kexec" and doms[0].summary()["shutdown_reason"] == "kexec"
    assert [e["reason"] for e in _events(log, "domain.shutdown") if e["dom"] == 1] == ["kexec"]
    assert doms[1].image == IMAGE and doms[1].spec == doms[0].spec and doms[1].name == "a"


def test_kdump_boots_the_crash_image_after_asking_for_a_coredump() -> None:
    program = _kexec_program(KexecType.CRASH)[:1] + [shutdown_op(ShutdownReason.crash)]
    c, log = _cluster([program])
    first = _events(log, "domain.restarted")[0]
    assert (first["why"], [d.domid for d in c.hv.coredumps][0]) == ("kdump", 1)
    assert list(c.hv.domains)[1].image == IMAGE


def test_rename_restart_is_refused_with_a_clear_error() -> None:
    with pytest.raises(SpecError, match="rename-restart"):
        parse_spec(_spec(on_reboot="rename-restart"))
    with pytest.raises(SpecError, match="on_poweroff"):
        parse_spec(_spec(on_poweroff="coredump-destroy"))  # only on_crash takes the coredump actions
    assert parse_spec(_spec(on_crash="coredump-destroy")).domains[0].on_crash == "coredump-destroy"


def test_layout_sizes() -> None:
    assert (layouts.KEXEC_LOAD.size, layouts.KEXEC_SEGMENT.size) == (24, 32)


def test_kexec_op_in_a_multicall_is_refused(dom: Domain) -> None:
    from hypervisor.hypercalls import multicall

    entries = 0x40000
    entry = struct.pack("<8I", Hypercall.kexec_op, 0, KexecCmd.kexec_load, LOAD, 0, 0, 0, 0)
    regions = [Region(entries, 32, entry, True), *_regions(_load_struct(), _seg(), {BUF: IMAGE})]
    call = make_call(_HV[dom], dom, Hypercall.multicall, [entries, 1], regions)
    assert run_handler(multicall, call) == 0 and call.continuation is None
    assert [(w.addr, w.data) for w in call.mem.writes] == [(entries + 4, struct.pack("<i", -Errno.EINVAL))]
    assert not dom.kexec_images
    spans = copy_in(Hypercall.multicall, [entries, 1, 0, 0, 0], lambda a, n: entry[:n] if a == entries else None)
    assert [s.addr for s in spans] == [entries]  # nothing of the image is copied for it

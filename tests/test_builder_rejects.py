"""Every way the domain builder refuses an image, through a real cluster: the domain ends "crashed" with a
specific reason, the hypervisor logs it, and a good domain in the same cluster boots and shuts down regardless."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import attrs
import pytest

from domains.elf_pack import Segment, pack_elf32
from pvcluster.abi.xen import PAGE_SIZE, XenElfNote
from pvcluster.cluster import Cluster
from pvcluster.control import ControlError
from pvcluster.spec import parse_spec
from pvcluster.trace import read_events

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

BASE = 0xC0000000
CODE = b"\xeb\xfe" + bytes(PAGE_SIZE - 2)  # jmp $ (never runs: every image here is refused)
N = XenElfNote


def _notes(**overrides: int | str) -> list[tuple[int, int | bytes | str]]:
    values: dict[XenElfNote, int | str] = {
        N.GUEST_OS: "bad",
        N.XEN_VERSION: "xen-3.0",
        N.LOADER: "generic",
        N.VIRT_BASE: BASE,
        N.PADDR_OFFSET: BASE,
        N.HYPERCALL_PAGE: BASE + PAGE_SIZE,
    }
    values.update({XenElfNote[name]: value for name, value in overrides.items()})
    return list(values.items())


def _image(segments: list[Segment] | None = None, entry: int = BASE, **kwargs: Any) -> bytes:
    kwargs.setdefault("notes", _notes())
    return pack_elf32(entry=entry, segments=segments or [Segment(BASE, CODE, memsz=2 * PAGE_SIZE)], **kwargs)


def _random_bytes() -> bytes:
    data = random.Random(1234).randbytes(4096)
    assert data[:4] != b"\x7fELF"
    return data


@attrs.frozen
class Case:
    name: str
    data: bytes
    code: str
    details: tuple[str, ...]  # substrings the crash message must contain
    extra: str = ""  # more spec keys for this domain


NOT_ELF = _random_bytes()
CASES = (
    Case("bad-class", _image(elf_class=2), "wrong-class", ("EI_CLASS is 2", "ELFCLASS32")),
    Case("bad-machine", _image(machine=62), "wrong-machine", ("e_machine is 62", "EM_386 (3)")),
    Case("bad-nometa", _image(notes=()), "no-xen-metadata", ("neither Xen ELF notes nor a __xen_guest",)),
    Case(
        "bad-overlap",
        _image([Segment(BASE, CODE, memsz=2 * PAGE_SIZE), Segment(BASE + PAGE_SIZE, b"data", memsz=PAGE_SIZE)]),
        "segments-overlap",
        ("PT_LOAD 1 [0xc0001000, 0xc0002000)", "overlaps PT_LOAD 0 [0xc0000000, 0xc0002000)"),
    ),
    Case(
        "bad-toobig",
        _image([Segment(BASE, CODE, memsz=2 << 20)]),
        "segment-outside-memory",
        ("[0x0, 0x200000)", "beyond the 0x100000 bytes of guest memory"),
        extra="memory_mib = 1",
    ),
    Case(
        "bad-entry",
        _image(entry=BASE + 0x10_0000),
        "entry-outside-image",
        ("entry point 0xc0100000 (e_entry) is in no PT_LOAD segment",),
    ),
    Case(
        "bad-hcpage",
        _image(notes=_notes(HYPERCALL_PAGE=BASE + 0x10)),
        "hypercall-page-unaligned",
        ("hypercall page 0xc0000010 is not page-aligned",),
    ),
    Case(
        "bad-noentry",
        _image(symbols={"_start": BASE, "hypercall_page": BASE + PAGE_SIZE}),
        "no-entry-for-backend",
        ("'pv_entry_xen'",),
        extra='boot = "entry"',
    ),
)


def _spec_text(kernels: dict[str, Path]) -> str:
    parts = ['[cluster]\nname = "rejects"\n']
    for case in CASES:
        parts.append(f'[[domain]]\nname = "{case.name}"\nvcpus = 1\nkernel = "{kernels[case.name]}"\n{case.extra}\n')
    parts.append('[[domain]]\nname = "good"\nvcpus = 1\nkernel = "pvkern"\ncmdline = "shutdown=poweroff"\n')
    return "\n".join(parts)


def test_every_builder_rejection_crashes_only_its_domain(run_dir: Path) -> None:
    images = run_dir / "images"
    images.mkdir()
    kernels = {}
    for case in CASES:
        kernels[case.name] = images / f"{case.name}.elf"
        kernels[case.name].write_bytes(case.data)
    spec = parse_spec(_spec_text(kernels))
    assert [d.name for d in spec.domains] == [*(c.name for c in CASES), "good"]

    with Cluster.start(spec, run_dir=run_dir / "run") as cluster:
        final = cluster.wait(timeout_s=120)
        good_console = cluster.client.call("console", dom="good")
        dmesg = cluster.client.call("dmesg")
    doms = {d["name"]: d for d in final["domains"]}

    good = doms["good"]
    assert (good["state"], good["shutdown_reason"], good["crash"]) == ("dead", "poweroff", ""), good
    assert good_console[-1] == "pvkern: shutting down, reason 0", good_console

    dmesg_events = [e for e in read_events(run_dir / "run" / "trace" / "hypervisor.jsonl") if e["event"] == "dmesg"]
    failures = []
    for case in CASES:
        d = doms[case.name]
        crash = d["crash"]
        if d["state"] != "crashed" or not crash.startswith(f"build failed: {case.code}: "):
            failures.append(f"{case.name}: expected crashed with {case.code}, got {d['state']} {crash!r}")
            continue
        missing = [s for s in case.details if s not in crash]
        if missing:
            failures.append(f"{case.name}: {crash!r} does not mention {missing}")
        assert d["shutdown_reason"] is None and d["hypercalls"] == 0 and d["instructions"] == 0, d
        logged = [e for e in dmesg_events if e.get("dom") == d["domid"] and e.get("error_code") == case.code]
        if not logged or crash not in logged[0]["text"]:
            failures.append(f"{case.name}: no dmesg trace event naming {crash!r}")
        if not any(crash in line and f"({case.name})" in line for line in dmesg):
            failures.append(f"{case.name}: `dmesg` does not show {crash!r}")
        dom_trace = run_dir / "run" / "trace" / f"dom{d['domid']}-{case.name}.jsonl"
        built = [e for e in read_events(dom_trace) if e["event"] == "domain.build_failed"]
        if [e["code"] for e in built] != [case.code]:
            failures.append(f"{case.name}: domain trace build_failed events {built}")
    assert not failures, "\n".join(failures)


def test_a_file_that_is_no_elf_image_is_refused_at_create_without_a_byte_of_it(run_dir: Path) -> None:
    # The hypervisor reads a kernel file for the requester (hypervisor/kernel_files.py) and refuses anything without
    # the ELF magic before a domain exists; the builder's own "not-elf" refusal is the second fence.
    bad = run_dir / "notelf.elf"
    bad.write_bytes(NOT_ELF)
    spec = parse_spec('[cluster]\nname = "rejects"\n[[domain]]\nname = "good"\ncmdline = "shutdown=poweroff"\n')
    with Cluster.start(spec, run_dir=run_dir / "run") as cluster:
        with pytest.raises(ControlError) as info:
            cluster.client.call("create", domain={"name": "notelf", "kernel": str(bad)})
        assert str(info.value) == f"kernel {bad}: not an ELF image"
        assert NOT_ELF[:4].hex() not in str(info.value)
        assert [d["name"] for d in cluster.client.call("list")] == ["good"]

"""ELF32 guest images: pack_elf32 writes them, parse_guest_image reads and validates them."""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import NoteSegment

from domains.elf_load import GuestImage, ImageError, parse_guest_image
from domains.elf_pack import Segment, pack_elf32
from pvcluster.abi.xen import PAGE_SIZE, XenElfNote

BASE = 0xC0000000
MEMORY = 16 << 20
CODE = bytes(range(256)) * 8  # 0x800 bytes
DATA = b"data segment"

N = XenElfNote


def _segments() -> list[Segment]:
    return [
        Segment(BASE, CODE, memsz=2 * PAGE_SIZE, flags=5),
        Segment(BASE + 2 * PAGE_SIZE, DATA, memsz=PAGE_SIZE, paddr=0x2000, flags=6),
    ]


def _notes(**overrides: int | str) -> list[tuple[int, int | bytes | str]]:
    values: dict[XenElfNote, int | str] = {
        N.GUEST_OS: "linux",
        N.XEN_VERSION: "xen-3.0",
        N.LOADER: "generic",
        N.FEATURES: "writable_page_tables",
        N.VIRT_BASE: BASE,
        N.PADDR_OFFSET: BASE,
        N.ENTRY: BASE + 0x10,
        N.HYPERCALL_PAGE: BASE + PAGE_SIZE,
    }
    values.update({XenElfNote[name]: value for name, value in overrides.items()})
    return list(values.items())


XEN_GUEST = (
    "GUEST_OS=linux,XEN_VER=xen-3.0,VIRT_BASE=0xC0000000,ELF_PADDR_OFFSET=C0000000,"
    "HYPERCALL_PAGE=1,LOADER=generic,PAE=no"
)


def _parse(data: bytes, memory: int = MEMORY) -> GuestImage:
    return parse_guest_image(data, memory)


def _expect(code: str, data: bytes, memory: int = MEMORY) -> ImageError:
    with pytest.raises(ImageError) as info:
        _parse(data, memory)
    assert info.value.code == code, info.value.message
    return info.value


def test_notes_only_round_trip() -> None:
    image = _parse(pack_elf32(entry=BASE, segments=_segments(), notes=_notes()))
    assert image.metadata_source == "notes"
    assert (image.guest_os, image.xen_version, image.loader, image.features) == (
        "linux",
        "xen-3.0",
        "generic",
        "writable_page_tables",
    )
    assert image.entry == BASE + 0x10  # the ENTRY note overrides e_entry
    assert (image.virt_base, image.paddr_offset, image.hypercall_page) == (BASE, BASE, BASE + PAGE_SIZE)
    assert (image.image_start, image.image_end) == (BASE, BASE + 3 * PAGE_SIZE)
    code, data = image.segments
    assert (code.vaddr, code.paddr, code.memsz, code.data) == (BASE, 0, 2 * PAGE_SIZE, CODE)
    # p_paddr (0x2000 here) is ignored: guest-physical is vaddr - virt_base.
    assert (data.vaddr, data.paddr, data.memsz, data.data) == (
        BASE + 2 * PAGE_SIZE,
        2 * PAGE_SIZE,
        PAGE_SIZE,
        DATA,
    )
    assert image.symbols == {}


def test_xen_guest_only_round_trip() -> None:
    image = _parse(pack_elf32(entry=BASE + 4, segments=_segments(), xen_guest=XEN_GUEST))
    assert image.metadata_source == "xen_guest"
    assert (image.guest_os, image.xen_version, image.loader, image.features) == (
        "linux",
        "xen-3.0",
        "generic",
        "",
    )
    assert image.entry == BASE + 4
    # HYPERCALL_PAGE in __xen_guest is a page number relative to VIRT_BASE.
    assert (image.virt_base, image.paddr_offset, image.hypercall_page) == (BASE, BASE, BASE + PAGE_SIZE)


def test_xen_guest_defaults() -> None:
    segments = [Segment(0x100000, CODE)]
    image = _parse(pack_elf32(entry=0x100000, segments=segments, xen_guest="GUEST_OS=Mini-OS"))
    assert (image.virt_base, image.paddr_offset, image.hypercall_page) == (0, 0, None)
    assert image.segments[0].paddr == 0x100000
    # PADDR_OFFSET defaults to VIRT_BASE when only VIRT_BASE is given.
    image = _parse(pack_elf32(entry=BASE, segments=_segments(), xen_guest="GUEST_OS=x,VIRT_BASE=c0000000"))
    assert image.paddr_offset == BASE


def test_notes_win_over_xen_guest() -> None:
    notes = _notes(GUEST_OS="netbsd", HYPERCALL_PAGE=BASE)
    image = _parse(
        pack_elf32(entry=BASE, segments=_segments(), notes=notes, xen_guest=XEN_GUEST + ",FEATURES=x")
    )
    assert image.metadata_source == "notes+xen_guest"
    assert image.guest_os == "netbsd"
    assert image.hypercall_page == BASE
    assert image.features == "writable_page_tables"


def test_xen_guest_fills_keys_the_notes_lack() -> None:
    notes: list[tuple[int, int | bytes | str]] = [(N.GUEST_OS, "linux")]
    image = _parse(pack_elf32(entry=BASE, segments=_segments(), notes=notes, xen_guest=XEN_GUEST))
    assert (image.guest_os, image.loader, image.virt_base, image.hypercall_page) == (
        "linux",
        "generic",
        BASE,
        BASE + PAGE_SIZE,
    )


def test_symbols_round_trip() -> None:
    symbols = {"startup_32": BASE, "hypercall_page": BASE + PAGE_SIZE, "_end": BASE + 3 * PAGE_SIZE}
    image = _parse(pack_elf32(entry=BASE, segments=_segments(), notes=_notes(), symbols=symbols))
    assert image.symbols == symbols


def test_not_elf() -> None:
    _expect("not-elf", b"this is not an ELF file at all" * 10)
    _expect("not-elf", b"")


def test_truncated_image_is_bad_metadata() -> None:
    good = pack_elf32(entry=BASE, segments=_segments(), notes=_notes(), symbols={"a": BASE})
    for size in (10, 30, 52, 100, len(good) // 2, len(good) - 1):
        _expect("bad-metadata", good[:size])


def test_wrong_class() -> None:
    _expect("wrong-class", pack_elf32(entry=BASE, segments=_segments(), notes=_notes(), elf_class=2))


def test_wrong_machine() -> None:
    error = _expect("wrong-machine", pack_elf32(entry=BASE, segments=_segments(), notes=_notes(), machine=62))
    assert "62" in error.message


def test_no_xen_metadata() -> None:
    _expect("no-xen-metadata", pack_elf32(entry=BASE, segments=_segments()))
    # Metadata present but GUEST_OS missing.
    _expect("no-xen-metadata", pack_elf32(entry=BASE, segments=_segments(), xen_guest="XEN_VER=xen-3.0"))
    _expect("no-xen-metadata", pack_elf32(entry=BASE, segments=_segments(), notes=[(N.VIRT_BASE, BASE)]))


def test_segments_overlap() -> None:
    segments = [Segment(BASE, bytes(0x2000)), Segment(BASE + 0x1000, bytes(0x2000))]
    error = _expect("segments-overlap", pack_elf32(entry=BASE, segments=segments, notes=_notes()))
    assert error.message == "PT_LOAD 1 [0xc0001000, 0xc0003000) overlaps PT_LOAD 0 [0xc0000000, 0xc0002000)"


def test_bss_tail_overlap() -> None:
    segments = [Segment(BASE, b"x", memsz=0x2000), Segment(BASE + 0x1000, b"y")]
    _expect("segments-overlap", pack_elf32(entry=BASE, segments=segments, notes=_notes()))


def test_segment_beyond_memory() -> None:
    data = pack_elf32(entry=BASE, segments=_segments(), notes=_notes())
    error = _expect("segment-outside-memory", data, memory=2 * PAGE_SIZE)
    assert "PT_LOAD 1" in error.message and "0x2000" in error.message
    _parse(data, memory=3 * PAGE_SIZE)  # exactly fits


def test_segment_below_virt_base_or_short_memsz() -> None:
    below = [Segment(BASE - PAGE_SIZE, b"x"), *_segments()]
    _expect("segment-outside-memory", pack_elf32(entry=BASE, segments=below, notes=_notes()))
    short = [Segment(BASE, CODE, memsz=16)]
    _expect(
        "segment-outside-memory", pack_elf32(entry=BASE, segments=short, notes=_notes(HYPERCALL_PAGE=BASE))
    )


def test_entry_outside_image() -> None:
    # In the gap-free image but past the end of the last segment.
    _expect(
        "entry-outside-image",
        pack_elf32(entry=BASE, segments=_segments(), notes=_notes(ENTRY=BASE + 0x10000)),
    )
    notes: list[tuple[int, int | bytes | str]] = [(N.GUEST_OS, "linux"), (N.VIRT_BASE, BASE)]
    error = _expect("entry-outside-image", pack_elf32(entry=0x1234, segments=_segments(), notes=notes))
    assert "0x1234" in error.message


def test_hypercall_page_unaligned() -> None:
    notes = _notes(HYPERCALL_PAGE=BASE + 0x800)
    error = _expect("hypercall-page-unaligned", pack_elf32(entry=BASE, segments=_segments(), notes=notes))
    assert "0xc0000800" in error.message


def test_hypercall_page_outside_image() -> None:
    notes = _notes(HYPERCALL_PAGE=BASE + 0x100000)
    _expect("bad-metadata", pack_elf32(entry=BASE, segments=_segments(), notes=notes))
    guest = "GUEST_OS=linux,VIRT_BASE=c0000000,HYPERCALL_PAGE=40"
    _expect("bad-metadata", pack_elf32(entry=BASE, segments=_segments(), xen_guest=guest))


def test_bad_xen_guest_number() -> None:
    guest = "GUEST_OS=linux,VIRT_BASE=zz"
    _expect("bad-metadata", pack_elf32(entry=BASE, segments=_segments(), xen_guest=guest))


def test_no_load_segment() -> None:
    _expect("bad-metadata", pack_elf32(entry=BASE, segments=[], notes=_notes()))


def test_fuzzed_bytes_only_raise_image_error() -> None:
    good = bytearray(pack_elf32(entry=BASE, segments=_segments(), notes=_notes(), symbols={"a": BASE}))
    rng = random.Random(1234)
    for _ in range(300):
        damaged = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            # Mostly the headers and notes at the front, sometimes anywhere (section headers sit at the end).
            limit = 0x200 if rng.random() < 0.7 else len(damaged)
            damaged[rng.randrange(0, limit)] = rng.randrange(256)
        try:
            _parse(bytes(damaged))
        except ImageError:
            pass


def test_pyelftools_reads_notes_and_xen_guest() -> None:
    elf = ELFFile(
        io.BytesIO(pack_elf32(entry=BASE, segments=_segments(), notes=_notes(), xen_guest=XEN_GUEST))
    )
    assert elf["e_machine"] == "EM_386" and elf.elfclass == 32 and elf.little_endian
    guest = elf.get_section_by_name("__xen_guest")
    assert guest is not None and guest.data() == XEN_GUEST.encode() + b"\0"
    note_segments = [seg for seg in elf.iter_segments() if isinstance(seg, NoteSegment)]
    assert len(note_segments) == 1
    assert [note["n_name"] for note in note_segments[0].iter_notes()] == ["Xen"] * len(_notes())
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_LOAD":
            assert seg["p_offset"] % PAGE_SIZE == seg["p_vaddr"] % PAGE_SIZE


@pytest.mark.skipif(not os.path.exists("/usr/bin/readelf"), reason="binutils readelf not installed")
def test_readelf_accepts_packed_image(tmp_path: Path) -> None:
    path = tmp_path / "guest.elf"
    symbols = {"startup_32": BASE, "data": BASE + 2 * PAGE_SIZE}
    path.write_bytes(
        pack_elf32(entry=BASE, segments=_segments(), notes=_notes(), xen_guest=XEN_GUEST, symbols=symbols)
    )
    readelf = shutil.which("readelf") or "/usr/bin/readelf"
    result = subprocess.run([readelf, "-a", "-W", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower() and "error" not in result.stderr.lower(), result.stderr
    assert "__xen_guest" in result.stdout and "startup_32" in result.stdout

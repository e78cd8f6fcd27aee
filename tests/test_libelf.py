"""The builder reads guest images as Xen's libelf does (xen/common/libelf/libelf-dominfo.c and friends), and refuses
with a specific code what this simulator cannot run. Images packed in-process, plus C guests built the way Linux and
Mini-OS emit their notes (skipped without Xen's headers or a gcc that targets -m32), booted once through a cluster
where they should run."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import attrs
import pytest
from cguest import gcc, require_toolchain
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import NoteSegment

from domains import paging
from domains.builder import build_domain
from domains.elf_load import (
    NON_PAE_GUEST_TYPE,
    PAE_GUEST_TYPE,
    SUPPORT,
    GuestImage,
    ImageError,
    Support,
    XenPae,
    parse_guest_image,
)
from domains.elf_pack import Note, Segment, encode_note, pack_elf32
from hypervisor.hypercall_page import hypercall_page
from pvcluster.abi.xen import PAGE_SIZE, XenElfNote, XenFeat
from pvcluster.bus.messages import Build

N = XenElfNote
F = XenFeat
BASE = 0xC0000000
MEMORY = 16 << 20
CODE = b"\xeb\xfe" + bytes(PAGE_SIZE - 2)  # jmp $
GNU_BUILD_ID = encode_note(3, b"\x01" * 20, owner=b"GNU")  # NT_GNU_BUILD_ID, as ld --build-id writes it


def _segments(base: int = BASE) -> list[Segment]:
    return [Segment(base, CODE, memsz=2 * PAGE_SIZE, flags=5), Segment(base + 2 * PAGE_SIZE, b"data", flags=6)]


def _notes(base: int | None = BASE, **overrides: int | str | bytes | None) -> list[Note]:
    """Linux-style metadata: VIRT_BASE (unless ``base`` is None) and PADDR_OFFSET, the hypercall page in the kernel.
    An override of None drops that note."""
    values: dict[XenElfNote, int | str | bytes | None] = {
        N.GUEST_OS: "linux",
        N.XEN_VERSION: "xen-3.0",
        N.LOADER: "generic",
        N.VIRT_BASE: base,
        N.PADDR_OFFSET: base,
        N.HYPERCALL_PAGE: (base or 0) + PAGE_SIZE,
    }
    values.update({XenElfNote[name]: value for name, value in overrides.items()})
    return [(n, v) for n, v in values.items() if v is not None]


def _image(notes: list[Note] | None = None, base: int = BASE, entry: int | None = None, **kwargs: Any) -> bytes:
    return pack_elf32(
        entry=base if entry is None else entry,
        segments=kwargs.pop("segments", None) or _segments(base),
        notes=_notes(base) if notes is None else notes,
        **kwargs,
    )


def _parse(data: bytes, support: Support = SUPPORT) -> GuestImage:
    return parse_guest_image(data, MEMORY, support)


def _refused(code: str, data: bytes, support: Support = SUPPORT) -> str:
    with pytest.raises(ImageError) as info:
        _parse(data, support)
    assert info.value.code == code, info.value.message
    return info.value.message


def _raw_note(n_type: int, name: bytes, desc: bytes, namesz: int | None = None, descsz: int | None = None) -> bytes:
    """A note with exactly the name bytes given (padding included) and chosen size fields."""
    header = struct.pack("<III", len(name) if namesz is None else namesz, len(desc) if descsz is None else descsz,
                         n_type)
    return header + name + desc


def _phdrs(data: bytes) -> list[dict[str, int]]:
    elf = ELFFile(io.BytesIO(data))
    return [dict(seg.header) for seg in elf.iter_segments()]


# -- where the notes are: elf_xen_parse ---------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["both", "segment", "section"])
def test_notes_in_a_pt_note_segment_or_only_in_a_sht_note_section(placement: str) -> None:
    data = _image(note_placement=placement)
    types = {h["p_type"] for h in _phdrs(data)}
    assert ("PT_NOTE" in types) == (placement != "section")
    image = _parse(data)
    assert (image.metadata_source, image.guest_os, image.virt_base, image.hypercall_page) == (
        "notes", "linux", BASE, BASE + PAGE_SIZE)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="binutils readelf not installed")
@pytest.mark.parametrize("placement", ["segment", "section"])
def test_readelf_reads_the_notes_where_the_packer_put_them(tmp_path: Path, placement: str) -> None:
    path = tmp_path / "guest.elf"
    path.write_bytes(_image(note_placement=placement, section_notes=[GNU_BUILD_ID]))
    res = subprocess.run(["readelf", "-lnSW", str(path)], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and not res.stderr, res.stderr
    assert (" NOTE " in res.stdout.split("Program Headers:")[1]) == (placement == "segment")
    assert ".note.extra" in res.stdout and (".note.Xen" in res.stdout) == (placement == "section")
    assert "NT_GNU_BUILD_ID" in res.stdout
    # readelf -n shows a PT_NOTE's notes only when no section headers exist; pyelftools reads the segment itself.
    elf = ELFFile(io.BytesIO(path.read_bytes()))
    owners = [n["n_name"] for seg in elf.iter_segments() if isinstance(seg, NoteSegment) for n in seg.iter_notes()]
    assert owners == (["Xen"] * len(_notes()) if placement == "segment" else [])


def test_sections_are_read_only_when_the_segments_hold_no_xen_note() -> None:
    # A PT_NOTE with only a GNU build-id: libelf falls back to the SHT_NOTE sections.
    data = _image(notes=[GNU_BUILD_ID], note_placement="segment", section_notes=_notes())
    assert _parse(data).guest_os == "linux"
    # A PT_NOTE with Xen notes wins: a section's different notes are never read.
    data = _image(notes=_notes(), note_placement="segment", section_notes=_notes(GUEST_OS="other"))
    assert _parse(data).guest_os == "linux"


def test_a_xen_note_of_unknown_type_still_counts_as_a_xen_note() -> None:
    # elf_xen_parse_notes counts every note named "Xen": the segment's lone unknown note stops the fallback.
    data = _image(notes=[(0x99, 1)], note_placement="segment", section_notes=_notes())
    assert "does not name GUEST_OS" in _refused("no-xen-metadata", data)


def test_a_pt_note_at_file_offset_0_is_skipped() -> None:
    # elf_xen_parse: "Some versions of binutils do not correctly set p_offset for note segments."
    def zero_note_offset(data: bytes) -> bytes:
        out = bytearray(data)
        phoff, phnum = struct.unpack_from("<I", data, 28)[0], struct.unpack_from("<H", data, 44)[0]
        for i in range(phnum):
            at = phoff + 32 * i
            if struct.unpack_from("<I", out, at)[0] == 4:  # PT_NOTE
                struct.pack_into("<I", out, at + 4, 0)
        return bytes(out)

    assert _parse(zero_note_offset(_image(note_placement="both"))).guest_os == "linux"  # the section still has them
    _refused("no-xen-metadata", zero_note_offset(_image(note_placement="segment")))


def test_note_names_and_padding_as_libelf_reads_them() -> None:
    rest = [encode_note(n, v) for n, v in _notes()[1:]]

    def with_guest_os(note: bytes) -> bytes:
        return _image(notes=[note, *rest])

    # "Xen" without its NUL (namesz 3), and with extra NULs (namesz 8): the name is read as a C string.
    assert _parse(with_guest_os(_raw_note(N.GUEST_OS, b"Xen\0", b"nonul\0\0\0", namesz=3))).guest_os == "nonul"
    assert _parse(with_guest_os(_raw_note(N.GUEST_OS, b"Xen\0\0\0\0\0", b"long\0\0\0\0"))).guest_os == "long"
    # A string descriptor without a NUL inside descsz is still the C string at the descriptor.
    assert _parse(with_guest_os(_raw_note(N.GUEST_OS, b"Xen\0", b"linux\0\0\0", descsz=5))).guest_os == "linux"
    # Other owners are not Xen's: the image then has no GUEST_OS.
    _refused("no-xen-metadata", with_guest_os(encode_note(N.GUEST_OS, "linux", owner=b"XenX")))


def test_number_notes_by_descriptor_size() -> None:
    for desc in (struct.pack("<Q", BASE), struct.pack("<I", BASE)):
        assert _parse(_image(notes=_notes(VIRT_BASE=desc))).virt_base == BASE
    # elf_note_numeric reads sizes other than 1, 2, 4, 8 as 0: VIRT_BASE 0, and the kernel at 3 GiB is no RAM.
    _refused("segment-outside-memory", _image(notes=_notes(VIRT_BASE=b"\0\0\xc0")))


def test_a_later_note_overrides_an_earlier_one() -> None:
    assert _parse(_image(notes=[*_notes(), (N.GUEST_OS, "second")])).guest_os == "second"


# -- addresses: elf_xen_addr_calc_check ---------------------------------------------------------------------------


@pytest.mark.parametrize("virt_base_note", [None, 0])
def test_virt_base_missing_or_0_loads_a_low_linked_guest(virt_base_note: int | None) -> None:
    low = 0x100000
    notes = _notes(base=None, VIRT_BASE=virt_base_note, PADDR_OFFSET=None, HYPERCALL_PAGE=low + PAGE_SIZE)
    image = _parse(_image(notes=notes, base=low))
    assert (image.virt_base, image.paddr_offset, image.entry, image.hypercall_page) == (0, 0, low, low + PAGE_SIZE)
    assert [(s.vaddr, s.paddr) for s in image.segments] == [(low, low), (low + 2 * PAGE_SIZE, low + 2 * PAGE_SIZE)]


def test_a_virt_base_0_guest_is_built_with_its_linear_map_at_0() -> None:
    data = _image(notes=_notes(base=None, PADDR_OFFSET=None), base=0)
    build = Build(domid=1, name="low", vcpus=1, memory_bytes=4 << 20, kernel="low.elf", cmdline="hi", backend="xen",
                  boot="ebx", patching=True, hypercall_page=hypercall_page(), ps_per_instr=1000, rom=b"", image=data)
    ram, boot = build_domain(build)
    # the kernel's 3 pages, the p2m's page, then start_info
    assert boot.regs["eip"] == 0 and boot.mfn_list == 3 * PAGE_SIZE
    assert boot.start_info == boot.regs["esi"] == 4 * PAGE_SIZE
    assert boot.pt_base == boot.cr3  # virtual = physical
    for va in (0, PAGE_SIZE, boot.mfn_list, boot.start_info, boot.stack_top - 4):
        assert paging.translate(ram, boot.cr3, va, write=False) == va
    assert ram.read_pa(PAGE_SIZE, 32) == hypercall_page()[:32]


def test_paddr_offset_defaults_as_libelf_computes_it() -> None:
    # With notes it defaults to 0; with only __xen_guest to VIRT_BASE (older hypervisors set p_paddr to VIRT_BASE).
    assert _parse(_image(notes=_notes(PADDR_OFFSET=None))).paddr_offset == 0
    legacy = _image(notes=[], xen_guest="GUEST_OS=linux,XEN_VER=xen-3.0,VIRT_BASE=0xC0000000,LOADER=generic")
    assert _parse(legacy).paddr_offset == BASE


def test_paddr_offset_without_virt_base_is_refused() -> None:
    message = _refused("paddr-offset-without-virt-base", _image(notes=_notes(VIRT_BASE=None, PADDR_OFFSET=0)))
    assert "PADDR_OFFSET 0x0" in message
    legacy = _image(notes=[], base=0, xen_guest="GUEST_OS=linux,ELF_PADDR_OFFSET=0x0")
    _refused("paddr-offset-without-virt-base", legacy)


def test_placement_agrees_with_libelf_for_linux_mini_os_and_legacy_layouts() -> None:
    """libelf loads a segment at virtual p_paddr + (VIRT_BASE - PADDR_OFFSET); this builder at p_vaddr. Real layouts
    make the two the same."""
    linux = [Segment(BASE, CODE, paddr=0, flags=5), Segment(BASE + PAGE_SIZE, b"d", paddr=PAGE_SIZE, flags=6)]
    cases = {
        # Linux 2.6.2x: VIRT_BASE = PAGE_OFFSET, no PADDR_OFFSET note, p_paddr = p_vaddr - PAGE_OFFSET
        "linux": _image(notes=_notes(PADDR_OFFSET=None, HYPERCALL_PAGE=BASE), segments=linux),
        # Mini-OS x86_32: no VIRT_BASE, linked at 0
        "mini-os": _image(notes=_notes(base=None, PADDR_OFFSET=None), base=0),
        # linux-2.6.18-xen's __xen_guest: VIRT_BASE and ELF_PADDR_OFFSET both PAGE_OFFSET, p_paddr = p_vaddr
        "legacy": _image(notes=[], xen_guest="GUEST_OS=linux,XEN_VER=xen-3.0,VIRT_BASE=0xC0000000,"
                         "ELF_PADDR_OFFSET=0xC0000000,HYPERCALL_PAGE=0x1,LOADER=generic"),
    }
    for name, data in cases.items():
        image = _parse(data)
        loads = [h for h in _phdrs(data) if h["p_type"] == "PT_LOAD"]
        libelf = [h["p_paddr"] + image.virt_base - image.paddr_offset for h in loads]
        assert libelf == [s.vaddr for s in image.segments], name


def test_entry_defaults_to_e_entry_and_xen_guest_virt_entry_is_read() -> None:
    assert _parse(_image(entry=BASE + 8)).entry == BASE + 8
    assert _parse(_image(notes=_notes(ENTRY=BASE + 16), entry=BASE + 8)).entry == BASE + 16
    guest = "GUEST_OS=linux,VIRT_BASE=0xC0000000,VIRT_ENTRY=0xC0000020"
    assert _parse(_image(notes=[], xen_guest=guest)).entry == BASE + 0x20


def test_init_p2m_inside_the_kernel_is_refused() -> None:
    message = _refused("p2m-base-in-kernel", _image(notes=_notes(INIT_P2M=BASE + PAGE_SIZE)))
    assert "INIT_P2M 0xc0001000" in message
    _parse(_image(notes=_notes(INIT_P2M=BASE + 0x100000)))


def test_a_pt_load_without_r_w_or_x_is_not_loaded() -> None:
    # elf_phdr_is_loadable: such a segment is neither loaded nor part of the kernel's extent.
    segments = [*_segments(), Segment(BASE + 0x10000, b"not loaded", flags=0)]
    image = _parse(_image(segments=segments))
    assert [s.vaddr for s in image.segments] == [BASE, BASE + 2 * PAGE_SIZE]


# -- FEATURES and SUPPORTED_FEATURES: elf_xen_parse_features -------------------------------------------------------


def test_supported_but_not_required_features_boot() -> None:
    features = "writable_page_tables|writable_descriptor_tables|auto_translated_physmap|pae_pgdir_above_4gb"
    image = _parse(_image(notes=_notes(FEATURES=features)))
    assert image.features == features
    assert image.features_supported == {F.writable_page_tables, F.writable_descriptor_tables,
                                        F.auto_translated_physmap, F.pae_pgdir_above_4gb}
    assert image.features_required == frozenset()


def test_a_kernel_requiring_writable_page_tables_is_accepted() -> None:
    image = _parse(_image(notes=_notes(FEATURES="!writable_page_tables|pae_pgdir_above_4gb")))
    assert image.features_required == {F.writable_page_tables}


@pytest.mark.parametrize("feature", ["writable_descriptor_tables", "auto_translated_physmap",
                                     "supervisor_mode_kernel", "pae_pgdir_above_4gb", "hvm_callback_vector"])
def test_a_required_feature_this_hypervisor_lacks_is_refused(feature: str) -> None:
    value = f"pae_pgdir_above_4gb|!{feature}"
    message = _refused("feature-unsupported", _image(notes=_notes(FEATURES=value)))
    assert feature in message and value in message


def test_a_kernel_requiring_dom0_does_not_run_as_a_domu() -> None:
    # xc_dom_parse_elf_kernel: "Kernel does not support unprivileged (DomU) operation"
    assert "DomU" in _refused("feature-unsupported", _image(notes=_notes(FEATURES="!dom0")))


def test_unknown_feature_names_as_libelf_treats_them() -> None:
    image = _parse(_image(notes=_notes(FEATURES="no_such_feature|writable_page_tables")))  # optional: ignored
    assert image.features_supported == {F.writable_page_tables}
    message = _refused("feature-unknown", _image(notes=_notes(FEATURES="writable_page_tables|!no_such_feature")))
    assert "'no_such_feature'" in message and "FEATURES" in message
    _refused("feature-unknown", _image(notes=_notes(FEATURES="!")))
    # A name features.h has but libelf's table lacks is unknown to libelf too.
    _refused("feature-unknown", _image(notes=_notes(FEATURES="!mmu_pt_update_preserve_ad")))


def test_feature_strings_are_split_as_libelf_splits_them() -> None:
    # Empty pieces are ignored, and libelf reads a name into char[64]: 63 bytes, then the rest is the next name.
    image = _parse(_image(notes=_notes(FEATURES="|writable_page_tables||" + "x" * 63 + "pae_pgdir_above_4gb")))
    assert image.features_supported == {F.writable_page_tables, F.pae_pgdir_above_4gb}


def test_supported_features_note_is_a_bitmap_ored_into_the_supported_set() -> None:
    bitmap = (1 << F.writable_page_tables) | (1 << F.dom0) | (1 << 30)
    image = _parse(_image(notes=_notes(FEATURES="pae_pgdir_above_4gb", SUPPORTED_FEATURES=bitmap)))
    assert image.features_supported == {F.writable_page_tables, F.dom0, F.pae_pgdir_above_4gb, 30}
    assert image.features_required == frozenset()
    # elf_note_numeric_array: only whole 32-bit words, the first submap only
    two_words = struct.pack("<II", 1 << F.dom0, 1)
    assert _parse(_image(notes=_notes(SUPPORTED_FEATURES=two_words))).features_supported == {F.dom0}
    assert _parse(_image(notes=_notes(SUPPORTED_FEATURES=b"\xff" * 6))).features_supported == frozenset()


def test_several_features_notes_add_up() -> None:
    notes = [*_notes(FEATURES="writable_page_tables"), (N.FEATURES, "pae_pgdir_above_4gb")]
    assert _parse(_image(notes=notes)).features_supported == {F.writable_page_tables, F.pae_pgdir_above_4gb}


def test_features_in_xen_guest() -> None:
    guest = "GUEST_OS=linux,VIRT_BASE=0xC0000000,FEATURES=writable_page_tables|pae_pgdir_above_4gb"
    assert _parse(_image(notes=[], xen_guest=guest)).features_supported == {F.writable_page_tables,
                                                                              F.pae_pgdir_above_4gb}
    required = _parse(_image(notes=[], xen_guest=guest.replace("FEATURES=", "FEATURES=!")))
    assert required.features_required == {F.writable_page_tables}
    _refused("feature-unsupported", _image(notes=[], xen_guest=guest + "|!auto_translated_physmap"))
    _refused("feature-unknown", _image(notes=[], xen_guest=guest + "|!bogus"))


def test_implementing_a_feature_lifts_its_refusal() -> None:
    wider = attrs.evolve(SUPPORT, features=SUPPORT.features | {F.auto_translated_physmap})
    data = _image(notes=_notes(FEATURES="!auto_translated_physmap"))
    assert _parse(data, wider).features_required == {F.auto_translated_physmap}
    _refused("feature-unsupported", data)


# -- PAE_MODE ------------------------------------------------------------------------------------------------------


NON_PAE_ONLY = attrs.evolve(SUPPORT, guest_types=frozenset({NON_PAE_GUEST_TYPE}))


@pytest.mark.parametrize(("mode", "pae"), [("yes", XenPae.EXTCR3), ("yes[extended-cr3]", XenPae.YES)])
def test_a_pae_kernel_runs_as_x86_32p_and_is_refused_where_pae_is_not_offered(mode: str, pae: XenPae) -> None:
    data = _image(notes=_notes(PAE_MODE=mode))
    message = _refused("pae-unsupported", data, NON_PAE_ONLY)
    assert f"PAE_MODE note {mode!r}" in message and PAE_GUEST_TYPE in message
    image = _parse(data)
    assert (image.pae, image.pae_mode, image.guest_type) == (pae, mode, PAE_GUEST_TYPE)


@pytest.mark.parametrize(("mode", "pae"), [("bimodal", XenPae.BIMODAL), ("yes,bimodal", XenPae.BIMODAL),
                                           ("no", XenPae.NO)])
def test_bimodal_and_non_pae_kernels_run_without_pae(mode: str, pae: XenPae) -> None:
    image = _parse(_image(notes=_notes(PAE_MODE=mode)))
    assert (image.pae, image.pae_mode, image.guest_type) == (pae, mode, NON_PAE_GUEST_TYPE)
    xens_rule = _parse(_image(notes=_notes(PAE_MODE=mode)), attrs.evolve(SUPPORT, bimodal_pae=True))
    # xc_dom_guest_type: bimodal is PAE where the hypervisor offers it (SUPPORT departs: bimodal stays non-PAE)
    assert xens_rule.guest_type == (PAE_GUEST_TYPE if pae is XenPae.BIMODAL else NON_PAE_GUEST_TYPE)


def test_a_later_pae_mode_note_changes_pae_only_as_libelf_would() -> None:
    # elf_xen_parse_note sets parms->pae for "yes" and "bimodal" only: a later "no" leaves a PAE kernel PAE.
    wider = attrs.evolve(SUPPORT, guest_types=SUPPORT.guest_types | {PAE_GUEST_TYPE})
    for modes, pae in ((("yes", "yes"), XenPae.EXTCR3), (("yes", "no"), XenPae.EXTCR3),
                       (("yes", "bimodal"), XenPae.BIMODAL)):
        notes = [*_notes(), *((N.PAE_MODE, mode) for mode in modes)]
        assert _parse(_image(notes=notes), wider).pae is pae, modes


def test_pae_in_xen_guest() -> None:
    guest = "GUEST_OS=linux,VIRT_BASE=0xC0000000,PAE="
    assert "__xen_guest PAE=yes[extended-cr3]" in _refused(
        "pae-unsupported", _image(notes=[], xen_guest=guest + "yes[extended-cr3]"), NON_PAE_ONLY)
    _refused("pae-unsupported", _image(notes=[], xen_guest=guest + "yes"), NON_PAE_ONLY)
    assert _parse(_image(notes=[], xen_guest=guest + "yes")).guest_type == PAE_GUEST_TYPE
    # elf_xen_parse_guest_info knows no "bimodal": such a kernel is non-PAE there
    assert _parse(_image(notes=[], xen_guest=guest + "bimodal")).pae is XenPae.NO
    # Beside notes, libelf never reads __xen_guest: its PAE does not count
    assert _parse(_image(xen_guest=guest + "yes[extended-cr3]")).pae is XenPae.NO


def test_bsd_symtab_is_refused_because_the_builder_does_not_load_it() -> None:
    assert "BSD_SYMTAB" in _refused("bsd-symtab-unsupported", _image(notes=_notes(BSD_SYMTAB="yes")))
    assert _parse(_image(notes=_notes(BSD_SYMTAB="no"))).guest_os == "linux"
    _refused("bsd-symtab-unsupported", _image(notes=[], xen_guest="GUEST_OS=linux,BSD_SYMTAB", base=0))


# -- __xen_guest: elf_xen_parse_guest_info -------------------------------------------------------------------------


def test_xen_guest_numbers_are_read_as_strtoull_base_0() -> None:
    def hypercall_page_of(number: str) -> int | None:
        segments = [Segment(0, bytes(0x20 * PAGE_SIZE))]
        data = _image(notes=[], base=0, segments=segments, xen_guest=f"GUEST_OS=x,HYPERCALL_PAGE={number}")
        return _parse(data).hypercall_page

    assert hypercall_page_of("10") == 10 * PAGE_SIZE  # decimal
    assert hypercall_page_of("0x10") == 0x10 * PAGE_SIZE
    assert hypercall_page_of("010") == 8 * PAGE_SIZE  # octal
    assert hypercall_page_of("1f") == 0x1F * PAGE_SIZE  # not a C number: bare hex, as this project writes it


def test_xen_guest_items_are_cut_as_libelf_cuts_them() -> None:
    # No whitespace is trimmed: " XEN_VER" is no key.
    image = _parse(_image(notes=[], xen_guest="GUEST_OS=linux, XEN_VER=xen-3.0,VIRT_BASE=0xC0000000"))
    assert (image.guest_os, image.xen_version) == ("linux", "")
    # A value is cut at 127 bytes; the rest starts the next item (here the key LOADER).
    image = _parse(_image(notes=[], xen_guest="GUEST_OS=" + "g" * 127 + "LOADER=generic,VIRT_BASE=0xC0000000"))
    assert (image.guest_os, image.loader) == ("g" * 127, "generic")
    # A name longer than 31 bytes is cut too, and matches nothing.
    image = _parse(_image(notes=[], xen_guest="GUEST_OS=linux,VIRT_BASE=0xC0000000," + "X" * 31 + "LOADER=generic"))
    assert image.loader == "generic"


# -- C guests built with the Xen headers, the way Linux and Mini-OS emit notes -------------------------------------

XEN_HEADERS = Path("/usr/include/xen/elfnote.h")

GUEST_C = r"""
#define __XEN_INTERFACE_VERSION__ 0x00030205
#include <stdint.h>
#include <xen/xen.h>
#include <xen/sched.h>
#include <xen/elfnote.h>
#include <xen/features.h>

#define STR_(x) #x
#define STR(x) STR_(x)

/* Linux's and Mini-OS's ELFNOTE, in a .note.Xen section: allocated ("a", so ld gives it a PT_NOTE) unless
 * NOTE_FLAGS says otherwise. */
#define ELFNOTE(type, desc)                                 \
    ".pushsection .note.Xen," NOTE_FLAGS ",@note\n"         \
    ".balign 4\n"                                           \
    ".long 2f - 1f, 4f - 3f, " STR(type) "\n"               \
    "1: .asciz \"Xen\"\n"                                   \
    "2: .balign 4\n"                                        \
    "3: " desc "\n"                                         \
    "4: .balign 4\n"                                        \
    ".popsection\n"

__asm__(
    ELFNOTE(XEN_ELFNOTE_GUEST_OS, ".asciz \"" GUEST_NAME "\"")
    ELFNOTE(XEN_ELFNOTE_XEN_VERSION, ".asciz \"xen-3.0\"")
    ELFNOTE(XEN_ELFNOTE_LOADER, ".asciz \"generic\"")
    ELFNOTE(XEN_ELFNOTE_HYPERCALL_PAGE, ".long hypercall_page")
    EXTRA_NOTES
);

__asm__(
    ".pushsection .text\n"
    ".globl _start\n"
    "_start:\n"
    "    cld\n"
    "    movl $boot_stack_top, %esp\n"
    "    call start_kernel\n"
    "5:  hlt\n"
    "    jmp 5b\n"
    ".balign 4096\n"
    ".globl hypercall_page\n"
    "hypercall_page:\n"
    "    .skip 4096\n"
    ".popsection\n"
    ".pushsection .bss\n"
    ".balign 16\n"
    "    .skip 8192\n"
    "boot_stack_top:\n"
    ".popsection\n"
);

/* Linux's _hypercall2/_hypercall3 on x86-32: call the stub of `name`, arguments in ebx, ecx, edx. */
#define _hypercall3(name, a1, a2, a3)                                                \
({                                                                                   \
    long __res, __ign1, __ign2, __ign3;                                              \
    __asm__ volatile ("call hypercall_page + (" STR(__HYPERVISOR_##name) " * 32)"     \
                      : "=a" (__res), "=b" (__ign1), "=c" (__ign2), "=d" (__ign3)     \
                      : "1" ((long)(a1)), "2" ((long)(a2)), "3" ((long)(a3))          \
                      : "memory");                                                   \
    __res;                                                                           \
})
#define _hypercall2(name, a1, a2)                                                    \
({                                                                                   \
    long __res, __ign1, __ign2;                                                      \
    __asm__ volatile ("call hypercall_page + (" STR(__HYPERVISOR_##name) " * 32)"     \
                      : "=a" (__res), "=b" (__ign1), "=c" (__ign2)                   \
                      : "1" ((long)(a1)), "2" ((long)(a2))                           \
                      : "memory");                                                   \
    __res;                                                                           \
})

static const char message[] = GUEST_NAME ": booted\n";

void start_kernel(void)
{
    struct sched_shutdown sd = { .reason = SHUTDOWN_poweroff };

    _hypercall3(console_io, CONSOLEIO_write, sizeof(message) - 1, message);
    _hypercall2(sched_op, SCHEDOP_shutdown, &sd);
    for (;;)
        ;
}
"""

CFLAGS = ["-m32", "-ffreestanding", "-fno-pic", "-fno-stack-protector", "-nostdlib", "-static", "-O1", "-no-pie",
          "-Wall", "-Werror", "-Wl,--build-id=none"]
LINUX_NOTES = (f"ELFNOTE(XEN_ELFNOTE_VIRT_BASE, \".long {BASE:#x}\") "
               f"ELFNOTE(XEN_ELFNOTE_PADDR_OFFSET, \".long {BASE:#x}\") "
               "ELFNOTE(XEN_ELFNOTE_ENTRY, \".long _start\")")


@attrs.frozen
class CGuest:
    name: str
    extra_notes: str  # more ELFNOTE(...) lines
    link_base: int = BASE  # the first PT_LOAD (ELF headers, then .text a page later)
    note_flags: str = "a"  # the .pushsection flags: "a" (allocated: ld makes a PT_NOTE) or "" (no segment)
    code: str | None = None  # the refusal, or None: it boots


C_GUESTS = (
    # Linux 2.6.2x x86_32 (arch/x86/xen/xen-head.S): writable page tables required (emulated: accepted)
    CGuest("linux-wpt", LINUX_NOTES + ' ELFNOTE(XEN_ELFNOTE_FEATURES, ".asciz \\"!writable_page_tables|'
           'pae_pgdir_above_4gb\\"") ELFNOTE(XEN_ELFNOTE_PAE_MODE, ".asciz \\"no\\"")'),
    # Mini-OS x86_32 (arch/x86/x86_32.S): no VIRT_BASE, linked at 0, PAE "yes"
    CGuest("minios-pae", 'ELFNOTE(XEN_ELFNOTE_PAE_MODE, ".asciz \\"yes\\"")', link_base=0),
    # the same kernel declared bimodal: runs non-PAE at VIRT_BASE 0
    CGuest("minios-bimodal", 'ELFNOTE(XEN_ELFNOTE_PAE_MODE, ".asciz \\"bimodal\\"")', link_base=0),
    # notes in a section no segment covers: found through the section headers
    CGuest("sections-only", LINUX_NOTES, note_flags=""),
    # features supported, none required, in the string and as the SUPPORTED_FEATURES bitmap (Linux 4.x style)
    CGuest("supported-only", LINUX_NOTES + ' ELFNOTE(XEN_ELFNOTE_FEATURES, ".asciz \\"writable_page_tables|'
           'writable_descriptor_tables|auto_translated_physmap|pae_pgdir_above_4gb|supervisor_mode_kernel\\"") '
           'ELFNOTE(XEN_ELFNOTE_SUPPORTED_FEATURES, ".long " '
           'STR((1 << XENFEAT_writable_page_tables) | (1 << XENFEAT_dom0)))'),
)
BOOTING = tuple(g for g in C_GUESTS if g.code is None)


def _build_c_guests(work: Path, guests: tuple[CGuest, ...]) -> dict[str, Path]:
    """Compile each guest, or skip if this machine cannot build 32-bit freestanding images with Xen's headers."""
    require_toolchain(work, (XEN_HEADERS,), CFLAGS)
    (work / "guest.c").write_text(GUEST_C)
    out = {}
    for guest in guests:
        defines = [f'-DGUEST_NAME="{guest.name}"', f"-DEXTRA_NOTES={guest.extra_notes}",
                   f'-DNOTE_FLAGS="\\"{guest.note_flags}\\""']
        elf = f"{guest.name}.elf"
        res = gcc([*CFLAGS, *defines, f"-Wl,-Ttext-segment={guest.link_base:#x}", "-o", elf, "guest.c"], work)
        assert res.returncode == 0, f"{guest.name} did not compile:\n{res.stderr}"
        out[guest.name] = work / elf
    return out


@pytest.fixture(scope="module")
def c_guests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _build_c_guests(tmp_path_factory.mktemp("cguests"), C_GUESTS)


def _c_guest(guests: dict[str, Path], name: str) -> tuple[bytes, CGuest]:
    (guest,) = (g for g in C_GUESTS if g.name == name)
    return guests[name].read_bytes(), guest


@pytest.mark.parametrize("name", [g.name for g in C_GUESTS])
def test_c_guest_is_accepted_or_refused_with_its_code(c_guests: dict[str, Path], name: str) -> None:
    data, guest = _c_guest(c_guests, name)
    if guest.code is not None:
        _refused(guest.code, data)
        return
    image = _parse(data)
    assert (image.metadata_source, image.guest_os, image.virt_base) == ("notes", name, guest.link_base)
    assert image.entry == image.symbols["_start"] and image.hypercall_page == image.symbols["hypercall_page"]


def test_c_guest_layouts(c_guests: dict[str, Path]) -> None:
    """The images are what they claim: notes in a PT_NOTE, or only in a section; libelf's placement is ours."""
    for name, path in c_guests.items():
        data = path.read_bytes()
        has_pt_note = "PT_NOTE" in {h["p_type"] for h in _phdrs(data)}
        assert has_pt_note == (name != "sections-only"), name
    bimodal = _parse(c_guests["minios-bimodal"].read_bytes())
    assert (bimodal.pae, bimodal.guest_type, bimodal.paddr_offset, bimodal.image_start) == (
        XenPae.BIMODAL, NON_PAE_GUEST_TYPE, 0, 0)
    supported = _parse(c_guests["supported-only"].read_bytes())
    assert supported.features_required == frozenset()
    assert {F.writable_page_tables, F.supervisor_mode_kernel, F.dom0} <= supported.features_supported
    wpt = _parse(c_guests["linux-wpt"].read_bytes())
    assert wpt.features_required == {F.writable_page_tables}
    for name in ("minios-bimodal", "sections-only", "supported-only"):
        data = c_guests[name].read_bytes()
        image = _parse(data)
        loads = [h for h in _phdrs(data) if h["p_type"] == "PT_LOAD" and h["p_flags"] & 7]
        assert [h["p_paddr"] + image.virt_base - image.paddr_offset for h in loads] == [
            s.vaddr for s in image.segments], name


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_c_guests_that_should_run_boot_unchanged(run_dir: Path) -> None:
    from pvcluster.cluster import Cluster
    from pvcluster.spec import parse_spec

    kernels = _build_c_guests(run_dir / "cguests", BOOTING)
    domains = "".join(
        f'[[domain]]\nname = "{name}"\nvcpus = 1\nmemory_mib = 4\nkernel = "{path}"\n' for name, path in kernels.items()
    )
    spec = parse_spec(f'[cluster]\nname = "libelf"\n{domains}')
    with Cluster.start(spec, run_dir=run_dir / "run") as cluster:
        final = cluster.wait(timeout_s=120)
        consoles = {d["name"]: cluster.client.call("console", dom=d["domid"]) for d in final["domains"]}
    for dom in final["domains"]:
        name = dom["name"]
        assert (dom["state"], dom["shutdown_reason"], dom["crash"]) == ("dead", "poweroff", ""), dom
        assert consoles[name] == [f"{name}: booted"], consoles

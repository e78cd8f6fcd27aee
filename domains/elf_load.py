"""Read and validate an ELF32 x86 PV guest image, following Xen's libelf and its domain builder.

Where each rule comes from (``xen/common/libelf/``, ``tools/libs/guest/``):

* Finding the metadata, ``elf_xen_parse``: Xen notes from every PT_NOTE segment whose p_offset is not 0; only if
  those hold no Xen note, from every SHT_NOTE section; only if those hold none either, the legacy ``__xen_guest``
  section.
* Walking notes, ``elf_xen_parse_notes`` with ``elf_note_next`` / ``elf_note_name`` / ``elf_note_desc`` /
  ``elf_note_numeric`` (libelf-tools.c): name and descriptor each padded to 4 bytes (ELF32); the name is read as a
  C string, so "Xen" matches with or without its NUL and with any padding; a string value is the C string at the
  descriptor; a number comes from a 1, 2, 4 or 8-byte descriptor (any other size reads as 0); a note of unknown
  type is skipped; a later note overrides an earlier one.
* One note, ``elf_xen_parse_note``: PAE_MODE "yes" is XEN_PAE_EXTCR3 and one containing "bimodal" XEN_PAE_BIMODAL;
  FEATURES goes through ``elf_xen_parse_features`` (``feat|!feat|...``; "!" = required; an unknown required name
  fails the parse, an unknown optional one is ignored); SUPPORTED_FEATURES ORs its first 32-bit word into the
  supported set.
* ``__xen_guest``, ``elf_xen_parse_guest_info``: ``KEY=VALUE,...`` (names cut at 31 bytes, values at 127), numbers
  as ``strtoull(value, NULL, 0)``, HYPERCALL_PAGE a page number counted from VIRT_BASE, PAE=yes[extended-cr3] /
  yes..., BSD_SYMTAB a bare flag.
* Addresses, ``elf_xen_addr_calc_check``: PADDR_OFFSET without VIRT_BASE is refused; VIRT_BASE defaults to 0;
  PADDR_OFFSET defaults to 0 with notes and to VIRT_BASE with ``__xen_guest``; the entry defaults to e_entry; the
  kernel must start at or above VIRT_BASE and contain the entry; INIT_P2M must not fall inside it.
* Loadable segments, ``elf_parse_binary`` / ``elf_phdr_is_loadable``: a PT_LOAD whose p_flags has none of R, W, X
  is not loaded.
* ``xc_dom_parse_elf_kernel`` and ``xc_dom_guest_type`` (xg_dom_elfloader.c), ``xc_dom_compat_check``
  (xg_dom_boot.c): a kernel that requires dom0 does not run as a DomU; the PAE mode picks the guest type
  (bimodal: PAE only if the hypervisor offers it), and a guest type the hypervisor does not list is refused.

What this simulator cannot run correctly is refused with a specific code rather than started: the capabilities
are in SUPPORT (one place: lifting a refusal once a capability lands is an edit there). PAE kernels
(PAE_MODE "yes" / "yes[extended-cr3]", guest type xen-3.0-x86_32p) are accepted; the builder refuses them
(pae-unsupported) only on a backend other than xen. A bimodal kernel runs non-PAE.

Refusal codes (``ImageError.code``): not-elf, wrong-class, wrong-machine, bad-metadata (damaged file or values),
no-xen-metadata, feature-unknown (a required FEATURES name libelf does not know), paddr-offset-without-virt-base,
pae-unsupported, feature-unsupported, bsd-symtab-unsupported, segments-overlap, segment-outside-memory,
entry-outside-image, hypercall-page-unaligned, p2m-base-in-kernel.

Where this parser departs from libelf, on purpose:

* Placement: a segment's guest-physical address is ``p_vaddr - virt_base``; libelf's is ``p_paddr - paddr_offset``
  (elf_load_binary into the kernel segment at virt_kstart). The two agree whenever p_paddr and PADDR_OFFSET match
  the link addresses, as in Linux, Mini-OS, linux-2.6.18-xen's ``__xen_guest`` and everything this project builds
  (tests/test_libelf.py checks those layouts); an image where they disagree is loaded where it is linked (libelf
  would load it elsewhere, or refuse it as out of bounds). ``paddr_offset`` is reported with libelf's default.
* ``__xen_guest`` beside notes fills the identification strings and addresses the notes lack (libelf would ignore
  it). Its PAE, FEATURES and BSD_SYMTAB, which decide whether a guest can run, are read only when libelf reads
  them: when there are no Xen notes.
* ``elf_xen_note_check``'s LOADER "generic" / GUEST_OS "linux" / XEN_VERSION "xen-3.0" tests are not applied;
  only GUEST_OS must be present.
* A ``__xen_guest`` number that strtoull would read only in part is read as bare hex when it is one ("c0000000",
  which strtoull reads as 0, a base no guest means), else refused; libelf never refuses a number.
* A PAE_MODE note that starts with "yes" but is not "yes" (say "yes[extended-cr3]") is a PAE kernel here; libelf
  leaves it XEN_PAE_NO and would build it without PAE.
* An unknown required feature in ``__xen_guest`` is refused as in a note; libelf stops reading the string there and
  goes on.
* The entry must lie inside a loadable segment, not merely in ``[virt_kstart, virt_kend]``; a note container or
  section that runs past the end of the file is refused as damage.
"""

from __future__ import annotations

import enum
import io
import re
import struct
from collections.abc import Iterator

import attrs
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from pvcluster.abi.elf import ELFCLASS32, ELFDATA2LSB, EM_386
from pvcluster.abi.layouts import START_INFO_MAGIC
from pvcluster.abi.xen import LIBELF_FEATURE_NAMES, PAGE_SHIFT, PAGE_SIZE, XenElfNote, XenFeat

ADDRESS_LIMIT = 1 << 32
PF_LOADABLE = 0x7  # PF_R | PF_W | PF_X: elf_phdr_is_loadable wants at least one of them

# libelf's limits (libelf.h, libelf-dominfo.c).
MAX_TOTAL_NOTES = 65536  # ELF_MAX_TOTAL_NOTE_COUNT: notes walked over all containers before it gives up
FEATURE_CHUNK = 63  # elf_xen_parse_features reads a name into char[64]: longer ones are cut into 63-byte pieces
GUEST_NAME_MAX = 31  # elf_xen_parse_guest_info: char name[32]
GUEST_VALUE_MAX = 127  # and char value[128]
U64_MAX = (1 << 64) - 1  # strtoull saturates here
XEN_NOTE_NAME = b"Xen"
XEN_GUEST_SECTION = "__xen_guest"

_C_INTEGER = re.compile(rb"[ \t\n\v\f\r]*(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_BARE_HEX = re.compile(rb"[0-9a-fA-F]+")


class XenPae(enum.IntEnum):
    """libelf's ``parms->pae`` (XEN_PAE_* in libelf.h; libelf-internal, never on any wire)."""

    NO = 0
    YES = 1
    EXTCR3 = 2
    BIMODAL = 3


# The guest type xc_dom_guest_type picks for a PAE kernel, and for a non-PAE one (also what the builder writes as
# start_info.magic).
PAE_GUEST_TYPE = "xen-3.0-x86_32p"
NON_PAE_GUEST_TYPE = START_INFO_MAGIC.decode()


@attrs.frozen
class Support:
    """What this simulator runs, in Xen's terms."""

    guest_types: frozenset[str]  # as XENVER_capabilities would list them (xc_dom_compat_check)
    features: frozenset[XenFeat]  # XENFEAT_* a kernel may require with "!"
    bsd_symtab: bool  # whether the builder loads the symbol table after the kernel (elf_load_bsdsyms)
    bimodal_pae: bool = True  # xc_dom_guest_type's rule: a bimodal kernel runs PAE where PAE is offered


# 2-level and PAE paging (xen-3.0-x86_32p: domains/paging_pae.py, on the xen backend only); a bimodal kernel keeps
# running non-PAE (a departure: Xen would run it PAE); writable page tables (domains/ptwr.py); no auto-translated
# or shadow mode, no ring-0 guest kernel, no HVM callback vector, never dom0; the builder loads no symbol table.
# Add a capability here when it is implemented and the matching refusal lifts.
SUPPORT = Support(guest_types=frozenset({NON_PAE_GUEST_TYPE, PAE_GUEST_TYPE}),
                  features=frozenset({XenFeat.writable_page_tables}), bsd_symtab=False, bimodal_pae=False)


class ImageError(Exception):
    """A guest image the builder refuses; ``code`` is a stable slug, ``message`` names the specifics."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@attrs.frozen
class LoadSegment:
    paddr: int  # guest-physical: vaddr - virt_base
    vaddr: int
    data: bytes
    memsz: int


@attrs.frozen
class GuestImage:
    entry: int  # virtual address
    virt_base: int
    paddr_offset: int
    hypercall_page: int | None  # virtual address of the hypercall page, or None
    guest_os: str
    xen_version: str
    loader: str
    features: str  # the FEATURES string as written ("" if none)
    segments: tuple[LoadSegment, ...]
    symbols: dict[str, int]  # from .symtab if present, else {}
    metadata_source: str  # "notes", "xen_guest" or "notes+xen_guest"
    image_start: int  # lowest vaddr of any segment
    image_end: int  # highest vaddr + memsz of any segment (exclusive)
    guest_version: str = ""
    pae: XenPae = XenPae.NO  # as libelf reads it (except the "yes..." note above)
    pae_mode: str = ""  # the PAE_MODE note (or __xen_guest PAE) as written
    guest_type: str = NON_PAE_GUEST_TYPE  # xc_dom_guest_type's choice: what the guest runs as
    features_supported: frozenset[int] = frozenset()  # XENFEAT_* bit numbers (XenFeat members where named)
    features_required: frozenset[int] = frozenset()  # always a subset of features_supported


def _range(start: int, size: int) -> str:
    return f"[{start:#x}, {start + size:#x})"


def _file_bytes(data: bytes, offset: int, size: int, what: str) -> bytes:
    # pyelftools hands back short reads for truncated files instead of failing, so check bounds ourselves.
    if offset + size > len(data):
        raise ImageError(
            "bad-metadata",
            f"{what} at file offset {offset:#x}+{size:#x} runs past the end of the {len(data):#x}-byte file",
        )
    return data[offset : offset + size]


# -- reading the file as libelf does ------------------------------------------------------------------------------


def _unsigned(data: bytes, offset: int, size: int) -> int:
    """elf_access_unsigned: a little-endian number, 0 when any of it lies outside the file."""
    if offset < 0 or offset + size > len(data):
        return 0
    return int.from_bytes(data[offset : offset + size], "little")


def _c_string(data: bytes, offset: int) -> bytes | None:
    """elf_strval: the NUL-terminated string at ``offset``, or None if it runs off the end of the file."""
    end = data.find(b"\0", offset) if 0 <= offset < len(data) else -1
    return None if end < 0 else data[offset:end]


def _text(raw: bytes) -> str:
    # latin-1 maps byte for byte, so what libelf compares with strcmp is what Python compares.
    return raw.decode("latin-1")


def _note_align(size: int) -> int:
    # libelf adds in 32-bit unsigned arithmetic, so a size near 2^32 wraps as it does in C.
    return (size + 3) & 0xFFFFFFFC


@attrs.frozen
class _Note:
    n_type: int
    name: bytes | None
    desc_at: int
    descsz: int


class _NoteBudget:
    """The total_note_count elf_xen_parse shares between every container it walks."""

    def __init__(self) -> None:
        self.left = MAX_TOTAL_NOTES


def _walk_notes(data: bytes, start: int, end: int, budget: _NoteBudget) -> Iterator[_Note]:
    """Every note that starts in ``[start, end)``, as elf_xen_parse_notes steps through them with elf_note_next."""
    at = start
    while at < end and budget.left > 0:
        budget.left -= 1
        namesz, descsz, n_type = (_unsigned(data, at + off, 4) for off in (0, 4, 8))
        desc_at = at + 12 + _note_align(namesz)
        yield _Note(n_type=n_type, name=_c_string(data, at + 12), desc_at=desc_at, descsz=descsz)
        if at >= len(data):  # elf_note_next stops the walk once a note header is outside the file
            return
        at = desc_at + _note_align(descsz)


def _note_number(data: bytes, note: _Note) -> int:
    """elf_note_numeric: only 1, 2, 4 and 8-byte descriptors are numbers; any other size reads as 0."""
    return _unsigned(data, note.desc_at, note.descsz) if note.descsz in (1, 2, 4, 8) else 0


def _note_submap0(data: bytes, note: _Note) -> int:
    """elf_note_numeric_array(note, 4, 0): the first 32-bit word of a descriptor made of whole words, else 0."""
    return _unsigned(data, note.desc_at, 4) if note.descsz >= 4 and note.descsz % 4 == 0 else 0


# -- the metadata (libelf's struct elf_dom_parms) -----------------------------------------------------------------


@attrs.define
class _Parms:
    """The part of libelf's ``elf_dom_parms`` this builder uses; None is libelf's "unset"."""

    guest_os: str | None = None
    guest_ver: str | None = None
    xen_ver: str | None = None
    loader: str | None = None
    virt_base: int | None = None
    virt_entry: int | None = None
    virt_hypercall: int | None = None
    elf_paddr_offset: int | None = None
    p2m_base: int | None = None
    hypercall_page_number: int | None = None  # __xen_guest's HYPERCALL_PAGE, a page number from VIRT_BASE
    # Whether the guest can run at all: read from one source only (see the module docstring).
    features: str | None = None
    f_supported: int = 0
    f_required: int = 0
    pae: XenPae = XenPae.NO
    pae_mode: str | None = None
    pae_what: str = ""  # where pae_mode came from, for messages
    bsd_symtab: str | None = None  # what asked for the symbol table, for messages


# Fields __xen_guest may fill when notes exist: identification and addresses, never capabilities.
_FILLABLE = ("guest_os", "guest_ver", "xen_ver", "loader", "virt_base", "virt_entry", "virt_hypercall",
             "elf_paddr_offset", "hypercall_page_number")


_NAMED_FEATURES = {int(f): f for f in XenFeat}
_NOTE_KINDS = {int(k): k for k in XenElfNote}


def _feature_name(bit: int) -> str:
    feature = _NAMED_FEATURES.get(bit)
    return f"bit {bit}" if feature is None else feature.name


def parse_features(text: str, where: str) -> tuple[int, int]:
    """elf_xen_parse_features: the (supported, required) bitmaps of a ``feat|!feat|...`` string.

    Raises ImageError("feature-unknown") for a required name libelf does not know, as libelf fails the parse."""
    names = {f.name: int(f) for f in LIBELF_FEATURE_NAMES}
    supported = required = 0
    pos = 0
    while pos < len(text):
        piece = text[pos : pos + FEATURE_CHUNK]
        bar = piece.find("|")
        feature = piece if bar < 0 else piece[:bar]
        pos += len(piece) if bar < 0 else bar + 1
        name = feature[1:] if feature.startswith("!") else feature
        bit = names.get(name)
        if bit is not None:
            supported |= 1 << bit
            if feature.startswith("!"):
                required |= 1 << bit
        elif feature.startswith("!"):
            raise ImageError(
                "feature-unknown",
                f"{where} {text!r} requires {name!r}, which is no feature Xen's libelf knows "
                f"(it knows {', '.join(names)})",
            )
    return supported, required


def _pae_from_note(value: str, current: XenPae) -> XenPae:
    """elf_xen_parse_note's PAE_MODE: "yes" is EXTCR3, anything containing "bimodal" is BIMODAL, else unchanged."""
    if "bimodal" in value:
        return XenPae.BIMODAL
    if value == "yes":
        return XenPae.EXTCR3
    # Departure: libelf ignores "yes[extended-cr3]" and the like in a note, and Xen then builds a PAE kernel
    # without PAE; a kernel that says "yes..." is a PAE kernel.
    return XenPae.YES if value.startswith("yes") else current


def _apply_note(parms: _Parms, data: bytes, note: _Note) -> None:
    """elf_xen_parse_note for the note types this builder reads; others are skipped as unknown ones are."""
    kind = _NOTE_KINDS.get(note.n_type)
    if kind is None:
        return
    where = f"XEN_ELFNOTE_{kind.name} note"
    if kind in _STRING_NOTES:
        raw = _c_string(data, note.desc_at)
        if raw is None:  # libelf's elf_strval failed: the note has no effect
            return
        _apply_string_note(parms, kind, _text(raw), where)
    elif kind is XenElfNote.SUPPORTED_FEATURES:
        parms.f_supported |= _note_submap0(data, note)
    elif kind in _NUMBER_NOTES:
        setattr(parms, _NUMBER_NOTES[kind], _note_number(data, note))


_STRING_NOTES = frozenset({
    XenElfNote.GUEST_OS, XenElfNote.GUEST_VERSION, XenElfNote.XEN_VERSION, XenElfNote.LOADER,
    XenElfNote.PAE_MODE, XenElfNote.FEATURES, XenElfNote.BSD_SYMTAB,
})
_IDENTITY_NOTES = {
    XenElfNote.GUEST_OS: "guest_os",
    XenElfNote.GUEST_VERSION: "guest_ver",
    XenElfNote.XEN_VERSION: "xen_ver",
    XenElfNote.LOADER: "loader",
}
_NUMBER_NOTES = {
    XenElfNote.VIRT_BASE: "virt_base",
    XenElfNote.ENTRY: "virt_entry",
    XenElfNote.INIT_P2M: "p2m_base",
    XenElfNote.PADDR_OFFSET: "elf_paddr_offset",
    XenElfNote.HYPERCALL_PAGE: "virt_hypercall",
}


def _apply_string_note(parms: _Parms, kind: XenElfNote, value: str, where: str) -> None:
    if kind in _IDENTITY_NOTES:
        setattr(parms, _IDENTITY_NOTES[kind], value)
    elif kind is XenElfNote.PAE_MODE:
        parms.pae = _pae_from_note(value, parms.pae)
        parms.pae_mode, parms.pae_what = value, f"{where} {value!r}"
    elif kind is XenElfNote.BSD_SYMTAB and value == "yes":
        parms.bsd_symtab = f"{where} {value!r}"
    elif kind is XenElfNote.FEATURES:
        _add_features(parms, value, where)


def _add_features(parms: _Parms, value: str, where: str) -> None:
    # Several FEATURES (a note and another, or keys) add up: libelf sets bits in the same bitmaps.
    supported, required = parse_features(value, where)
    parms.features = value
    parms.f_supported |= supported
    parms.f_required |= required


def _notes_in(elf: ELFFile, data: bytes, parms: _Parms) -> bool:
    """Parse the Xen notes into ``parms`` in libelf's order; True if there were any."""
    budget = _NoteBudget()
    segments = []
    for index, seg in enumerate(elf.iter_segments()):
        # elf_xen_parse skips a PT_NOTE at offset 0: some binutils wrote that for note segments.
        if seg["p_type"] == "PT_NOTE" and seg["p_offset"] != 0:
            segments.append((seg["p_offset"], seg["p_filesz"], f"PT_NOTE {index}"))
    sections = [
        (sec["sh_offset"], sec["sh_size"], f"section {sec.name}")
        for sec in elf.iter_sections()
        if sec["sh_type"] == "SHT_NOTE"
    ]
    for containers in (segments, sections):  # sections only when the segments held no Xen note
        found = 0
        for offset, size, what in containers:
            _file_bytes(data, offset, size, what)
            for note in _walk_notes(data, offset, offset + size, budget):
                if note.name == XEN_NOTE_NAME:
                    _apply_note(parms, data, note)
                    found += 1
        if found:
            return True
    return False


# -- __xen_guest -----------------------------------------------------------------------------------------------


def _guest_items(text: bytes) -> Iterator[tuple[bytes, bytes]]:
    """elf_xen_parse_guest_info's tokenizer: ``NAME[=VALUE]`` items separated by ','. A name longer than 31 bytes or
    a value longer than 127 is cut there, and the rest starts the next item, as in libelf."""
    at = 0
    while at < len(text):
        name = text[at : at + GUEST_NAME_MAX]
        stop = min((i for i in (name.find(b","), name.find(b"=")) if i >= 0), default=-1)
        if stop < 0:
            at += len(name)
            yield name, b""
            continue
        at += stop + 1
        if name[stop : stop + 1] == b",":
            yield name[:stop], b""
            continue
        value = text[at : at + GUEST_VALUE_MAX]
        comma = value.find(b",")
        at += len(value) if comma < 0 else comma + 1
        yield name[:stop], value if comma < 0 else value[:comma]


def _guest_number(key: str, value: bytes) -> int:
    """strtoull(value, NULL, 0), as libelf reads __xen_guest numbers (see the module docstring for bare hex)."""
    match = _C_INTEGER.fullmatch(value)
    if match:
        digits = match.group(1)
        if digits[:2] in (b"0x", b"0X"):
            number = int(digits[2:], 16)
        else:
            number = int(digits, 8 if digits.startswith(b"0") else 10)
    elif _BARE_HEX.fullmatch(value):
        number = int(value, 16)
    else:
        raise ImageError("bad-metadata", f"__xen_guest {key}={_text(value)!r} is not a number")
    return min(number, U64_MAX)


def _guest_parms(elf: ELFFile, data: bytes, capabilities: bool) -> _Parms | None:
    """The ``__xen_guest`` section parsed as elf_xen_parse_guest_info does, or None without one. PAE, FEATURES and
    BSD_SYMTAB are read only when ``capabilities``."""
    sec = elf.get_section_by_name(XEN_GUEST_SECTION)
    if sec is None:
        return None
    _file_bytes(data, sec["sh_offset"], sec["sh_size"], f"section {XEN_GUEST_SECTION}")
    text = _c_string(data, sec["sh_offset"]) or b""
    parms = _Parms()
    for raw_key, value in _guest_items(text):
        key = _text(raw_key)
        if key in _GUEST_STRINGS:
            setattr(parms, _GUEST_STRINGS[key], _text(value))
        elif key in _GUEST_NUMBERS:
            setattr(parms, _GUEST_NUMBERS[key], _guest_number(key, value))
        elif capabilities:
            _apply_guest_capability(parms, key, _text(value))
    return parms


_GUEST_STRINGS = {"GUEST_OS": "guest_os", "GUEST_VER": "guest_ver", "XEN_VER": "xen_ver", "LOADER": "loader"}
_GUEST_NUMBERS = {
    "VIRT_BASE": "virt_base",
    "VIRT_ENTRY": "virt_entry",
    "ELF_PADDR_OFFSET": "elf_paddr_offset",
    "HYPERCALL_PAGE": "hypercall_page_number",
}


def _apply_guest_capability(parms: _Parms, key: str, value: str) -> None:
    where = f"__xen_guest {key}"
    if key == "PAE":
        if value == "yes[extended-cr3]":
            parms.pae = XenPae.EXTCR3
        elif value.startswith("yes"):
            parms.pae = XenPae.YES
        parms.pae_mode, parms.pae_what = value, f"{where}={value}"
    elif key == "BSD_SYMTAB":  # a bare flag in __xen_guest: present means yes
        parms.bsd_symtab = where
    elif key == "FEATURES":
        _add_features(parms, value, where)


# -- putting it together ----------------------------------------------------------------------------------------


@attrs.frozen
class _Metadata:
    parms: _Parms
    notes: bool  # Xen notes found (libelf's elf_note_start set): PADDR_OFFSET then defaults to 0
    source: str


def _metadata(elf: ELFFile, data: bytes) -> _Metadata:
    parms = _Parms()
    notes = _notes_in(elf, data, parms)
    guest = _guest_parms(elf, data, capabilities=not notes)
    if not notes and guest is None:
        raise ImageError("no-xen-metadata", "neither Xen ELF notes nor a __xen_guest section is present")
    source = "+".join(name for name, present in (("notes", notes), ("xen_guest", guest is not None)) if present)
    if guest is not None and not notes:
        parms = guest
    elif guest is not None:
        for field in _FILLABLE:
            if getattr(parms, field) is None:
                setattr(parms, field, getattr(guest, field))
    if parms.guest_os is None:
        raise ImageError("no-xen-metadata", f"Xen metadata (from {source}) does not name GUEST_OS")
    if parms.virt_hypercall is None and parms.hypercall_page_number is not None:
        # Counted from VIRT_BASE once everything is read, as libelf does after its loop (0 when VIRT_BASE is unset).
        parms.virt_hypercall = ((parms.hypercall_page_number << PAGE_SHIFT) + (parms.virt_base or 0)) & U64_MAX
    return _Metadata(parms=parms, notes=notes, source=source)


def _bits(bitmap: int) -> frozenset[int]:
    return frozenset(_NAMED_FEATURES.get(b, b) for b in range(32) if bitmap >> b & 1)


def _guest_type(pae: XenPae, support: Support) -> str:
    """xc_dom_guest_type for EM_386: bimodal runs PAE only where the hypervisor offers PAE."""
    if pae is XenPae.BIMODAL:
        offered = PAE_GUEST_TYPE in support.guest_types and support.bimodal_pae
        return PAE_GUEST_TYPE if offered else NON_PAE_GUEST_TYPE
    return PAE_GUEST_TYPE if pae in (XenPae.YES, XenPae.EXTCR3) else NON_PAE_GUEST_TYPE


def _check_support(parms: _Parms, support: Support) -> str:
    """Refuse what the simulator cannot run; return the guest type it runs as."""
    guest_type = _guest_type(parms.pae, support)
    if guest_type not in support.guest_types:
        raise ImageError(
            "pae-unsupported",
            f"{parms.pae_what} makes this a {guest_type} guest (PAE paging); this hypervisor runs only "
            f"{', '.join(sorted(support.guest_types))} (2-level paging)",
        )
    required = _bits(parms.f_required)
    if XenFeat.dom0 in required:  # xc_dom_parse_elf_kernel: such a kernel cannot run unprivileged
        raise ImageError(
            "feature-unsupported", f"FEATURES {parms.features!r} requires dom0: the kernel does not run as a DomU"
        )
    missing = sorted(required - support.features)
    if missing:
        raise ImageError(
            "feature-unsupported",
            f"FEATURES {parms.features!r} requires {', '.join(_feature_name(b) for b in missing)}, which this "
            f"hypervisor does not implement",
        )
    if parms.bsd_symtab is not None and not support.bsd_symtab:
        raise ImageError(
            "bsd-symtab-unsupported",
            f"{parms.bsd_symtab} asks for the symbol table to be loaded after the kernel; this builder does not",
        )
    return guest_type


def _addresses(meta: _Metadata) -> tuple[int, int]:
    """(virt_base, paddr_offset) with elf_xen_addr_calc_check's refusal and defaults."""
    parms = meta.parms
    if parms.elf_paddr_offset is not None and parms.virt_base is None:
        raise ImageError(
            "paddr-offset-without-virt-base",
            f"PADDR_OFFSET {parms.elf_paddr_offset:#x} is set but VIRT_BASE is not (from {meta.source})",
        )
    virt_base = parms.virt_base or 0
    if parms.elf_paddr_offset is not None:
        return virt_base, parms.elf_paddr_offset
    return virt_base, 0 if meta.notes else virt_base


def _load_segments(elf: ELFFile, data: bytes, virt_base: int, memory_bytes: int) -> tuple[LoadSegment, ...]:
    found: list[tuple[int, LoadSegment]] = []
    for index, seg in enumerate(elf.iter_segments()):
        if seg["p_type"] != "PT_LOAD" or not seg["p_flags"] & PF_LOADABLE:
            continue
        vaddr, filesz, memsz = seg["p_vaddr"], seg["p_filesz"], seg["p_memsz"]
        what = f"PT_LOAD {index} {_range(vaddr, memsz)}"
        body = _file_bytes(data, seg["p_offset"], filesz, what)
        if memsz < filesz:
            raise ImageError("segment-outside-memory", f"{what} has memsz {memsz:#x} < filesz {filesz:#x}")
        for other_index, other in found:
            if vaddr < other.vaddr + other.memsz and other.vaddr < vaddr + memsz:
                raise ImageError(
                    "segments-overlap",
                    f"{what} overlaps PT_LOAD {other_index} {_range(other.vaddr, other.memsz)}",
                )
        found.append((index, LoadSegment(paddr=vaddr - virt_base, vaddr=vaddr, data=body, memsz=memsz)))
    if not found:
        raise ImageError("bad-metadata", "the image has no loadable PT_LOAD segment")

    for index, load in found:
        what = f"PT_LOAD {index} {_range(load.vaddr, load.memsz)}"
        if load.vaddr < virt_base:
            raise ImageError("segment-outside-memory", f"{what} starts below VIRT_BASE {virt_base:#x}")
        if load.vaddr + load.memsz > ADDRESS_LIMIT or load.paddr + load.memsz > memory_bytes:
            raise ImageError(
                "segment-outside-memory",
                f"{what} needs guest-physical {_range(load.paddr, load.memsz)}, "
                f"beyond the {memory_bytes:#x} bytes of guest memory",
            )
    return tuple(load for _, load in found)


def _check_ident(data: bytes) -> None:
    if data[:4] != b"\x7fELF":
        # never the bytes themselves: the message reaches the toolstack, and the file may be anyone's
        raise ImageError("not-elf", "no ELF magic")
    if len(data) < 20:
        raise ImageError("bad-metadata", f"ELF header truncated at {len(data)} bytes")
    if data[4] != ELFCLASS32:
        raise ImageError("wrong-class", f"EI_CLASS is {data[4]}, a PV x86-32 guest must be ELFCLASS32 (1)")
    if data[5] != ELFDATA2LSB:
        raise ImageError("bad-metadata", f"EI_DATA is {data[5]}, x86 images are little-endian (1)")
    # Read e_machine before pyelftools: it would otherwise fail on foreign-machine quirks with vaguer errors.
    (machine,) = struct.unpack_from("<H", data, 18)
    if machine != EM_386:
        raise ImageError("wrong-machine", f"e_machine is {machine}, expected EM_386 (3)")


def _check_addresses(meta: _Metadata, entry: int, segments: tuple[LoadSegment, ...]) -> None:
    """The entry, hypercall page and INIT_P2M against the loaded kernel (elf_xen_addr_calc_check, and Xen's
    hypercall-page checks)."""
    image_start = min(s.vaddr for s in segments)
    image_end = max(s.vaddr + s.memsz for s in segments)
    if not any(s.vaddr <= entry < s.vaddr + s.memsz for s in segments):
        origin = "e_entry" if meta.parms.virt_entry is None else "Xen metadata ENTRY"
        raise ImageError("entry-outside-image", f"entry point {entry:#x} ({origin}) is in no PT_LOAD segment")
    hypercall_page = meta.parms.virt_hypercall
    if hypercall_page is not None:
        if hypercall_page % PAGE_SIZE:
            raise ImageError("hypercall-page-unaligned", f"hypercall page {hypercall_page:#x} is not page-aligned")
        if not image_start <= hypercall_page < image_end:
            kernel = _range(image_start, image_end - image_start)
            raise ImageError("bad-metadata", f"hypercall page {hypercall_page:#x} is outside the image {kernel}")
    p2m_base = meta.parms.p2m_base
    if p2m_base is not None and image_start <= p2m_base < image_end:
        raise ImageError(
            "p2m-base-in-kernel",
            f"INIT_P2M {p2m_base:#x} is inside the kernel {_range(image_start, image_end - image_start)}",
        )


def _symbols(elf: ELFFile, data: bytes) -> dict[str, int]:
    symbols: dict[str, int] = {}
    for sec in elf.iter_sections():
        if isinstance(sec, SymbolTableSection) and sec["sh_type"] == "SHT_SYMTAB":
            _file_bytes(data, sec["sh_offset"], sec["sh_size"], f"section {sec.name}")
            for sym in sec.iter_symbols():
                if sym.name and sym["st_info"]["type"] not in ("STT_FILE", "STT_SECTION"):
                    symbols[sym.name] = sym["st_value"]
    return symbols


def _parse(data: bytes, memory_bytes: int, support: Support) -> GuestImage:
    _check_ident(data)
    elf = ELFFile(io.BytesIO(data))
    meta = _metadata(elf, data)
    virt_base, paddr_offset = _addresses(meta)
    guest_type = _check_support(meta.parms, support)
    segments = _load_segments(elf, data, virt_base, memory_bytes)
    parms = meta.parms
    entry = elf.header["e_entry"] if parms.virt_entry is None else parms.virt_entry
    _check_addresses(meta, entry, segments)
    return GuestImage(
        entry=entry,
        virt_base=virt_base,
        paddr_offset=paddr_offset,
        hypercall_page=parms.virt_hypercall,
        segments=segments,
        symbols=_symbols(elf, data),
        metadata_source=meta.source,
        image_start=min(s.vaddr for s in segments),
        image_end=max(s.vaddr + s.memsz for s in segments),
        guest_os=parms.guest_os or "",
        xen_version=parms.xen_ver or "",
        loader=parms.loader or "",
        features=parms.features or "",
        guest_version=parms.guest_ver or "",
        pae=parms.pae,
        pae_mode=parms.pae_mode or "",
        guest_type=guest_type,
        features_supported=_bits(parms.f_supported),
        features_required=_bits(parms.f_required),
    )


def parse_guest_image(data: bytes, memory_bytes: int, support: Support = SUPPORT) -> GuestImage:
    """Parse and validate ``data``; every refusal, including a damaged file, is an ImageError. ``support`` is what
    the simulator runs (tests pass a wider one to see a refusal lift)."""
    try:
        return _parse(bytes(data), memory_bytes, support)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyelftools raises many unrelated types on damaged input
        raise ImageError("bad-metadata", f"damaged ELF image: {type(exc).__name__}: {exc}") from exc

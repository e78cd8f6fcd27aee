"""Read and validate an ELF32 x86 PV guest image, following Xen's libelf / xc_dom_elfloader rules.

Address model: a segment's guest-physical address is ``p_vaddr - virt_base``. ``p_paddr`` and
ELF_PADDR_OFFSET are reported but never used for placement, because old guests put junk in them (Xen's own
compatibility handling for images without notes comes to the same thing).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator

import attrs
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from pvcluster.abi.xen import PAGE_SIZE, XenElfNote

EM_386 = 3
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ADDRESS_LIMIT = 1 << 32

# (note type, __xen_guest key) for the string-valued metadata GuestImage carries.
_STRING_KEYS = {
    "guest_os": (XenElfNote.GUEST_OS, "GUEST_OS"),
    "xen_version": (XenElfNote.XEN_VERSION, "XEN_VER"),
    "loader": (XenElfNote.LOADER, "LOADER"),
    "features": (XenElfNote.FEATURES, "FEATURES"),
}


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
    features: str
    segments: tuple[LoadSegment, ...]
    symbols: dict[str, int]  # from .symtab if present, else {}
    metadata_source: str  # "notes", "xen_guest" or "notes+xen_guest"
    image_start: int  # lowest vaddr of any segment
    image_end: int  # highest vaddr + memsz of any segment (exclusive)


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


def _iter_notes(blob: bytes, what: str) -> Iterator[tuple[bytes, int, bytes]]:
    """Yield (name, type, desc) from a note blob.

    Parsed by hand because pyelftools relabels Xen's note types with GNU names.
    """
    offset = 0
    while offset + 12 <= len(blob):
        namesz, descsz, n_type = struct.unpack_from("<III", blob, offset)
        name_at = offset + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        offset = desc_at + (descsz + 3) // 4 * 4
        if desc_at + descsz > len(blob):
            raise ImageError(
                "bad-metadata", f"note of type {n_type} in {what} runs past the end of its container"
            )
        yield blob[name_at : name_at + namesz].rstrip(b"\0"), n_type, blob[desc_at : desc_at + descsz]


def _xen_notes(elf: ELFFile, data: bytes) -> dict[int, bytes]:
    """Xen notes from PT_NOTE segments or, if those hold none, SHT_NOTE sections (libelf's order)."""
    containers: list[list[tuple[bytes, str]]] = [[], []]
    for index, seg in enumerate(elf.iter_segments()):
        if seg["p_type"] == "PT_NOTE":
            what = f"PT_NOTE {index}"
            containers[0].append((_file_bytes(data, seg["p_offset"], seg["p_filesz"], what), what))
    for sec in elf.iter_sections():
        if sec["sh_type"] == "SHT_NOTE":
            what = f"section {sec.name}"
            containers[1].append((_file_bytes(data, sec["sh_offset"], sec["sh_size"], what), what))
    for blobs in containers:
        notes = {
            n_type: desc
            for blob, what in blobs
            for name, n_type, desc in _iter_notes(blob, what)
            if name == b"Xen"
        }
        if notes:
            return notes
    return {}


def _xen_guest(elf: ELFFile, data: bytes) -> dict[str, str] | None:
    sec = elf.get_section_by_name("__xen_guest")
    if sec is None:
        return None
    raw = _file_bytes(data, sec["sh_offset"], sec["sh_size"], "section __xen_guest").split(b"\0", 1)[0]
    pairs: dict[str, str] = {}
    for item in raw.decode("ascii", errors="replace").split(","):
        if item:
            # A bare flag (no '=') is legal in __xen_guest and means an empty value, as in libelf.
            key, _, value = item.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def _note_int(notes: dict[int, bytes], n_type: XenElfNote) -> int | None:
    desc = notes.get(n_type)
    if desc is None:
        return None
    if len(desc) not in (1, 2, 4, 8):
        raise ImageError("bad-metadata", f"Xen note {n_type.name} holds {len(desc)} bytes, not an integer")
    return int.from_bytes(desc, "little")


def _note_str(notes: dict[int, bytes], n_type: XenElfNote) -> str | None:
    desc = notes.get(n_type)
    return None if desc is None else desc.split(b"\0", 1)[0].decode("ascii", errors="replace")


def _guest_int(guest: dict[str, str], key: str) -> int | None:
    if key not in guest:
        return None
    try:
        return int(guest[key], 16)  # int(..., 16) accepts an optional 0x prefix, as strtoull(.., 16) does
    except ValueError:
        raise ImageError("bad-metadata", f"__xen_guest {key}={guest[key]!r} is not a hex number") from None


@attrs.frozen
class _Metadata:
    strings: dict[str, str]
    virt_base: int
    paddr_offset: int
    hypercall_page: int | None
    entry: int | None
    source: str


def _metadata(elf: ELFFile, data: bytes) -> _Metadata:
    notes = _xen_notes(elf, data)
    guest = _xen_guest(elf, data)
    if not notes and guest is None:
        raise ImageError("no-xen-metadata", "neither Xen ELF notes nor a __xen_guest section is present")
    source = "+".join(
        name for name, present in (("notes", bool(notes)), ("xen_guest", guest is not None)) if present
    )
    guest = guest or {}

    strings: dict[str, str] = {}
    for field, (n_type, key) in _STRING_KEYS.items():
        value = _note_str(notes, n_type)
        strings[field] = value if value is not None else guest.get(key, "")
    if "GUEST_OS" not in guest and XenElfNote.GUEST_OS not in notes:
        raise ImageError("no-xen-metadata", f"Xen metadata (from {source}) does not name GUEST_OS")

    def pick(n_type: XenElfNote, key: str) -> int | None:
        value = _note_int(notes, n_type)
        return value if value is not None else _guest_int(guest, key)

    virt_base = pick(XenElfNote.VIRT_BASE, "VIRT_BASE") or 0
    paddr_offset = pick(XenElfNote.PADDR_OFFSET, "ELF_PADDR_OFFSET")
    hypercall_page = _note_int(notes, XenElfNote.HYPERCALL_PAGE)
    if hypercall_page is None:
        page_number = _guest_int(guest, "HYPERCALL_PAGE")
        if page_number is not None:
            hypercall_page = virt_base + page_number * PAGE_SIZE
    return _Metadata(
        strings=strings,
        virt_base=virt_base,
        paddr_offset=virt_base if paddr_offset is None else paddr_offset,
        hypercall_page=hypercall_page,
        entry=_note_int(notes, XenElfNote.ENTRY),
        source=source,
    )


def _load_segments(elf: ELFFile, data: bytes, virt_base: int, memory_bytes: int) -> tuple[LoadSegment, ...]:
    found: list[tuple[int, LoadSegment]] = []
    for index, seg in enumerate(elf.iter_segments()):
        if seg["p_type"] != "PT_LOAD":
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
        raise ImageError("bad-metadata", "the image has no PT_LOAD segment")

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


def _parse(data: bytes, memory_bytes: int) -> GuestImage:
    _check_ident(data)
    elf = ELFFile(io.BytesIO(data))
    meta = _metadata(elf, data)
    segments = _load_segments(elf, data, meta.virt_base, memory_bytes)
    image_start = min(s.vaddr for s in segments)
    image_end = max(s.vaddr + s.memsz for s in segments)

    entry = elf.header["e_entry"] if meta.entry is None else meta.entry
    if not any(s.vaddr <= entry < s.vaddr + s.memsz for s in segments):
        origin = "e_entry" if meta.entry is None else "ENTRY note"
        raise ImageError("entry-outside-image", f"entry point {entry:#x} ({origin}) is in no PT_LOAD segment")

    if meta.hypercall_page is not None:
        if meta.hypercall_page % PAGE_SIZE:
            raise ImageError(
                "hypercall-page-unaligned", f"hypercall page {meta.hypercall_page:#x} is not page-aligned"
            )
        if not image_start <= meta.hypercall_page < image_end:
            raise ImageError(
                "bad-metadata",
                f"hypercall page {meta.hypercall_page:#x} is outside the image "
                f"{_range(image_start, image_end - image_start)}",
            )

    symbols: dict[str, int] = {}
    for sec in elf.iter_sections():
        if isinstance(sec, SymbolTableSection) and sec["sh_type"] == "SHT_SYMTAB":
            _file_bytes(data, sec["sh_offset"], sec["sh_size"], f"section {sec.name}")
            for sym in sec.iter_symbols():
                if sym.name and sym["st_info"]["type"] not in ("STT_FILE", "STT_SECTION"):
                    symbols[sym.name] = sym["st_value"]

    return GuestImage(
        entry=entry,
        virt_base=meta.virt_base,
        paddr_offset=meta.paddr_offset,
        hypercall_page=meta.hypercall_page,
        segments=segments,
        symbols=symbols,
        metadata_source=meta.source,
        image_start=image_start,
        image_end=image_end,
        guest_os=meta.strings["guest_os"],
        xen_version=meta.strings["xen_version"],
        loader=meta.strings["loader"],
        features=meta.strings["features"],
    )


def parse_guest_image(data: bytes, memory_bytes: int) -> GuestImage:
    """Parse and validate ``data``; every refusal, including a damaged file, is an ImageError."""
    try:
        return _parse(bytes(data), memory_bytes)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyelftools raises many unrelated types on damaged input
        raise ImageError("bad-metadata", f"damaged ELF image: {type(exc).__name__}: {exc}") from exc

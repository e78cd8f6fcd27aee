"""Write ELF32 x86 guest images with the metadata a Xen-style domain builder reads.

pyelftools can only read, so the bytes are laid out here with ``struct``. The header fields ``machine`` and
``elf_class`` are overridable so tests can craft images the loader must reject; nothing else is validated
(a Segment with ``memsz < len(data)`` is written as given) for the same reason.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Literal

import attrs

from pvcluster.abi.elf import ELFCLASS32, ELFDATA2LSB, EM_386, ET_EXEC, EV_CURRENT, PF_R, PF_W, PF_X, PT_LOAD, PT_NOTE
from pvcluster.abi.xen import PAGE_SIZE

SHT_PROGBITS = 1
SHT_SYMTAB = 2
SHT_STRTAB = 3
SHT_NOTE = 7
SHT_NOBITS = 8
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4
SHN_ABS = 0xFFF1

STB_GLOBAL = 1
STT_NOTYPE, STT_FUNC = 0, 2

EHDR_SIZE = 52
PHDR_SIZE = 32
SHDR_SIZE = 40
SYM_SIZE = 16

XEN_NOTE_OWNER = b"Xen"

NoteValue = int | bytes | str
# A note as (type, value), written with the owner "Xen", or the bytes of one note as encode_note (or a test) made it.
Note = tuple[int, NoteValue] | bytes
# Where the notes go: a PT_NOTE segment and a .note.Xen section over the same bytes (what ld makes of an allocated
# note section), the PT_NOTE segment alone, or the section alone (a note section outside every segment).
NotePlacement = Literal["both", "segment", "section"]


@attrs.frozen
class Segment:
    vaddr: int
    data: bytes
    memsz: int | None = None  # >= len(data); None = len(data) (bss tail when larger)
    paddr: int | None = None  # None = vaddr
    flags: int = PF_R | PF_W | PF_X

    @property
    def mem_size(self) -> int:
        return len(self.data) if self.memsz is None else self.memsz


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _note_desc(value: NoteValue) -> bytes:
    if isinstance(value, bool):
        raise TypeError("note value must be int, bytes or str, not bool")
    if isinstance(value, int):
        # Numeric notes are address-sized, and the address size of ELF32 is four bytes.
        return struct.pack("<I", value)
    if isinstance(value, str):
        return value.encode() + b"\0"
    return bytes(value)


def encode_note(n_type: int, value: NoteValue, owner: bytes = XEN_NOTE_OWNER) -> bytes:
    """One ELF note: the name and descriptor are each padded to 4 bytes, as the gABI requires for ELF32."""
    name = owner + b"\0"
    desc = _note_desc(value)
    header = struct.pack("<III", len(name), len(desc), n_type)
    return header + name.ljust(_align(len(name), 4), b"\0") + desc.ljust(_align(len(desc), 4), b"\0")


def _note_blob(notes: Sequence[Note]) -> bytes:
    return b"".join(note if isinstance(note, bytes) else encode_note(*note) for note in notes)


class _StrTab:
    """A string table that starts with the mandatory empty string."""

    def __init__(self) -> None:
        self.data = bytearray(b"\0")

    def add(self, name: str) -> int:
        offset = len(self.data)
        self.data += name.encode() + b"\0"
        return offset


@attrs.define
class _Section:
    name: str
    sh_type: int
    flags: int = 0
    addr: int = 0
    offset: int = 0
    size: int = 0
    link: int = 0
    info: int = 0
    addralign: int = 1
    entsize: int = 0


def _section_flags(seg_flags: int) -> int:
    flags = SHF_ALLOC
    if seg_flags & PF_W:
        flags |= SHF_WRITE
    if seg_flags & PF_X:
        flags |= SHF_EXECINSTR
    return flags


def _symtab(symbols: dict[str, int], segments: Sequence[Segment],
            sections: Sequence[_Section] = ()) -> tuple[bytes, bytes]:
    """Each symbol is defined in the section holding its address (debuggers such as gdb look a code address up by
    its section), else absolute."""
    def in_code(value: int) -> bool:
        return any(s.flags & PF_X and s.vaddr <= value < s.vaddr + s.mem_size for s in segments)

    def section_of(value: int) -> int:
        for index, sec in enumerate(sections, start=1):  # section 0 is the null one
            if sec.addr and sec.addr <= value < sec.addr + sec.size:
                return index
        return SHN_ABS

    strtab = _StrTab()
    entries = [bytes(SYM_SIZE)]  # index 0 is the reserved undefined symbol
    for name, value in symbols.items():
        kind = STT_FUNC if in_code(value) else STT_NOTYPE
        entries.append(
            struct.pack("<IIIBBH", strtab.add(name), value, 0, (STB_GLOBAL << 4) | kind, 0, section_of(value))
        )
    return b"".join(entries), bytes(strtab.data)


def pack_elf32(
    *,
    entry: int,
    segments: Sequence[Segment],
    xen_guest: str | None = None,
    notes: Sequence[Note] = (),
    symbols: dict[str, int] | None = None,
    machine: int = EM_386,
    elf_class: int = ELFCLASS32,
    note_placement: NotePlacement = "both",
    section_notes: Sequence[Note] = (),
) -> bytes:
    """Return the bytes of a little-endian ET_EXEC ELF32 image.

    Layout: headers, then the note and ``__xen_guest`` payloads, then each PT_LOAD at a file offset congruent
    to its vaddr modulo the page size (so a loader could mmap it), then symbols and section headers.
    ``section_notes`` go in a second SHT_NOTE section, ``.note.extra``, outside every segment (so a PT_NOTE and a
    note section can disagree, as libelf's search order matters only then).
    """
    note_blob = _note_blob(notes)
    extra_blob = _note_blob(section_notes)
    note_segment = bool(note_blob) and note_placement in ("both", "segment")
    note_section = bool(note_blob) and note_placement in ("both", "section")
    phnum = len(segments) + (1 if note_segment else 0)

    out = bytearray(EHDR_SIZE + PHDR_SIZE * phnum)
    sections: list[_Section] = []

    def place(blob: bytes, alignment: int) -> int:
        out.extend(bytes(_align(len(out), alignment) - len(out)))
        offset = len(out)
        out.extend(blob)
        return offset

    note_offset = 0
    if note_blob:
        note_offset = place(note_blob, 4)
    if note_section:
        sections.append(_Section(".note.Xen", SHT_NOTE, offset=note_offset, size=len(note_blob), addralign=4))
    if extra_blob:
        sections.append(
            _Section(".note.extra", SHT_NOTE, offset=place(extra_blob, 4), size=len(extra_blob), addralign=4)
        )
    if xen_guest is not None:
        guest_blob = xen_guest.encode() + b"\0"
        offset = place(guest_blob, 1)
        sections.append(_Section("__xen_guest", SHT_PROGBITS, offset=offset, size=len(guest_blob)))

    phdrs: list[bytes] = []
    for index, seg in enumerate(segments):
        padding = (seg.vaddr - len(out)) % PAGE_SIZE
        out.extend(bytes(padding))
        offset = len(out)
        out.extend(seg.data)
        paddr = seg.vaddr if seg.paddr is None else seg.paddr
        phdrs.append(
            struct.pack(
                "<8I", PT_LOAD, offset, seg.vaddr, paddr, len(seg.data), seg.mem_size, seg.flags, PAGE_SIZE
            )
        )
        flags = _section_flags(seg.flags)
        if seg.data:
            sections.append(_Section(f".load{index}", SHT_PROGBITS, flags, seg.vaddr, offset, len(seg.data)))
        if seg.mem_size > len(seg.data):
            sections.append(
                _Section(
                    f".bss{index}",
                    SHT_NOBITS,
                    flags,
                    seg.vaddr + len(seg.data),
                    offset + len(seg.data),
                    seg.mem_size - len(seg.data),
                )
            )
    if note_segment:
        phdrs.append(struct.pack("<8I", PT_NOTE, note_offset, 0, 0, len(note_blob), len(note_blob), PF_R, 4))

    if symbols is not None:
        sym_blob, str_blob = _symtab(symbols, segments, sections)
        symtab_index = len(sections) + 1  # +1 for the null section header
        sym_offset = place(sym_blob, 4)
        sections.append(
            _Section(
                ".symtab",
                SHT_SYMTAB,
                offset=sym_offset,
                size=len(sym_blob),
                link=symtab_index + 1,
                info=1,  # index of the first non-local symbol: all of ours are global
                addralign=4,
                entsize=SYM_SIZE,
            )
        )
        sections.append(_Section(".strtab", SHT_STRTAB, offset=place(str_blob, 1), size=len(str_blob)))

    shstrtab = _StrTab()
    name_offsets = [shstrtab.add(s.name) for s in sections]
    shstr_name = shstrtab.add(".shstrtab")
    shstr_offset = place(bytes(shstrtab.data), 1)
    sections.append(_Section(".shstrtab", SHT_STRTAB, offset=shstr_offset, size=len(shstrtab.data)))
    name_offsets.append(shstr_name)

    shdrs = [bytes(SHDR_SIZE)]
    for name_offset, s in zip(name_offsets, sections, strict=True):
        shdrs.append(
            struct.pack(
                "<10I",
                name_offset,
                s.sh_type,
                s.flags,
                s.addr,
                s.offset,
                s.size,
                s.link,
                s.info,
                s.addralign,
                s.entsize,
            )
        )
    shoff = place(b"".join(shdrs), 4)

    ident = b"\x7fELF" + bytes([elf_class, ELFDATA2LSB, EV_CURRENT]) + bytes(9)
    out[:EHDR_SIZE] = ident + struct.pack(
        "<HHIIIIIHHHHHH",
        ET_EXEC,
        machine,
        EV_CURRENT,
        entry,
        EHDR_SIZE if phnum else 0,
        shoff,
        0,  # e_flags
        EHDR_SIZE,
        PHDR_SIZE,
        phnum,
        SHDR_SIZE,
        len(shdrs),
        len(shdrs) - 1,  # .shstrtab is always the last section
    )
    out[EHDR_SIZE : EHDR_SIZE + PHDR_SIZE * phnum] = b"".join(phdrs)
    return bytes(out)

"""An ELF32 core file of an x86-32 guest, as Linux writes one for a 32-bit process: pure layout, no I/O.

``pvcluster dump`` (hypervisor/dump.py) and kdump write a domain's memory and vCPU state in the format gdb and
pyelftools read: an ``ET_CORE`` / ``EM_386`` image whose first program header is a ``PT_NOTE`` holding one
``NT_PRSTATUS`` per vCPU (Linux's i386 ``struct elf_prstatus``, 144 bytes: ``pr_pid`` is the vCPU id + 1, so gdb
shows each vCPU as a thread, and ``pr_reg`` is ``elf_gregset_t``: ebx, ecx, edx, esi, edi, ebp, eax, ds, es, fs,
gs, orig_eax, eip, cs, eflags, esp, ss) and one ``NT_PRPSINFO`` (the domain's name), followed by a ``PT_LOAD`` per
run of virtually and physically contiguous mapped pages, at its guest-virtual address (``p_paddr`` holds the
guest-physical one, as kdump's cores do).

The writer lays the file out up front (``core_layout``: the header and notes, and each segment's offset) so the
caller can stream each segment's bytes after it, chunk by chunk, in order: a dump never holds a domain's memory
twice. The first vCPU's note comes first: gdb takes it for the current thread.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

import attrs

from pvcluster.abi.elf import EM_386, ET_CORE, EV_CURRENT, PF_R, PF_W, PF_X, PT_LOAD, PT_NOTE

PAGE = 4096
NT_PRSTATUS = 1
NT_PRPSINFO = 3
EHDR_SIZE = 52
PHDR_SIZE = 32
PRSTATUS_SIZE = 144
PRPSINFO_SIZE = 124
# Linux's i386 elf_gregset_t, in order.
GREGS = ("ebx", "ecx", "edx", "esi", "edi", "ebp", "eax", "ds", "es", "fs", "gs", "orig_eax", "eip", "cs", "eflags",
         "esp", "ss")
# e_phnum is 16 bits (PN_XNUM, 0xffff, would need a section header): the note and at most this many loads.
MAX_SEGMENTS = 0xFFFE
# A 32-bit core's offsets are 32 bits.
MAX_FILE_BYTES = (1 << 32) - 1

_PRSTATUS_HEAD = struct.Struct("<3ih2xII4I8I")  # pr_info, pr_cursig, pr_sigpend, pr_sighold, pids, 4 timevals
_PRPSINFO = struct.Struct("<4BIHH4I16s80s")


class CoreError(ValueError):
    """What was asked cannot be a 32-bit core file (too many segments, too large, a value out of range)."""


@attrs.frozen
class CoreThread:
    """One vCPU: ``tid`` (pr_pid: vCPU id + 1), its registers by name (every name in GREGS but orig_eax, which
    defaults to -1: no system call), and the signal gdb reports for it."""

    tid: int
    regs: Mapping[str, int]
    signal: int = 0


@attrs.frozen
class CoreSegment:
    vaddr: int
    paddr: int
    size: int  # a multiple of PAGE
    writable: bool


def prstatus(thread: CoreThread) -> bytes:
    head = _PRSTATUS_HEAD.pack(thread.signal, 0, 0, thread.signal, 0, 0, thread.tid, 0, thread.tid, thread.tid,
                               *([0] * 8))
    regs = [thread.regs.get(name, 0xFFFFFFFF if name == "orig_eax" else 0) & 0xFFFFFFFF for name in GREGS]
    out = head + struct.pack("<17I", *regs) + struct.pack("<i", 0)
    assert len(out) == PRSTATUS_SIZE
    return out


def prpsinfo(name: str, args: str) -> bytes:
    fname = name.encode("utf-8", "replace")[:15]
    psargs = args.encode("utf-8", "replace")[:79]
    return _PRPSINFO.pack(ord("R"), ord("R"), 0, 0, 0, 0, 0, 1, 0, 1, 1, fname, psargs)


def _note(kind: int, desc: bytes) -> bytes:
    name = b"CORE\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731 - notes pad name and desc to 4 bytes
    return struct.pack("<3I", len(name), len(desc), kind) + pad(name) + pad(desc)


def notes(threads: Sequence[CoreThread], name: str, args: str = "") -> bytes:
    return b"".join([_note(NT_PRSTATUS, prstatus(t)) for t in threads] + [_note(NT_PRPSINFO, prpsinfo(name, args))])


def core_layout(threads: Sequence[CoreThread], segments: Sequence[CoreSegment], name: str,
                args: str = "") -> tuple[bytes, list[int]]:
    """The file's first bytes (ELF header, program headers, notes, padded to the first segment's page) and each
    segment's file offset; the segments' bytes follow in order, each at its offset, with nothing between them."""
    if len(segments) > MAX_SEGMENTS:
        raise CoreError(f"{len(segments)} segments: a 32-bit core holds at most {MAX_SEGMENTS}")
    for s in segments:
        if s.size <= 0 or s.size % PAGE or not 0 <= s.vaddr <= (1 << 32) - s.size or not 0 <= s.paddr < 1 << 32:
            raise CoreError(f"segment at {s.vaddr:#x} (size {s.size:#x}) is not whole pages of the 32-bit space")
    note = notes(threads, name, args)
    phnum = 1 + len(segments)
    note_off = EHDR_SIZE + PHDR_SIZE * phnum
    first = -(-(note_off + len(note)) // PAGE) * PAGE
    offsets, at = [], first
    for s in segments:
        offsets.append(at)
        at += s.size
    if at > MAX_FILE_BYTES:
        raise CoreError(f"{at} bytes: more than a 32-bit core can address")
    ident = b"\x7fELF" + bytes([1, 1, EV_CURRENT, 0]) + bytes(8)
    ehdr = ident + struct.pack("<HHIIIIIHHHHHH", ET_CORE, EM_386, EV_CURRENT, 0, EHDR_SIZE, 0, 0, EHDR_SIZE,
                               PHDR_SIZE, phnum, 0, 0, 0)
    phdrs = [struct.pack("<8I", PT_NOTE, note_off, 0, 0, len(note), 0, 0, 4)]
    for s, off in zip(segments, offsets, strict=True):
        flags = PF_R | PF_X | (PF_W if s.writable else 0)
        phdrs.append(struct.pack("<8I", PT_LOAD, off, s.vaddr, s.paddr, s.size, s.size, flags, PAGE))
    head = ehdr + b"".join(phdrs) + note
    return head + bytes(first - len(head)), offsets


def merge_pages(pages: Sequence[tuple[int, int, bool]]) -> list[CoreSegment]:
    """(virtual address, physical address, writable) of mapped pages, in virtual order, as the fewest segments:
    a run continues while both addresses advance by a page and the permission stays the same."""
    out: list[CoreSegment] = []
    for va, pa, writable in pages:
        last = out[-1] if out else None
        if last is not None and last.writable == writable and last.vaddr + last.size == va \
                and last.paddr + last.size == pa:
            out[-1] = attrs.evolve(last, size=last.size + PAGE)
        else:
            out.append(CoreSegment(va, pa, PAGE, writable))
    return out

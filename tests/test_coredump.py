"""The ELF32 core writer (pvcluster/coredump.py), in process: pyelftools reads what it lays out."""

from __future__ import annotations

import io
import struct

import pytest
from elftools.elf.elffile import ELFFile

from pvcluster.coredump import (
    GREGS,
    PAGE,
    PRSTATUS_SIZE,
    CoreError,
    CoreSegment,
    CoreThread,
    core_layout,
    merge_pages,
)


def _core(threads: list[CoreThread], segments: list[CoreSegment], fill: bytes = b"\xab") -> bytes:
    head, offsets = core_layout(threads, segments, "guest", "pvkern workload=forever")
    out = bytearray(head)
    for seg, off in zip(segments, offsets, strict=True):
        assert off == len(out) and off % PAGE == 0
        out += fill * seg.size
    return bytes(out)


def test_pyelftools_reads_notes_registers_and_segments() -> None:
    regs = {"eax": 1, "ebx": 2, "ecx": 3, "edx": 4, "esi": 5, "edi": 6, "ebp": 7, "esp": 0xC0024000,
            "eip": 0xC0000258, "eflags": 0x206, "cs": 0xE019, "ss": 0xE021, "ds": 0xE021, "es": 0xE021,
            "fs": 0xE021, "gs": 0xE021}
    threads = [CoreThread(1, regs), CoreThread(2, {**regs, "eip": 0xC0001000})]
    segments = [CoreSegment(0xC0000000, 0, 2 * PAGE, True), CoreSegment(0xFC000000, 0x500000, PAGE, False)]
    data = _core(threads, segments)
    elf = ELFFile(io.BytesIO(data))
    assert elf["e_type"] == "ET_CORE" and elf["e_machine"] == "EM_386" and elf.elfclass == 32
    kinds = [seg["p_type"] for seg in elf.iter_segments()]
    assert kinds == ["PT_NOTE", "PT_LOAD", "PT_LOAD"]
    notes = list(next(elf.iter_segments()).iter_notes())
    assert [n["n_type"] for n in notes] == ["NT_PRSTATUS", "NT_PRSTATUS", "NT_PRPSINFO"]
    for note, thread in zip(notes, threads, strict=False):
        status = note["n_desc"]  # pyelftools hands a prstatus over as its bytes: Linux's i386 layout
        assert note["n_descsz"] == len(status) == PRSTATUS_SIZE
        assert struct.unpack_from("<i", status, 24)[0] == thread.tid  # pr_pid
        greg = dict(zip(GREGS, struct.unpack_from("<17I", status, 72), strict=True))  # pr_reg
        assert greg["eip"] == thread.regs["eip"] and greg["esp"] == 0xC0024000 and greg["orig_eax"] == 0xFFFFFFFF
        assert greg["cs"] == 0xE019 and greg["eax"] == 1 and greg["ebx"] == 2
    psinfo = notes[2]["n_desc"]
    assert psinfo["pr_fname"].rstrip(b"\0") == b"guest" and psinfo["pr_pid"] == 1
    loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
    assert [(s["p_vaddr"], s["p_paddr"], s["p_memsz"], s["p_flags"] & 2) for s in loads] == [
        (0xC0000000, 0, 2 * PAGE, 2), (0xFC000000, 0x500000, PAGE, 0)]
    assert loads[1].data() == b"\xab" * PAGE


def test_merge_pages_joins_only_runs_contiguous_in_both_spaces() -> None:
    pages = [(0x1000, 0x5000, True), (0x2000, 0x6000, True), (0x3000, 0x9000, True), (0x4000, 0xA000, False),
             (0x6000, 0xB000, False)]
    assert merge_pages(pages) == [CoreSegment(0x1000, 0x5000, 2 * PAGE, True), CoreSegment(0x3000, 0x9000, PAGE, True),
                                  CoreSegment(0x4000, 0xA000, PAGE, False), CoreSegment(0x6000, 0xB000, PAGE, False)]


@pytest.mark.parametrize("seg", [CoreSegment(0xFFFFF000, 0, 2 * PAGE, True), CoreSegment(0, 0, 100, True),
                                 CoreSegment(0, -1, PAGE, True)])
def test_segments_outside_the_32_bit_space_are_refused(seg: CoreSegment) -> None:
    with pytest.raises(CoreError):
        core_layout([], [seg], "x")

"""Byte layouts of the Xen x86-32 structures the builder and the event code write into guest memory."""

from __future__ import annotations

import struct

import attrs

START_INFO_MAGIC = b"xen-3.0-x86_32"
START_INFO_SIZE = 1112
START_INFO_CMDLINE = 80
MAX_GUEST_CMDLINE = 1024

SHARED_INFO_SIZE = 2344
VCPU_INFO_SIZE = 64
SHARED_INFO_EVTCHN_PENDING = 2048
SHARED_INFO_EVTCHN_MASK = 2176


@attrs.frozen
class StartInfo:
    nr_pages: int
    shared_info: int  # machine address of shared_info
    flags: int = 0
    store_mfn: int = 0
    store_evtchn: int = 0
    console_mfn: int = 0
    console_evtchn: int = 0
    pt_base: int = 0
    nr_pt_frames: int = 0
    mfn_list: int = 0
    mod_start: int = 0
    mod_len: int = 0
    cmd_line: bytes = b""
    first_p2m_pfn: int = 0
    nr_p2m_frames: int = 0

    def pack(self, magic: bytes = START_INFO_MAGIC) -> bytes:
        if len(self.cmd_line) >= MAX_GUEST_CMDLINE:
            raise ValueError(f"command line of {len(self.cmd_line)} bytes does not fit in start_info")
        head = struct.pack(
            "<32s12I",
            magic,
            self.nr_pages,
            self.shared_info,
            self.flags,
            self.store_mfn,
            self.store_evtchn,
            self.console_mfn,
            self.console_evtchn,
            self.pt_base,
            self.nr_pt_frames,
            self.mfn_list,
            self.mod_start,
            self.mod_len,
        )
        tail = struct.pack("<1024s2I", self.cmd_line, self.first_p2m_pfn, self.nr_p2m_frames)
        out = head + tail
        assert len(out) == START_INFO_SIZE
        return out

"""The hypervisor's window onto guest memory for one hypercall.

Guest RAM lives in the domain process, so before a hypercall reaches the hypervisor the domain process copies in
the spans that the hypercall's family declares (``copy_in`` in ``hypervisor/hypercalls/<family>.py``). Reads and
writes here are checked against those spans: an unmapped guest pointer becomes -EFAULT, exactly as
``copy_from_guest`` / ``copy_to_guest`` fail in Xen.
"""

from __future__ import annotations

import struct

import attrs

from pvcluster.bus.messages import MemWrite, Region

_ADDR_LIMIT = 1 << 32


class GuestFault(Exception):
    def __init__(self, addr: int, length: int, why: str) -> None:
        super().__init__(f"guest access [{addr:#x}, +{length}) {why}")
        self.addr = addr
        self.length = length


@attrs.frozen
class Span:
    """A guest buffer a hypercall may touch: ``addr`` and ``length`` as the guest gave them."""

    addr: int
    length: int
    writable: bool = False


class GuestView:
    def __init__(self, regions: list[Region]) -> None:
        self._regions = [r for r in regions if r.data is not None and len(r.data) == r.length]
        self.writes: list[MemWrite] = []

    def _find(self, addr: int, length: int, *, writable: bool) -> tuple[Region, int]:
        if length < 0 or addr < 0 or addr + length > _ADDR_LIMIT:
            raise GuestFault(addr, length, "wraps the 32-bit address space")
        for r in self._regions:
            if r.addr <= addr and addr + length <= r.addr + r.length and (r.writable or not writable):
                return r, addr - r.addr
        raise GuestFault(addr, length, "is not mapped" if not writable else "is not mapped writable")

    def check(self, addr: int, length: int, *, writable: bool = False) -> None:
        """Raise GuestFault unless [addr, +length) may be read (or, with ``writable``, written)."""
        self._find(addr, length, writable=writable)

    def read(self, addr: int, length: int) -> bytes:
        r, off = self._find(addr, length, writable=False)
        assert r.data is not None
        return r.data[off : off + length]

    def u32(self, addr: int) -> int:
        return int(struct.unpack_from("<I", self.read(addr, 4))[0])

    def write(self, addr: int, data: bytes) -> None:
        self._find(addr, len(data), writable=True)
        self.writes.append(MemWrite(addr=addr, data=bytes(data)))

    def write_u32(self, addr: int, value: int) -> None:
        self.write(addr, struct.pack("<I", value & 0xFFFFFFFF))

"""The hypervisor's window onto guest memory for one hypercall.

Guest RAM lives in the domain process, so before a hypercall reaches the hypervisor the domain process copies in
the spans that the hypercall's copy-in descriptor declares (``pvcluster/abi/copyin.py``). Reads and writes here are
checked against those spans: an unmapped guest pointer becomes -EFAULT, exactly as ``copy_from_guest`` /
``copy_to_guest`` fail in Xen. A span the domain process did not copy at all (the rest of a long batch, past what
one trap carries) raises ``NotCopied`` instead, which the batch hypercalls turn into a continuation.
"""

from __future__ import annotations

import struct

from pvcluster.bus.messages import MemWrite, Region

_ADDR_LIMIT = 1 << 32


class GuestFault(Exception):
    def __init__(self, addr: int, length: int, why: str) -> None:
        super().__init__(f"guest access [{addr:#x}, +{length}) {why}")
        self.addr = addr
        self.length = length


class NotCopied(Exception):
    """A guest span the domain process did not copy in with the trap. Not a GuestFault: the guest did nothing
    wrong, and a batch hypercall continues from there in a later trap instead of failing."""

    def __init__(self, addr: int, length: int) -> None:
        super().__init__(f"guest span [{addr:#x}, +{length}) was not copied in")
        self.addr = addr
        self.length = length


class GuestView:
    def __init__(self, regions: list[Region]) -> None:
        # A region whose data is None (or short) was named but is not mapped in the guest: touching it faults.
        self._regions = regions
        self.writes: list[MemWrite] = []

    def _find(self, addr: int, length: int, *, writable: bool) -> tuple[Region, int]:
        if length < 0 or addr < 0 or addr + length > _ADDR_LIMIT:
            raise GuestFault(addr, length, "wraps the 32-bit address space")
        covered = False
        for r in self._regions:
            if not (r.addr <= addr and addr + length <= r.addr + r.length):
                continue
            covered = True
            if r.data is not None and len(r.data) == r.length and (r.writable or not writable):
                return r, addr - r.addr
        if not covered:
            raise NotCopied(addr, length)
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

"""The hypervisor's window onto guest memory for one hypercall.

Guest RAM lives in the domain process, so before a hypercall reaches the hypervisor the domain process copies in
the spans that the hypercall's copy-in descriptor declares (``pvcluster/abi/copyin.py``). Reads and writes here are
checked against those spans: an unmapped guest pointer becomes -EFAULT, exactly as ``copy_from_guest`` /
``copy_to_guest`` fail in Xen. A span the domain process did not copy at all (the rest of a long batch, past what
one trap carries) raises ``NotCopied`` instead, which the batch hypercalls turn into a continuation.

Xen runs the parts of a hypercall (the entries of a multicall, the requests of a batch) one after another against
live guest memory, so a later part reads what an earlier one wrote. So does this view:

* Reads see this call's own writes so far (``write``), on every copied span that holds the same bytes: spans are
  matched by the machine frames the domain process translated them to, so two virtual addresses of one frame agree.
  ``writes``, what the domain process applies, is the call's writes in order, nothing else.
* What the call's effects do to guest memory happens in the domain process, after the call: a page-table entry
  written (``WriteMachine``, ``SetVaPte``), a new CR3, event bits in shared_info. ``observe`` marks every span whose
  translation read such an entry, or whose bytes it changed, as stale: reading one raises ``NotCopied``, so the
  batch continues from there in a new trap whose copy-in goes through the tables as they now are (Xen's own
  continuation; the domain process applies this trap's effects first). A write to a stale span is still recorded:
  only the part of the call that made it stale writes there, and its write goes through the translation the span
  had at the trap, as a TLB entry the guest has not flushed yet lets Xen's copy_to_guest do.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pvcluster.bus.effects import (
    Block,
    ClearPending,
    Effect,
    FlushTlb,
    Invlpg,
    Poll,
    PollTimeout,
    RestartHypercall,
    SetCallback,
    SetClockSkew,
    SetContext,
    SetCr3,
    SetGdt,
    SetPending,
    SetSpeed,
    SetTs,
    SetVaPte,
    Unmask,
    VcpuDown,
    VcpuUp,
    WriteMachine,
)
from pvcluster.bus.messages import MemWrite, Region

_ADDR_LIMIT = 1 << 32
_PAGE_SHIFT = 12
_PAGE = 1 << _PAGE_SHIFT
# Effects that change no guest memory the domain process copies from (its copy-in walks the tables, not a TLB).
_NO_MEMORY = (FlushTlb, Invlpg, SetContext, SetCallback, VcpuUp, VcpuDown, Poll, PollTimeout, RestartHypercall,
              SetSpeed, SetClockSkew, SetGdt, SetTs)
# Effects that write event bits into the shared_info frame.
_SHARED_INFO = (SetPending, Unmask, ClearPending, Block)


class GuestFault(Exception):
    def __init__(self, addr: int, length: int, why: str) -> None:
        super().__init__(f"guest access [{addr:#x}, +{length}) {why}")
        self.addr = addr
        self.length = length


class NotCopied(Exception):
    """A guest span the domain process did not copy in with the trap, or whose copy an earlier part of the call
    made stale. Not a GuestFault: the guest did nothing wrong, and a batch hypercall continues from there in a
    later trap instead of failing."""

    def __init__(self, addr: int, length: int) -> None:
        super().__init__(f"guest span [{addr:#x}, +{length}) was not copied in")
        self.addr = addr
        self.length = length


# A copied page: (region index, first and end offset of the region's bytes in the page, the page's virtual number)
_Piece = tuple[int, int, int, int]


class GuestView:
    def __init__(self, regions: Sequence[Region]) -> None:
        # A region whose data is None (or short) was named but is not mapped in the guest: touching it faults.
        self._regions = [r for r in regions if not r.machine]
        # Whole frames copied by machine address for page-table validation (``table``), and the ones this call's
        # writes or effects changed since.
        self._tables = {r.addr >> _PAGE_SHIFT: r.data for r in regions
                        if r.machine and r.data is not None and len(r.data) == _PAGE}
        self._stale_tables: set[int] = set()
        self._stale = [False] * len(self._regions)
        self._live: dict[int, bytearray] = {}  # region index -> its bytes with this call's writes so far
        # Built at the first write or observed effect: who holds each page, and who was translated through each
        # page-table entry (by entry address / 4) or maps each frame.
        self._pages: dict[int, list[_Piece]] | None = None
        self._starts: dict[int, list[int]] | None = None  # address -> the regions that start there
        self._by_entry: dict[int, list[int]] = {}
        self._by_frame: dict[int, list[int]] = {}
        self.writes: list[MemWrite] = []

    # -- access ----------------------------------------------------------------------------------------------

    def _candidates(self, addr: int) -> list[int]:
        """The regions that start at ``addr``: a handler mostly reads a span its descriptor named, so these are
        looked at before every region is."""
        if self._starts is None:
            self._starts = {}
            for i, r in enumerate(self._regions):
                self._starts.setdefault(r.addr, []).append(i)
        return self._starts.get(addr, [])

    def _usable(self, i: int, addr: int, length: int, writable: bool, stale_ok: bool) -> bool:
        r = self._regions[i]
        return (bool(r.length) and r.addr <= addr and addr + length <= r.addr + r.length
                and (stale_ok or not self._stale[i]) and r.data is not None and len(r.data) == r.length
                and (r.writable or not writable))

    def _find(self, addr: int, length: int, *, writable: bool, stale_ok: bool = False) -> int:
        if length < 0 or addr < 0 or addr + length > _ADDR_LIMIT:
            raise GuestFault(addr, length, "wraps the 32-bit address space")
        for i in self._candidates(addr):  # every copy of the same bytes is the same, so any usable one will do
            if self._usable(i, addr, length, writable, stale_ok):
                return i
        covered = False
        for i, r in enumerate(self._regions):
            if not r.length or not (r.addr <= addr and addr + length <= r.addr + r.length):
                continue  # a zero-length region is a translation only: it holds no bytes
            if self._stale[i] and not stale_ok:
                continue
            covered = True
            if r.data is not None and len(r.data) == r.length and (r.writable or not writable):
                return i
        if not covered:
            raise NotCopied(addr, length)
        raise GuestFault(addr, length, "is not mapped" if not writable else "is not mapped writable")

    def check(self, addr: int, length: int, *, writable: bool = False) -> None:
        """Raise GuestFault unless [addr, +length) may be read (or, with ``writable``, written)."""
        self._find(addr, length, writable=writable)

    def read(self, addr: int, length: int) -> bytes:
        i = self._find(addr, length, writable=False)
        data = self._live.get(i, self._regions[i].data)
        assert data is not None
        off = addr - self._regions[i].addr
        return bytes(data[off : off + length])

    def u32(self, addr: int) -> int:
        return int(struct.unpack_from("<I", self.read(addr, 4))[0])

    def peek(self, addr: int, length: int) -> bytes | None:
        """``read``, or None where it would fault or was not copied: a copy-in descriptor's reader."""
        try:
            return self.read(addr, length)
        except (GuestFault, NotCopied):
            return None

    def holds(self, addr: int, length: int, *, writable: bool = False) -> bool:
        """Whether a span the guest named came with the trap and is not stale (mapped or not: an unmapped one
        faults, as in Xen). A zero-length span is a translation only."""
        for i in self._candidates(addr):
            r = self._regions[i]
            if not self._stale[i] and r.length >= length and (r.writable or not writable) and (length or not r.length):
                return True
        for i, r in enumerate(self._regions):
            if self._stale[i]:
                continue
            if not length:
                if not r.length and r.addr == addr:
                    return True
            elif r.addr <= addr and addr + length <= r.addr + r.length and (r.writable or not writable):
                return True
        return False

    def translation(self, va: int) -> list[int] | None:
        """The entries the domain process's walk of ``va`` read (the PDE, then the PTE when the PDE is present),
        from the zero-length span update_va_mapping names; None when no such span came (a hand-made call)."""
        for i in self._candidates(va):
            r = self._regions[i]
            if not r.length and r.walk and not self._stale[i]:
                return list(r.walk)
        return None

    def write(self, addr: int, data: bytes) -> None:
        i = self._find(addr, len(data), writable=True, stale_ok=True)
        self.writes.append(MemWrite(addr=addr, data=bytes(data)))
        self._overlay(i, addr, bytes(data))
        self._stale_tables.update(self._regions[i].frames)  # a table frame copied beside it may hold these bytes

    def table(self, mfn: int) -> bytes:
        """Frame ``mfn`` as the domain process copied it by machine address for this trap; NotCopied when it did
        not (past MAX_TABLE_FRAMES, or a hand-made call) or when this call has changed it since."""
        data = self._tables.get(mfn)
        if data is None or mfn in self._stale_tables:
            raise NotCopied(mfn << _PAGE_SHIFT, _PAGE)
        return data

    def write_u32(self, addr: int, value: int) -> None:
        self.write(addr, struct.pack("<I", value & 0xFFFFFFFF))

    # -- what later reads see --------------------------------------------------------------------------------

    def _key(self, i: int, vpage: int) -> int:
        """What names page ``vpage`` of region ``i``: its machine frame, or (not known: a hand-made region) its
        virtual page, negated so that the two never meet."""
        r = self._regions[i]
        first = r.addr >> _PAGE_SHIFT
        if len(r.frames) == ((r.addr + r.length - 1) >> _PAGE_SHIFT) - first + 1 and r.frames[vpage - first] >= 0:
            return r.frames[vpage - first]
        return -1 - vpage

    def _index(self) -> dict[int, list[_Piece]]:
        if self._pages is None:
            self._pages = {}
            for i, r in enumerate(self._regions):
                for entry in r.walk:
                    self._by_entry.setdefault(entry >> 2, []).append(i)
                if r.data is None or len(r.data) != r.length or not r.length:
                    continue  # no bytes a read could see
                for frame in r.frames:
                    self._by_frame.setdefault(frame, []).append(i)
                end = r.addr + r.length
                for vpage in range(r.addr >> _PAGE_SHIFT, ((end - 1) >> _PAGE_SHIFT) + 1):
                    base = vpage << _PAGE_SHIFT
                    piece = (i, max(r.addr, base) - base, min(end, base + _PAGE) - base, vpage)
                    self._pages.setdefault(self._key(i, vpage), []).append(piece)
        return self._pages

    def _overlay(self, i: int, addr: int, data: bytes) -> None:
        """Put a write made through region ``i`` into every copy of the bytes it wrote."""
        pages = self._index()
        done = 0
        while done < len(data):
            va = addr + done
            lo = va & (_PAGE - 1)
            hi = min(lo + len(data) - done, _PAGE)
            for j, start, end, vpage in pages.get(self._key(i, va >> _PAGE_SHIFT), ()):
                if start < hi and lo < end:
                    a, b = (lo if lo > start else start), (hi if hi < end else end)
                    at = (vpage << _PAGE_SHIFT) + a - self._regions[j].addr
                    live = self._live.get(j)
                    if live is None:
                        live = self._live[j] = bytearray(self._regions[j].data or b"")
                    live[at : at + b - a] = data[done + a - lo : done + b - lo]
            done += hi - lo

    # -- what effects do to the copy ------------------------------------------------------------------------

    def observe(self, effects: Sequence[Effect], *, vcpu: int, shared_info_frame: int) -> None:
        """``effects`` of vCPU ``vcpu``'s call will change guest memory once the domain process applies them:
        mark the spans they change (their translation or their bytes) stale."""
        for e in effects:
            if isinstance(e, WriteMachine):
                self.invalidate(e.addr, len(e.data))
            elif isinstance(e, SetVaPte) and e.vcpu == vcpu:
                self._set_va_pte(e.va)
            elif isinstance(e, SetCr3):
                if e.vcpu == vcpu:  # every span was translated through the old tables
                    self.invalidate_all()
            elif isinstance(e, _SHARED_INFO):
                self.invalidate(shared_info_frame << _PAGE_SHIFT, _PAGE)
            elif not isinstance(e, _NO_MEMORY):
                self.invalidate_all()  # an effect this view does not know: assume it changed anything

    def _set_va_pte(self, va: int) -> None:
        """update_va_mapping writes the L1 entry its zero-length span was translated through (none when the PDE
        is not present: the domain process writes nothing then). Without that span, it could be any entry."""
        for i in self._candidates(va):
            r = self._regions[i]
            if not r.length and r.walk and not self._stale[i]:
                if len(r.walk) > 1:
                    self.invalidate(r.walk[1], 4)
                return
        self.invalidate_all()

    def invalidate(self, addr: int, length: int) -> None:
        """Machine bytes ``[addr, +length)`` change under the domain process's copy."""
        if length <= 0:
            return
        self._index()
        hit: set[int] = set()
        if length > 64:  # a whole frame (shared_info): look at every entry of it
            frames = range(addr >> _PAGE_SHIFT, ((addr + length - 1) >> _PAGE_SHIFT) + 1)
            hit.update(i for i, r in enumerate(self._regions) if any(e >> _PAGE_SHIFT in frames for e in r.walk))
        else:
            for slot in range(addr >> 2, ((addr + length - 1) >> 2) + 1):
                hit.update(self._by_entry.get(slot, ()))
        for frame in range(addr >> _PAGE_SHIFT, ((addr + length - 1) >> _PAGE_SHIFT) + 1):
            hit.update(self._by_frame.get(frame, ()))
            self._stale_tables.add(frame)
        for i in hit:
            self._stale[i] = True

    def invalidate_all(self) -> None:
        """Every span whose translation is known may translate differently now."""
        for i, r in enumerate(self._regions):
            if r.walk or r.frames:
                self._stale[i] = True

"""Page types with type counts, as Xen's xen/arch/x86/mm.c keeps them for a 32-bit PV guest, non-PAE or PAE.

Every frame of a domain has one type at a time (``PageType``: none, writable, L1, L2, seg_desc) and a count of the
references that hold it in that type. A frame whose count is 0 may take any type; one whose count is not 0 only
more references of the type it has (Xen's get_page_type / put_page_type). Who holds references:

* a present, writable L1 entry of a validated L1, on the frame it maps: writable (get_page_from_l1e);
* a present guest slot of a validated L2, on the frame it names: L1 (get_page_from_l2e), which validates that L1
  when it is the first (alloc_l1_table: every entry, as above);
* a pin (MMUEXT_PIN_L*_TABLE), a vCPU's page-table base (new_guest_cr3), a GDT frame in use (set_gdt: seg_desc);
* the hypervisor itself, on the L1s under the hypervisor hole of the builder's tables (never the guest's to change).

* PAE (``Frames.pae``): a present slot of a validated L3 (4 slots), on the L2 it names: L2, and for slot 3, which
  must be present, PAE_XEN_L2 (Xen's PGT_pae_xen_l2: the L2 holding the hole, whose slots from 428 on are Xen's);
  entries are 64 bits (frame bits 12..51; bits 52..63 refused) and tables have 512 of them.

So a frame mapped writable anywhere cannot become a page table or a GDT frame, and a page table or a GDT frame
cannot be mapped writable. When a count drops to 0 the frame loses its type; a page table then drops the
references its entries held (free_l1_table / free_l2_table), which may in turn free the L1s an L2 named.

The hypervisor holds no guest RAM, so it keeps a copy of every validated table's entries (``Frames.tables``): it
validated them, and the guest can change them only through mmu_update / update_va_mapping, which update the copy
as they check the new entry. A frame about to be validated comes with the trap, copied by machine address
(``GuestView.table``; NotCopied when it did not). An L2's slots in the hypervisor hole are not looked at, as
Xen's alloc_l2_table validates only guest slots (``is_guest_l2_slot``).

Xen refuses with: -EINVAL for a type conflict (__get_page_type's "Bad type"), so pinning, a new base or an L2 entry
naming a frame mapped writable is -EINVAL; -EBUSY where an L1 entry would map a typed frame writable
(get_page_from_l1e's could_not_pin); -EPERM for a frame the domain does not own and for an L2 slot in the hole.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs

from pvcluster.abi.errno import Errno
from pvcluster.abi.pagetables import PAE_L3_ENTRIES, PAE_XEN_L3_SLOT, entries, frame_of, is_guest_l2_slot
from pvcluster.abi.x86 import PTE_PRESENT, PTE_PSE, PTE_RW


class PageType(enum.Enum):
    NONE = "none"
    WRITABLE = "writable"  # PGT_writable_page
    L1 = "l1"  # PGT_l1_page_table
    L2 = "l2"  # PGT_l2_page_table
    PAE_XEN_L2 = "l2-pae-xen"  # PGT_l2_page_table | PGT_pae_xen_l2: the L2 under a PAE L3's slot 3, with the hole
    L3 = "l3"  # PGT_l3_page_table (PAE only)
    SEG_DESC = "seg_desc"  # PGT_seg_desc_page


TABLE_LEVEL = {PageType.L1: 1, PageType.L2: 2, PageType.PAE_XEN_L2: 2, PageType.L3: 3}
LEVEL_TYPE = {1: PageType.L1, 2: PageType.L2, 3: PageType.L3}
# What a PAE L3 entry may not have (Xen 4.0 x86_32's L3_DISALLOW_MASK 0xFFFFF1FE: every flag but present and the
# available bits, so no RW, USER, accessed, dirty, PSE or global), and the flag bits 52..63 of a 64-bit entry
# (Xen's get_pte_flags puts them above the low 12; without NX, which Xen offers only where the CPU has it and
# which Unicorn's CPU runs without, they are all disallowed).
PAE_L3_DISALLOW = 0x1FE
PAE_HIGH_FLAGS = 52


class Refused(Exception):
    """A type reference Xen would not give: the hypercall's errno and the reason it is traced with."""

    def __init__(self, err: Errno, reason: str, **fields: int) -> None:
        super().__init__(reason)
        self.err = err
        self.reason = reason
        self.fields = fields


@attrs.define
class PageInfo:
    """Xen's page_info.u.inuse.type_info for one frame: its type, how many references hold it, and whether the
    guest pinned it (PGT_pinned; the pin is one of the references)."""

    type: PageType = PageType.NONE
    count: int = 0
    pinned: bool = False


# What the checks need of the domain: which frames it owns (may type) and which a present L1 entry may map.
Owned = Callable[[int], bool]
# A frame's contents as the trap copied them (GuestView.table): raises NotCopied when they are not there.
Fetch = Callable[[int], bytes]


def _writable_reason(held: PageType) -> str:
    return "writable-descriptor-table" if held is PageType.SEG_DESC else "writable-pagetable"


def _no_fetch(mfn: int) -> bytes:
    raise AssertionError(f"frame {mfn:#x} needs validating, but no contents were given")


class Frames:
    """A domain's frame types (hangs off ``Domain.frames``, as Xen's frame table holds each page's type_info)."""

    def __init__(self) -> None:
        self.info: dict[int, PageInfo] = {}
        self.tables: dict[int, list[int]] = {}  # validated L1/L2 frame -> its entries, as validated and updated
        self.bases: dict[int, int] = {}  # vCPU -> the L2 frame its base reference holds (arch.guest_table)
        self.xen_l1s: set[int] = set()  # L1s under the hypervisor hole, typed by the hypervisor for the builder
        self.owned: Owned = lambda mfn: False
        self.mappable: Owned = lambda mfn: False
        self.pae = False  # the domain's tables are PAE (3 levels, 64-bit entries): from its BuildResult

    @property
    def entry_shift(self) -> int:
        """log2 of a table entry's size: 2, or 3 for PAE."""
        return 3 if self.pae else 2

    # -- reading -----------------------------------------------------------------------------------------------

    def type_of(self, mfn: int) -> PageType:
        info = self.info.get(mfn)
        return info.type if info is not None and info.count else PageType.NONE

    def count(self, mfn: int) -> int:
        info = self.info.get(mfn)
        return info.count if info is not None else 0

    def level(self, mfn: int) -> int | None:
        """1, 2 or 3 (PAE) for a frame that is a validated page table now, else None."""
        return TABLE_LEVEL.get(self.type_of(mfn))

    def is_pinned(self, mfn: int) -> bool:
        info = self.info.get(mfn)
        return info is not None and info.pinned

    @property
    def pinned(self) -> dict[int, int]:
        """Pinned frames -> their level."""
        return {mfn: TABLE_LEVEL.get(i.type, 0) for mfn, i in self.info.items() if i.pinned}

    def is_seg_desc(self, mfn: int) -> bool:
        return self.type_of(mfn) is PageType.SEG_DESC

    def entry(self, mfn: int, index: int) -> int:
        return self.tables[mfn][index]

    # -- get_page_type / put_page_type -------------------------------------------------------------------------

    def get_type(self, mfn: int, want: PageType, fetch: Fetch = _no_fetch) -> None:
        """Xen's get_page_type: one more reference holding ``mfn`` as ``want``, validating a page table whose
        count was 0 (alloc_l1_table / alloc_l2_table). Raises Refused, or NotCopied (from ``fetch``) before
        changing anything."""
        info = self.info.setdefault(mfn, PageInfo())
        if info.count and info.type is not want:
            raise Refused(Errno.EINVAL, f"{info.type.value}-frame-not-{want.value}", mfn=mfn)
        if info.count:
            info.count += 1
            return
        info.type, info.count = want, 1  # typed before its entries are checked: an entry naming it conflicts
        if want in TABLE_LEVEL:
            try:
                self._alloc_table(mfn, want, entries(fetch(mfn), self.pae), fetch)
            except BaseException:
                del self.info[mfn]
                self.tables.pop(mfn, None)
                raise

    def put_type(self, mfn: int) -> None:
        """Xen's put_page_type: drop one reference; at 0 the frame loses its type, and a page table the references
        its entries held (free_page_type)."""
        info = self.info.get(mfn)
        if info is None or not info.count:
            raise AssertionError(f"frame {mfn:#x} has no type reference to drop")
        info.count -= 1
        if info.count:
            return
        table = self.tables.pop(mfn, None)
        old, info.type, info.pinned = info.type, PageType.NONE, False
        del self.info[mfn]
        if table is not None:
            for slot, e in enumerate(table):
                self._put_entry(old, slot, e)

    def _alloc_table(self, mfn: int, kind: PageType, table: list[int], fetch: Fetch) -> None:
        """alloc_l1_table / alloc_l2_table: a reference for every entry (an L2's guest slots only); on a refusal
        the ones taken are dropped again."""
        taken: list[tuple[int, int]] = []
        try:
            for slot, e in enumerate(table):
                self._get_entry(kind, slot, e, fetch)
                taken.append((slot, e))
        except BaseException:
            for slot, e in reversed(taken):
                self._put_entry(kind, slot, e)
            raise
        self.tables[mfn] = table

    # -- the references entries hold ---------------------------------------------------------------------------

    def is_guest_slot(self, kind: PageType, slot: int) -> bool:
        """Whether slot ``slot`` of a table of type ``kind`` is the guest's (validated, and changeable by it)."""
        if kind is PageType.L1:
            return True
        if kind is PageType.L3:
            return slot < PAE_L3_ENTRIES
        return is_guest_l2_slot(slot, pae=self.pae, xen_l2=kind is PageType.PAE_XEN_L2)

    def _get_entry(self, kind: PageType, slot: int, e: int, fetch: Fetch) -> None:
        if not self.is_guest_slot(kind, slot):
            return
        if kind is PageType.L1:
            self.get_l1e(e)
        elif kind is PageType.L3:
            self.get_l3e(e, slot, fetch)
        else:
            self.get_l2e(e, fetch)

    def _put_entry(self, kind: PageType, slot: int, e: int) -> None:
        if not self.is_guest_slot(kind, slot):
            return
        if kind is PageType.L1:
            self.put_l1e(e)
        elif kind is PageType.L3:
            self.put_l3e(e)
        else:
            self.put_l2e(e)

    def _frame(self, e: int) -> int:
        return frame_of(e, self.pae)

    def _check_high_flags(self, e: int) -> None:
        if self.pae and e >> PAE_HIGH_FLAGS:
            raise Refused(Errno.EINVAL, "pte-high-flags", flags=e >> PAE_HIGH_FLAGS)

    def get_l1e(self, e: int) -> None:
        """get_page_from_l1e: a present entry may map only what the domain may map; a writable one takes a writable
        reference on a frame the domain owns (-EBUSY when the frame has another type)."""
        if not e & PTE_PRESENT:
            return
        self._check_high_flags(e)
        target = self._frame(e)
        if not self.mappable(target):
            raise Refused(Errno.EPERM, "maps-unowned-frame", mfn=target)
        if e & PTE_RW and self.owned(target):
            try:
                self.get_type(target, PageType.WRITABLE)
            except Refused:
                raise Refused(Errno.EBUSY, _writable_reason(self.type_of(target)), mfn=target) from None

    def check_l1e(self, e: int) -> None:
        """get_page_from_l1e's checks without the reference (an entry whose L1 is not known)."""
        target = self._frame(e)
        if e & PTE_PRESENT:
            self._check_high_flags(e)
        if e & PTE_PRESENT and not self.mappable(target):
            raise Refused(Errno.EPERM, "maps-unowned-frame", mfn=target)
        if e & PTE_PRESENT and e & PTE_RW and self.type_of(target) not in (PageType.NONE, PageType.WRITABLE):
            raise Refused(Errno.EBUSY, _writable_reason(self.type_of(target)), mfn=target)

    def put_l1e(self, e: int) -> None:
        if e & PTE_PRESENT and e & PTE_RW and self.owned(self._frame(e)):
            self.put_type(self._frame(e))

    def get_l2e(self, e: int, fetch: Fetch) -> None:
        """get_page_from_l2e: a present guest slot names an L1 of the domain's own (no superpage, no linear
        page table: an L2 naming an L2 is refused)."""
        if not e & PTE_PRESENT:
            return
        self._check_high_flags(e)
        target = self._frame(e)
        if e & PTE_PSE:  # a 4 MiB superpage would map 1024 frames past every check; Xen refuses PSE to PV guests
            raise Refused(Errno.EINVAL, "superpage", mfn=target)
        if not self.owned(target):
            raise Refused(Errno.EPERM, "l2e-frame-not-owned", mfn=target)
        if target in self.xen_l1s:  # the hypervisor's own L1 (the m2p's): not a table the guest may use
            raise Refused(Errno.EINVAL, "l2e-names-xen-table", mfn=target)
        self.get_type(target, PageType.L1, fetch)

    def put_l2e(self, e: int) -> None:
        if e & PTE_PRESENT and not e & PTE_PSE and self.owned(self._frame(e)):
            self.put_type(self._frame(e))

    def get_l3e(self, e: int, slot: int, fetch: Fetch) -> None:
        """get_page_from_l3e for a 32-bit PAE guest (alloc_l3_table): a present entry names an L2 of the domain's
        own, with no flag but present; slot 3 must be present and names the L2 that holds the hypervisor hole
        (PGT_pae_xen_l2, which no other slot's L2 may share)."""
        if not e & PTE_PRESENT:
            if slot == PAE_XEN_L3_SLOT:
                raise Refused(Errno.EINVAL, "l3-slot-3-not-present", slot=slot)
            return
        target = self._frame(e)
        if e & PAE_L3_DISALLOW or e >> PAE_HIGH_FLAGS:
            raise Refused(Errno.EINVAL, "l3e-bad-flags", slot=slot, flags=e & 0xFFF)
        if not self.owned(target):
            raise Refused(Errno.EPERM, "l3e-frame-not-owned", mfn=target)
        self.get_type(target, PageType.PAE_XEN_L2 if slot == PAE_XEN_L3_SLOT else PageType.L2, fetch)

    def put_l3e(self, e: int) -> None:
        if e & PTE_PRESENT and self.owned(self._frame(e)):
            self.put_type(self._frame(e))

    def clear(self) -> None:
        """The domain is gone: every type with it."""
        self.info.clear()
        self.tables.clear()
        self.bases.clear()
        self.xen_l1s.clear()

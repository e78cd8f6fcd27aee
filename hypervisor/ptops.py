"""The page-table operations a PV guest asks for, on its frame types (``hypervisor/pagetypes.py``): an entry update
(Xen's mod_l1_entry / mod_l2_entry), a pin and an unpin, a new page-table base (new_guest_cr3), and typing the
builder's initial tables (as Xen's domain builder pins the initial L2, or for PAE the L3). Each raises ``Refused``
(or NotCopied, for a frame to validate that did not come with the trap) before changing anything, and otherwise
leaves the type counts and the copies of the tables as Xen's would be.
"""

from __future__ import annotations

from hypervisor.pagetypes import LEVEL_TYPE, Fetch, Frames, PageInfo, PageType, Refused
from pvcluster.abi.errno import Errno
from pvcluster.abi.pagetables import (
    ENTRIES,
    FIRST_XEN_L2_SLOT,
    PAE_XEN_L3_SLOT,
    entries,
)
from pvcluster.abi.x86 import PTE_PRESENT
from pvcluster.abi.xen import PAGE_SHIFT, PAGE_SIZE


def mod_entry(frames: Frames, table: int, slot: int, new: int, fetch: Fetch) -> None:
    """mod_l1_entry / mod_l2_entry: entry ``slot`` of validated table ``table`` becomes ``new``. The new entry's
    reference is taken before the old one's is dropped (so a frame mapped the same way again keeps its type), and
    the table's copy follows."""
    kind = frames.type_of(table)
    if table in frames.xen_l1s:
        raise Refused(Errno.EPERM, "xen-private-table", mfn=table)
    old = frames.entry(table, slot)
    if kind is PageType.L3:
        _mod_l3_entry(frames, table, slot, new, fetch)
    elif kind in (PageType.L2, PageType.PAE_XEN_L2):
        if not frames.is_guest_slot(kind, slot):
            # "Illegal L2 update attempt in Xen-private area"
            raise Refused(Errno.EPERM, "l2-slot-in-hypervisor-hole", slot=slot)
        frames.get_l2e(new, fetch)
        frames.tables[table][slot] = new
        frames.put_l2e(old)
    else:
        frames.get_l1e(new)
        frames.tables[table][slot] = new
        frames.put_l1e(old)


def _mod_l3_entry(frames: Frames, table: int, slot: int, new: int, fetch: Fetch) -> None:
    """mod_l3_entry for a PAE guest: one of slots 0..2 (a PAE L3 has 4; -EINVAL past them) takes its new L2's
    reference, then drops the old one's. Departure: slot 3 (the L2 holding the hole) is not the guest's to change
    here (-EPERM); Xen lets it name another PGT_pae_xen_l2 L2 and copies the hole into it."""
    if slot >= 4:
        raise Refused(Errno.EINVAL, "l3-slot-out-of-range", slot=slot)
    if slot == PAE_XEN_L3_SLOT:
        raise Refused(Errno.EPERM, "l3-slot-3-holds-hypervisor-hole", slot=slot)
    old = frames.entry(table, slot)
    frames.get_l3e(new, slot, fetch)
    frames.tables[table][slot] = new
    frames.put_l3e(old)


def pin(frames: Frames, mfn: int, level: int, fetch: Fetch) -> None:
    """MMUEXT_PIN_L{1,2,3}_TABLE: a type reference that stays until the unpin (-EINVAL when already pinned; L3 only
    for a PAE domain, checked by the caller)."""
    frames.get_type(mfn, LEVEL_TYPE[level], fetch)
    info = frames.info[mfn]
    if info.pinned:
        frames.put_type(mfn)
        raise Refused(Errno.EINVAL, "already-pinned", mfn=mfn)
    info.pinned = True


def unpin(frames: Frames, mfn: int) -> None:
    """MMUEXT_UNPIN_TABLE: drop the pin's reference (the frame loses its type if that was the last one)."""
    if not frames.is_pinned(mfn):
        raise Refused(Errno.EINVAL, "not-pinned", mfn=mfn)
    frames.info[mfn].pinned = False
    frames.put_type(mfn)


def new_base(frames: Frames, vcpu: int, mfn: int, fetch: Fetch) -> None:
    """new_guest_cr3: an L2 reference (PAE: L3) on the new base, then the old base's dropped."""
    frames.get_type(mfn, PageType.L3 if frames.pae else PageType.L2, fetch)
    old = frames.bases.get(vcpu)
    frames.bases[vcpu] = mfn
    if old is not None:
        frames.put_type(old)


def type_initial_pae_tables(frames: Frames, l3: int, tables: list[int], contents: bytes, vcpus: int) -> None:
    """A PAE domain's builder tables (setup_pgtables_x86_32_pae's shape): the L3 validated (its L2s, slot 3's as
    PGT_pae_xen_l2, and their L1s) and pinned, as libxc's bootlate_pv pins it with MMUEXT_PIN_L3_TABLE, and every
    vCPU's base. ``tables`` are the other table frames (the L2s then the L1s), ``contents`` the L3's frame then
    each of theirs. The hole's L2 slots (from 428 in slot 3's L2) name the hypervisor's own L1s, never looked at."""
    data = {mfn: contents[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i, mfn in enumerate((l3, *tables))}

    def fetch(mfn: int) -> bytes:
        page = data.get(mfn, b"")
        return page if len(page) == PAGE_SIZE else bytes(PAGE_SIZE)

    frames.pae = True
    mappable, frames.mappable = frames.mappable, lambda mfn: True  # as type_initial_tables: the builder's own
    try:
        pin(frames, l3, 3, fetch)
    finally:
        frames.mappable = mappable
    for v in range(vcpus):
        new_base(frames, v, l3, fetch)


def type_initial_tables(frames: Frames, l2: int, l1s: list[int], contents: bytes, vcpus: int) -> None:
    """The builder's tables, as Xen's builder leaves them: the L2 validated and pinned (libxc's bootlate_pv pins it
    with MMUEXT_PIN_L2_TABLE; dom0_build takes the type itself), and every vCPU's base (arch.guest_table).
    The L1s under the hypervisor hole hold the hypervisor's mappings (the m2p): the hypervisor types them itself
    and never lets the guest name or change them. ``contents`` is the L2's frame then each L1's (empty: zeros)."""
    frames_data = {mfn: contents[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i, mfn in enumerate((l2, *l1s))}

    def fetch(mfn: int) -> bytes:
        data = frames_data.get(mfn, b"")
        return data if len(data) == PAGE_SIZE else bytes(PAGE_SIZE)

    l2_entries = entries(fetch(l2))
    for pde in l2_entries[FIRST_XEN_L2_SLOT:ENTRIES]:
        mfn = pde >> PAGE_SHIFT
        if pde & PTE_PRESENT and mfn in frames_data and mfn not in frames.xen_l1s:
            frames.xen_l1s.add(mfn)
            frames.info[mfn] = PageInfo(type=PageType.L1, count=1)  # the hypervisor's own reference
            frames.tables[mfn] = entries(fetch(mfn))
    # The builder maps some of the hypervisor's own frames in guest slots (the GDT the vCPUs run with), as Xen
    # maps its own in the per-domain area: entries the guest could not make, taking no reference, trusted here.
    mappable, frames.mappable = frames.mappable, lambda mfn: True
    try:
        pin(frames, l2, 2, fetch)
    finally:
        frames.mappable = mappable
    for v in range(vcpus):
        new_base(frames, v, l2, fetch)


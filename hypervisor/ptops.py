"""The page-table operations a PV guest asks for, on its frame types (``hypervisor/pagetypes.py``): an entry update
(Xen's mod_l1_entry / mod_l2_entry), a pin and an unpin, a new page-table base (new_guest_cr3), and typing the
builder's initial tables (as Xen's domain builder pins the initial L2). Each raises ``Refused`` (or NotCopied, for
a frame to validate that did not come with the trap) before changing anything, and otherwise leaves the type
counts and the copies of the tables as Xen's would be.
"""

from __future__ import annotations

from hypervisor.pagetypes import LEVEL_TYPE, Fetch, Frames, PageInfo, PageType, Refused
from pvcluster.abi.errno import Errno
from pvcluster.abi.pagetables import ENTRIES, FIRST_XEN_L2_SLOT, entries, is_guest_l2_slot
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
    if kind is PageType.L2:
        if not is_guest_l2_slot(slot):
            # "Illegal L2 update attempt in Xen-private area"
            raise Refused(Errno.EPERM, "l2-slot-in-hypervisor-hole", slot=slot)
        frames.get_l2e(new, fetch)
        frames.tables[table][slot] = new
        frames.put_l2e(old)
    else:
        frames.get_l1e(new)
        frames.tables[table][slot] = new
        frames.put_l1e(old)


def pin(frames: Frames, mfn: int, level: int, fetch: Fetch) -> None:
    """MMUEXT_PIN_L{1,2}_TABLE: a type reference that stays until the unpin (-EINVAL when already pinned)."""
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
    """new_guest_cr3: an L2 reference on the new base, then the old base's dropped."""
    frames.get_type(mfn, PageType.L2, fetch)
    old = frames.bases.get(vcpu)
    frames.bases[vcpu] = mfn
    if old is not None:
        frames.put_type(old)


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


"""Copy-in of whole frames by machine address, for the hypervisor's page-table validation (``copyin.Span.machine``).

The hypervisor types a frame as an L1 or L2 only after checking every entry it holds, and it holds no guest RAM: a
trap that may make frames page tables (a pin, a new base, an mmu_update) names them, and this copies them from RAM
as they are at the trap. A frame to become an L2 brings the L1 frames its guest slots name (``follow``; PAE: an L3
its L2s and their L1s). At most
MAX_TABLE_FRAMES frames go with one trap; the hypervisor continues a request whose frames were left out.
"""

from __future__ import annotations

from collections.abc import Iterable

from domains.memory import GuestRam
from pvcluster.abi.copyin import MAX_TABLE_FRAMES, Span
from pvcluster.abi.pagetables import PAE_L3_ENTRIES, l2_targets, pae_targets
from pvcluster.abi.xen import PAGE_SHIFT, PAGE_SIZE
from pvcluster.bus.messages import Region


def _frame(ram: GuestRam, mfn: int) -> Region:
    """One frame of the domain's RAM (data None for a frame it does not own: the hypervisor refuses those)."""
    owned = 0 <= mfn < ram.nr_pages
    data = ram.read_pa(mfn << PAGE_SHIFT, PAGE_SIZE) if owned else None
    return Region(mfn << PAGE_SHIFT, PAGE_SIZE, data, False, [], [mfn], machine=True)


def _pae_follow(ram: GuestRam, data: bytes) -> list[int]:
    """PAE: the frame may become an L2 or an L3 (the copy-in cannot tell), so the frames its entries name, then,
    when only its first 4 entries are present (it may be an L3), the frames those name (the L2s' L1s)."""
    first = [m for m in pae_targets(data) if 0 <= m < ram.nr_pages]
    second: list[int] = []
    if pae_targets(data) != pae_targets(data, PAE_L3_ENTRIES):
        return first
    for mfn in first:
        second += [m for m in pae_targets(ram.read_pa(mfn << PAGE_SHIFT, PAGE_SIZE)) if 0 <= m < ram.nr_pages]
    return first + second


def table_regions(ram: GuestRam, spans: Iterable[Span]) -> list[Region]:
    """The frames ``spans`` name (machine spans only), each once, first ones first, at most MAX_TABLE_FRAMES."""
    out: dict[int, Region] = {}
    for span in spans:
        if not span.machine:
            continue
        todo = [span.addr >> PAGE_SHIFT]
        if span.follow and (first := _frame(ram, todo[0])).data is not None:
            todo += _pae_follow(ram, first.data) if ram.pae else l2_targets(first.data)
        for mfn in todo:
            if len(out) >= MAX_TABLE_FRAMES:
                return list(out.values())
            if mfn not in out:
                out[mfn] = _frame(ram, mfn)
    return list(out.values())

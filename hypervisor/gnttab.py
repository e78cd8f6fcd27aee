"""A domain's grant table (Xen's ``struct grant_table``): its version and the frames that hold its entries.

The entries themselves live in guest RAM's hypervisor frames (machine frames ``nr_pages + GRANT_FRAME_BASE + i``,
backed by the domain process's ``GuestRam``), which the domain maps and writes; the hypervisor keeps only what Xen
keeps beside them. A frame exists once the table has grown to it (``gnttab_grow_table``): from then on the domain
may map it, as Xen's ``share_xen_page_with_guest`` lets it, and before that no PTE may name it.
"""

from __future__ import annotations

import attrs

from pvcluster.abi.platform import GRANT_FRAME_BASE, MAX_GRANT_FRAMES
from pvcluster.abi.xen import INITIAL_NR_GRANT_FRAMES


@attrs.define
class GrantTable:
    """Version 1 only; it starts with INITIAL_NR_GRANT_FRAMES frames, as grant_table_init grows it."""

    version: int = 1
    nr_frames: int = INITIAL_NR_GRANT_FRAMES
    max_frames: int = MAX_GRANT_FRAMES

    def grow(self, nr_frames: int) -> None:
        """Have at least ``nr_frames`` frames (the caller checked ``max_frames``); a table never shrinks."""
        assert nr_frames <= self.max_frames
        self.nr_frames = max(self.nr_frames, nr_frames)


def frame_mfn(nr_pages: int, index: int) -> int:
    """The machine frame of grant frame ``index`` of a domain with ``nr_pages`` of RAM."""
    return nr_pages + GRANT_FRAME_BASE + index


def frame_index(nr_pages: int, gt: GrantTable, mfn: int) -> int | None:
    """Which of the table's existing frames ``mfn`` is, or None."""
    index = mfn - frame_mfn(nr_pages, 0)
    return index if 0 <= index < gt.nr_frames else None

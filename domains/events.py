"""Event-channel delivery as the hardware side of Xen does it: bits in shared_info, written into guest RAM.

The hypervisor decides which port fires on which vCPU; these functions set the 2-level pending bitmaps
(``evtchn_pending`` words, each vCPU's ``evtchn_pending_sel``) and ``evtchn_upcall_pending`` exactly as Xen's
evtchn_set_pending / evtchn_unmask do, so the guest's upcall handler scans them as a real kernel would.
"""

from __future__ import annotations

from domains.memory import GuestRam
from pvcluster.abi.layouts import SHARED_INFO, SHARED_INFO_EVTCHN_MASK, SHARED_INFO_EVTCHN_PENDING, VCPU_INFO
from pvcluster.abi.xen import NR_EVENT_CHANNELS

_PENDING_SEL = VCPU_INFO.offset("evtchn_pending_sel")
_UPCALL_PENDING = VCPU_INFO.offset("evtchn_upcall_pending")
_UPCALL_MASK = VCPU_INFO.offset("evtchn_upcall_mask")


def _bit(ram: GuestRam, offset: int, bit: int) -> bool:
    word = int.from_bytes(ram.read_pa(ram.shared_info_paddr + offset + 4 * (bit // 32), 4), "little")
    return bool(word >> (bit % 32) & 1)


def _set_bit(ram: GuestRam, offset: int, bit: int, value: bool) -> bool:
    """Set or clear a bit; return its old value (test_and_set / test_and_clear)."""
    addr = ram.shared_info_paddr + offset + 4 * (bit // 32)
    word = int.from_bytes(ram.read_pa(addr, 4), "little")
    old = bool(word >> (bit % 32) & 1)
    word = word | (1 << bit % 32) if value else word & ~(1 << bit % 32)
    ram.write_pa(addr, word.to_bytes(4, "little"))
    return old


def _vcpu_info(ram: GuestRam, vcpu: int) -> int:
    return SHARED_INFO.offset("vcpu_info") + vcpu * VCPU_INFO.size


def _mark_events_pending(ram: GuestRam, port: int, vcpu: int) -> bool:
    if _set_bit(ram, _vcpu_info(ram, vcpu) + _PENDING_SEL, port // 32, True):
        return False
    ram.write_pa(ram.shared_info_paddr + _vcpu_info(ram, vcpu) + _UPCALL_PENDING, b"\x01")
    return True


def set_pending(ram: GuestRam, port: int, vcpu: int) -> bool:
    """Mark ``port`` pending for ``vcpu``; True when this raised the vCPU's upcall."""
    if not 0 < port < NR_EVENT_CHANNELS:
        return False
    if _set_bit(ram, SHARED_INFO_EVTCHN_PENDING, port, True):
        return False
    if _bit(ram, SHARED_INFO_EVTCHN_MASK, port):
        return False
    return _mark_events_pending(ram, port, vcpu)


def unmask(ram: GuestRam, port: int, vcpu: int) -> bool:
    """Clear the port's mask; a port still pending raises the upcall again (as EVTCHNOP_unmask does)."""
    if not 0 < port < NR_EVENT_CHANNELS:
        return False
    _set_bit(ram, SHARED_INFO_EVTCHN_MASK, port, False)
    if _bit(ram, SHARED_INFO_EVTCHN_PENDING, port):
        return _mark_events_pending(ram, port, vcpu)
    return False


def clear(ram: GuestRam, port: int) -> None:
    if 0 < port < NR_EVENT_CHANNELS:
        _set_bit(ram, SHARED_INFO_EVTCHN_PENDING, port, False)


def is_pending(ram: GuestRam, port: int) -> bool:
    return 0 < port < NR_EVENT_CHANNELS and _bit(ram, SHARED_INFO_EVTCHN_PENDING, port)


def upcall_pending(ram: GuestRam, vcpu: int) -> bool:
    return ram.read_pa(ram.shared_info_paddr + _vcpu_info(ram, vcpu) + _UPCALL_PENDING, 1) != b"\x00"


def upcall_masked(ram: GuestRam, vcpu: int) -> bool:
    return ram.read_pa(ram.shared_info_paddr + _vcpu_info(ram, vcpu) + _UPCALL_MASK, 1) != b"\x00"


def set_upcall_mask(ram: GuestRam, vcpu: int, masked: bool) -> None:
    ram.write_pa(ram.shared_info_paddr + _vcpu_info(ram, vcpu) + _UPCALL_MASK, b"\x01" if masked else b"\x00")


def set_arch_cr2(ram: GuestRam, vcpu: int, cr2: int) -> None:
    """vcpu_info.arch.cr2: where Xen tells a PV guest the faulting address of the page fault it bounces to it."""
    at = ram.shared_info_paddr + _vcpu_info(ram, vcpu) + VCPU_INFO.offset("arch")
    ram.write_pa(at, (cr2 & 0xFFFFFFFF).to_bytes(4, "little"))

"""A vCPU's ``vcpu_time_info`` in shared_info, written as Xen's __update_vcpu_system_time writes it
(xen/arch/x86/time.c): ``version`` made odd, every other field, ``version`` made even again, so a guest that reads
``version``, the fields, and ``version`` again (both even and equal) has a consistent set.

The fields tie the vCPU's virtual clock to what RDTSC returns there: ``tsc_timestamp`` is the TSC (the virtual clock
in ticks of ``TSC_HZ``, ``domains/blockhook.py``) at the instant ``system_time`` was taken, and ``tsc_to_system_mul``
/ ``tsc_shift`` come from TSC_HZ as Xen's set_time_scale computes them. A guest's
``system_time + scale_delta(rdtsc() - tsc_timestamp)`` is then the vCPU's virtual time in ns, to within a tick.

The skew fault (a drifting clock source) moves only what the guest reads: ``system_time`` by its offset plus ppm of
the true time, and the scale by the same ppm, so the guest's extrapolation drifts at that rate between updates too.
"""

from __future__ import annotations

import struct

from domains.memory import GuestRam
from pvcluster.abi.layouts import SHARED_INFO, VCPU_INFO
from pvcluster.abi.pvclock import PPM, drifted, set_time_scale
from pvcluster.costs import PS_PER_TSC_TICK, TSC_HZ

_TSC_SCALE = set_time_scale(TSC_HZ)
_VERSION = VCPU_INFO.offset("time.version")
_TSC_TIMESTAMP = VCPU_INFO.offset("time.tsc_timestamp")
_MUL = VCPU_INFO.offset("time.tsc_to_system_mul")
_U64 = (1 << 64) - 1
# tsc_timestamp, system_time, tsc_to_system_mul, tsc_shift: contiguous in struct vcpu_time_info
_FIELDS = struct.Struct("<QQIb")
assert VCPU_INFO.offset("time.system_time") == _TSC_TIMESTAMP + 8 and _MUL == _TSC_TIMESTAMP + 16
assert VCPU_INFO.offset("time.tsc_shift") == _MUL + 4


def tsc_at(clock_ps: int) -> int:
    """The TSC a vCPU whose virtual clock reads ``clock_ps`` sees (what its RDTSC returns)."""
    return (clock_ps // PS_PER_TSC_TICK) & _U64


def publish(ram: GuestRam, vid: int, clock_ps: int, skew: tuple[int, int] = (0, 0)) -> None:
    """Update vCPU ``vid``'s vcpu_time_info for its clock at ``clock_ps``; ``skew`` is the skew fault's (offset ns,
    ppm)."""
    info = ram.shared_info_paddr + SHARED_INFO.offset("vcpu_info") + vid * VCPU_INFO.size
    tsc, clock_ns = tsc_at(clock_ps), clock_ps // 1000  # both rounded down: within a tick and a ns of each other
    offset, ppm = skew
    shown = max(0, clock_ns + offset + clock_ns * ppm // PPM) & _U64
    scale = drifted(_TSC_SCALE, ppm) if ppm else _TSC_SCALE
    version = struct.unpack_from("<I", ram.buf, info + _VERSION)[0]
    struct.pack_into("<I", ram.buf, info + _VERSION, (version | 1) & 0xFFFFFFFF)
    _FIELDS.pack_into(ram.buf, info + _TSC_TIMESTAMP, tsc, shown, scale.mul_frac, scale.shift)
    struct.pack_into("<I", ram.buf, info + _VERSION, ((version | 1) + 1) & 0xFFFFFFFF)

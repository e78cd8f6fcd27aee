"""The paravirtual clock's arithmetic (``struct vcpu_time_info``): how a TSC rate becomes ``tsc_to_system_mul`` and
``tsc_shift``, and how a guest turns a TSC delta back into nanoseconds.

Xen's own code (xen/arch/x86/time.c): ``set_time_scale`` picks the shift that brings the rate into (1 GHz, 2 GHz]
and the 32-bit fraction ``mul_frac`` = 10^9 / rate (scaled by 2^32); ``scale_delta`` is what every guest computes
(xen/include/public/xen.h, at ``struct vcpu_time_info``)::

    system_time + ((((tsc - tsc_timestamp) << tsc_shift) * tsc_to_system_mul) >> 32)

with a negative shift meaning a right shift. Both ends use these functions: the domain process to publish a vCPU's
time, the tests to check what a guest computed from it.
"""

from __future__ import annotations

import attrs

_NS_PER_S = 1_000_000_000
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
PPM = 1_000_000


@attrs.frozen
class TimeScale:
    """``tsc_to_system_mul`` and ``tsc_shift`` as vcpu_time_info carries them."""

    mul_frac: int
    shift: int


def set_time_scale(ticks_per_sec: int) -> TimeScale:
    """Xen's set_time_scale: the scale that turns ticks of a ``ticks_per_sec`` counter into nanoseconds."""
    if ticks_per_sec <= 0:
        raise ValueError(f"a counter of {ticks_per_sec} Hz has no time scale")
    tps, shift = ticks_per_sec, 0
    while tps > 2 * _NS_PER_S:
        tps >>= 1
        shift -= 1
    tps &= _U32  # Xen keeps the rate in a u32 from here
    while tps <= _NS_PER_S:
        tps <<= 1
        shift += 1
    return TimeScale(mul_frac=(_NS_PER_S << 32) // tps, shift=shift)  # div_frac(10^9, tps)


def scale_delta(delta: int, scale: TimeScale) -> int:
    """Nanoseconds in ``delta`` ticks, as a guest computes them (the 64-bit delta shifted, times the fraction)."""
    delta &= _U64
    delta = delta >> -scale.shift if scale.shift < 0 else (delta << scale.shift) & _U64
    return (delta * scale.mul_frac) >> 32 & _U64


def drifted(scale: TimeScale, ppm: int) -> TimeScale:
    """``scale`` for a clock that runs ``ppm`` parts per million fast (slow when negative): the skew fault's drifting
    clock source. A fraction that no longer fits in 32 bits moves a bit into the shift, as set_time_scale would."""
    mul, shift = scale.mul_frac * max(0, PPM + ppm) // PPM, scale.shift
    while mul > _U32:
        mul >>= 1
        shift += 1
    return TimeScale(mul_frac=mul, shift=shift)

"""The privileged instructions a ring-1 kernel's #GP or #UD brings to the hypervisor, emulated as Xen emulates them.

Xen 4.17 decodes a PV guest's faulting instruction in ``xen/arch/x86/pv/emul-priv-op.c`` (the #GP path) and
``pv/emulate.c``/``pv/traps.c`` (the forced-emulation prefix on #UD). What this module emulates, and what it leaves to
the guest's own #GP / #UD handler (``None``: the fault is injected, ``domains/traps.py``):

==============================  =============================================================================
instruction                     here
==============================  =============================================================================
``mov reg, cr0``                CR0 as the CPU has it, TS as fpu_taskswitch / clts left it (read_cr)
``mov reg, cr2``                the vCPU's virtual CR2: the address of its last page fault (ctrlreg[2])
``mov reg, cr3``                the machine address of the current page directory (xen_pfn_to_cr3)
``mov reg, cr4``                the virtual CR4 the guest last wrote, of the bits a PV guest owns
``mov cr0, reg``                only TS may change (do_fpu_taskswitch); any other bit: #GP, so a guest can
                                never clear CR0.WP or CR0.PG ("Attempt to change unmodifiable CR0 flags")
``mov cr2, reg``                sets the virtual CR2
``mov cr4, reg``                keeps the bits a PV guest owns (TSD, OSFXSR, OSXMMEXCPT), ignores the rest
``clts``                        clears TS
``wbinvd``, ``invd``            nothing (an unprivileged domain has no cache-flush permission)
``ud2a; "xen"; cpuid``          CPUID, with Xen's hypervisor leaves 0x40000000-2 and the hypervisor bit in
                                leaf 1 (the forced-emulation prefix, XEN_EMULATE_PREFIX)
``ud2a; "xen"`` + anything else #UD, as on Xen
==============================  =============================================================================

``mov cr3, reg`` is emulated too, as Xen's pv_emul_write_cr does it (new_guest_cr3), but not here: a new base needs
the hypervisor's validation, which lives across the bus, so the vCPU sends it as an emulated one-op mmuext_op
NEW_BASEPTR (``Vcpu._begin_cr3_write``); a base the hypervisor refuses is #GP, as Xen's X86EMUL_UNHANDLEABLE.

Not emulated, so #GP: ``rdmsr``/``wrmsr`` (no MSR is exposed), ``hlt``, ``cli``/``sti`` (a PV guest has no
IOPL: its interrupt flag is evtchn_upcall_mask), ``lgdt``/``lidt``/``ltr``/``lldt``/``lmsw``/``invlpg``, debug
registers. Port I/O never reaches here: Unicorn does not check the I/O permission bitmap, and the platform has only
its own two ports (``pvcluster/abi/platform.py``).
"""

from __future__ import annotations

import functools
from typing import Protocol

import attrs
from unicorn import UC_ARCH_X86, UC_MODE_32, Uc
from unicorn import x86_const as X

from pvcluster.abi.x86 import CR0_TS
from pvcluster.abi.xen import (
    XEN_CPUID_FIRST_LEAF,
    XEN_CPUID_SIGNATURE_EBX,
    XEN_CPUID_SIGNATURE_ECX,
    XEN_CPUID_SIGNATURE_EDX,
    XEN_EMULATE_PREFIX,
    XEN_VERSION_MAJOR,
    XEN_VERSION_MINOR,
)

_GPRS = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")  # ModRM register numbers
CR4_PV_OWNED = (1 << 2) | (1 << 9) | (1 << 10)  # TSD, OSFXSR, OSXMMEXCPT
CPUID_HYPERVISOR_BIT = 1 << 31  # leaf 1 ECX: running under a hypervisor
XEN_CPUID_LAST_LEAF = XEN_CPUID_FIRST_LEAF + 2  # leaves 3-5 (time, HVM, PV features) are not modelled
_CPUID = b"\x0f\xa2"
FORCED_CPUID = XEN_EMULATE_PREFIX + _CPUID


class PrivVcpu(Protocol):
    """What emulation needs of a vCPU (``domains.vcpu.Vcpu``)."""

    @property
    def cr0(self) -> int: ...
    @property
    def cr3(self) -> int: ...

    virt_cr2: int
    virt_cr4: int

    def reg(self, name: str) -> int: ...
    def set_regs(self, regs: dict[str, int]) -> None: ...
    def set_ts(self, ts: bool) -> None: ...


def emulate_gp(v: PrivVcpu, code: bytes) -> int | None:
    """Emulate the instruction ``code`` starts with, which raised #GP in ring 1: its length, or None to inject the
    #GP."""
    if code[:2] == b"\x0f\x06":  # clts
        v.set_ts(False)
        return 2
    if code[:2] in (b"\x0f\x09", b"\x0f\x08"):  # wbinvd, invd
        return 2
    if len(code) >= 3 and code[0] == 0x0F and code[1] in (0x20, 0x22) and code[2] >> 6 == 3:
        cr, gpr = code[2] >> 3 & 7, _GPRS[code[2] & 7]
        done = _read_cr(v, cr, gpr) if code[1] == 0x20 else _write_cr(v, cr, v.reg(gpr))
        return 3 if done else None
    return None


@attrs.frozen
class Cr3Write:
    """A ``mov reg, cr3`` on its way to the hypervisor: where the vCPU resumes once the new base is accepted."""

    eip: int
    length: int = 3


def cr3_source(code: bytes) -> str | None:
    """The register a ``mov cr3, reg`` (0F 22 /3, register form) loads from, or None for any other instruction."""
    if len(code) >= 3 and code[:2] == b"\x0f\x22" and code[2] >> 6 == 3 and code[2] >> 3 & 7 == 3:
        return _GPRS[code[2] & 7]
    return None


def _read_cr(v: PrivVcpu, cr: int, gpr: int | str) -> bool:
    value = {0: v.cr0, 2: v.virt_cr2, 3: v.cr3 & 0xFFFFF000, 4: v.virt_cr4}.get(cr)
    if value is None:
        return False
    v.set_regs({str(gpr): value})
    return True


def _write_cr(v: PrivVcpu, cr: int, value: int) -> bool:
    if cr == 0:
        if (value ^ v.cr0) & ~CR0_TS & 0xFFFFFFFF:
            return False
        v.set_ts(bool(value & CR0_TS))
        return True
    if cr == 2:
        v.virt_cr2 = value
        return True
    if cr == 4:
        v.virt_cr4 = value & CR4_PV_OWNED
        return True
    return False


def emulate_ud(v: PrivVcpu, code: bytes) -> int | None:
    """The forced-emulation prefix followed by CPUID: emulate it and return its length; anything else: None (#UD)."""
    if not code.startswith(FORCED_CPUID):
        return None
    eax, ebx, ecx, edx = cpuid(v.reg("eax"), v.reg("ecx"))
    v.set_regs({"eax": eax, "ebx": ebx, "ecx": ecx, "edx": edx})
    return len(FORCED_CPUID)


def cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    """What a PV guest's emulated CPUID returns: Xen's leaves in its range, else the CPU's with the hypervisor bit."""
    if XEN_CPUID_FIRST_LEAF <= leaf <= XEN_CPUID_LAST_LEAF:
        return _xen_leaf(leaf - XEN_CPUID_FIRST_LEAF)
    eax, ebx, ecx, edx = _native_cpuid(leaf, subleaf if leaf in (4, 7, 0xB, 0xD) else 0)
    if leaf == 1:
        ecx |= CPUID_HYPERVISOR_BIT
    return eax, ebx, ecx, edx


def _xen_leaf(index: int) -> tuple[int, int, int, int]:
    """cpuid_hypervisor_leaves (xen/arch/x86/cpuid.c): signature and last leaf, version, hypercall pages and MSR."""
    if index == 0:
        return XEN_CPUID_LAST_LEAF, XEN_CPUID_SIGNATURE_EBX, XEN_CPUID_SIGNATURE_ECX, XEN_CPUID_SIGNATURE_EDX
    if index == 1:
        return XEN_VERSION_MAJOR << 16 | XEN_VERSION_MINOR, 0, 0, 0
    return 1, XEN_CPUID_FIRST_LEAF, 0, 0  # one hypercall page, its MSR at 0x40000000


@functools.lru_cache(maxsize=64)  # the guest picks the leaves: a bounded cache, not one entry per leaf it tries
def _native_cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    """The emulated CPU's own answer (the same CPU every vCPU runs on, so the same answer as a plain CPUID)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, 0x1000)
    uc.mem_write(0, _CPUID)
    uc.reg_write(X.UC_X86_REG_EAX, leaf)
    uc.reg_write(X.UC_X86_REG_ECX, subleaf)
    uc.emu_start(0, len(_CPUID))
    regs = (X.UC_X86_REG_EAX, X.UC_X86_REG_EBX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX)
    eax, ebx, ecx, edx = (int(uc.reg_read(r)) for r in regs)
    return eax, ebx, ecx, edx

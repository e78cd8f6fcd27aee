"""The guest kernel's assembly include of ABI numbers, generated from ``pvcluster/abi`` (Linux's asm-offsets idea).

Every number the built-in kernel (``domains/kernel/*.S``) shares with Python is defined once, in Python; this module
renders them as ``.equ NAME, value`` lines, and ``domains/kernel/build.py`` puts that text in place of
``.include "abi.inc"`` before assembling. ``python -m pvcluster.abi.asm`` prints it. Names:

* Xen's constants keep Xen's C names, so the assembly reads like code written against Xen's headers:
  ``__HYPERVISOR_mmuext_op``, ``SCHEDOP_block``, ``VCPUOP_up``, ``EVTCHNOP_send``, ``MMUEXT_TLB_FLUSH_MULTI``,
  ``UVMF_INVLPG``, ``VIRQ_TIMER``, ``SHUTDOWN_crash``, ``DOMID_SELF``, ``XEN_EINVAL`` (positive, as in xen/errno.h:
  a hypercall returns ``-XEN_EINVAL``).
* Struct layouts, asm-offsets style: ``<PREFIX>_<member>`` is the member's offset, nested members joined by ``_``
  (``VCPUGCTX_user_regs_eip``, ``VCPU_INFO_time_system_time``); ``<PREFIX>_SIZE`` the struct's size;
  ``<PREFIX>_SHIFT`` log2 of it where code indexes by shifting. The prefix is the struct's name in capitals
  (``VCPUGCTX`` for vcpu_guest_context); members keep their C spelling.
* The simulator's own numbers (``platform.py``, ``pvops.py``) have plain capitalised names: ``CLOCK_PORT``,
  ``MARK_SHOOTDOWN_REQUEST``, ``HYPERVISOR_TYPE_XEN``, ``BOOT_IDENT_XEN``, ``VMI_ROM_HEADER_nr_ops``, ``NR_PV_OPS``.
"""

from __future__ import annotations

import enum
import functools

import attrs

from pvcluster.abi import layouts, platform, pvops, xen
from pvcluster.abi.errno import Errno
from pvcluster.abi.layouts import Layout

INCLUDE_NAME = "abi.inc"
SOURCE_MODULES = ("xen", "errno", "layouts", "platform", "pvops")


@attrs.frozen
class AsmConstant:
    """One ``.equ`` of the include. ``c_expr`` is the same number as a C expression against Xen's public headers
    (tests/test_abi_headers.py compiles it); None for a number Xen's headers do not have."""

    name: str
    value: int
    c_expr: str | None = None
    hex: bool = False

    def line(self) -> str:
        return f".equ {self.name}, 0x{self.value:X}" if self.hex else f".equ {self.name}, {self.value}"


def _xen_enum(members: type[enum.IntEnum], prefix: str) -> list[AsmConstant]:
    # SchedOp.yield_ is SCHEDOP_yield: the trailing underscore only dodges the Python keyword
    names = [(prefix + name.rstrip("_"), int(member)) for name, member in members.__members__.items()]
    return [AsmConstant(name, value, c_expr=name) for name, value in names]


def _xen_value(name: str, value: int, hex: bool = False) -> AsmConstant:
    return AsmConstant(name, value, c_expr=name, hex=hex)


def _layout(layout: Layout) -> list[AsmConstant]:
    c = layout.c_type
    out = [AsmConstant(f"{layout.prefix}_SIZE", layout.size, None if c is None else f"sizeof({c})")]
    if layout.shift:
        out.append(AsmConstant(f"{layout.prefix}_SHIFT", layout.size.bit_length() - 1))
    for member, off in layout.members.items():
        c_expr = None if c is None else f"offsetof({c}, {member})"
        out.append(AsmConstant(f"{layout.prefix}_{member.replace('.', '_')}", off, c_expr))
    return out


def _platform_enum(members: type[enum.IntEnum], prefix: str, hex: bool = False) -> list[AsmConstant]:
    return [AsmConstant(prefix + name.upper(), int(m), hex=hex) for name, m in members.__members__.items()]


def _hypercalls() -> list[AsmConstant]:
    out = _xen_enum(xen.Hypercall, "__HYPERVISOR_")
    for members, prefix in (
        (xen.ConsoleIO, "CONSOLEIO_"), (xen.XenVer, "XENVER_"), (xen.XenFeat, "XENFEAT_"), (xen.SchedOp, "SCHEDOP_"),
        (xen.ShutdownReason, "SHUTDOWN_"), (xen.VcpuOp, "VCPUOP_"), (xen.EvtchnOp, "EVTCHNOP_"),
        (xen.EvtchnStat, "EVTCHNSTAT_"), (xen.Virq, "VIRQ_"), (xen.MmuCmd, "MMU_"), (xen.MmuextCmd, "MMUEXT_"),
        (xen.CallbackOp, "CALLBACKOP_"), (xen.CallbackType, "CALLBACKTYPE_"), (xen.MemoryOp, "XENMEM_"),
        (xen.GnttabOp, "GNTTABOP_"), (xen.Gntst, "GNTST_"), (xen.KexecCmd, "KEXEC_CMD_"),
        (xen.KexecType, "KEXEC_TYPE_"),
    ):
        out += _xen_enum(members, prefix)
    out += [
        _xen_value("DOMID_SELF", xen.DOMID_SELF, hex=True),
        _xen_value("FLAT_RING1_CS", xen.FLAT_RING1_CS, hex=True),
        _xen_value("FLAT_RING1_DS", xen.FLAT_RING1_DS, hex=True),
        _xen_value("DOMID_IO", xen.DOMID_IO, hex=True),
        _xen_value("DOMID_XEN", xen.DOMID_XEN, hex=True),
        _xen_value("DOMID_INVALID", xen.DOMID_INVALID, hex=True),
        _xen_value("UVMF_NONE", xen.UVMF_NONE),
        _xen_value("UVMF_TLB_FLUSH", xen.UVMF_TLB_FLUSH),
        _xen_value("UVMF_INVLPG", xen.UVMF_INVLPG),
        _xen_value("UVMF_FLUSHTYPE_MASK", xen.UVMF_FLUSHTYPE_MASK),
        _xen_value("UVMF_MULTI", xen.UVMF_MULTI),
        _xen_value("UVMF_LOCAL", xen.UVMF_LOCAL),
        _xen_value("UVMF_ALL", xen.UVMF_ALL),
        _xen_value("CALLBACKF_mask_events", xen.CALLBACKF_MASK_EVENTS),
        _xen_value("XEN_LEGACY_MAX_VCPUS", xen.XEN_LEGACY_MAX_VCPUS),
        _xen_value("NR_EVENT_CHANNELS", xen.NR_EVENT_CHANNELS),
        _xen_value("NR_VIRQS", xen.NR_VIRQS),
        _xen_value("MAX_GUEST_CMDLINE", xen.MAX_GUEST_CMDLINE),
        _xen_value("XENFEAT_NR_SUBMAPS", xen.XENFEAT_NR_SUBMAPS),
        _xen_value("VCPU_SSHOTTMR_future", xen.VCPU_SSHOTTMR_FUTURE),
        # Xen's, but with no macro in the public headers
        AsmConstant("MMU_UPDATE_PREEMPTED", xen.MMU_UPDATE_PREEMPTED, hex=True),
        AsmConstant("PAGE_SHIFT", xen.PAGE_SHIFT),
        AsmConstant("KEXEC_SEGMENT_MAX", xen.KEXEC_SEGMENT_MAX),  # xen/include/xen/kimage.h: not public
        AsmConstant("EM_386", xen.EM_386),  # ELF's, not Xen's
        AsmConstant("PAGE_SIZE", xen.PAGE_SIZE),
        AsmConstant("HYPERCALL_VECTOR", xen.HYPERCALL_VECTOR, hex=True),
        AsmConstant("HYPERCALL_STUB_SHIFT", xen.HYPERCALL_STUB_SHIFT),
        AsmConstant("HYPERCALL_STUB_SIZE", xen.HYPERCALL_STUB_SIZE),
    ]
    return out


def _platform() -> list[AsmConstant]:
    p = platform
    out = [
        AsmConstant("VIRT_BASE", p.VIRT_BASE, hex=True),
        AsmConstant("KERNEL_CS", p.KERNEL_CS, hex=True),
        AsmConstant("KERNEL_DS", p.KERNEL_DS, hex=True),
        AsmConstant("CLOCK_PORT", p.CLOCK_PORT, hex=True),
        AsmConstant("MARK_PORT", p.MARK_PORT, hex=True),
        AsmConstant("MARK_DETAIL_SHIFT", p.MARK_DETAIL_SHIFT),
        AsmConstant("MARK_CODE_MASK", p.MARK_CODE_MASK, hex=True),
        *_platform_enum(p.Mark, "MARK_", hex=True),
        AsmConstant("APIC_BASE", p.APIC_BASE, hex=True),
        AsmConstant("APIC_ID", p.APIC_ID, hex=True),
        AsmConstant("APIC_EOI", p.APIC_EOI, hex=True),
        AsmConstant("APIC_ICR_LOW", p.APIC_ICR_LOW, hex=True),
        AsmConstant("APIC_ICR_HIGH", p.APIC_ICR_HIGH, hex=True),
        AsmConstant("APIC_ID_SHIFT", p.APIC_ID_SHIFT),
        AsmConstant("IPI_VECTOR", p.IPI_VECTOR, hex=True),
        AsmConstant("FLUSH_VECTOR", p.FLUSH_VECTOR, hex=True),
        AsmConstant("CR3_VECTOR", p.CR3_VECTOR, hex=True),
        *_platform_enum(p.HypervisorType, "HYPERVISOR_TYPE_"),
        *_platform_enum(p.BootProtocol, "BOOT_PROTOCOL_"),
        *[AsmConstant(f"BOOT_IDENT_{t.name.upper()}", ident, hex=True) for t, ident in p.BOOT_IDENTS.items()],
        AsmConstant("VMI_ROM_BASE", p.VMI_ROM_BASE, hex=True),
        AsmConstant("VMI_ROM_MAGIC", p.VMI_ROM_MAGIC, hex=True),
        AsmConstant("VMI_INIT_SIGNATURE", p.VMI_INIT_SIGNATURE, hex=True),
        *_layout(p.VMI_ROM_HEADER),
        AsmConstant("NR_PV_OPS", pvops.NR_PV_OPS),
    ]
    return out


@functools.cache
def sections() -> tuple[tuple[str, tuple[AsmConstant, ...]], ...]:
    """The include's constants in titled groups, in the order they are printed."""
    out = (
        ("xen.py: hypercalls, their sub-operations and Xen's other numbers", tuple(_hypercalls())),
        ("errno.py: Xen's errno values (hypercalls return them negated)", tuple(_xen_enum(Errno, "XEN_"))),
        ("layouts.py: Xen's structs on x86-32 (offsets, _SIZE, _SHIFT)",
         tuple(c for layout in layouts.XEN_LAYOUTS for c in _layout(layout))),
        ("platform.py, pvops.py: the simulated machine's own numbers", tuple(_platform())),
    )
    seen: dict[str, int] = {}
    for _, group in out:
        for c in group:
            if c.name in seen:
                raise ValueError(f"{c.name} is defined twice in the ABI include ({seen[c.name]} and {c.value})")
            seen[c.name] = c.value
    return out


def constants() -> tuple[AsmConstant, ...]:
    return tuple(c for _, group in sections() for c in group)


def include_text() -> str:
    """The text of the include: a header saying what generated it, then one ``.equ`` per constant."""
    lines = [
        f"# {INCLUDE_NAME}: GENERATED by pvcluster.abi.asm. DO NOT EDIT: change the Python definitions it comes from,",
        f"#   {', '.join(f'pvcluster/abi/{m}.py' for m in SOURCE_MODULES)}.",
        f'# domains/kernel/build.py puts this text in place of `.include "{INCLUDE_NAME}"`; '
        "`python -m pvcluster.abi.asm` prints it.",
        "# Names: Xen's C names for Xen's constants (__HYPERVISOR_mmuext_op, SCHEDOP_block, XEN_EINVAL, ...);",
        "# struct layouts asm-offsets style: <PREFIX>_<member> = offset (nested members joined by _),",
        "# <PREFIX>_SIZE = size, <PREFIX>_SHIFT = log2(size); the simulator's own numbers in plain capitals.",
    ]
    for title, group in sections():
        lines += ["", f"# -- {title}", *(c.line() for c in group)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(include_text(), end="")

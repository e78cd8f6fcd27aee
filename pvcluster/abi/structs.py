"""What the hypercall argument structs mean to the code that copies them in and the code that reads them.

The numbers themselves are defined once, in ``pvcluster/abi/layouts.py`` (sizes and offsets) and
``pvcluster/abi/xen.py`` (commands and flags); this module derives the views the copy-in descriptors
(``pvcluster/abi/copyin.py``) and the hypervisor's handlers share: which buffer each sub-command names, how long
it is, and which of them the hypervisor writes back.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from pvcluster.abi import layouts as L
from pvcluster.abi.xen import (
    MACH2PHYS_VIRT_END_NONPAE,
    MACH2PHYS_VIRT_START_NONPAE,
    MACHPHYS_EXTENT_SHIFT,
    UVMF_ALL,
    UVMF_FLUSHTYPE_MASK,
    UVMF_INVLPG,
    UVMF_LOCAL,
    UVMF_TLB_FLUSH,
    XEN_CAPABILITIES_LEN,
    XEN_EXTRAVERSION_LEN,
    CallbackOp,
    EvtchnOp,
    GnttabOp,
    MmuextCmd,
    VcpuOp,
    XenVer,
)

# xen/version.h output buffers: xen_extraversion_t char[16], xen_compile_info_t 64+16+32+32, xen_capabilities_info_t
# char[1024], xen_changeset_info_t char[64], xen_platform_parameters_t one unsigned long, xen_feature_info_t two u32.
XENVER_OUT_SIZE: Mapping[int, int] = MappingProxyType({
    XenVer.extraversion: XEN_EXTRAVERSION_LEN,
    XenVer.compile_info: 144,
    XenVer.capabilities: XEN_CAPABILITIES_LEN,
    XenVer.changeset: 64,
    XenVer.platform_parameters: 4,
    XenVer.get_features: 8,
})

# SCHEDOP_poll: Xen refuses more than 128 ports (-EINVAL), in do_poll (xen/common/sched/core.c).
SCHED_POLL_MAX_PORTS = 128

# The part of cpu_user_regs a secondary vCPU starts from (VCPUOP_initialise): ebx .. esp.
CPU_USER_REGS_OFFSETS: Mapping[str, int] = MappingProxyType({
    name: L.CPU_USER_REGS.offset(name) for name in ("ebx", "ecx", "edx", "esi", "edi", "ebp", "eax", "eip", "eflags",
                                                    "esp")
})
VCPUGCTX_USER_REGS_SPAN = L.CPU_USER_REGS.offset("esp") + 4
VCPU_TIMER_STRUCT_SIZE: Mapping[int, int] = MappingProxyType({
    VcpuOp.set_periodic_timer: L.VCPU_SET_PERIODIC_TIMER.size,
    VcpuOp.set_singleshot_timer: L.VCPU_SET_SINGLESHOT_TIMER.size,
})

# mmuext_op commands whose arg2 points at a vCPU bitmap.
MMUEXT_MULTI_CMDS = frozenset({MmuextCmd.TLB_FLUSH_MULTI, MmuextCmd.INVLPG_MULTI})

# event_channel_op: the struct each command copies in, and the commands that copy it back with out fields filled.
EVTCHNOP_SIZE: Mapping[int, int] = MappingProxyType({int(op): lay.size for op, lay in L.EVTCHN_OP_LAYOUTS.items()})
EVTCHNOP_WITH_OUT = frozenset({EvtchnOp.bind_interdomain, EvtchnOp.bind_virq, EvtchnOp.bind_pirq, EvtchnOp.status,
                               EvtchnOp.alloc_unbound, EvtchnOp.bind_ipi})

CALLBACKOP_SIZE: Mapping[int, int] = MappingProxyType({
    CallbackOp.register: L.CALLBACK_REGISTER.size, CallbackOp.unregister: L.CALLBACK_UNREGISTER.size,
})

# grant_table_op: the struct each command this hypervisor handles copies in (and back: each has out fields).
GNTTABOP_SIZE: Mapping[int, int] = MappingProxyType({
    GnttabOp.setup_table: L.GNTTAB_SETUP_TABLE.size,
    GnttabOp.query_size: L.GNTTAB_QUERY_SIZE.size,
    GnttabOp.set_version: L.GNTTAB_SET_VERSION.size,
})

# XENMEM_machphys_mfn_list: at most this many 2 MiB extents make up the non-PAE m2p table.
MACHPHYS_MAX_EXTENTS = (MACH2PHYS_VIRT_END_NONPAE - MACH2PHYS_VIRT_START_NONPAE) >> MACHPHYS_EXTENT_SHIFT

# multicall_entry on x86-32: args[6], of which a 32-bit hypercall takes five (EBX..EDI).
MULTICALL_ENTRY_ARGS = 5


def uvmf_bitmap_ptr(flags: int) -> int | None:
    """The vCPU bitmap pointer of a MULTI flush, as Xen reads it: ``flags & ~3`` unless that is LOCAL or ALL.
    (A 4-aligned bitmap may have bit 2 set, so bit 2 alone does not mean ALL.)"""
    flags &= 0xFFFFFFFF
    if flags & UVMF_FLUSHTYPE_MASK not in (UVMF_TLB_FLUSH, UVMF_INVLPG):
        return None
    scope = flags & ~UVMF_FLUSHTYPE_MASK
    return None if scope in (UVMF_LOCAL, UVMF_ALL) else scope

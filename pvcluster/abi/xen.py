"""Xen x86-32 PV ABI numbers, as in Xen's public headers (xen/xen.h, sched.h, vcpu.h, event_channel.h, ...).

Enums name the members as Xen's macros do after their prefix (``EvtchnOp.send`` is ``EVTCHNOP_send``), so the
guest assembly gets Xen's own names (``pvcluster/abi/asm.py``). Cross-checked against /usr/include/xen where
present (tests/test_abi_headers.py).
"""

from __future__ import annotations

import enum

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
HYPERCALL_STUB_SHIFT = 5  # the hypercall page holds one 32-byte stub per hypercall number
HYPERCALL_STUB_SIZE = 1 << HYPERCALL_STUB_SHIFT
XEN_LEGACY_MAX_VCPUS = 32  # shared_info's vcpu_info array (arch-x86/xen.h)
MAX_LEGACY_VCPUS = XEN_LEGACY_MAX_VCPUS
MAX_GUEST_CMDLINE = 1024
XEN_VERSION_MAJOR = 4
XEN_VERSION_MINOR = 17
XEN_EXTRAVERSION = b".0-pvcluster"
XEN_EXTRAVERSION_LEN = 16  # xen_extraversion_t is char[16]
HYPERCALL_VECTOR = 0x82


class Hypercall(enum.IntEnum):
    set_trap_table = 0
    mmu_update = 1
    set_gdt = 2
    stack_switch = 3
    set_callbacks = 4
    fpu_taskswitch = 5
    sched_op_compat = 6
    platform_op = 7
    set_debugreg = 8
    get_debugreg = 9
    update_descriptor = 10
    memory_op = 12
    multicall = 13
    update_va_mapping = 14
    set_timer_op = 15
    event_channel_op_compat = 16
    xen_version = 17
    console_io = 18
    physdev_op_compat = 19
    grant_table_op = 20
    vm_assist = 21
    update_va_mapping_otherdomain = 22
    iret = 23
    vcpu_op = 24
    set_segment_base = 25
    mmuext_op = 26
    xsm_op = 27
    nmi_op = 28
    sched_op = 29
    callback_op = 30
    xenoprof_op = 31
    event_channel_op = 32
    physdev_op = 33
    hvm_op = 34
    sysctl = 35
    domctl = 36
    kexec_op = 37


NR_HYPERCALLS = 64  # the hypercall page holds 4096 / 32 = 128 stubs; Xen fills the first 64 slots


class ConsoleIO(enum.IntEnum):
    write = 0
    read = 1


class XenVer(enum.IntEnum):
    version = 0
    extraversion = 1
    compile_info = 2
    capabilities = 3
    changeset = 4
    platform_parameters = 5
    get_features = 6
    pagesize = 7


class SchedOp(enum.IntEnum):
    yield_ = 0
    block = 1
    shutdown = 2
    poll = 3
    remote_shutdown = 4


class ShutdownReason(enum.IntEnum):
    poweroff = 0
    reboot = 1
    suspend = 2
    crash = 3
    watchdog = 4
    soft_reset = 5


class VcpuOp(enum.IntEnum):
    initialise = 0
    up = 1
    down = 2
    is_up = 3
    get_runstate_info = 4
    set_periodic_timer = 6
    stop_periodic_timer = 7
    set_singleshot_timer = 8
    stop_singleshot_timer = 9
    register_vcpu_info = 10
    send_nmi = 11


class XenFeat(enum.IntEnum):
    writable_page_tables = 0
    writable_descriptor_tables = 1
    auto_translated_physmap = 2
    supervisor_mode_kernel = 3
    pae_pgdir_above_4gb = 4
    mmu_pt_update_preserve_ad = 5
    highmem_assist = 6
    gnttab_map_avail_bits = 7
    hvm_callback_vector = 8
    hvm_safe_pvclock = 9
    hvm_pirqs = 10
    dom0 = 11
    # 12 was XENFEAT_grant_map_identity: deprecated, and commented out in features.h
    memory_op_vnode_supported = 13
    ARM_SMCCC_supported = 14
    linux_rsdp_unrestricted = 15
    not_direct_mapped = 16
    direct_mapped = 17


# Submap 0 of XENVER_get_features as this hypervisor reports it: none of the optional features.
FEATURES_SUBMAP0 = 0


class XenElfNote(enum.IntEnum):
    INFO = 0
    ENTRY = 1
    HYPERCALL_PAGE = 2
    VIRT_BASE = 3
    PADDR_OFFSET = 4
    XEN_VERSION = 5
    GUEST_OS = 6
    GUEST_VERSION = 7
    LOADER = 8
    PAE_MODE = 9
    FEATURES = 10
    BSD_SYMTAB = 11
    HV_START_LOW = 12
    L1_MFN_VALID = 13
    SUSPEND_CANCEL = 14
    INIT_P2M = 15
    MOD_START_PFN = 16
    SUPPORTED_FEATURES = 17
    PHYS32_ENTRY = 18


DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1
DOMID_XEN = 0x7FF2
DOMID_INVALID = 0x7FF4


class EvtchnOp(enum.IntEnum):
    """EVTCHNOP_* (event_channel.h): the cmd of event_channel_op."""

    bind_interdomain = 0
    bind_virq = 1
    bind_pirq = 2
    close = 3
    send = 4
    status = 5
    alloc_unbound = 6
    bind_ipi = 7
    bind_vcpu = 8
    unmask = 9
    reset = 10
    init_control = 11
    expand_array = 12
    set_priority = 13


class EvtchnStat(enum.IntEnum):
    """EVTCHNSTAT_*: a port's state as EVTCHNOP_status reports it."""

    closed = 0
    unbound = 1
    interdomain = 2
    pirq = 3
    virq = 4
    ipi = 5


# The 2-level event-channel ABI of a 32-bit guest: evtchn_pending / evtchn_mask hold 32 words of 32 bits
# (EVTCHN_2L_NR_CHANNELS with a 4-byte xen_ulong_t).
NR_EVENT_CHANNELS = 1024


class Virq(enum.IntEnum):
    """VIRQ_* (xen.h). Per-vCPU ones are bound on a chosen vCPU; the others are global."""

    TIMER = 0
    DEBUG = 1
    CONSOLE = 2
    DOM_EXC = 3
    TBUF = 4
    DEBUGGER = 6
    XENOPROF = 7
    CON_RING = 8
    PCPU_STATE = 9
    MEM_EVENT = 10
    ARGO = 11
    ENOMEM = 12
    XENPMU = 13


NR_VIRQS = 24


class MmuCmd(enum.IntEnum):
    """MMU_* (xen.h): the low two bits of mmu_update's ``ptr``. MMU_PT_UPDATE_NO_TRANSLATE (3) is for translated
    guests only."""

    NORMAL_PT_UPDATE = 0
    MACHPHYS_UPDATE = 1
    PT_UPDATE_PRESERVE_AD = 2


class MmuextCmd(enum.IntEnum):
    """MMUEXT_* (xen.h): the cmd of one struct mmuext_op."""

    PIN_L1_TABLE = 0
    PIN_L2_TABLE = 1
    PIN_L3_TABLE = 2
    PIN_L4_TABLE = 3
    UNPIN_TABLE = 4
    NEW_BASEPTR = 5
    TLB_FLUSH_LOCAL = 6
    INVLPG_LOCAL = 7
    TLB_FLUSH_MULTI = 8
    INVLPG_MULTI = 9
    TLB_FLUSH_ALL = 10
    INVLPG_ALL = 11
    FLUSH_CACHE = 12
    SET_LDT = 13


# Xen's hypervisor-internal flag (not in the public headers) that marks a preempted mmu_update count for its
# continuation.
MMU_UPDATE_PREEMPTED = 0x80000000

# update_va_mapping flags (xen.h): the flush type in bits 0-1, the flush scope in bit 2 (else a vCPU bitmap pointer).
UVMF_NONE = 0
UVMF_TLB_FLUSH = 1
UVMF_INVLPG = 2
UVMF_FLUSHTYPE_MASK = 3
UVMF_MULTI = 0
UVMF_LOCAL = 0
UVMF_ALL = 4


class CallbackOp(enum.IntEnum):
    """CALLBACKOP_* (callback.h)."""

    register = 0
    unregister = 1


class CallbackType(enum.IntEnum):
    """CALLBACKTYPE_* (callback.h), as in interface version 0x00030207 and later."""

    event = 0
    failsafe = 1
    syscall = 2  # 64-bit guests only
    sysenter_deprecated = 3  # CALLBACKTYPE_sysenter for __XEN_INTERFACE_VERSION__ < 0x00030207
    nmi = 4
    sysenter = 5
    syscall32 = 7


CALLBACKF_MASK_EVENTS = 1  # CALLBACKF_mask_events


# x86_32 (non-PAE) start of the hypervisor's hole, as XENVER_platform_parameters reports it. The 4.17 headers define
# only the PAE value (0xF5800000) for x86_32, so this one is not cross-checked.
HYPERVISOR_VIRT_START_NONPAE = 0xFC000000
XENFEAT_NR_SUBMAPS = 1  # features.h
VCPU_SSHOTTMR_FUTURE = 1  # vcpu.h VCPU_SSHOTTMR_future: fail with -ETIME if the timeout is already past

# The feature names XEN_ELFNOTE_FEATURES (and __xen_guest's FEATURES) may carry: libelf's elf_xen_feature_names
# (xen/common/libelf/libelf-dominfo.c), a subset of features.h. A required ("!") name outside it fails the parse.
LIBELF_FEATURE_NAMES = (
    XenFeat.writable_page_tables,
    XenFeat.writable_descriptor_tables,
    XenFeat.auto_translated_physmap,
    XenFeat.supervisor_mode_kernel,
    XenFeat.pae_pgdir_above_4gb,
    XenFeat.hvm_callback_vector,
    XenFeat.dom0,
)

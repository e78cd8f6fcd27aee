"""Xen x86-32 PV ABI numbers, as in Xen's public headers (xen/xen.h, sched.h, vcpu.h, event_channel.h, ...).

Enums name the members as Xen's macros do after their prefix (``EvtchnOp.send`` is ``EVTCHNOP_send``), so the
guest assembly gets Xen's own names (``pvcluster/abi/asm.py``). Cross-checked against /usr/include/xen where
present (tests/test_abi_headers.py).
"""

from __future__ import annotations

import enum

from pvcluster.abi import elf

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


class KexecCmd(enum.IntEnum):
    """kexec_op's commands (xen/include/public/kexec.h). The v1 load/unload and get_range are obsolete since Xen 4.4
    (kexec_op answers them -EOPNOTSUPP here: hypervisor/hypercalls/kexec_op.py)."""

    kexec = 0
    kexec_load_v1 = 1
    kexec_unload_v1 = 2
    kexec_get_range = 3
    kexec_load = 4
    kexec_unload = 5
    kexec_status = 6


class KexecType(enum.IntEnum):
    """KEXEC_TYPE_DEFAULT (a reboot into the image) and KEXEC_TYPE_CRASH (kexec-on-panic: kdump's kernel)."""

    DEFAULT = 0
    CRASH = 1


# KEXEC_SEGMENT_MAX (xen/include/xen/kimage.h): xen/common/kexec.c's kexec_load refuses nr_segments >= this.
KEXEC_SEGMENT_MAX = 16
# The ELF machine number kexec_load's ``arch`` names for a 32-bit x86 image (ELF's EM_386, defined in abi/elf.py).
EM_386 = elf.EM_386


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
    """XENFEAT_* (features.h): bit numbers in submap 0 of XENVER_get_features."""

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
    # 12, XENFEAT_grant_map_identity, is deprecated: features.h keeps it only in a comment
    memory_op_vnode_supported = 13
    ARM_SMCCC_supported = 14
    linux_rsdp_unrestricted = 15
    not_direct_mapped = 16
    direct_mapped = 17


# Submap 0 of XENVER_get_features as this hypervisor reports it to a PV domU. Xen 4.17's do_xen_version sets, for a
# PV domU, memory_op_vnode_supported, mmu_pt_update_preserve_ad, highmem_assist, gnttab_map_avail_bits and (not
# translated) direct_mapped. Only direct_mapped is advertised: it states a fact (the p2m is the identity), while each
# of the others promises a service this hypervisor lacks (XENMEM_get_vnumainfo; A/D bits kept by
# MMU_PT_UPDATE_PRESERVE_AD, which is a plain write here; MMUEXT_CLEAR_PAGE/COPY_PAGE; GNTTABOP_map_grant_ref).
FEATURES_SUBMAP0 = 1 << XenFeat.direct_mapped


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
# The PAE one (arch-x86/xen-x86_32.h's __HYPERVISOR_VIRT_START_PAE): everything from here to 4 GiB is Xen's.
HYPERVISOR_VIRT_START_PAE = 0xF5800000
XENFEAT_NR_SUBMAPS = 1  # features.h
VCPU_SSHOTTMR_FUTURE = 1  # vcpu.h VCPU_SSHOTTMR_future: fail with -ETIME if the timeout is already past


# XENVER_capabilities: what Xen's arch_get_xen_caps writes for a non-PAE x86-32 build without HVM, the only guest
# type this hypervisor runs (4.17's x86-64 build would list "xen-3.0-x86_64 xen-3.0-x86_32p ", guests it cannot run).
XEN_CAPABILITIES = b"xen-3.0-x86_32 "
# ... and for a PAE guest, what a PAE x86-32 build's arch_get_xen_caps writes ("xen-3.0-x86_32p").
XEN_CAPABILITIES_PAE = b"xen-3.0-x86_32p "
XEN_CAPABILITIES_LEN = 1024  # xen_capabilities_info_t is char[1024]


class MemoryOp(enum.IntEnum):
    """XENMEM_* (memory.h): the cmd of memory_op (its low MEMOP_EXTENT_SHIFT bits)."""

    increase_reservation = 0
    decrease_reservation = 1
    maximum_ram_page = 2
    current_reservation = 3
    maximum_reservation = 4
    machphys_mfn_list = 5
    populate_physmap = 6
    maximum_gpfn = 14
    machphys_compat_mfn_list = 25


# Xen's, not in the public headers (xen/include/xen/hypercall.h): memory_op's cmd carries a continuation's start
# extent above its low 6 bits.
MEMOP_EXTENT_SHIFT = 6
MEMOP_CMD_MASK = (1 << MEMOP_EXTENT_SHIFT) - 1

# The non-PAE x86-32 machine-to-phys table's place (arch-x86/xen-x86_32.h); XENMEM_machphys_mfn_list reports the
# table in 2 MiB extents (memory.h), so it has at most (END - START) >> MACHPHYS_EXTENT_SHIFT of them.
MACH2PHYS_VIRT_START_NONPAE = 0xFC000000
MACH2PHYS_VIRT_END_NONPAE = 0xFC400000
# The PAE place (arch-x86/xen-x86_32.h: __MACH2PHYS_VIRT_START_PAE / __MACH2PHYS_VIRT_END_PAE).
MACH2PHYS_VIRT_START_PAE = 0xF5800000
MACH2PHYS_VIRT_END_PAE = 0xF6800000
MACHPHYS_EXTENT_SHIFT = 21


class GnttabOp(enum.IntEnum):
    """GNTTABOP_* (grant_table.h): the cmd of grant_table_op."""

    map_grant_ref = 0
    unmap_grant_ref = 1
    setup_table = 2
    dump_table = 3
    transfer = 4
    copy = 5
    query_size = 6
    unmap_and_replace = 7
    set_version = 8
    get_status_frames = 9
    get_version = 10
    swap_grant_ref = 11
    cache_flush = 12


class Gntst(enum.IntEnum):
    """GNTST_* (grant_table.h): the status a grant-table op leaves in its struct (the hypercall itself returns 0)."""

    okay = 0
    general_error = -1
    bad_domain = -2
    bad_gntref = -3
    bad_handle = -4
    bad_virt_addr = -5
    bad_dev_addr = -6
    no_device_space = -7
    permission_denied = -8
    bad_page = -9
    bad_copy_arg = -10
    address_too_big = -11
    eagain = -12
    no_space = -13


# Xen's, not in the public headers (common/grant_table.c): grant_table_op's cmd carries a continuation argument
# above its low 12 bits, which only GNTTABOP_cache_flush may use.
GNTTABOP_CMD_MASK = (1 << 12) - 1
# A new domain's grant table has this many frames (xen/include/xen/grant_table.h) and is version 1.
INITIAL_NR_GRANT_FRAMES = 1

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


# vm_assist (xen.h): VMASST_CMD_* and the VMASST_TYPE_* bit numbers, with Xen's own names (a type name starts with a
# digit, so these are module constants rather than enum members).
VMASST_CMD_enable = 0
VMASST_CMD_disable = 1
VMASST_TYPE_4gb_segments = 0
VMASST_TYPE_4gb_segments_notify = 1
VMASST_TYPE_writable_pagetables = 2
VMASST_TYPE_pae_extended_cr3 = 3
VMASST_TYPE_architectural_iopl = 4
VMASST_TYPE_runstate_update_flag = 5
VMASST_TYPE_m2p_strict = 32
# The assists Xen 4.17 offers a 32-bit PV guest: PV32_VM_ASSIST_MASK (xen/arch/x86/include/asm/domain.h), which
# do_vm_assist (xen/common/domain.c) checks a type against; m2p_strict is for 64-bit guests only. do_vm_assist tests
# the type against an unsigned long: BITS_PER_LONG is 64 in 4.17's (x86-64) hypervisor.
PV32_VM_ASSIST_MASK = (
    (1 << VMASST_TYPE_4gb_segments)
    | (1 << VMASST_TYPE_4gb_segments_notify)
    | (1 << VMASST_TYPE_writable_pagetables)
    | (1 << VMASST_TYPE_pae_extended_cr3)
    | (1 << VMASST_TYPE_architectural_iopl)
    | (1 << VMASST_TYPE_runstate_update_flag)
)
VM_ASSIST_BITS_PER_LONG = 64

# The guest's part of a vCPU's GDT (arch-x86/xen.h): entries past FIRST_RESERVED_GDT_ENTRY are Xen's own, so set_gdt
# takes at most that many entries, in frames of GDT_ENTRIES_PER_FRAME 8-byte descriptors.
FIRST_RESERVED_GDT_PAGE = 14
FIRST_RESERVED_GDT_BYTE = FIRST_RESERVED_GDT_PAGE * 4096
FIRST_RESERVED_GDT_ENTRY = FIRST_RESERVED_GDT_BYTE // 8
GDT_ENTRIES_PER_FRAME = PAGE_SIZE // 8
# Xen's flat ring-1 kernel code selector in its reserved GDT entries (arch-x86/xen-x86_32.h; 4.17's compat
# FLAT_COMPAT_KERNEL_CS has the same value): the one reserved selector a guest's call gate may target.
FLAT_RING1_CS = 0xE019
# The other reserved flat selectors of arch-x86/xen-x86_32.h: ring-1 data, ring-3 code and data (user mode), and the
# hypervisor's own ring-0 code and data (__HYPERVISOR_CS / __HYPERVISOR_DS), which only the hypervisor's entry paths
# use (domains/rings.py).
FLAT_RING1_DS = 0xE021
FLAT_RING3_CS = 0xE02B
FLAT_RING3_DS = 0xE033
HYPERVISOR_CS = 0xE008
HYPERVISOR_DS = 0xE010
# A 32-bit PV guest kernel runs in ring 1 (Xen's GUEST_KERNEL_RPL for a 32-bit domain): selectors and descriptor
# privilege levels below it are raised to it.
GUEST_KERNEL_RPL = 1


# struct trap_info (arch-x86/xen.h): one virtual IDT entry of set_trap_table, 8 bytes on x86-32. ``flags`` holds the
# gate's DPL in bits 0-1 (TI_GET_DPL) and "mask events on entry" in bit 2 (TI_GET_IF, TI_SET_IF).
TRAP_INFO_SIZE = 8
TI_DPL_MASK = 3
TI_MASK_EVENTS = 4
# Xen's hypervisor CPUID leaves (arch-x86/cpuid.h), found through the forced-emulation prefix by a PV guest.
XEN_CPUID_FIRST_LEAF = 0x40000000
XEN_CPUID_SIGNATURE_EBX = 0x566E6558  # "XenV"
XEN_CPUID_SIGNATURE_ECX = 0x65584D4D  # "MMXe"
XEN_CPUID_SIGNATURE_EDX = 0x4D4D566E  # "nVMM"
# The forced-emulation prefix (arch-x86/xen.h XEN_EMULATE_PREFIX): ud2a; .ascii "xen"; then the instruction.
XEN_EMULATE_PREFIX = b"\x0f\x0bxen"

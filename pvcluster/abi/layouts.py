"""Byte layouts of the Xen x86-32 structures the guest kernel, the builder, the event code and the hypercalls share.

Each ``Layout`` is one C struct as a 32-bit guest compiler lays it out (u64 members 4-byte aligned): its size and the
offsets of its members, keyed by the member designator C's ``offsetof`` takes (``"user_regs.eip"``), so
tests/test_abi_headers.py checks every one against Xen's headers. The guest assembly sees them asm-offsets style
(``pvcluster/abi/asm.py``): ``<PREFIX>_<member>`` (dots become ``_``: ``VCPUGCTX_user_regs_eip``), ``<PREFIX>_SIZE``
and, for a struct indexed by shifting, ``<PREFIX>_SHIFT``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from types import MappingProxyType

import attrs

from pvcluster.abi.xen import MAX_GUEST_CMDLINE, EvtchnOp


def _frozen(members: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(members))


@attrs.frozen
class Layout:
    """A struct's size and member offsets. ``c_type`` is its C type name (None for a structure of the simulator's
    own, which no header describes); ``prefix`` names it in the assembly include; ``shift`` asks for
    ``<PREFIX>_SHIFT`` = log2(size), for code that indexes an array of them by shifting."""

    c_type: str | None
    prefix: str
    size: int
    members: Mapping[str, int] = attrs.field(converter=_frozen)
    shift: bool = False

    def __attrs_post_init__(self) -> None:
        if self.shift and self.size & (self.size - 1):
            raise ValueError(f"{self.prefix}: size {self.size} is not a power of two, so it has no shift")
        for member, off in self.members.items():
            if not 0 <= off < self.size:
                raise ValueError(f"{self.prefix}.{member} at {off} is outside the {self.size}-byte struct")

    def offset(self, member: str) -> int:
        return self.members[member]

    def nested(self, member: str) -> dict[str, int]:
        """This struct's members as seen from a struct that embeds it at ``member`` (``"user_regs.eip"``)."""
        return {f"{member}.{name}": off for name, off in self.members.items()}


def _at(base: int, members: Mapping[str, int]) -> dict[str, int]:
    return {name: base + off for name, off in members.items()}


START_INFO = Layout("start_info_t", "START_INFO", 1112, {
    "magic": 0, "nr_pages": 32, "shared_info": 36, "flags": 40, "store_mfn": 44, "store_evtchn": 48,
    "console.domU.mfn": 52, "console.domU.evtchn": 56, "pt_base": 60, "nr_pt_frames": 64, "mfn_list": 68,
    "mod_start": 72, "mod_len": 76, "cmd_line": 80, "first_p2m_pfn": 1104, "nr_p2m_frames": 1108,
})
VCPU_TIME_INFO = Layout("struct vcpu_time_info", "VCPU_TIME_INFO", 32, {
    "version": 0, "tsc_timestamp": 8, "system_time": 16, "tsc_to_system_mul": 24, "tsc_shift": 28,
})
_VCPU_INFO_TIME = 32
VCPU_INFO = Layout("struct vcpu_info", "VCPU_INFO", 64, {
    "evtchn_upcall_pending": 0, "evtchn_upcall_mask": 1, "evtchn_pending_sel": 4, "arch": 8, "time": _VCPU_INFO_TIME,
    **_at(_VCPU_INFO_TIME, VCPU_TIME_INFO.nested("time")),
}, shift=True)
SHARED_INFO = Layout("shared_info_t", "SHARED_INFO", 2344, {
    "vcpu_info": 0, "evtchn_pending": 2048, "evtchn_mask": 2176, "wc_version": 2304, "wc_sec": 2308,
    "wc_nsec": 2312, "arch": 2316,
})
CPU_USER_REGS = Layout("struct cpu_user_regs", "CPU_USER_REGS", 68, {
    "ebx": 0, "ecx": 4, "edx": 8, "esi": 12, "edi": 16, "ebp": 20, "eax": 24, "error_code": 28, "entry_vector": 30,
    "eip": 32, "cs": 36, "saved_upcall_mask": 38, "eflags": 40, "esp": 44, "ss": 48, "es": 52, "ds": 56, "fs": 60,
    "gs": 64,
})
_USER_REGS = 516
VCPU_GUEST_CONTEXT = Layout("struct vcpu_guest_context", "VCPUGCTX", 2800, {
    "fpu_ctxt": 0, "flags": 512, "user_regs": _USER_REGS, **_at(_USER_REGS, CPU_USER_REGS.nested("user_regs")),
    "trap_ctxt": 584, "ldt_base": 2632, "ldt_ents": 2636, "gdt_frames": 2640, "gdt_ents": 2704, "kernel_ss": 2708,
    "kernel_sp": 2712, "ctrlreg": 2716, "debugreg": 2748, "event_callback_cs": 2780, "event_callback_eip": 2784,
    "failsafe_callback_cs": 2788, "failsafe_callback_eip": 2792, "vm_assist": 2796,
})
MULTICALL_ENTRY = Layout("struct multicall_entry", "MULTICALL_ENTRY", 32, {"op": 0, "result": 4, "args": 8},
                         shift=True)
MMU_UPDATE = Layout("struct mmu_update", "MMU_UPDATE", 16, {"ptr": 0, "val": 8}, shift=True)
MMUEXT_OP = Layout("struct mmuext_op", "MMUEXT_OP", 12, {"cmd": 0, "arg1": 4, "arg2": 8})
SCHED_SHUTDOWN = Layout("struct sched_shutdown", "SCHED_SHUTDOWN", 4, {"reason": 0})
SCHED_POLL = Layout("struct sched_poll", "SCHED_POLL", 16, {"ports": 0, "nr_ports": 4, "timeout": 8})
SCHED_REMOTE_SHUTDOWN = Layout("struct sched_remote_shutdown", "SCHED_REMOTE_SHUTDOWN", 8,
                               {"domain_id": 0, "reason": 4})
# xen_callback_t on x86-32 is { cs; eip; }: the entry point is at 8, not 4.
CALLBACK_REGISTER = Layout("struct callback_register", "CALLBACK_REGISTER", 12, {
    "type": 0, "flags": 2, "address": 4, "address.cs": 4, "address.eip": 8,
})
CALLBACK_UNREGISTER = Layout("struct callback_unregister", "CALLBACK_UNREGISTER", 4, {"type": 0})
EVTCHN_ALLOC_UNBOUND = Layout("struct evtchn_alloc_unbound", "EVTCHN_ALLOC_UNBOUND", 8,
                              {"dom": 0, "remote_dom": 2, "port": 4})
EVTCHN_BIND_INTERDOMAIN = Layout("struct evtchn_bind_interdomain", "EVTCHN_BIND_INTERDOMAIN", 12,
                                 {"remote_dom": 0, "remote_port": 4, "local_port": 8})
EVTCHN_BIND_VIRQ = Layout("struct evtchn_bind_virq", "EVTCHN_BIND_VIRQ", 12, {"virq": 0, "vcpu": 4, "port": 8})
EVTCHN_BIND_PIRQ = Layout("struct evtchn_bind_pirq", "EVTCHN_BIND_PIRQ", 12, {"pirq": 0, "flags": 4, "port": 8})
EVTCHN_BIND_IPI = Layout("struct evtchn_bind_ipi", "EVTCHN_BIND_IPI", 8, {"vcpu": 0, "port": 4})
EVTCHN_CLOSE = Layout("struct evtchn_close", "EVTCHN_CLOSE", 4, {"port": 0})
EVTCHN_SEND = Layout("struct evtchn_send", "EVTCHN_SEND", 4, {"port": 0})
EVTCHN_STATUS = Layout("struct evtchn_status", "EVTCHN_STATUS", 24, {
    "dom": 0, "port": 4, "status": 8, "vcpu": 12, "u": 16, "u.unbound.dom": 16, "u.interdomain.dom": 16,
    "u.interdomain.port": 20, "u.pirq": 16, "u.virq": 16,
})
EVTCHN_BIND_VCPU = Layout("struct evtchn_bind_vcpu", "EVTCHN_BIND_VCPU", 8, {"port": 0, "vcpu": 4})
EVTCHN_UNMASK = Layout("struct evtchn_unmask", "EVTCHN_UNMASK", 4, {"port": 0})
EVTCHN_RESET = Layout("struct evtchn_reset", "EVTCHN_RESET", 2, {"dom": 0})
VCPU_SET_PERIODIC_TIMER = Layout("struct vcpu_set_periodic_timer", "VCPU_SET_PERIODIC_TIMER", 8, {"period_ns": 0})
VCPU_SET_SINGLESHOT_TIMER = Layout("struct vcpu_set_singleshot_timer", "VCPU_SET_SINGLESHOT_TIMER", 12,
                                   {"timeout_abs_ns": 0, "flags": 8})

# grant_table_op's argument structs (a 32-bit guest's: xen_pfn_t and a guest handle are 4 bytes) and memory_op's.
GNTTAB_SETUP_TABLE = Layout("struct gnttab_setup_table", "GNTTAB_SETUP_TABLE", 16,
                            {"dom": 0, "nr_frames": 4, "status": 8, "frame_list": 12})
GNTTAB_QUERY_SIZE = Layout("struct gnttab_query_size", "GNTTAB_QUERY_SIZE", 16,
                           {"dom": 0, "nr_frames": 4, "max_nr_frames": 8, "status": 12})
GNTTAB_SET_VERSION = Layout("struct gnttab_set_version", "GNTTAB_SET_VERSION", 4, {"version": 0})
XEN_MEMORY_DOMAIN = Layout("struct xen_memory_domain", "XEN_MEMORY_DOMAIN", 2, {"domid": 0})
XEN_MACHPHYS_MFN_LIST = Layout("struct xen_machphys_mfn_list", "XEN_MACHPHYS_MFN_LIST", 12,
                               {"max_extents": 0, "extent_start": 4, "nr_extents": 8})

# xen/include/public/io/console.h: the console ring, in a page of the domain's (start_info.console.domU.mfn). Not in
# the kernel's include (the built-in kernel writes through console_io); the backend and the tests read it.
XENCONS_IN_SIZE = 1024
XENCONS_OUT_SIZE = 2048
XENCONS_INTERFACE = Layout("struct xencons_interface", "XENCONS", 3088, {
    "in": 0, "out": XENCONS_IN_SIZE, "in_cons": 3072, "in_prod": 3076, "out_cons": 3080, "out_prod": 3084,
})
assert XENCONS_INTERFACE.offset("in_cons") == XENCONS_IN_SIZE + XENCONS_OUT_SIZE

# The argument struct of each event_channel_op command this ABI offers (not the FIFO ABI's init_control,
# expand_array, set_priority).
EVTCHN_OP_LAYOUTS: Mapping[EvtchnOp, Layout] = MappingProxyType({
    EvtchnOp.bind_interdomain: EVTCHN_BIND_INTERDOMAIN, EvtchnOp.bind_virq: EVTCHN_BIND_VIRQ,
    EvtchnOp.bind_pirq: EVTCHN_BIND_PIRQ, EvtchnOp.close: EVTCHN_CLOSE, EvtchnOp.send: EVTCHN_SEND,
    EvtchnOp.status: EVTCHN_STATUS, EvtchnOp.alloc_unbound: EVTCHN_ALLOC_UNBOUND, EvtchnOp.bind_ipi: EVTCHN_BIND_IPI,
    EvtchnOp.bind_vcpu: EVTCHN_BIND_VCPU, EvtchnOp.unmask: EVTCHN_UNMASK, EvtchnOp.reset: EVTCHN_RESET,
})

# kexec_op's arguments (xen/include/public/kexec.h): the v2 load names an array of segments, each a guest buffer
# (``buf``, a handle widened to 64 bits) and where it goes in the new image (``dest_maddr``, ``dest_size``).
KEXEC_EXEC = Layout("xen_kexec_exec_t", "KEXEC_EXEC", 4, {"type": 0})
KEXEC_SEGMENT = Layout("xen_kexec_segment_t", "KEXEC_SEGMENT", 32,
                       {"buf": 0, "buf_size": 8, "dest_maddr": 16, "dest_size": 24}, shift=True)
KEXEC_LOAD = Layout("xen_kexec_load_t", "KEXEC_LOAD", 24,
                    {"type": 0, "arch": 2, "nr_segments": 4, "segments": 8, "entry_maddr": 16})
KEXEC_UNLOAD = Layout("xen_kexec_unload_t", "KEXEC_UNLOAD", 1, {"type": 0})
KEXEC_STATUS = Layout("xen_kexec_status_t", "KEXEC_STATUS", 1, {"type": 0})

# Every Xen structure above, in the order the assembly include lists them.
XEN_LAYOUTS: tuple[Layout, ...] = (
    START_INFO, SHARED_INFO, VCPU_INFO, VCPU_TIME_INFO, VCPU_GUEST_CONTEXT, CPU_USER_REGS, MULTICALL_ENTRY,
    MMU_UPDATE, MMUEXT_OP, SCHED_SHUTDOWN, SCHED_POLL, SCHED_REMOTE_SHUTDOWN, CALLBACK_REGISTER, CALLBACK_UNREGISTER,
    EVTCHN_ALLOC_UNBOUND, EVTCHN_BIND_INTERDOMAIN, EVTCHN_BIND_VIRQ, EVTCHN_BIND_PIRQ, EVTCHN_BIND_IPI, EVTCHN_CLOSE,
    EVTCHN_SEND, EVTCHN_STATUS, EVTCHN_BIND_VCPU, EVTCHN_UNMASK, EVTCHN_RESET, VCPU_SET_PERIODIC_TIMER,
    VCPU_SET_SINGLESHOT_TIMER, GNTTAB_SETUP_TABLE, GNTTAB_QUERY_SIZE, GNTTAB_SET_VERSION, XEN_MEMORY_DOMAIN,
    XEN_MACHPHYS_MFN_LIST, KEXEC_EXEC, KEXEC_SEGMENT, KEXEC_LOAD, KEXEC_UNLOAD, KEXEC_STATUS,
)

# The names the builder and the event code used before the layouts above existed.
START_INFO_MAGIC = b"xen-3.0-x86_32"
START_INFO_SIZE = START_INFO.size
START_INFO_CMDLINE = START_INFO.offset("cmd_line")
SHARED_INFO_SIZE = SHARED_INFO.size
VCPU_INFO_SIZE = VCPU_INFO.size
SHARED_INFO_EVTCHN_PENDING = SHARED_INFO.offset("evtchn_pending")
SHARED_INFO_EVTCHN_MASK = SHARED_INFO.offset("evtchn_mask")


@attrs.frozen
class StartInfo:
    nr_pages: int
    shared_info: int  # machine address of shared_info
    flags: int = 0
    store_mfn: int = 0
    store_evtchn: int = 0
    console_mfn: int = 0
    console_evtchn: int = 0
    pt_base: int = 0
    nr_pt_frames: int = 0
    mfn_list: int = 0
    mod_start: int = 0
    mod_len: int = 0
    cmd_line: bytes = b""
    first_p2m_pfn: int = 0
    nr_p2m_frames: int = 0

    def pack(self, magic: bytes = START_INFO_MAGIC) -> bytes:
        if len(self.cmd_line) >= MAX_GUEST_CMDLINE:
            raise ValueError(f"command line of {len(self.cmd_line)} bytes does not fit in start_info")
        head = struct.pack(
            "<32s12I",
            magic,
            self.nr_pages,
            self.shared_info,
            self.flags,
            self.store_mfn,
            self.store_evtchn,
            self.console_mfn,
            self.console_evtchn,
            self.pt_base,
            self.nr_pt_frames,
            self.mfn_list,
            self.mod_start,
            self.mod_len,
        )
        tail = struct.pack("<1024s2I", self.cmd_line, self.first_p2m_pfn, self.nr_p2m_frames)
        out = head + tail
        assert len(out) == START_INFO_SIZE
        return out

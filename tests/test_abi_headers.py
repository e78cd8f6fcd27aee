"""Cross-check the ABI numbers and layouts against Xen's public headers, where they are installed.

The headers come with Debian's libxen-dev; the project never needs them, so this test skips without them (or
without a gcc that can target -m32). The expressions are compiled for x86-32 and their values read back from the
object file's .rodata, so layouts are checked as a 32-bit guest compiler sees them.
"""

from __future__ import annotations

from pathlib import Path

from helpers import assert_matches_xen_headers

from pvcluster.abi import asm, layouts, structs, xen
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import (
    DOMID_INVALID,
    DOMID_IO,
    DOMID_SELF,
    DOMID_XEN,
    ConsoleIO,
    Hypercall,
    SchedOp,
    ShutdownReason,
    VcpuOp,
    XenElfNote,
    XenVer,
)

HEADERS = Path("/usr/include/xen/xen.h")
# The interface version the generated include is checked at: from 0x00030207 on CALLBACKTYPE_sysenter is the
# current 5 (before, callback.h makes it an alias of CALLBACKTYPE_sysenter_deprecated, 3), from 0x0003020a on
# GNTTABOP_set_version and its struct exist, and before 0x00040400 xen.h still defines NR_EVENT_CHANNELS.
INCLUDE_INTERFACE_VERSION = 0x0003020A


def _checks() -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = [(f"__HYPERVISOR_{h.name}", int(h)) for h in Hypercall]
    out += [(f"XEN_{e.name}", int(e)) for e in Errno]
    out += [(f"CONSOLEIO_{c.name}", int(c)) for c in ConsoleIO]
    out += [(f"XENVER_{c.name}", int(c)) for c in XenVer]
    out += [(f"SCHEDOP_{c.name.rstrip('_')}", int(c)) for c in SchedOp]
    out += [(f"SHUTDOWN_{c.name}", int(c)) for c in ShutdownReason]
    out += [(f"VCPUOP_{c.name}", int(c)) for c in VcpuOp]
    out += [(f"XEN_ELFNOTE_{c.name}", int(c)) for c in XenElfNote]
    out += [
        ("DOMID_SELF", DOMID_SELF),
        ("DOMID_IO", DOMID_IO),
        ("DOMID_XEN", DOMID_XEN),
        ("DOMID_INVALID", DOMID_INVALID),
    ]
    out += [
        ("sizeof(start_info_t)", layouts.START_INFO_SIZE),
        ("offsetof(start_info_t, cmd_line)", layouts.START_INFO_CMDLINE),
        ("offsetof(start_info_t, shared_info)", 36),
        ("offsetof(start_info_t, nr_pages)", 32),
        ("sizeof(shared_info_t)", layouts.SHARED_INFO_SIZE),
        ("offsetof(shared_info_t, evtchn_pending)", layouts.SHARED_INFO_EVTCHN_PENDING),
        ("offsetof(shared_info_t, evtchn_mask)", layouts.SHARED_INFO_EVTCHN_MASK),
        ("sizeof(struct vcpu_info)", layouts.VCPU_INFO_SIZE),
        ("sizeof(struct vcpu_guest_context)", layouts.VCPU_GUEST_CONTEXT.size),
        ("offsetof(struct vcpu_guest_context, user_regs)", layouts.VCPU_GUEST_CONTEXT.offset("user_regs")),
    ]
    out += [(f"offsetof(struct cpu_user_regs, {r})", off) for r, off in structs.CPU_USER_REGS_OFFSETS.items()]
    out += [(name, int(getattr(xen, name))) for name in dir(xen) if name.startswith(("VMASST_CMD_", "VMASST_TYPE_"))]
    out += [(name, int(getattr(xen, name))) for name in ("FIRST_RESERVED_GDT_PAGE", "FIRST_RESERVED_GDT_BYTE",
                                                         "FIRST_RESERVED_GDT_ENTRY", "FLAT_RING1_CS")]
    return out


def _generated_checks() -> list[tuple[str, int]]:
    """Every Xen number the guest kernel's generated include carries (pvcluster/abi/asm.py): enum members and
    constants by their Xen names, struct layouts by offsetof/sizeof. The simulator's own numbers have no C form."""
    return [(c.c_expr, c.value) for c in asm.constants() if c.c_expr is not None]


def test_abi_matches_xen_public_headers(tmp_path: Path) -> None:
    assert_matches_xen_headers(tmp_path, ("xen", "vcpu", "sched", "version", "elfnote", "errno"), _checks())


def test_generated_kernel_abi_matches_xen_public_headers(tmp_path: Path) -> None:
    checks = _generated_checks()
    # the include must reach every area the kernel and the hypercalls use, not just some of it
    names = {expr for expr, _ in checks}
    assert {"EVTCHNOP_send", "MMUEXT_TLB_FLUSH_MULTI", "UVMF_INVLPG", "VIRQ_TIMER", "CALLBACKOP_register",
            "EVTCHNSTAT_unbound", "NR_EVENT_CHANNELS", "XEN_ETIME"} <= names
    assert {"sizeof(struct multicall_entry)", "sizeof(struct sched_poll)", "sizeof(struct callback_register)",
            "offsetof(struct vcpu_guest_context, event_callback_eip)"} <= names
    assert {"GNTTABOP_set_version", "XENMEM_machphys_mfn_list", "GNTST_permission_denied",
            "sizeof(struct gnttab_setup_table)", "offsetof(struct xen_machphys_mfn_list, nr_extents)"} <= names
    headers = ("xen", "vcpu", "sched", "version", "elfnote", "errno", "event_channel", "callback", "features",
               "grant_table", "memory")
    kexec = [c for c in checks if "kexec" in c[0].lower()]
    assert {"KEXEC_CMD_kexec_load", "KEXEC_TYPE_CRASH", "sizeof(xen_kexec_load_t)"} <= {e for e, _ in kexec}
    rest = [c for c in checks if c not in kexec]
    assert_matches_xen_headers(tmp_path, headers, rest, interface_version=INCLUDE_INTERFACE_VERSION)
    # kexec_op's v2 load (KEXEC_CMD_kexec_load = 4, xen_kexec_load_t) exists from interface 0x00040400; before it
    # the header maps KEXEC_CMD_kexec_load to the v1 command 1
    (tmp_path / "kexec").mkdir()
    assert_matches_xen_headers(tmp_path / "kexec", ("xen", "kexec"), kexec, interface_version=0x00040400)

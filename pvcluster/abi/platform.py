"""The simulated machine's own numbers: what the built-in guest kernel and the Python side agree on beyond Xen's ABI.

None of these come from Xen, so no header can check them; they are defined here once for the domain process
(``domains/vcpu.py``, ``domains/builder.py``), the hypervisor's VMI ROM, the trace analysis and, through the
generated assembly include (``pvcluster/abi/asm.py``), the guest kernel.
"""

from __future__ import annotations

import enum

from pvcluster.abi.layouts import START_INFO_MAGIC, Layout
from pvcluster.abi.xen import HYPERCALL_STUB_SIZE, PAGE_SIZE

# Where the built-in kernel links itself and maps guest RAM linearly; the VMI ROM's set_pte relies on it too.
VIRT_BASE = 0xC0000000

# The flat GDT the domain process installs for every vCPU: ring-0 code and data over 4 GiB.
KERNEL_CS = 0x08
KERNEL_DS = 0x10

# The most a kexec image (the sum of its segments' dest_size) may hold, however much memory its domain has: the image
# crosses the bus in one trap's copy-in and again in the new domain's Build, both under the 4 MiB frame limit
# (pvcluster/bus/codec.py); a domain's own memory bounds it too (hypervisor/hypercalls/kexec_op.py).
KEXEC_MAX_IMAGE_BYTES = 1 << 20

# I/O ports. `in eax, dx` from CLOCK_PORT reads the vCPU's virtual time in ns (low 32 bits), priced as RDTSC (which
# returns the same time in TSC ticks: pvcluster/costs.py's TSC_HZ). A write to MARK_PORT puts a guest mark in the
# trace at the exact virtual time: value = code | detail << MARK_DETAIL_SHIFT (the detail is a round or a count).
CLOCK_PORT = 0x5C
MARK_PORT = 0x5D
MARK_DETAIL_SHIFT = 8
MARK_CODE_MASK = (1 << MARK_DETAIL_SHIFT) - 1


class Mark(enum.IntEnum):
    """Guest mark codes, which the trace analysis, the benches and the tests look for."""

    SHOOTDOWN_REQUEST = 1  # workload=shootdown: the initiator asks the others to flush (detail: round)
    SHOOTDOWN_DONE = 2  # flush_tlb_others returned (detail: round)
    SHOOTDOWN_STALE = 3  # a vCPU read a stale translation (detail: round)
    FLUSH_ACK = 4  # a shootdown target's flush handler acknowledged (after its flush; no detail)
    MCBENCH_START = 0x41  # workload=mcbench: before the first update (detail: batch size)
    MCBENCH_END = 0x42  # after the last update (detail: updates)
    MCBENCH_FAIL = 0x43  # a check failed (detail: failures)
    IPIWAKE_SENT = 0x61  # workload=ipiwake: vCPU 0 sends the IPI that wakes vCPU 1 (detail: wake-ups left)
    IPIWAKE_SEEN = 0x62  # vCPU 0 sees vCPU 1's handler counted it (detail: wake-ups left)
    PING_SENT = 0x51  # workload=pingclient: event sent (detail: round)
    PING_ECHO = 0x52  # its echo seen (detail: round)


# Hypercall numbers an extension (pvcluster/extensions.py) may register: one per stub of the hypercall page, which
# the hypervisor fills whole (hypervisor/hypercall_page.py); a built-in family's number only with `override = true`.
# Free for new interfaces: 50..55 (Xen's __HYPERVISOR_arch_2..7; x86 uses only arch_0, mca, and arch_1,
# paging_domctl_cont) and 56..127 (Xen fills no stub past 63).
EXTENSION_NR_LIMIT = PAGE_SIZE // HYPERCALL_STUB_SIZE
EXTENSION_FREE_FIRST = 50

# The domain the console and xenstore backends belong to: in Xen, dom0's xenconsoled and xenstored; here the
# hypervisor plays them, so a domain's console and store ports are bound to dom0, which is never a guest (domids
# start at 1).
BACKEND_DOMID = 0

# The local APIC: one trapped MMIO page. The ICR's high word holds the destination APIC ID in its top byte, as the
# ID register does.
APIC_BASE = 0xFEE00000
APIC_ID = 0x20
APIC_EOI = 0xB0
APIC_ICR_LOW = 0x300
APIC_ICR_HIGH = 0x310
APIC_ID_SHIFT = 24

# The built-in kernel's interrupt vectors for IPIs; the trace analysis counts IPIs on the two flush vectors.
IPI_VECTOR = 0xF0
FLUSH_VECTOR = 0xF1
CR3_VECTOR = 0xF2


class HypervisorType(enum.IntEnum):
    """The hypervisor type in %ebx under the "ebx" boot protocol; the built-in kernel numbers its paravirt backends
    the same way (and prints that number)."""

    xen = 0
    vmi = 1
    native = 2


class BootProtocol(enum.IntEnum):
    """The boot protocols (``boot`` in the spec), numbered as the built-in kernel prints which one it came in by."""

    ebx = 0
    ident = 1
    entry = 2


# The start-info block opens with the hypervisor's magic string (Xen's own for xen); its first 4 bytes are the 32-bit
# ident the "ident" protocol matches ("xen-", "vmi-", "nat-").
START_INFO_MAGICS: dict[HypervisorType, bytes] = {
    HypervisorType.xen: START_INFO_MAGIC,
    HypervisorType.vmi: b"vmi-3.0-x86_32",
    HypervisorType.native: b"nat-3.0-x86_32",
}
BOOT_IDENTS: dict[HypervisorType, int] = {t: int.from_bytes(m[:4], "little") for t, m in START_INFO_MAGICS.items()}

# The VMI ROM (hypervisor/vmi_rom.py): one page of op code the guest finds by the magic in its header, followed by
# a table of op entries (offsets from the ROM base, 0 for NULL) right after the header.
VMI_ROM_BASE = 0xFFFF0000
VMI_ROM_MAGIC = 0x31494D56  # b"VMI1" little-endian
VMI_INIT_SIGNATURE = 0x564D4931  # what the ROM's init op returns: b"1IMV" little-endian
VMI_ROM_HEADER = Layout(None, "VMI_ROM_HEADER", 16, {"magic": 0, "version": 4, "nr_ops": 8, "reserved": 12})

# Machine frames just after a domain's RAM (frame nr_pages + N; the p2m is the identity, and each domain's frames
# are its own: no other domain can name them). The hypervisor owns them: shared_info, the GDT its vCPUs run with,
# then the grant table's frames (GNTTABOP_setup_table returns their numbers; the domain maps them to write grant
# entries). MAX_GRANT_FRAMES is this hypervisor's gnttab_max_frames: Xen's default is 64 for a domU, but every
# frame is backed in the domain process whether used or not, and 4 frames (2048 v1 grants) serve a guest's few
# frontends; Linux asks for more only as it runs out of grant references.
SHARED_INFO_FRAME = 0
GDT_FRAME = 1
GRANT_FRAME_BASE = 2
MAX_GRANT_FRAMES = 4
HYPERVISOR_FRAMES = GRANT_FRAME_BASE + MAX_GRANT_FRAMES  # the fixed ones: the m2p's frames follow them

# Then the machine-to-phys table's frames (frame nr_pages + M2P_FRAME_BASE on): one u32 per machine frame of the
# domain's RAM holding its pfn (the identity here), in as many pages as that takes (a 4 MiB domain: 1024 entries,
# one page). Xen's table is global and its frames are dom_xen's, shared read-only with privileged domains only
# (subarch_init_memory: share_xen_page_with_privileged_guests(..., XENSHARE_readonly)); it maps the table into
# every PV guest's hypervisor hole at MACH2PHYS_VIRT_START itself. Here each domain's process holds the part
# covering its own frames, the builder maps it read-only there, and no guest PTE may name these frames.
M2P_FRAME_BASE = HYPERVISOR_FRAMES
M2P_ENTRY_BYTES = 4  # unsigned long on x86-32


def m2p_frames(nr_pages: int) -> int:
    """How many frames the m2p entries of ``nr_pages`` machine frames take."""
    return -(-nr_pages * M2P_ENTRY_BYTES // PAGE_SIZE)


# Then, after the m2p's frames, the frames of the hypervisor hole a ring-1 (``xen`` backend) guest runs under
# (domains/rings.py): the L1 that maps the m2p at MACH2PHYS_VIRT_START, the per-domain L1 that maps every vCPU's GDT
# window, the page of Xen's reserved GDT entries (the flat ring-0/1/3 selectors), a zero page for the GDT pages a
# guest has not supplied, and the trampoline page (the ``iretd`` the domain process changes rings through, and each
# vCPU's frame for it). All are the hypervisor's: no guest PTE may name them, and only the hole's L2 slots, which
# the guest cannot update, point at the two L1s.
class HoleFrame(enum.IntEnum):
    m2p_l1 = 0
    perdomain_l1 = 1
    xen_gdt = 2
    zero = 3
    trampoline = 4
    perdomain_l1_hi = 5  # PAE only: a PAE L1 maps 2 MiB, so the 4 MiB of GDT windows take a second one


HOLE_FRAMES = len(HoleFrame) - 1  # a non-PAE domain's hole frames
HOLE_FRAMES_PAE = len(HoleFrame)


def hole_frame(nr_pages: int, which: HoleFrame) -> int:
    """Machine frame of one of the hole's frames in a domain of ``nr_pages`` pages."""
    return nr_pages + M2P_FRAME_BASE + m2p_frames(nr_pages) + int(which)


# Where the hole maps them (non-PAE): the m2p from MACH2PHYS_VIRT_START (L2 slot 1008), and the per-domain area in
# the next 4 MiB (slot 1009), as Xen's x86_32 builds laid out their PERDOMAIN area: vCPU v's window starts at
# PERDOMAIN_VIRT_START + (v << GDT_VCPU_VA_SHIFT), 32 pages of which the first FIRST_RESERVED_GDT_PAGE (14) show the
# guest's GDT frames, page 14 Xen's reserved entries and page 15 the trampoline.
PERDOMAIN_VIRT_START = 0xFC400000
GDT_VCPU_VA_SHIFT = 17
TRAMPOLINE_WINDOW_PAGE = 15

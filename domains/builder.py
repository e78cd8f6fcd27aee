"""The domain builder: loads a guest ELF into guest RAM and lays out what Xen's builder would.

Layout (guest-physical, page granular):
``[kernel image][p2m][start_info][boot stack][L2][L1...][xenstore][console]`` and ``shared_info``, the GDT frame,
the grant frames and the m2p's frames after guest RAM. The p2m (``start_info.mfn_list``: one u32 mfn per pfn, the
identity here) sits where xc_dom_build_image puts the "phys2mach" segment: right after the kernel, before
alloc_magic_pages_pv's start_info (alloc_p2m_list_x86_32 in tools/libs/guest/xg_dom_x86.c; setup_pgtables_x86_32_pae
fills it). The rest keeps this builder's order, not xc_dom's (start_info, xenstore, console, page tables, boot
stack): the tests pin it, and no guest may rely on either. The xenstore and console rings are ordinary zeroed pages
of the guest's, as alloc_magic_pages_pv allocates them. The initial page tables (non-PAE, 4 KiB pages) map
``[virt_base, virt_base + RAM + 2 pages)`` (shared_info and the GDT frame; not the grant frames after them) linearly
onto physical 0 onwards, the local APIC page at 0xFEE00000 (uncached), when there is one, and the VMI ROM at
0xFFFF0000 (read-only), each at its own physical address. For the ``xen`` backend (ring 1) the page directory also
gets the hypervisor hole (``domains/rings.py``): the m2p table read-only at MACH2PHYS_VIRT_START (0xFC000000), where
Xen's hole has it in every non-PAE PV guest (entry mfn holds pfn; only the pages covering this domain's frames
exist), and the vCPUs' GDT windows, both through L1 tables that are the hypervisor's frames, not the guest's.
For the ``xen`` and ``vmi`` backends the page-table frames are read-only in the linear map (Xen's rule for PV
guests: they change their tables with mmu_update); a ``native`` kernel writes its tables itself. The guest enters
at its entry point with paging on (CR3 = the L2), ``%esi`` = virtual address of ``start_info`` and ``%esp`` at the
top of the boot stack.

A PAE guest (PAE_MODE "yes": guest type xen-3.0-x86_32p, ``xen`` backend only; elsewhere pae-unsupported) gets
3-level tables instead, as setup_pgtables_x86_32_pae (xg_dom_x86.c) makes them (``domains/paging_pae.py``): an L3
(CR3; start_info.pt_base its virtual address), an L2 per GiB used (always slot 3's, which holds the hole) and an L1
per 2 MiB, all counted in nr_pt_frames; start_info.magic "xen-3.0-x86_32p"; the vCPUs run with CR4.PAE; no local
APIC page (0xFEE00000 is inside the PAE hole, which starts at 0xF5800000 and holds the m2p there:
``domains/rings.py``).

shared_info starts as shared_info_x86_32 (xg_dom_x86.c) leaves it: zeroed, with every vcpu_info's
``evtchn_upcall_mask`` set (events start masked: a guest turns them on when it is ready for them), plus the
wallclock the hypervisor chose, written under ``wc_version`` as Xen's update_domain_wallclock_time does.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from domains import paging_pae, rings
from domains.elf_load import PAE_GUEST_TYPE, GuestImage, ImageError, parse_guest_image
from domains.kernel.build import BUILTIN_KERNELS, KernelBuildError, cached_kernel
from domains.memory import GuestRam, identity_table
from domains.paging import (
    PDE_FLAGS,
    PTE_RAM,
    PTE_RAM_RO,
    InitialTables,
    build_initial_tables,
    initial_mappings,
    l1_tables_needed,
)
from pvcluster.abi.layouts import MAX_GUEST_CMDLINE, SHARED_INFO, VCPU_INFO, StartInfo
from pvcluster.abi.platform import APIC_BASE, GRANT_FRAME_BASE, START_INFO_MAGICS, VMI_ROM_BASE, HypervisorType
from pvcluster.abi.xen import HYPERVISOR_VIRT_START_PAE, PAGE_SHIFT, PAGE_SIZE, XEN_LEGACY_MAX_VCPUS
from pvcluster.bus.messages import Build

BOOT_STACK_PAGES = 4
P2M_ENTRY_BYTES = 4  # x86-32's sizeof_pfn: the p2m holds one 32-bit mfn per pfn
SPECIAL_PAGES = 2  # after the page tables: the xenstore ring, then the console ring (xc_dom's order)
# %ebx under the "ebx" boot protocol: the hypervisor type the kernel switches its paravirt_ops on.
HYPERVISOR_TYPE: dict[str, int] = {t.name: int(t) for t in HypervisorType}
# The start-info block opens with the hypervisor's magic string; its first 4 bytes are the 32-bit ident the
# "ident" protocol matches ("xen-", "vmi-", "nat-").
START_INFO_MAGIC: dict[str, bytes] = {t.name: magic for t, magic in START_INFO_MAGICS.items()}
ENTRY_SYMBOL = {"xen": "pv_entry_xen", "vmi": "pv_entry_vmi", "native": "pv_entry_native"}
IDENT_ENTRY_SYMBOL = "pv_entry_ident"
# Linux's switch for turning off paravirt call-site patching; the spec's `patching = false` appends it.
NO_PATCHING_FLAG = "noreplace-paravirt"
# Backends whose kernel must see its own page tables read-only (it updates them through the hypervisor).
READ_ONLY_PAGE_TABLES = frozenset({"xen", "vmi"})
# Backends whose kernel runs in ring 1 under the hypervisor hole (domains/rings.py): Xen's PV kernels. The vmi
# backend keeps ring 0, with native (see README: "Privilege").
RING1_BACKENDS = frozenset({"xen"})
HOLE_SLOTS = (rings.M2P_SLOT, rings.PERDOMAIN_SLOT)


@attrs.frozen
class BootState:
    image: GuestImage
    entry: int
    start_info: int  # virtual address
    stack_top: int
    regs: dict[str, int]
    cr3: int = 0  # physical (= machine) address of the initial page directory (PAE: the L3)
    pt_base: int = 0  # its virtual address (start_info.pt_base)
    l2_mfn: int = 0  # the root table's frame: the L2 (PAE: the L3)
    l1_mfns: tuple[int, ...] = ()
    store_mfn: int = 0  # the xenstore ring's page
    console_mfn: int = 0  # the console ring's page (struct xencons_interface)
    mfn_list: int = 0  # virtual address of the p2m (start_info.mfn_list)
    pae: bool = False  # a PAE guest (xen-3.0-x86_32p): 3-level tables
    l2_mfns: tuple[int, ...] = ()  # PAE: the L2s under the L3, in slot order

    @property
    def nr_pt_frames(self) -> int:
        return 1 + len(self.l2_mfns) + len(self.l1_mfns)


def _page_up(x: int) -> int:
    return (x + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def load_kernel_bytes(kernel: str) -> bytes:
    if kernel in BUILTIN_KERNELS:
        try:
            return cached_kernel(kernel)  # the toolstack built it before the domains started: no keystone here
        except KernelBuildError as exc:
            raise ImageError("bad-builtin", str(exc)) from None
    try:
        return Path(kernel).read_bytes()
    except OSError as exc:
        raise ImageError("unreadable", f"cannot read kernel {kernel}: {exc.strerror or exc}") from None


def _entry_point(image: GuestImage, boot: str, backend: str) -> int:
    """Where the vCPU starts, by boot protocol: the ELF entry ("ebx"), the ident entry if the image names one
    ("ident"), or the image's entry point for this hypervisor ("entry")."""
    if boot == "entry":
        name = ENTRY_SYMBOL.get(backend, "")
        if name not in image.symbols:
            raise ImageError("no-entry-for-backend",
                             f"boot protocol 'entry' needs the symbol {name!r} in the image; it has none")
        return _inside(image, image.symbols[name], name)
    if boot == "ident":
        return _inside(image, image.symbols.get(IDENT_ENTRY_SYMBOL, image.entry), IDENT_ENTRY_SYMBOL)
    return image.entry


def _inside(image: GuestImage, addr: int, what: str) -> int:
    if not any(s.vaddr <= addr < s.vaddr + s.memsz for s in image.segments):
        raise ImageError("entry-outside-image", f"{what} at {addr:#x} is outside every loadable segment")
    return addr


def _special_pages(ram: GuestRam, first_pa: int) -> tuple[int, int]:
    """The xenstore and console pages from ``first_pa`` on, cleared (xc_clear_domain_page): their frame numbers."""
    store_pa, console_pa = first_pa, first_pa + PAGE_SIZE
    for pa in (store_pa, console_pa):
        ram.write_pa(pa, bytes(PAGE_SIZE))
    return store_pa >> PAGE_SHIFT, console_pa >> PAGE_SHIFT


def _version_bump(ram: GuestRam, pa: int) -> None:
    """One step of Xen's version protocol on the u32 at ``pa``: odd while an update is under way, even after."""
    version = int.from_bytes(ram.read_pa(pa, 4), "little")
    ram.write_pa(pa, ((version + 1) & 0xFFFFFFFF).to_bytes(4, "little"))


def init_shared_info(ram: GuestRam, wc_sec: int, wc_nsec: int) -> None:
    """shared_info at the start of day: zeroed, events masked on every vCPU, the wallclock filled in."""
    base = ram.shared_info_paddr
    ram.write_pa(base, bytes(SHARED_INFO.size))
    mask = SHARED_INFO.offset("vcpu_info") + VCPU_INFO.offset("evtchn_upcall_mask")
    for vid in range(XEN_LEGACY_MAX_VCPUS):
        ram.write_pa(base + mask + vid * VCPU_INFO.size, b"\x01")
    version = base + SHARED_INFO.offset("wc_version")
    _version_bump(ram, version)  # 1: an update is under way
    ram.write_pa(base + SHARED_INFO.offset("wc_sec"), (wc_sec & 0xFFFFFFFF).to_bytes(4, "little"))
    ram.write_pa(base + SHARED_INFO.offset("wc_nsec"), (wc_nsec & 0xFFFFFFFF).to_bytes(4, "little"))
    _version_bump(ram, version)  # 2: consistent


def _check_hole(maps: dict[int, tuple[int, int]], backend: str, pae: bool) -> None:
    """A ring-1 guest's initial mappings must stay out of the hypervisor hole: its two L2 slots (non-PAE), or
    everything from HYPERVISOR_VIRT_START_PAE on (PAE)."""
    if backend not in RING1_BACKENDS:
        return
    if pae and any(va >= HYPERVISOR_VIRT_START_PAE for va in maps):
        raise ValueError(f"it reaches into the PAE hypervisor hole at {HYPERVISOR_VIRT_START_PAE:#x}")
    if not pae and any(va >> 22 in HOLE_SLOTS for va in maps):
        raise ValueError("it reaches into the hypervisor hole at 0xFC000000")


def _build_tables(
    ram: GuestRam, at: int, maps: dict[int, tuple[int, int]], read_only: bool
) -> InitialTables | paging_pae.PaeTables:
    """The initial tables in the domain's mode: an L2 and its L1s, or (PAE, as setup_pgtables_x86_32_pae) an L3,
    its L2s (slot 3's always, for the hole) and their L1s."""
    if not ram.pae:
        return build_initial_tables(ram, at, maps, tables_read_only=read_only)
    return paging_pae.build_tables(ram, at, maps, pde_flags=PDE_FLAGS,
                                   read_only=(PTE_RAM, PTE_RAM_RO) if read_only else None,
                                   l3_slots=(rings.PAE_HOLE_L3_SLOT,))


def build_domain(req: Build) -> tuple[GuestRam, BootState]:
    """Build the guest's memory for ``req``; raise ImageError with a specific code when it cannot be done."""
    image = parse_guest_image(req.image or load_kernel_bytes(req.kernel), req.memory_bytes)
    pae = image.guest_type == PAE_GUEST_TYPE
    if pae and req.backend not in RING1_BACKENDS:
        raise ImageError("pae-unsupported", f"a {PAE_GUEST_TYPE} guest runs only on the xen backend, not "
                                            f"{req.backend}")
    ram = GuestRam(req.memory_bytes, image.virt_base, pae=pae)
    for seg in image.segments:
        ram.write_pa(seg.paddr, seg.data)
    if image.hypercall_page is not None:
        pa = image.hypercall_page - image.virt_base
        if pa < 0 or pa + PAGE_SIZE > req.memory_bytes:
            raise ImageError(
                "bad-metadata", f"hypercall page {image.hypercall_page:#x} is outside guest memory"
            )
        ram.write_pa(pa, req.hypercall_page)
    p2m_pa = _page_up(image.image_end - image.virt_base)
    si_pa = p2m_pa + _page_up(ram.nr_pages * P2M_ENTRY_BYTES)
    stack_top_pa = si_pa + PAGE_SIZE * (1 + BOOT_STACK_PAGES)
    rom_pages = tuple(VMI_ROM_BASE + off for off in range(0, len(req.rom or b""), PAGE_SIZE))
    try:
        # RAM, shared_info and the GDT frame: not the grant frames, which the guest maps once its table has grown
        # to them (grant_table_op setup_table), as on Xen
        mapped = req.memory_bytes + GRANT_FRAME_BASE * PAGE_SIZE
        # PAE: no local APIC page (0xFEE00000 is inside the PAE hole, all of which is Xen's)
        maps = initial_mappings(image.virt_base, mapped, mmio=() if pae else (APIC_BASE,), rom=rom_pages)
        _check_hole(maps, req.backend, pae)
    except ValueError as exc:
        raise ImageError("bad-metadata", f"VIRT_BASE {image.virt_base:#x}: {exc}") from None
    pt_pa = stack_top_pa
    nr_tables = paging_pae.tables_needed(maps, (rings.PAE_HOLE_L3_SLOT,)) if pae else 1 + l1_tables_needed(maps)
    pt_end_pa = pt_pa + PAGE_SIZE * nr_tables
    if pt_end_pa + SPECIAL_PAGES * PAGE_SIZE > req.memory_bytes:
        raise ImageError(
            "image-too-large",
            f"image, p2m, start_info, boot stack, page tables and the xenstore and console pages need "
            f"{pt_end_pa + SPECIAL_PAGES * PAGE_SIZE} bytes; the domain has {req.memory_bytes}",
        )
    ram.write_pa(p2m_pa, identity_table(ram.nr_pages))  # setup_pgtables_x86_32_pae's copy of dom->pv_p2m[]
    tables = _build_tables(ram, pt_pa, maps, req.backend in READ_ONLY_PAGE_TABLES)
    if req.backend in RING1_BACKENDS:
        rings.init_hole(ram)
        rings.install_hole(ram, tables.root)
    store_mfn, console_mfn = _special_pages(ram, pt_end_pa)
    init_shared_info(ram, req.wc_sec, req.wc_nsec)
    cmdline_text = req.cmdline if req.patching else f"{req.cmdline} {NO_PATCHING_FLAG}".strip()
    cmdline = cmdline_text.encode()
    if len(cmdline) >= MAX_GUEST_CMDLINE:
        raise ImageError("bad-cmdline", f"command line of {len(cmdline)} bytes does not fit in start_info")
    start_info = StartInfo(
        nr_pages=ram.nr_pages,
        shared_info=ram.shared_info_paddr,
        pt_base=image.virt_base + tables.root,
        nr_pt_frames=len(tables.frames),
        cmd_line=cmdline,
        store_mfn=store_mfn,
        store_evtchn=req.store_evtchn,
        console_mfn=console_mfn,
        console_evtchn=req.console_evtchn,
        mfn_list=image.virt_base + p2m_pa,
    )
    magic = PAE_GUEST_TYPE.encode() if pae else START_INFO_MAGIC.get(req.backend, START_INFO_MAGIC["native"])
    block = bytearray(start_info.pack(magic=magic))
    if req.start_info_ident is not None:  # the "ident" fault (hypervisor/faults.py): an ident no backend knows
        block[0:4] = (req.start_info_ident & 0xFFFFFFFF).to_bytes(4, "little")
    ram.write_pa(si_pa, bytes(block))
    si_va = image.virt_base + si_pa
    stack_top = image.virt_base + stack_top_pa
    regs = {
        "eip": _entry_point(image, req.boot, req.backend),
        "esi": si_va,
        "esp": stack_top,
        "ebx": HYPERVISOR_TYPE.get(req.backend, HypervisorType.native),
        "eflags": 0x2,
    }
    frames = tables.frames
    l2_count = len(tables.l2s) if isinstance(tables, paging_pae.PaeTables) else 0
    return ram, BootState(
        image=image,
        entry=image.entry,
        start_info=si_va,
        stack_top=stack_top,
        regs=regs,
        cr3=tables.root,
        pt_base=image.virt_base + tables.root,
        l2_mfn=frames[0],
        l2_mfns=frames[1 : 1 + l2_count],
        l1_mfns=frames[1 + l2_count :],
        pae=pae,
        store_mfn=store_mfn,
        console_mfn=console_mfn,
        mfn_list=image.virt_base + p2m_pa,
    )

"""The domain builder: loads a guest ELF into guest RAM and lays out what Xen's builder would.

Layout (guest-physical, page granular), as xc_dom_core does it for a PV x86-32 guest:
``[kernel image][start_info][boot stack]`` and ``shared_info`` in the frame after guest RAM. The guest enters at
its entry point with ``%esi`` = virtual address of ``start_info`` and ``%esp`` at the top of the boot stack.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from domains.elf_load import GuestImage, ImageError, parse_guest_image
from domains.kernel.build import BUILTIN_KERNELS, KernelBuildError, build_kernel
from domains.memory import GuestRam
from pvcluster.abi.layouts import StartInfo
from pvcluster.abi.xen import PAGE_SIZE
from pvcluster.bus.messages import Build

BOOT_STACK_PAGES = 4
# %ebx under the "ebx" boot protocol: the hypervisor type the kernel switches its paravirt_ops on.
HYPERVISOR_TYPE = {"xen": 0, "vmi": 1, "native": 2}


@attrs.frozen
class BootState:
    image: GuestImage
    entry: int
    start_info: int  # virtual address
    stack_top: int
    regs: dict[str, int]


def _page_up(x: int) -> int:
    return (x + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def load_kernel_bytes(kernel: str) -> bytes:
    if kernel in BUILTIN_KERNELS:
        try:
            return build_kernel(kernel)
        except KernelBuildError as exc:
            raise ImageError("bad-builtin", str(exc)) from None
    try:
        return Path(kernel).read_bytes()
    except OSError as exc:
        raise ImageError("unreadable", f"cannot read kernel {kernel}: {exc.strerror or exc}") from None


def build_domain(req: Build) -> tuple[GuestRam, BootState]:
    """Build the guest's memory for ``req``; raise ImageError with a specific code when it cannot be done."""
    image = parse_guest_image(load_kernel_bytes(req.kernel), req.memory_bytes)
    ram = GuestRam(req.memory_bytes, image.virt_base)
    for seg in image.segments:
        ram.write_pa(seg.paddr, seg.data)
    if image.hypercall_page is not None:
        pa = ram.va_to_pa(image.hypercall_page, PAGE_SIZE)
        if pa is None or pa + PAGE_SIZE > req.memory_bytes:
            raise ImageError(
                "bad-metadata", f"hypercall page {image.hypercall_page:#x} is outside guest memory"
            )
        ram.write_pa(pa, req.hypercall_page)
    si_pa = _page_up(image.image_end - image.virt_base)
    stack_top_pa = si_pa + PAGE_SIZE * (1 + BOOT_STACK_PAGES)
    if stack_top_pa > req.memory_bytes:
        raise ImageError(
            "image-too-large",
            f"image, start_info and boot stack need {stack_top_pa} bytes; the domain has {req.memory_bytes}",
        )
    cmdline = req.cmdline.encode()
    start_info = StartInfo(
        nr_pages=ram.nr_pages,
        shared_info=ram.shared_info_paddr,
        cmd_line=cmdline,
    )
    ram.write_pa(si_pa, start_info.pack())
    si_va = image.virt_base + si_pa
    stack_top = image.virt_base + stack_top_pa
    regs = {
        "eip": image.entry,
        "esi": si_va,
        "esp": stack_top,
        "ebx": HYPERVISOR_TYPE.get(req.backend, 2),
        "eflags": 0x2,
    }
    return ram, BootState(image=image, entry=image.entry, start_info=si_va, stack_top=stack_top, regs=regs)

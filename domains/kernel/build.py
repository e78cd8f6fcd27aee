"""Assemble the built-in guest kernel with keystone and pack it as an ELF32 Xen guest image.

keystone's library costs every process that loads it several MB of memory (and the assembly a tenth of a second),
so a domain process does neither: the image is cached on disk (``cached_kernel``), keyed by everything that goes
into its bytes, and the toolstack builds it before it starts the hypervisor. keystone is imported only inside
``assemble``, on a cache miss.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from domains import elf_pack
from domains.elf_pack import Segment, pack_elf32
from pvcluster.abi.asm import INCLUDE_NAME, include_text
from pvcluster.abi.platform import VIRT_BASE
from pvcluster.abi.pvops import PV_OPS
from pvcluster.abi.xen import HYPERCALL_STUB_SIZE, PAGE_SIZE, Hypercall, XenElfNote

if TYPE_CHECKING:
    import keystone

BUILTIN_KERNELS = ("pvkern",)
_STUBS = PAGE_SIZE // HYPERCALL_STUB_SIZE


class KernelBuildError(Exception):
    pass


def _hypercall_page_asm() -> str:
    """A page-aligned hypercall page with one label per 32-byte stub: `call hc_console_io`."""
    names = {int(h): h.name for h in Hypercall}
    lines = [f".align {PAGE_SIZE}", "hypercall_page:"]
    for nr in range(_STUBS):
        label = f"hc_{names[nr]}" if nr in names else f"hc_slot_{nr}"
        lines.append(f"{label}: .space {HYPERCALL_STUB_SIZE}")
    return "\n".join(lines) + "\n"


# The built-in kernel's source files, assembled as one unit in this order.
KERNEL_FILES = {
    "pvkern": ("pvkern.S", "pvops.S", "backend_xen.S", "backend_vmi.S", "smp.S", "shootdown.S", "opstest.S",
               "mmuhostile.S", "multicall_bench.S", "evtchn_work.S", "robust.S", "kexec_work.S")
}
# workload=kexec's second stage: a kernel of its own, packed as an ELF and carried inside pvkern (kexec_stage2)
KEXEC_STAGE2_FILE = "kexec2.S"
PVCALL_SITE_LEN = 6  # call dword ptr [disp32]
ENTRY_SYMBOLS = ("_start", "pv_entry_ident", "pv_entry_xen", "pv_entry_vmi", "pv_entry_native")

# The only `.equ` constants the kernel's .S files may define themselves: numbers no Python code shares (workload
# tunables, buffer sizes, test values) and names derived from generated ones. Every ABI number comes from the
# generated include instead (pvcluster/abi/asm.py); tests/test_abi_source.py fails on any other `.equ`.
KERNEL_PRIVATE_EQUS: dict[str, str] = {
    # pvkern.S
    "MAX_VCPUS": "size of the per-vCPU arrays: XEN_LEGACY_MAX_VCPUS, one per shared_info vcpu_info slot",
    "LINE_LEN": "size of a vCPU's console line buffer",
    "STACK_SIZE": "size of each vCPU's kernel stack",
    "HCBENCH_ROUNDS": "workload=hcbench tunable",
    "IRQBENCH_ROUNDS": "workload=irqbench tunable",
    "NOSUCH_HYPERCALL": "workload=hostile: a hypercall number Xen does not have, on purpose",
    # backend_xen.S
    "EFLAGS_IF": "x86 architecture (EFLAGS.IF), what save_fl/restore_fl traffic in; not a Xen or simulator number",
    "IPI_VECTOR_BIT": "derived: the bit xen_send_ipi notes IPI_VECTOR in",
    "FLUSH_VECTOR_BIT": "derived: the bit xen_send_ipi notes FLUSH_VECTOR in",
    "CR3_VECTOR_BIT": "derived: the bit xen_send_ipi notes CR3_VECTOR in",
    "XEN_MC_MAX": "entries in a vCPU's lazy-MMU multicall batch (the kernel's choice)",
    "XEN_MC_ARGS": "derived: offset of the argument buffers in a batch area",
    "XEN_MC_AREA": "derived: size of one vCPU's batch area",
    # evtchn_work.S
    "EVW_ROUNDS_DEFAULT": "ping-pong tunable",
    "EVW_TICKS_DEFAULT": "workload=timer tunable",
    "EVW_PERIOD_NS": "workload=timer tunable: the periodic timer it asks for",
    "EVW_POLL_TIMEOUT_NS": "ping-pong tunable: how long a SCHEDOP_poll waits",
    "EVW_BIND_TRIES": "ping-pong tunable: bind_interdomain retries",
    # mmuhostile.S
    "FOREIGN_FRAME": "workload=mmuhostile test value: a frame no small domain owns",
    # shootdown.S
    "SD_ROUNDS": "workload=shootdown tunable",
    # smp.S
    "IW_WAKES": "workload=ipiwake tunable",
    "IW_GAP_NS": "workload=ipiwake tunable: virtual ns between wake-ups, more than a window",
    "PTE_FLAGS": "x86 PTE bits (present, rw, accessed, dirty) the workloads map their test frames with",
    # multicall_bench.S
    "MC_MAX_BATCH": "workload=mcbench tunable: the largest batch (XEN_MC_MAX)",
    # opstest.S
    "TEST_TSS_SLOT": "workload=ops test value",
    "TEST_TSS_BASE": "workload=ops test value",
    "TEST_PTE_VALUE": "workload=ops test value",
    "TEST_LAZY_PTE_VALUE": "workload=ops test value",
    "OPBENCH_ROUNDS": "opbench tunable",
    "SPIN_LIMIT": "workload=ops: how long to wait for an IPI",
    # robust.S
    "RB_FLOOD_ENTRIES": "workload=mcflood: entries per multicall",
    "RB_FLOOD_OPS": "workload=mcflood: mmuext ops per entry",
    "RB_FLOOD_ROUNDS_DEFAULT": "workload=mcflood tunable",
    "RB_FUZZ_COUNT_DEFAULT": "workload=hcfuzz tunable",
    "RB_FUZZ_SCRATCH_DWORDS": "workload=hcfuzz: how much of the scratch buffer gets random bytes",
    "RB_FUZZ_SCRATCH_BYTES": "workload=hcfuzz: size of the scratch buffer",
    "RB_FUZZ_MAX_BATCH": "workload=hcfuzz: the most entries or ops a fuzzed multicall or mmuext_op names",
    "RB_FUZZ_NR_RANGE": "workload=hcfuzz: hypercall numbers are drawn below this",
    "RB_LCG_MUL": "workload=hcfuzz: the generator's multiplier",
    "RB_LCG_ADD": "workload=hcfuzz: the generator's increment",
    "RB_FAR_DEADLINE_WORD": "workload=fartimer: each 32-bit half of the deadline 2^64 - 1 it sets",
}


def kernel_source(name: str) -> str:
    if name not in BUILTIN_KERNELS:
        raise KernelBuildError(f"no built-in kernel named {name!r} (built-ins: {', '.join(BUILTIN_KERNELS)})")
    files = resources.files("domains.kernel")
    parts = [files.joinpath(f).read_text(encoding="utf-8") for f in KERNEL_FILES[name]]
    # The files share one symbol space: an .equ one defines serves those after it.
    return "\n".join(parts)


# A label definition at the start of a line (numeric local labels excluded).
_LABEL = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*):", re.MULTILINE)
_INCLUDE = re.compile(r'^\s*\.include\s+"([^"]*)"\s*(#.*)?$')


def expand_includes(source: str) -> str:
    """Put the generated ABI include (pvcluster/abi/asm.py) in place of its first ``.include``: keystone has no
    .include. The kernel's files are one unit, so a later ``.include`` of it (each file names what it uses) adds
    nothing, as a header guard would have it."""
    out: list[str] = []
    included = False
    for line in source.splitlines():
        m = _INCLUDE.match(line)
        if not m:
            out.append(line)
            continue
        if m.group(1) != INCLUDE_NAME:
            raise KernelBuildError(f".include of {m.group(1)!r}: the only include is the generated {INCLUDE_NAME!r}")
        if not included:
            out.append(include_text())
            included = True
    return "\n".join(out) + "\n"


_PVCALL = re.compile(r"^(\s*)PVCALL\s+(\w+)\s*(#.*)?$")


def expand_pvcalls(source: str) -> str:
    """Turn each ``PVCALL op`` into an indirect call through pv_ops and record it in the patch-site table."""
    out: list[str] = []
    sites: list[str] = []
    for line in source.splitlines():
        m = _PVCALL.match(line)
        if not m:
            out.append(line)
            continue
        op = m.group(2)
        if op not in PV_OPS:
            raise KernelBuildError(f"PVCALL of unknown op {op!r} (ops: {', '.join(PV_OPS)})")
        label = f"__pv_site_{len(sites)}"
        out.append(f"{label}:")
        out.append(f"{m.group(1)}call dword ptr [pv_ops + {4 * PV_OPS.index(op)}]")
        sites.append(f"    .long {PV_OPS.index(op)}, {label}, {PVCALL_SITE_LEN}")
    out += [".align 4", "pv_patch_sites:", *sites, "pv_patch_sites_end:"]
    return "\n".join(out) + "\n"


_EQU = re.compile(r"^\s*\.equ\s+([A-Za-z_]\w*)\s*,\s*(.+?)\s*(#.*)?$")
_PLAIN_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|\d+")
_WORD = re.compile(r"\w+")  # a whole word, so a constant is replaced only where it stands alone
# A string literal (possibly unterminated, as after a '#' split) or a comment: no substitution inside either.
_STRING_OR_COMMENT = re.compile(r'"(?:[^"\\]|\\.)*"?|#.*')


class _Constants:
    """The .equ constants defined so far, expanded textually into the lines that follow their definition."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def define(self, name: str, expr: str) -> None:
        if name in self.values:
            raise KernelBuildError(f".equ {name} is defined twice (ABI numbers come only from {INCLUDE_NAME})")
        value = self.expand(expr)
        # A plain number goes in bare (keystone cannot negate a parenthesised operand: `-(1)`), anything else in
        # parentheses so that it keeps its precedence.
        self.values[name] = value if _PLAIN_NUMBER.fullmatch(value) else f"({value})"

    def expand(self, line: str) -> str:
        if not self.values:
            return line
        out: list[str] = []
        pos = 0
        for m in _STRING_OR_COMMENT.finditer(line):
            out += [_WORD.sub(self._lookup, line[pos : m.start()]), m.group(0)]
            pos = m.end()
        out.append(_WORD.sub(self._lookup, line[pos:]))
        return "".join(out)

    def _lookup(self, word: re.Match[str]) -> str:
        return self.values.get(word.group(0), word.group(0))


def preprocess(source: str) -> str:
    """Expand ``.equ`` constants textually: keystone mis-resolves an .equ symbol added to a forward label
    inside a memory operand (``[buf + OFFSET]`` assembles as ``[OFFSET]``)."""
    consts = _Constants()
    out = []
    for line in source.splitlines():
        m = _EQU.match(line)
        if m:
            consts.define(m.group(1), m.group(2))
            continue
        out.append(consts.expand(line))
    return "\n".join(out) + "\n"


def _locate_error(ks: keystone.Ks, source: str, base: int, errno: int) -> str:
    """keystone reports no line numbers: find the shortest prefix of the source that fails the same way."""
    import keystone

    lines = source.splitlines()

    def fails(n: int) -> bool:
        try:
            ks.asm("\n".join(lines[:n]), base)
        except keystone.KsError as exc:
            return bool(exc.errno == errno)
        return False

    lo, hi = 0, len(lines)
    while lo < hi:
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid + 1
    return f" at statement {lines[lo - 1].strip()!r}" if 0 < lo <= len(lines) else ""


def assemble(source: str, base: int) -> tuple[bytes, dict[str, int]]:
    """Assemble ``source`` at ``base``; return the bytes and the addresses of the symbols the loader needs."""
    import keystone  # here only: a process that finds the image in the cache never loads keystone's library

    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)
    symbols: dict[str, int] = {}
    wanted = (*ENTRY_SYMBOLS, "hypercall_page", "pv_patch_sites", "pv_patch_sites_end")
    text = expand_pvcalls(preprocess(expand_includes(source))) + _hypercall_page_asm()
    # Every other label too, for debuggers (gdb on a dump or on the stub breaks at and prints kernel symbols). Their
    # table comes after the loader's and is cut off again, so the image's bytes do not depend on it.
    labels = sorted(n for n in set(_LABEL.findall(text)) - set(wanted) if not n.startswith("__pv_site"))
    # keystone cannot report symbol values, so each wanted label is located by assembling a probe that
    # stores the label's address as data at the end of the image.
    probe = text + "\n.align 4\n__symtab:\n" + "".join(f".long {w}\n" for w in (*wanted, *labels))
    try:
        encoding, _ = ks.asm(probe, base)
    except keystone.KsError as exc:
        where = _locate_error(ks, probe, base, exc.errno)
        raise KernelBuildError(f"keystone failed to assemble the kernel: {exc}{where}") from None
    code = bytes(encoding)
    code, extra = code[: len(code) - 4 * len(labels)], code[len(code) - 4 * len(labels) :]
    table = code[len(code) - 4 * len(wanted) :]
    for i, w in enumerate(wanted):
        symbols[w] = int.from_bytes(table[4 * i : 4 * i + 4], "little")
    for i, w in enumerate(labels):
        symbols.setdefault(w, int.from_bytes(extra[4 * i : 4 * i + 4], "little"))
    return code, symbols


def _stage2_source() -> str:
    return resources.files("domains.kernel").joinpath(KEXEC_STAGE2_FILE).read_text(encoding="utf-8")


def kexec_stage2() -> bytes:
    """The ELF image workload=kexec loads with kexec_op (kexec2.S): packed as any built-in kernel is, so the
    control plane's builder loads it as it loads pvkern."""
    return _pack(f"{KERNEL_NAME_STAGE2}", *assemble(_stage2_source(), VIRT_BASE))


KERNEL_NAME_STAGE2 = "pvkern-kexec2"


def _stage2_asm() -> str:
    """kexec_stage2's bytes as data at ``kexec_image`` .. ``kexec_image_end`` in pvkern's source."""
    image = kexec_stage2()
    rows = [".byte " + ",".join(str(b) for b in image[i : i + 32]) for i in range(0, len(image), 32)]
    return "\n".join(["", ".align 16", "kexec_image:", *rows, "kexec_image_end:", ""])


@functools.lru_cache(maxsize=8)
def build_kernel(name: str = "pvkern") -> bytes:
    """The ELF image of a built-in kernel, with Xen ELF notes and a ``__xen_guest`` section."""
    return _pack(name, *assemble(kernel_source(name) + _stage2_asm(), VIRT_BASE))


def _pack(name: str, code: bytes, symbols: dict[str, int]) -> bytes:
    hypercall_page = symbols["hypercall_page"]
    xen_guest = (
        f"GUEST_OS={name},XEN_VER=xen-3.0,VIRT_BASE=0x{VIRT_BASE:x},ELF_PADDR_OFFSET=0x{VIRT_BASE:x},"
        f"HYPERCALL_PAGE=0x{(hypercall_page - VIRT_BASE) // PAGE_SIZE:x},LOADER=generic"
    )
    notes: list[tuple[int, int | bytes | str]] = [
        (XenElfNote.GUEST_OS, name),
        (XenElfNote.GUEST_VERSION, "0.1"),
        (XenElfNote.XEN_VERSION, "xen-3.0"),
        (XenElfNote.LOADER, "generic"),
        (XenElfNote.VIRT_BASE, VIRT_BASE),
        (XenElfNote.PADDR_OFFSET, VIRT_BASE),
        (XenElfNote.ENTRY, symbols["_start"]),
        (XenElfNote.HYPERCALL_PAGE, hypercall_page),
    ]
    return pack_elf32(
        entry=symbols["_start"],
        segments=[Segment(vaddr=VIRT_BASE, data=code)],
        xen_guest=xen_guest,
        notes=notes,
        symbols=symbols,
    )


# -- the on-disk cache -------------------------------------------------------------------------------------------

# Where the cache lives when set; otherwise $XDG_CACHE_HOME/pvcluster/kernels or ~/.cache/pvcluster/kernels.
CACHE_DIR_ENV = "PVCLUSTER_CACHE_DIR"


def _keystone_version() -> str:
    """keystone's version from its package metadata: reading it does not load the library."""
    from importlib import metadata

    try:
        return metadata.version("keystone-engine")
    except metadata.PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=8)
def kernel_cache_key(name: str) -> str:
    """sha256 of everything the image's bytes depend on: the kernel's sources, the generated ABI include, the
    code that assembles and packs it (this file and elf_pack.py: a change to either changes the bytes), the
    Python numbers it uses directly, and keystone's version."""
    h = hashlib.sha256()
    parts = (
        kernel_source(name),
        _stage2_source(),
        include_text(),
        Path(__file__).read_text(encoding="utf-8"),
        Path(elf_pack.__file__).read_text(encoding="utf-8"),
        repr((VIRT_BASE, PAGE_SIZE, HYPERCALL_STUB_SIZE, PV_OPS, sorted((int(c), c.name) for c in Hypercall))),
        _keystone_version(),
    )
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def kernel_cache_dir() -> Path | None:
    """The directory of cached images, or None when there is no home to put it in."""
    if env := os.environ.get(CACHE_DIR_ENV):
        return Path(env)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "pvcluster" / "kernels"
    try:
        return Path.home() / ".cache" / "pvcluster" / "kernels"
    except RuntimeError:
        return None


def cached_kernel_path(name: str, cache_dir: Path | None = None) -> Path | None:
    where = cache_dir or kernel_cache_dir()
    return None if where is None else where / f"{name}-{kernel_cache_key(name)[:32]}.elf"


def cached_kernel(name: str = "pvkern", cache_dir: Path | None = None) -> bytes:
    """``build_kernel(name)``, from the on-disk cache when an image with the same key is there; otherwise built
    and stored. A cache that cannot be read or written only costs the build."""
    path = cached_kernel_path(name, cache_dir)
    if path is not None:
        try:
            return path.read_bytes()
        except OSError:
            pass
    image = build_kernel(name)
    if path is not None:
        _store(path, image)
    return image


def _store(path: Path, image: bytes) -> None:
    """Write ``image`` to ``path`` atomically: several domain processes may miss the cache at once, and each must
    read either nothing or a whole image (the images they write are identical, so the last rename wins)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(image)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # no cache this time: the caller has the image

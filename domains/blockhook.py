"""Virtual time per translated block, counted by a C block hook (``domains/native/blockhook.c``).

Why C: a vCPU's clock advances by each translated block's instruction count before the block runs, and a slice
stops at the first block boundary at or after its end. A Python UC_HOOK_BLOCK callback doing that was half of a
domain process's time and made guest loops 50-300x slower than bare Unicorn; the same work in a C callback keeps
most of Unicorn's speed.

What is cached, keyed on what: one table per domain (``CountTable``, shared by its vCPUs like ``InsnCounter``)
maps a block's (virtual address, size) plus its exact bytes to its instruction count. The C hook reads the bytes
the way the CPU fetched them (CR3, then a walk of the guest's page tables over the shared RAM, or the ROM page),
so code rewritten at the same address (pvops call-site patching, self-modifying code) is a different entry.
Comparing the stored bytes, rather than trusting a hash of them, makes a hit exact and costs less than hashing.
Two memos in C cut the per-block cost without touching a count: CR3 (reading it through Unicorn cost more than the
rest of the hook; it is re-read at each emu_start and after a block holding ``mov crN, r32``, the one instruction
that loads it inside emulation), and per vCPU the table entries it used last (checked against the bytes too).

When Python is called: only on a miss (the block was never seen with these bytes; ``InsnCounter`` counts it with
capstone, C stores the count) or when C cannot read the bytes (a page not mapped, or mapped to neither RAM nor the
ROM: Python reads them with ``Vcpu.fetch``, as the old hook did, and C stores nothing). Traps, port I/O and the
APIC keep their Python hooks; they are not per block.

RDTSC is C too (``pv_rdtsc_hook``, a UC_HOOK_INSN hook; Unicorn's Python binding offers no RDTSC hook, its library
does): left alone, Unicorn's RDTSC reads the host's counter, which would make a guest's clock wall time. It
returns the virtual clock at the instruction's own instant in ticks of ``TSC_HZ``: the clock before the block plus
the cost of the block's instructions before the RDTSC, which Python prices once per RDTSC site (``price``) and C
keeps in the block's entry. A UC_HOOK_INSN hook is called only from the RDTSC helper, so other code runs as fast.

Building: the shared object is compiled with gcc on first use (no Python.h, no libunicorn at link time: Unicorn's
entry points are passed in as function pointers from the library the Python binding loaded), named by a hash of
the C source and the command, into ``domains/native`` when writable or else the user's cache directory. It is
compiled to a temporary file and renamed into place, so domain processes starting at once do not see half a file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unicorn import UC_HOOK_BLOCK, UC_HOOK_INSN, Uc, UcError
from unicorn import x86_const as X

from pvcluster.costs import PS_PER_TSC_TICK

_SOURCE = Path(__file__).resolve().parent / "native" / "blockhook.c"
_CFLAGS = ("-O2", "-shared", "-fPIC", "-std=c11")
_U64_MAX = (1 << 64) - 1
RECENT = 256  # blockhook.c's RECENT

# Python's side of a miss: (address, size, pointer to the bytes or None) -> instruction count (>= 1; < 1 means
# the callback failed and emulation must stop).
COUNT_FUNC = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)
# Python's price of the instructions before an RDTSC: (block address, bytes before it, pointer to them or None) -> ps
# at ps_per_instr = 1000 (< 0: the callback failed).
PRICE_FUNC = COUNT_FUNC


class BuildError(RuntimeError):
    """The C block hook could not be compiled or loaded."""


class PvVcpu(ctypes.Structure):
    """Mirror of ``pv_vcpu`` in blockhook.c (checked against its ``sizeof`` at load)."""

    _fields_ = [
        ("reg_read", ctypes.c_void_p),
        ("emu_stop", ctypes.c_void_p),
        ("count", ctypes.c_void_p),
        ("counts", ctypes.c_void_p),
        ("ram", ctypes.c_void_p),
        ("ram_size", ctypes.c_uint64),
        ("rom", ctypes.c_void_p),
        ("rom_base", ctypes.c_uint64),
        ("rom_size", ctypes.c_uint64),
        ("cr3_regid", ctypes.c_int64),
        ("ps_per_instr", ctypes.c_uint64),
        ("clock_ps", ctypes.c_uint64),
        ("end_ps", ctypes.c_uint64),
        ("instructions", ctypes.c_uint64),
        ("misses", ctypes.c_uint64),
        ("unreadable", ctypes.c_uint64),
        ("failed", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr3_known", ctypes.c_uint64),
        ("block_addr", ctypes.c_uint64),
        ("block_ps", ctypes.c_uint64),
        ("reg_write", ctypes.c_void_p),
        ("price", ctypes.c_void_p),
        ("eip_regid", ctypes.c_int64),
        ("eax_regid", ctypes.c_int64),
        ("edx_regid", ctypes.c_int64),
        ("base_ps", ctypes.c_uint64),
        ("ps_per_tick", ctypes.c_uint64),
        ("block_entry", ctypes.c_void_p),
        ("tsc_reads", ctypes.c_uint64),
        ("tsc_priced", ctypes.c_uint64),
        ("recent", ctypes.c_void_p * RECENT),
        ("ecx_regid", ctypes.c_int64),
        ("pae", ctypes.c_uint64),
    ]


# -- building and loading ---------------------------------------------------------------------------------------


def _compiler() -> str:
    return os.environ.get("CC") or "gcc"


def _digest(cc: str) -> str:
    h = hashlib.sha256(_SOURCE.read_bytes())
    h.update(repr((cc, _CFLAGS, platform.machine())).encode())
    return h.hexdigest()[:16]


def _cache_dirs() -> list[Path]:
    """Where the shared object may live, in order: beside the source when writable, else the user's cache."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    cache = Path(xdg) if xdg else Path.home() / ".cache"
    return [_SOURCE.parent, cache / "pvcluster"]


def _compile(cc: str, target: Path) -> None:
    """Compile to a temporary file beside ``target``, then rename it into place (atomic on one filesystem)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    cmd = [cc, *_CFLAGS, "-o", tmp, str(_SOURCE)]
    try:
        if shutil.which(cc) is None:
            raise BuildError(f"cannot build the vCPU block hook: compiler {cc!r} not found on PATH "
                             f"(command: {' '.join(cmd)}); install gcc")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BuildError(f"cannot build the vCPU block hook: `{' '.join(cmd)}` exited with {proc.returncode}:\n"
                             f"{proc.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> Path:
    cc = _compiler()
    name = f"blockhook-{_digest(cc)}.so"
    for where in _cache_dirs():
        path = where / name
        if path.exists():
            return path
    errors: list[str] = []
    for where in _cache_dirs():
        if where.exists() and not os.access(where, os.W_OK):
            errors.append(f"{where}: not writable")
            continue
        try:
            _compile(cc, where / name)
        except OSError as exc:  # a directory we cannot create or write: try the next one
            errors.append(f"{where}: {exc}")
            continue
        return where / name
    raise BuildError("cannot build the vCPU block hook: no writable directory (" + "; ".join(errors) + ")")


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled hook, built on first use."""
    path = _build()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise BuildError(f"cannot load the vCPU block hook {path}: {exc}") from exc
    lib.pv_vcpu_size.restype = ctypes.c_uint64
    lib.pv_table_new.restype = ctypes.c_void_p
    lib.pv_table_free.argtypes = [ctypes.c_void_p]
    lib.pv_table_used.restype = ctypes.c_uint64
    lib.pv_table_used.argtypes = [ctypes.c_void_p]
    if lib.pv_vcpu_size() != ctypes.sizeof(PvVcpu):
        raise BuildError(f"{path}: pv_vcpu is {lib.pv_vcpu_size()} bytes, its Python mirror {ctypes.sizeof(PvVcpu)}")
    return lib


def unicorn_library() -> ctypes.CDLL:
    """The libunicorn the Python binding loaded (2.1.x: ``unicorn.unicorn_py3.unicorn.uclib``; the older binding
    called it ``unicorn.unicorn._uc``): the hook must call into the very same library as the Uc objects."""
    try:
        from unicorn.unicorn_py3 import unicorn as binding
    except ImportError:  # the pre-2.1.2 binding
        from unicorn import unicorn as binding  # type: ignore[no-redef]
    lib = getattr(binding, "uclib", None) or getattr(binding, "_uc", None)
    if not isinstance(lib, ctypes.CDLL):
        raise BuildError("cannot find the Unicorn binding's library (uclib / _uc)")
    return lib


def _address(func: Any) -> int:
    value = ctypes.cast(func, ctypes.c_void_p).value
    assert value is not None
    return value


def _hook_add(uc: Uc, kind: int, callback: int, state: PvVcpu, insn: int | None = None) -> int:
    """uc_hook_add of a C callback over every address (``insn``: the instruction a UC_HOOK_INSN hook is for)."""
    handle = ctypes.c_size_t()
    extra = () if insn is None else (ctypes.c_int(insn),)
    status = unicorn_library().uc_hook_add(uc._uch, ctypes.byref(handle), kind, ctypes.c_void_p(callback),
                                           ctypes.c_void_p(ctypes.addressof(state)), ctypes.c_uint64(1),
                                           ctypes.c_uint64(0), *extra)
    if status != 0:
        raise UcError(status)
    return handle.value


# -- the per-domain table and the per-vCPU hook ---------------------------------------------------------------


class CountTable:
    """The instruction counts of the blocks a domain's vCPUs ran, in C memory (freed with this object)."""

    def __init__(self) -> None:
        lib = library()
        ptr = lib.pv_table_new()
        if not ptr:
            raise MemoryError("pv_table_new")
        self.ptr: int = ptr
        weakref.finalize(self, lib.pv_table_free, ptr)

    def __len__(self) -> int:
        return int(library().pv_table_used(self.ptr))


# A block's count and an RDTSC's prefix price, as Python computes them: (address, size, bytes or None) -> int.
Counter = Callable[[int, int, bytes | None], int]


class BlockHook:
    """The C block hook and RDTSC hook on one Unicorn instance, with their state (``state``: clock, slice end,
    counts).

    ``count(addr, size, code)`` is Python's count of a block, ``price(addr, size, code)`` the cost of the instructions
    in ``size`` bytes at ``addr`` (those before an RDTSC); ``code`` is None when C could not read the bytes.
    """

    def __init__(self, uc: Uc, cr3_regid: int, ram_addr: int, ram_size: int, table: CountTable,
                 count: Counter, price: Counter, pae: bool = False) -> None:
        uclib = unicorn_library()
        self._count, self._price = count, price
        self.error: BaseException | None = None
        self._table = table  # the C state points into it: keep it alive as long as the hook
        self._callback = COUNT_FUNC(self._on_miss)  # ditto: C calls them
        self._price_callback = PRICE_FUNC(self._on_price)
        self.state = PvVcpu(
            reg_read=_address(uclib.uc_reg_read), emu_stop=_address(uclib.uc_emu_stop),
            count=_address(self._callback), counts=table.ptr, ram=ram_addr, ram_size=ram_size,
            cr3_regid=cr3_regid, end_ps=0, reg_write=_address(uclib.uc_reg_write),
            price=_address(self._price_callback), eip_regid=X.UC_X86_REG_EIP, eax_regid=X.UC_X86_REG_EAX,
            edx_regid=X.UC_X86_REG_EDX, ps_per_tick=PS_PER_TSC_TICK, ecx_regid=X.UC_X86_REG_ECX, pae=int(pae),
        )
        self.handle = _hook_add(uc, UC_HOOK_BLOCK, _address(library().pv_block_hook), self.state)
        self.rdtsc_handle = _hook_add(uc, UC_HOOK_INSN, _address(library().pv_rdtsc_hook), self.state,
                                      X.UC_X86_INS_RDTSC)
        self.rdtscp_handle = _hook_add(uc, UC_HOOK_INSN, _address(library().pv_rdtscp_hook), self.state,
                                       X.UC_X86_INS_RDTSCP)

    def map_rom(self, addr: int, base: int, size: int) -> None:
        """Code at physical ``[base, base+size)`` is read from host memory at ``addr`` (kept alive by the caller)."""
        self.state.rom, self.state.rom_base, self.state.rom_size = addr, base, size

    def start(self, end_ps: int) -> None:
        """Before emu_start: the slice end, relative to the clock's base (see ``Vcpu.clock_ps``) and clamped to what
        C holds; and CR3 to be read afresh (Python may have loaded it since the last emulation)."""
        self.state.end_ps = min(max(end_ps, 0), _U64_MAX)
        self.state.cr3_known = 0

    def _on_miss(self, addr: int, size: int, code: int | None) -> int:
        return self._call(self._count, addr, size, code)

    def _on_price(self, addr: int, size: int, code: int | None) -> int:
        return self._call(self._price, addr, size, code)

    def _call(self, fn: Counter, addr: int, size: int, code: int | None) -> int:
        try:
            return fn(addr, size, None if code is None else ctypes.string_at(code, size))
        except BaseException as exc:  # C stops emulation; Vcpu re-raises after emu_start, as Unicorn's binding would
            if self.error is None:
                self.error = exc
            return -1

    def set_base(self, base_ps: int) -> None:
        """Python's clock base (``Vcpu.clock_ps`` = base + the hook's clock), which RDTSC adds; saturated to what C
        holds (a clock past 2^64 ps, half a year of virtual time, reads as that)."""
        self.state.base_ps = min(max(base_ps, 0), _U64_MAX)

    def raise_error(self) -> None:
        """After emu_start: what made the hook stop emulation, raised (a Python hook's exception surfaces from
        emu_start the same way in Unicorn's binding)."""
        if not self.state.failed:
            return
        err, self.error = self.error, None
        self.state.failed = 0
        raise err if err is not None else MemoryError("the block hook could not store a block's count")

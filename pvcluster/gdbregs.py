"""The i386 register file as gdb's remote protocol numbers it, shared by the stub (hypervisor/gdbstub.py), the
domain process that reads and writes the registers (domains/debug.py) and the core writer's callers.

gdb's default i386 target description (no XML): 16 registers of 32 bits, little-endian, in this order; ``g``
sends them as hex, ``p N`` one by number. Registers past these (the x87 and SSE state) are answered as
unavailable.
"""

from __future__ import annotations

GDB_REGS: tuple[str, ...] = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "eip", "eflags", "cs", "ss",
                             "ds", "es", "fs", "gs")
SEGMENTS = frozenset({"cs", "ss", "ds", "es", "fs", "gs"})
EIP = GDB_REGS.index("eip")
ESP = GDB_REGS.index("esp")

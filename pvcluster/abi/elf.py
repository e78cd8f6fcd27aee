"""The ELF numbers the project reads and writes (the System V gABI's, ``elf.h``): defined once for the domain
builder's loader (domains/elf_load.py), the kernel packer (domains/elf_pack.py), the core writer
(pvcluster/coredump.py) and kexec_load's ``arch`` (pvcluster/abi/xen.py re-exports EM_386 for it)."""

from __future__ import annotations

EM_386 = 3
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_EXEC = 2
ET_CORE = 4
PT_LOAD = 1
PT_NOTE = 4
PF_X, PF_W, PF_R = 1, 2, 4

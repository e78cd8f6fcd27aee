"""What a translated block costs: each instruction's class (``pvcluster.costs.InsnClass``) priced by the spec.

Classified once per block the C hook has not seen (capstone, with operand detail), so the price is paid per miss
and the hook adds it per run. The rules follow the classes' definitions in ``pvcluster/costs.py``.
"""

from __future__ import annotations

import capstone
from capstone import x86 as cx

from pvcluster.costs import CLOCK_READ_PS, INSN_PS, InsnClass

_LOCK = 0xF0  # the lock prefix, as capstone reports it in insn.prefix[0]
_IO = frozenset({"in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd"})
_SERIALISING = frozenset({"cpuid", "lgdt", "lidt", "lldt", "ltr", "wbinvd", "invd", "wrmsr", "rdmsr", "clts",
                          "lmsw", "hlt"})
_BY_MNEMONIC = {
    "invlpg": InsnClass.INVLPG,
    "cli": InsnClass.CLI_STI,
    "sti": InsnClass.CLI_STI,
    "pushfd": InsnClass.PUSHF_POPF,
    "popfd": InsnClass.PUSHF_POPF,
    "pushf": InsnClass.PUSHF_POPF,
    "popf": InsnClass.PUSHF_POPF,
    "iretd": InsnClass.IRET,
    "iret": InsnClass.IRET,
    "ret": InsnClass.RET,
    "retf": InsnClass.RET,
    "pause": InsnClass.PAUSE,
}
# the stack is memory: these load or store through ESP without a memory operand capstone would show
_STACK = frozenset({"push", "pop", "pushal", "popal", "pushad", "popad", "leave", "enter"})
COUNT_BITS = 16  # domains/native/blockhook.c: the count in the low bits of what a miss returns, the cost above


def classify(insn: capstone.CsInsn) -> InsnClass:
    mnemonic = insn.mnemonic.split()[-1]  # "rep outsb" -> "outsb", "lock inc" -> "inc"
    if insn.prefix[0] == _LOCK or (mnemonic == "xchg" and any(op.type == cx.X86_OP_MEM for op in insn.operands)):
        return InsnClass.LOCKED
    if mnemonic in _IO:
        return InsnClass.IO
    known = _BY_MNEMONIC.get(mnemonic)
    if known is not None:
        return known
    if mnemonic in _SERIALISING:
        return InsnClass.SERIALISING
    ops = insn.operands
    if mnemonic == "mov" and ops and ops[0].type == cx.X86_OP_REG and insn.reg_name(ops[0].reg).startswith("cr"):
        return InsnClass.CR3_WRITE if insn.reg_name(ops[0].reg) == "cr3" else InsnClass.SERIALISING
    if mnemonic in ("call", "jmp", "ljmp", "lcall") and ops and ops[0].type != cx.X86_OP_IMM:
        return InsnClass.INDIRECT
    if mnemonic in _STACK or any(op.type == cx.X86_OP_MEM for op in ops):
        return InsnClass.MEM
    return InsnClass.ALU


class BlockPricer:
    """Instruction count and cost (ps at ps_per_instr = 1000) of a block's bytes; ``insn_ps`` in InsnClass order."""

    def __init__(self, insn_ps: tuple[int, ...] | None = None, refill_ps: int = 0) -> None:
        self.insn_ps = tuple(insn_ps) if insn_ps is not None else tuple(INSN_PS[c] for c in InsnClass)
        self.refill_ps = refill_ps  # a cr3 write's refill of the translations it dropped (TLB_REFILL_NS)
        self._md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
        self._md.detail = True

    def price(self, addr: int, code: bytes) -> tuple[int, int]:
        count, cost = 0, 0
        for insn in self._md.disasm(code, addr):
            count += 1
            if insn.mnemonic == "rdtsc":  # the cycle counter: priced as the clock port is (costs.CLOCK_READ_PS)
                cost += CLOCK_READ_PS
                continue
            cls = classify(insn)
            cost += self.insn_ps[cls] + (self.refill_ps if cls is InsnClass.CR3_WRITE else 0)
        if not count:  # undecodable bytes: the CPU faults on them, one instruction's worth
            return 1, self.insn_ps[InsnClass.ALU]
        return count, cost

    def packed(self, addr: int, code: bytes) -> int:
        """What the C hook stores: the count in the low COUNT_BITS bits, the cost above them."""
        count, cost = self.price(addr, code)
        return min(count, (1 << COUNT_BITS) - 1) | cost << COUNT_BITS

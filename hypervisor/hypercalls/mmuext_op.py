"""mmuext_op (26): pin and unpin page tables, switch the page-table base, flush TLBs, in a batch (Xen's
do_mmuext_op).

A pin takes a type reference on the frame as an L1 or L2 (or, for a PAE domain, an L3: MMUEXT_PIN_L3_TABLE),
validating it if it had no type (for an L2: its guest slots, and each L1 they name; for an L3 its 4 slots, the L2s
they name and their L1s; the frames come with the trap, ``copyin``); a frame mapped writable, or with another type,
is refused with -EINVAL. An unpin drops it. A new base takes an L2 reference (PAE: L3) on the new frame and drops
the vCPU's old one, as Xen's new_guest_cr3 (``hypervisor/ptops.py``).

Ops run in order and the batch stops at the first refusal; the done count reports how many succeeded either
way, as Xen's does; a long batch continues in a later window (``mm.run_batch``). Changes to a vCPU (a new CR3,
flushes) become effects the domain process carries out.
"""

from __future__ import annotations

from hypervisor import mm, ptops
from hypervisor.guestmem import GuestFault
from hypervisor.hypercalls.base import Call
from hypervisor.pagetypes import Refused
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import PAGE_SHIFT, Hypercall, MmuextCmd
from pvcluster.bus.effects import SetCr3

NR = Hypercall.mmuext_op


_C = MmuextCmd
_MULTI = (_C.TLB_FLUSH_MULTI, _C.INVLPG_MULTI)


def handle(call: Call) -> int:
    return mm.run_batch(call, "<3I", "op-unmapped", lambda c, i, f: _op(c, i, f[0], f[1], f[2]), what="op")


def _op(call: Call, i: int, cmd: int, arg1: int, arg2: int) -> int:
    dom = call.dom
    targets: list[int] = []
    if cmd in (_C.PIN_L1_TABLE, _C.PIN_L2_TABLE):
        if not mm.owned(dom, arg1):
            return mm.deny(call, Errno.EPERM, "pin-frame-not-owned", index=i, mfn=arg1)
        try:
            ptops.pin(dom.frames, arg1, cmd - _C.PIN_L1_TABLE + 1, call.mem.table)
        except Refused as r:  # a type conflict (mapped writable, a GDT frame) or an entry refused: -EINVAL
            return mm.refused(call, r, index=i)
    elif cmd == _C.PIN_L3_TABLE and dom.pae:
        if not mm.owned(dom, arg1):
            return mm.deny(call, Errno.EPERM, "pin-frame-not-owned", index=i, mfn=arg1)
        try:
            ptops.pin(dom.frames, arg1, 3, call.mem.table)
        except Refused as r:
            return mm.refused(call, r, index=i)
    elif cmd in (_C.PIN_L3_TABLE, _C.PIN_L4_TABLE):
        # non-PAE paging has two levels, PAE three: Xen's "Bad type" for a level the guest's mode lacks
        return mm.deny(call, Errno.EINVAL, "no-such-level", index=i, cmd=cmd)
    elif cmd == _C.UNPIN_TABLE:
        try:
            ptops.unpin(dom.frames, arg1)
        except Refused as r:
            return mm.refused(call, r, index=i)
    elif cmd == _C.NEW_BASEPTR:
        if not mm.owned(dom, arg1):
            return mm.deny(call, Errno.EPERM, "baseptr-not-owned", index=i, mfn=arg1)
        try:
            ptops.new_base(dom.frames, call.vcpu, arg1, call.mem.table)
        except Refused as r:  # new_guest_cr3: "Error while installing new baseptr", -EINVAL
            return mm.refused(call, r, index=i)
        targets = [call.vcpu]
        call.effects.append(SetCr3(vcpu=call.vcpu, cr3=arg1 << PAGE_SHIFT))
    elif cmd in (_C.TLB_FLUSH_LOCAL, _C.INVLPG_LOCAL, *_MULTI, _C.TLB_FLUSH_ALL, _C.INVLPG_ALL):
        if cmd in (_C.TLB_FLUSH_LOCAL, _C.INVLPG_LOCAL):
            targets = [call.vcpu]
        elif cmd in (_C.TLB_FLUSH_ALL, _C.INVLPG_ALL):
            targets = list(range(len(dom.vcpus)))
        else:
            try:
                mask = call.mem.u32(arg2)
            except GuestFault:
                return mm.deny(call, Errno.EFAULT, "vcpumask-unmapped", index=i, addr=arg2)
            named = mm.vcpus_in_mask(dom, mask)
            if named is None:
                return mm.deny(call, Errno.EINVAL, "vcpumask-bad-vcpu", index=i, mask=mask)
            targets = named
        invlpg = cmd in (_C.INVLPG_LOCAL, _C.INVLPG_MULTI, _C.INVLPG_ALL)
        call.effects.extend(mm.flush_effects(targets, arg1 if invlpg else None))
        call.work_ns += _flush_cost(call, targets, invlpg)
    elif cmd == _C.FLUSH_CACHE:
        # Xen: -EACCES unless cache_flush_permitted(), which needs I/O resources no domain is given here
        return mm.deny(call, Errno.EACCES, "cache-flush-not-permitted", index=i)
    else:
        # SET_LDT among them: descriptor tables are not modelled yet.
        return mm.deny(call, Errno.ENOSYS, "unsupported-cmd", index=i, cmd=cmd)
    call.trace("mmuext", cmd=_C(cmd).name, arg1=arg1, targets=targets)
    return 0


def _flush_cost(call: Call, targets: list[int], invlpg: bool) -> int:
    """What the flush takes, as Xen's flush_area_mask does it: the flush itself, and when a target runs on another
    pCPU an IPI to those pCPUs and the wait for their acknowledgements (a target without a pCPU is flushed before
    it next runs, at no cost to the caller)."""
    cost = call.hv.cost
    remote = any(t != call.vcpu and call.dom.vcpus[t].running for t in targets)
    return (cost.flush_page_ns if invlpg else cost.flush_local_ns) + (cost.flush_remote_ns if remote else 0)

"""The hypervisor's side of hypercall extensions (``pvcluster/extensions.py``): loading them, and running one.

The ``Hypervisor`` loads the spec's extensions once, when it is made (``load``), and keeps the result as its own
state (``Hypervisor.extensions``); ``hypercalls.dispatch`` looks there before the built-in families, so an
extension registered with ``override = true`` replaces a built-in number and nothing else can.

An extension's handler is untrusted code in the one process that must never fall over. ``run`` calls it, and:

* ``NotCopied`` passes through: the trap turns it into -EFAULT as for any family (the handler read a buffer its
  copy-in did not declare);
* ``GuestFault`` (a guest pointer that is not mapped, which a handler should have caught) becomes -EFAULT with an
  ``ext.guest_fault`` trace event: the guest's mistake, not the extension's;
* anything else becomes ``ExtensionFailed``, naming the extension, the hypercall and what it raised: the clock ends
  the calling domain with that as its crash cause (``Clock._apply_hypercalls``), and every other domain and the
  hypervisor go on;
* a result that is not an int in the 32-bit range is an ``ExtensionFailed`` too (the guest's EAX must be defined).

An extension's fault kind (``Registry.fault_kind``) is run by ``apply_fault`` when the ``FaultPlan`` reaches it:
what it raises (or an outcome that is not a string) becomes ``ExtensionFailed`` naming the extension and the kind,
and the plan crashes the targeted domain with that as its cause; the hypervisor goes on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.guestmem import GuestFault, NotCopied
from pvcluster.abi.errno import Errno
from pvcluster.extensions import Extensions, ExtensionSpec, Family, FaultKind, load

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    from hypervisor.core import Hypervisor
    from hypervisor.domain import Domain
    from hypervisor.hypercalls.base import Call
    from pvcluster.faults import FaultRequest


class ExtensionFailed(Exception):
    """An extension's handler raised (or returned nonsense): the calling domain ends with this message."""


def load_extensions(specs: Sequence[ExtensionSpec], builtin: Collection[int]) -> Extensions:
    """The spec's extensions, checked against the built-in numbers (``ExtensionError`` when one is refused)."""
    return load(specs, builtin) if specs else Extensions()


def run(family: Family, call: Call) -> int:
    """Call ``family``'s handler for ``call``, containing whatever it does wrong (module docstring)."""
    try:
        value = family.handle(call)
    except NotCopied:
        raise
    except GuestFault as exc:
        call.trace("ext.guest_fault", extension=family.extension, name=family.name, addr=exc.addr,
                   length=exc.length)
        return -Errno.EFAULT
    except Exception as exc:
        raise ExtensionFailed(f"extension {family.extension}: hypercall {family.name} ({family.nr}) raised "
                              f"{exc!r}") from exc
    if isinstance(value, bool) or not isinstance(value, int) or not -(1 << 31) <= value < (1 << 32):
        raise ExtensionFailed(f"extension {family.extension}: hypercall {family.name} ({family.nr}) returned "
                              f"{value!r}, not a 32-bit integer")
    return value


def apply_fault(kind: FaultKind, hv: Hypervisor, dom: Domain, req: FaultRequest, vt: int) -> str:
    """Run an extension's fault kind on ``dom`` (already checked live); its outcome, or ``ExtensionFailed``."""
    params = dict(req.params)
    if kind.kind.target == "vcpu":
        if req.vcpu is None or not 0 <= req.vcpu < len(dom.vcpus):
            return f"refused: domain {dom.name} has no vCPU {req.vcpu}"
        params["vcpu"] = req.vcpu
    try:
        outcome = kind.apply(hv, dom, params, vt)
    except Exception as exc:
        raise ExtensionFailed(f"extension {kind.extension}: fault kind {kind.name} raised {exc!r}") from exc
    if not isinstance(outcome, str):
        raise ExtensionFailed(f"extension {kind.extension}: fault kind {kind.name} returned {outcome!r}, not an "
                              f"outcome string")
    return outcome

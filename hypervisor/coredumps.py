"""The toolstack's core dumps of domains that end (xl's ``on_crash = "coredump-destroy" / "coredump-restart"``, and
kdump: a crash with a KEXEC_TYPE_CRASH image loaded).

The core decides in virtual time that a domain ended and is to be dumped (``Hypervisor.coredumps``); its memory is
in its process, so the dump must be taken before that process is ended. ``start`` runs the dump as a task of its
own (the bus reader, which carries out the core's requests, must stay free to read the process's answers), and
until it is done ``defer`` keeps back what would end the process: its Stop, or its termination. Then they go out
as the core asked. The file is ``<run_dir>/dumps/NAME-dDOMID.core`` (0600), an ELF core like `pvcluster dump`'s.
Nothing simulated waits for it: the domain has already left every window, and the rest of the cluster goes on.
A process that is gone (killed, or the cause of the crash) leaves no memory to dump: traced as
``domain.coredump_failed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hypervisor.dump import DumpError, dump_ending

if TYPE_CHECKING:
    from hypervisor.domain import Domain
    from hypervisor.shell import HypervisorProcess


class Coredumps:
    def __init__(self, hvp: HypervisorProcess) -> None:
        self.hvp = hvp
        # domid -> what was held back while its dump is written: a message to send (Stop), or None for "end it"
        self._pending: dict[int, list[Any]] = {}

    def start(self, dom: Domain) -> None:
        if dom.domid in self._pending or self.hvp.nursery is None:
            return
        self._pending[dom.domid] = []
        self.hvp.nursery.start_soon(self._dump, dom)

    def defer(self, dom: Domain, body: Any) -> bool:
        """Hold back ``body`` (a message for ``dom``'s process; None: ending the process) while ``dom`` is dumped."""
        held = self._pending.get(dom.domid)
        if held is None:
            return False
        held.append(body)
        return True

    async def _dump(self, dom: Domain) -> None:
        hvp = self.hvp
        path = hvp.run_dir / "dumps" / f"{dom.name}-d{dom.domid}.core"
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            rec = await dump_ending(hvp, dom, path)
            hvp.core.printk(f"d{dom.domid} ({dom.name}): memory dumped to {path} ({rec['size']} bytes)",
                            vt_ns=rec["vt_ns"], dom=dom.domid, hostdep=True)
            dom.trace.event("domain.coredump", vt_ns=rec["vt_ns"], file=str(path), size=rec["size"])
        except (DumpError, OSError) as exc:
            dom.trace.warning("domain.coredump_failed", vt_ns=hvp.core.clock.now_ns, file=str(path),
                              error=str(exc)[:400])
        finally:
            for body in self._pending.pop(dom.domid, []):
                if body is None:
                    hvp.core.to_kill.append(dom)
                else:
                    hvp.core.outbox.append((dom, body))
            await hvp.flush()

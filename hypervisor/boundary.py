"""Holding the cluster at a window boundary, and asking a domain process something while it is held.

The toolstack operations that need a domain's own state (dump, save, migrate, the gdb stub) read it from the
domain's process, which owns its memory and vCPUs. They do it between two windows: ``Boundary.held()`` lets the
open window finish (every participant reports, as always) and then keeps the clock from opening the next one, so
every domain process is idle, waiting for a window, with its state exactly as the virtual time of that boundary has
it. While held, ``ask`` sends a domain process one request and waits for its answer. Nothing about virtual time
changes: the clock does not move while the cluster is held, so an operation done while held leaves the trace of
the simulation as it would have been without it (only the operation's own trace events are added).

Holds nest (two operations at once each hold; the clock moves again when both are done). Wall-clock time only
bounds how long an answer is awaited from a process that is idle and was asked: a process that does not answer
within ``hypervisor.unresponsive_s`` is reported to the operation (``AskError``), not judged; liveness is the
window loop's business (hypervisor/shell.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

from pvcluster.bus.messages import Error

if TYPE_CHECKING:
    from hypervisor.domain import Domain
    from hypervisor.shell import HypervisorProcess

T = TypeVar("T")


class AskError(Exception):
    """A domain process did not give the answer asked for: it refused (Error), went away, or stayed silent."""


@attrs.define
class _Asked:
    kind: type
    done: trio.Event = attrs.Factory(trio.Event)
    answer: Any = None


class Boundary:
    def __init__(self, hvp: HypervisorProcess) -> None:
        self.hvp = hvp
        self.holds = 0
        self._reports_in = trio.Event()
        self._asked: dict[int, _Asked] = {}  # domid -> the answer awaited from its process
        self._at: list[int] = []  # virtual times holds wait for (save --at)

    @property
    def holding(self) -> bool:
        """Whether the clock must not open a new window (hypervisor/shell.py's ``advance`` asks): held, or a hold
        waits for this virtual time (``held(at_ns=...)``)."""
        return self.holds > 0 or (bool(self._at) and self.hvp.core.clock.now_ns >= min(self._at))

    def quiet(self) -> None:
        """The open window has every report it waits for (or none is open): a held cluster is now at a boundary."""
        self._reports_in.set()
        self._reports_in = trio.Event()

    @asynccontextmanager
    async def held(self, at_ns: int | None = None, wait_s: float = 0.0) -> AsyncIterator[int]:
        """Hold the cluster at the next window boundary for the body; yields the boundary's virtual time (the end
        of the last window opened). The window open when this is entered still runs to its end first. ``at_ns``:
        the first boundary at or after that virtual time instead, waited for ``wait_s`` wall seconds at most
        (TimeoutError: the clock did not get there, e.g. the cluster went idle)."""
        if at_ns is not None:
            await self._reach(at_ns, wait_s)
        self.hold()
        try:
            yield await self.settled()
        finally:
            self.release()

    def hold(self) -> None:
        """Take a hold without waiting, before any task could step the clock, from code that cannot await: the gdb
        stub, when a report says a vCPU stopped at a breakpoint, holds before the window loop can open the next
        window; a restored hypervisor holds from its start until every domain process has its state. Pair with
        ``release``."""
        self.holds += 1

    def release(self) -> None:
        self.holds -= 1
        self.hvp.poke()

    async def settled(self) -> int:
        """Under a hold: wait until the open window has every report (the cluster is at the boundary); its time."""
        while self.hvp.core.clock.awaiting:
            await self._reports_in.wait()
        return self.hvp.core.clock.now_ns

    async def _reach(self, at_ns: int, wait_s: float) -> None:
        """Let the clock run to the first boundary at or after ``at_ns`` (``advance`` stops there: ``holding``)."""
        clock = self.hvp.core.clock
        self._at.append(at_ns)
        try:
            self.hvp.poke()
            with trio.move_on_after(wait_s):
                while clock.awaiting or clock.now_ns < at_ns:
                    await self._reports_in.wait()
                return
            raise TimeoutError(f"virtual time {at_ns} ns not reached within {wait_s:g} s (now {clock.now_ns} ns)")
        finally:
            self._at.remove(at_ns)  # the caller's hold (taken before any checkpoint) keeps the clock here

    async def ask(self, dom: Domain, body: Any, kind: type[T], ending: bool = False) -> T:
        """Send ``body`` to ``dom``'s process and return its answer, a ``kind``. Only while held: the process is
        then between windows and answers at once. ``ending``: ``dom`` has just ended and takes part in no window
        (a core dump before its process is ended): its process answers once its last report is out, held or not."""
        if not self.holding and not ending:
            raise RuntimeError("ask() outside held(): the domain's process may be running a window")
        if not dom.identity or not (dom.alive or ending):
            raise AskError(f"domain {dom.domid} ({dom.name}) has no running process")
        if dom.domid in self._asked:
            raise AskError(f"domain {dom.domid} is already answering another request")
        asked = self._asked[dom.domid] = _Asked(kind)
        try:
            if not await self.hvp.send(dom.identity, body):
                raise AskError(f"domain {dom.domid}'s process cannot be reached")
            with trio.move_on_after(self.hvp.unresponsive_s):
                await asked.done.wait()
            if not asked.done.is_set():
                raise AskError(f"domain {dom.domid}'s process did not answer within {self.hvp.unresponsive_s:g} s")
        finally:
            del self._asked[dom.domid]
        if isinstance(asked.answer, Error):
            raise AskError(f"domain {dom.domid}'s process refused: {asked.answer.kind}: {asked.answer.detail}")
        if asked.answer is None:
            raise AskError(f"domain {dom.domid}'s process went away")
        return asked.answer  # type: ignore[no-any-return]

    def answer(self, dom: Domain, body: Any) -> bool:
        """A message from ``dom``'s process: True if it is the answer (or refusal) an ``ask`` waits for."""
        asked = self._asked.get(dom.domid)
        if asked is None or not isinstance(body, (asked.kind, Error)):
            return False
        asked.answer = body
        asked.done.set()
        return True

    def gone(self, dom: Domain) -> None:
        """``dom``'s process exited: whatever was asked of it will not be answered."""
        asked = self._asked.get(dom.domid)
        if asked is not None:
            asked.done.set()

"""The domain's end of the modelled hypervisor-domain link: it takes each message once.

The hypervisor numbers every message it sends a domain (``hypervisor/link.py``); a ``dup`` fault delivers one twice
with the same number, and this end drops the copy, as a sequence-numbered protocol's receiver does. Messages that
never crossed the link (number 0: sent before the link existed, or by tests) are always taken.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# How many sequence numbers below the highest seen are remembered: the link restores the sending order, so a
# duplicate arrives next to its original; this only bounds the memory a long run needs.
WINDOW = 4096


class LinkReceiver:
    def __init__(self) -> None:
        self._seen: set[int] = set()
        self._highest = 0

    def first(self, seq: int, what: str, trace: Callable[..., Any], vt_ns: int) -> bool:
        """Whether message ``seq`` is new; a copy is traced and dropped."""
        if seq == 0:
            return True
        if seq in self._seen or seq <= self._highest - WINDOW:
            trace("link.dup_dropped", vt_ns=vt_ns, seq=seq, what=what)
            return False
        self._seen.add(seq)
        if seq > self._highest:
            self._highest = seq
            if len(self._seen) > 2 * WINDOW:
                self._seen = {s for s in self._seen if s > seq - WINDOW}
        return True

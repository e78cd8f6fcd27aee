"""A domain's trace, with its context bound once and its detail events rate-limited in virtual time.

Every event the hypervisor traces about a domain goes through that domain's ``DomainTrace`` (``Domain.trace``),
which binds ``dom`` once. Two kinds:

* ``event``: the events analysis depends on (hypercalls, shootdowns, life cycle, run states): never dropped. Each
  costs the domain at least one window, so their rate is bounded by the clock itself.
* ``detail``: what handlers say about their work (denials, per-op records, console lines). A guest controls how
  many of these one hypercall produces (a 512-entry multicall of 512-op batches, a console write of 8000 lines), so
  they pass through a token bucket, as Xen rate-limits guest console output: ``burst`` tokens, refilled with
  ``rate`` per virtual microsecond of the domain's own hypercall times. What is suppressed is counted and reported
  in one ``trace.suppressed`` event when details flow again (and when the domain ends). The bucket depends only on
  the domain's own virtual times, so the trace stays deterministic.
"""

from __future__ import annotations

from typing import Any

UNLIMITED = 0


class DomainTrace:
    def __init__(self, log: Any, domid: int, burst: int, rate_per_us: int) -> None:
        self.log = log.bind(dom=domid)
        self.burst = burst
        self.rate = rate_per_us
        self._tokens = float(burst)
        self._last_vt = 0
        self.suppressed = 0
        self._reported = 0
        self._suppressed_since: int | None = None

    def event(self, name: str, /, *, vt_ns: int, **fields: Any) -> None:
        self.log.info(name, vt_ns=vt_ns, **fields)

    def warning(self, name: str, /, *, vt_ns: int, **fields: Any) -> None:
        self.log.warning(name, vt_ns=vt_ns, **fields)

    def detail(self, name: str, /, *, vt_ns: int, **fields: Any) -> None:
        if self.burst == UNLIMITED:
            self.log.info(name, vt_ns=vt_ns, **fields)
            return
        self._refill(vt_ns)
        if self._tokens < 1:
            if self._suppressed_since is None:
                self._suppressed_since = vt_ns
            self.suppressed += 1
            return
        self._tokens -= 1
        self.flush(vt_ns)
        self.log.info(name, vt_ns=vt_ns, **fields)

    def flush(self, vt_ns: int) -> None:
        """Report what was suppressed since details last flowed, if anything."""
        if self._suppressed_since is None:
            return
        count = self.suppressed - self._reported
        if count:
            self.log.info("trace.suppressed", vt_ns=vt_ns, count=count, since_vt_ns=self._suppressed_since,
                          total=self.suppressed)
        self._reported = self.suppressed
        self._suppressed_since = None

    def _refill(self, vt_ns: int) -> None:
        if vt_ns > self._last_vt:
            self._tokens = min(float(self.burst), self._tokens + (vt_ns - self._last_vt) * self.rate / 1000)
            self._last_vt = vt_ns

"""The modelled link between the hypervisor and one domain, in virtual time.

Every message the hypervisor sends a domain (a hypercall result, a delivery, an IPI) crosses this link: it gets the
link's next sequence number and an arrival time. Healthy, a message arrives when it was sent. Link faults change
that, and the protocol still delivers every message exactly once:

* ``drop``: the message is lost and retransmitted ``rto_ns`` later (the sender's retransmission timeout);
* ``partition``: every message sent while the link is cut is retransmitted until one retransmission falls after
  the link heals;
* ``delay``: a fixed extra time plus seeded jitter, while the fault lasts;
* ``reorder``: the message is overtaken by the ones sent after it (it arrives ``reorder_ns`` later);
* ``dup``: the message arrives twice with the same sequence number, and the receiver drops the copy.

The receiver restores the sending order, as a sequence-numbered protocol does: a message sent after one the link
held back is held until that one arrives. Every drop, retransmission, duplicate, delay and reordering is a trace
event of the domain. A healthy link changes nothing: its messages arrive when they are sent.
"""

from __future__ import annotations

import random

import attrs

from hypervisor.tracing import DomainTrace


@attrs.frozen
class Arrival:
    seq: int
    vt_ns: int
    copies: int  # 2: duplicated on the link (the receiver drops one by its sequence number)


@attrs.define
class Link:
    rto_ns: int
    reorder_ns: int
    rng: random.Random
    seq: int = 0
    hold_from: int = 0  # send time of the latest message the link held back
    hold_until: int = 0  # and when it arrives: later messages wait for it
    drops: int = 0
    dups: int = 0
    reorders: int = 0
    delay_ns: int = 0
    jitter_ns: int = 0
    delay_until: int = 0
    partition_from: int = 0
    partition_until: int = 0

    def send(self, vt: int, what: str, trace: DomainTrace) -> Arrival:
        """A message sent at ``vt``: when (and how often) it arrives."""
        self.seq += 1
        arrival = vt
        if self.partition_from <= vt < self.partition_until:
            tries = (self.partition_until - vt + self.rto_ns - 1) // self.rto_ns
            arrival = vt + tries * self.rto_ns
            trace.event("link.partitioned", vt_ns=vt, seq=self.seq, what=what, retransmissions=tries,
                        arrival_vt_ns=arrival)
        elif self.drops:
            self.drops -= 1
            arrival = vt + self.rto_ns
            trace.event("link.drop", vt_ns=vt, seq=self.seq, what=what, retransmit_vt_ns=arrival)
        if vt < self.delay_until:
            extra = self.delay_ns + (self.rng.randint(0, self.jitter_ns) if self.jitter_ns else 0)
            arrival += extra
            trace.event("link.delay", vt_ns=vt, seq=self.seq, what=what, delay_ns=extra)
        if self.reorders:
            self.reorders -= 1
            arrival += self.reorder_ns
            trace.event("link.reorder", vt_ns=vt, seq=self.seq, what=what, arrival_vt_ns=arrival)
        if self.hold_from <= vt < self.hold_until:
            arrival = max(arrival, self.hold_until)  # the receiver restores the sending order
        if arrival > vt:
            self.hold_from, self.hold_until = vt, max(self.hold_until, arrival)
        copies = 1
        if self.dups:
            self.dups -= 1
            copies = 2
            trace.event("link.dup", vt_ns=vt, seq=self.seq, what=what)
        return Arrival(self.seq, arrival, copies)

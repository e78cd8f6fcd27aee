"""Exceptions the simulation core raises. None of them may escape to the transport shell: each ends (at most) the
domain it concerns, traced with its cause."""

from __future__ import annotations


class IllegalTransition(Exception):
    """A state-machine move that is not allowed: a bug in the caller, never a guest error."""


class ReportError(Exception):
    """A message from a domain process that contradicts what the hypervisor knows (a report for the wrong window,
    a vCPU it does not have, a time out of range); the domain is answered with an Error or ended."""

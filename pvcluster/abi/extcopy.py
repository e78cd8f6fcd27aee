"""What an extension's hypercall copies in from guest memory, declared as data so it can cross the bus.

A built-in hypercall's copy-in is a Python function in ``pvcluster/abi/copyin.py`` that both processes import. An
extension (``pvcluster/extensions.py``) is a module named in the spec, and only the hypervisor imports it: the
domain process is the trusted "hardware" around untrusted guest code and may run on another host or in a container
image that has no copy of the user's module. So an extension declares its copy-in as a list of ``ArgSpan`` records
(which guest buffer each argument register names), the hypervisor sends them to every domain process in its
``Build`` message, and the domain process turns them into an ordinary copy-in descriptor here. The domain process
never runs extension code, and an extension's spans are capped like every built-in's (``copyin.MAX_SPAN``,
``MAX_TOTAL``).

The declaration covers the common shapes: a fixed-size struct at an argument (``size``), an array whose element
count is another argument (``count_arg``, ``size`` bytes each, at most ``max_count``), either of them only for one
sub-command (``when_arg0``), read-only or written back (``writable``). A buffer found by following a pointer read from
guest memory is not declarable: an extension that needs one reads the struct and is given only what it declared
(the handler's ``GuestView`` raises ``NotCopied`` for the rest, which the guest sees as -EFAULT).
"""

from __future__ import annotations

import attrs

from pvcluster.abi.copyin import MAX_SPAN, Descriptor, Reader, Span

NR_ARGS = 5  # argument registers: ebx, ecx, edx, esi, edi


@attrs.frozen
class ArgSpan:
    """One guest buffer named by argument register ``addr_arg`` (0 = ebx .. 4 = edi).

    ``count_arg`` < 0: ``size`` bytes. Otherwise the buffer holds ``arg[count_arg]`` elements of ``size`` bytes,
    capped at ``max_count`` (the handler sees the elements copied and must refuse a larger count itself).
    ``when_arg0`` >= 0: only when argument 0 (a sub-command) has that value.
    """

    addr_arg: int
    size: int
    count_arg: int = -1
    max_count: int = 1
    writable: bool = False
    when_arg0: int = -1

    def problems(self) -> list[str]:
        """What is wrong with this declaration (empty when it is usable)."""
        out = []
        if not 0 <= self.addr_arg < NR_ARGS:
            out.append(f"addr_arg must be 0..{NR_ARGS - 1}, got {self.addr_arg}")
        if not -1 <= self.count_arg < NR_ARGS or self.count_arg == self.addr_arg:
            out.append(f"count_arg must be -1 or another argument 0..{NR_ARGS - 1}, got {self.count_arg}")
        if not 0 < self.size <= MAX_SPAN:
            out.append(f"size must be 1..{MAX_SPAN}, got {self.size}")
        if not 1 <= self.max_count or self.max_count * self.size > MAX_SPAN:
            out.append(f"max_count * size must be at most {MAX_SPAN} bytes, got {self.max_count} * {self.size}")
        return out

    def span(self, args: list[int]) -> Span | None:
        """The span these argument registers name (None: not this sub-command, or no elements)."""
        if self.when_arg0 >= 0 and args[0] != self.when_arg0:
            return None
        count = 1 if self.count_arg < 0 else min(args[self.count_arg], self.max_count)
        if count <= 0:
            return None
        return Span(args[self.addr_arg], count * self.size, writable=self.writable)


@attrs.frozen
class ExtCopyIn:
    """An extension hypercall's number and its declared buffers, as the ``Build`` message carries them."""

    nr: int
    spans: list[ArgSpan] = attrs.Factory(list)


def descriptor(spans: list[ArgSpan] | tuple[ArgSpan, ...]) -> Descriptor:
    """The copy-in descriptor (``copyin.Descriptor``) of a declaration."""
    declared = tuple(spans)

    def describe(args: list[int], read: Reader) -> list[Span]:
        return [s for d in declared if (s := d.span(args)) is not None]

    return describe


def descriptors(decls: list[ExtCopyIn]) -> dict[int, Descriptor]:
    """Number -> descriptor for ``copyin.copy_in``'s ``extra``, from what a Build message carried. A malformed
    declaration (the hypervisor checked them, but a message is not trusted) names nothing."""
    return {d.nr: descriptor([s for s in d.spans if not s.problems()]) for d in decls}

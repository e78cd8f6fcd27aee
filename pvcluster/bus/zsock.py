"""ZeroMQ sockets driven from trio, without asyncio, at the cost of the system calls and little more.

ZeroMQ exposes one edge-triggered file descriptor per socket: it turns readable when the socket's state may have
changed, and any operation on the socket (a send, a receive, reading ``ZMQ_EVENTS``) may consume that edge. So:

* ``recv_multipart`` first tries a non-blocking receive and parks on ``trio.lowlevel.wait_readable(fd)`` only when
  it found nothing: a failed receive has just drained the edge, so the next frame to arrive raises a new one.
* A send made while the reader is parked may consume the edge, so it then reads ``ZMQ_EVENTS`` (``has_pending``,
  which any task may also call: it is the same read). When a frame is pending and the reader is parked, the reader
  is woken with ``trio.lowlevel.notify_closing(fd)``, trio's own way to wake a task parked on a descriptor: no
  cancel scope per wait, as waking by cancellation would need. The reader takes the ClosedResourceError it gets
  as "look again", unless the socket really is closed. A reader that is not parked receives before it parks, so a
  send made then (the bus reader's own replies) needs no check at all.
* ``safety_poll``, one long-lived task, does the same check every ``SAFETY_POLL_S``: a last resort that costs
  nothing per message.

A receive that finds a frame waiting still yields to the scheduler now and then (``_YIELD_EVERY`` receives in a
row), so a flood of frames cannot starve the other tasks. Sends never wait on the fast path: a send ZeroMQ refuses
for now (zmq.Again: the peer's queue is full, which is rare) takes a slow path that retries under a lock, and while
one does, later sends queue behind it so frames to a peer keep their order.
"""

from __future__ import annotations

import trio
import zmq

SAFETY_POLL_S = 0.05
_SEND_RETRY_S = 0.001
_YIELD_EVERY = 16


class TrioSocket:
    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self._fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._parked = False  # the reader waits on the descriptor
        self._closed = False
        self._unyielded = 0  # receives in a row that found a frame waiting
        self._send_lock = trio.Lock()  # the slow path only

    # -- waking the reader ---------------------------------------------------------------------------------------

    def has_pending(self) -> bool:
        """Whether a frame waits to be read; wakes a parked reader that must have missed its edge."""
        pending = bool(int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)  # type: ignore[arg-type]
        if pending and self._parked:
            self._parked = False  # one wake-up is enough
            trio.lowlevel.notify_closing(self._fd)
        return pending

    async def safety_poll(self) -> None:
        """Run for the socket's lifetime: catches a lost wake-up, should one ever happen."""
        while not self._closed:
            await trio.sleep(SAFETY_POLL_S)
            self.has_pending()

    async def _park(self) -> None:
        self._parked = True
        try:
            await trio.lowlevel.wait_readable(self._fd)
        except trio.ClosedResourceError:
            if self._closed:
                raise
            # has_pending woke us: a frame is waiting
        finally:
            self._parked = False

    # -- receiving -----------------------------------------------------------------------------------------------

    async def recv_multipart(self, copy: bool = True) -> list[bytes]:
        """The next message; ``copy=False`` gives ``zmq.Frame`` objects instead (their properties, such as the
        authenticated User-Id, are readable; typed as bytes for the common case)."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                await self._park()
                self._unyielded = 0  # parking was a yield
                continue
            self._unyielded += 1
            if self._unyielded >= _YIELD_EVERY:
                self._unyielded = 0
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
            return frames  # type: ignore[return-value]

    # -- sending -------------------------------------------------------------------------------------------------

    async def send_multipart(self, frames: list[bytes]) -> None:
        if not self._send_lock.locked():
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                pass
            else:
                self._after_send()
                return
        await self._send_slow(frames)

    def _after_send(self) -> None:
        # A reader that is not parked receives before it parks, so only a parked one can have lost its edge.
        if self._parked:
            self.has_pending()

    async def _send_slow(self, frames: list[bytes]) -> None:
        async with self._send_lock:
            while True:
                try:
                    self.sock.send_multipart(frames, zmq.NOBLOCK)
                    break
                except zmq.Again:
                    # Only one task may park on the descriptor (the reader), so a writer backs off and retries.
                    await trio.sleep(_SEND_RETRY_S)
                finally:
                    self._after_send()

    def close(self) -> None:
        self._closed = True
        if self._parked:
            trio.lowlevel.notify_closing(self._fd)
        self.sock.close(linger=0)

"""ZeroMQ sockets driven from trio, without asyncio.

ZeroMQ exposes one edge-triggered file descriptor per socket. Any send or receive may consume the edge that
announced incoming frames, so a task parked on the descriptor can miss them. Every operation therefore re-checks
``ZMQ_EVENTS`` afterwards and wakes the parked reader through a cancel scope; a short poll interval is kept as a
second line of defence, never as the primary wake-up.
"""

from __future__ import annotations

import trio
import zmq

_SAFETY_POLL_S = 0.05


class TrioSocket:
    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self._fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._reader_wake: trio.CancelScope | None = None
        self._send_lock = trio.Lock()

    def _poke(self) -> None:
        if self._reader_wake is not None and int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:  # type: ignore[arg-type]
            self._reader_wake.cancel()

    async def _park_reader(self) -> None:
        with trio.move_on_after(_SAFETY_POLL_S) as scope:
            self._reader_wake = scope
            try:
                await trio.lowlevel.wait_readable(self._fd)
            finally:
                self._reader_wake = None

    async def recv_multipart(self) -> list[bytes]:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                await self._park_reader()
                continue
            self._poke()
            await trio.lowlevel.checkpoint()
            return frames  # type: ignore[return-value]

    async def send_multipart(self, frames: list[bytes]) -> None:
        async with self._send_lock:
            while True:
                try:
                    self.sock.send_multipart(frames, zmq.NOBLOCK)
                    break
                except zmq.Again:
                    # Only one task may park on the descriptor (the reader); a full queue is rare
                    # enough that a writer simply backs off.
                    await trio.sleep(0.001)
            self._poke()

    def close(self) -> None:
        self.sock.close(linger=0)

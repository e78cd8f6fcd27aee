"""A small blocking client of the GDB remote serial protocol, for tests of the stub (hypervisor/gdbstub.py)."""

from __future__ import annotations

import socket

from pvcluster.gdbproto import INTERRUPT, PacketReader, frame, hex_le32, parse_le32
from pvcluster.gdbregs import GDB_REGS


class GdbClient:
    def __init__(self, host: str, port: int, timeout_s: float = 60.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.reader = PacketReader()
        self.pending: list[tuple[str, bytes]] = []

    def close(self) -> None:
        self.sock.close()

    def _event(self) -> tuple[str, bytes]:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the stub closed the connection")
            self.pending += self.reader.feed(data)
        return self.pending.pop(0)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(frame(payload))
        kind, data = self._event()
        assert (kind, data) == ("ack", b"+"), (kind, data)

    def recv(self) -> bytes:
        while True:
            kind, data = self._event()
            if kind == "packet":
                self.sock.sendall(b"+")
                return data
            assert kind == "ack", (kind, data)

    def cmd(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.recv()

    def interrupt(self) -> bytes:
        self.sock.sendall(INTERRUPT)
        return self.recv()

    # -- conveniences --------------------------------------------------------------------------------------

    def regs(self) -> dict[str, int]:
        return dict(zip(GDB_REGS, parse_le32(self.cmd(b"g")), strict=True))

    def set_regs(self, regs: dict[str, int]) -> bytes:
        return self.cmd(b"G" + hex_le32([regs[n] for n in GDB_REGS]))

    def read(self, addr: int, length: int) -> bytes | None:
        reply = self.cmd(b"m%x,%x" % (addr, length))
        return None if reply.startswith(b"E") else bytes.fromhex(reply.decode())

    def u32(self, addr: int) -> int:
        data = self.read(addr, 4)
        assert data is not None
        return int.from_bytes(data, "little")

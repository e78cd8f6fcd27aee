"""The GDB remote serial protocol's framing, pure: no sockets, no state beyond a byte buffer.

A packet is ``$payload#cc`` (``cc``: the payload's byte sum mod 256 as two hex digits); the receiver answers ``+``
(or ``-``: send again). ``}`` escapes a byte (XOR 0x20) in binary data, and a lone 0x03 outside a packet is an
interrupt (gdb's Ctrl-C). The stub (hypervisor/gdbstub.py) and the tests' client (tests/gdbclient.py) both use
this; everything a peer sends is untrusted: ``PacketReader`` bounds the bytes it buffers and drops what does not
parse (a bad checksum is answered ``-``).
"""

from __future__ import annotations

import attrs

INTERRUPT = b"\x03"
# The most a packet's payload may hold (the stub advertises PacketSize in qSupported; gdb stays under it).
MAX_PACKET = 0x4000


def checksum(payload: bytes) -> bytes:
    return b"%02x" % (sum(payload) & 0xFF)


def escape(payload: bytes) -> bytes:
    out = bytearray()
    for b in payload:
        if b in b"$#}*":
            out += bytes([0x7D, b ^ 0x20])
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        out.append(next(it, 0x20) ^ 0x20 if b == 0x7D else b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    body = escape(payload)
    return b"$" + body + b"#" + checksum(body)


@attrs.define
class PacketReader:
    """Bytes in, events out: ("packet", payload), ("interrupt", b""), ("ack", b"+"/b"-"), ("bad", reason)."""

    buf: bytearray = attrs.Factory(bytearray)

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        self.buf += data
        events: list[tuple[str, bytes]] = []
        while self.buf:
            first = self.buf[0]
            if first == 0x03:
                events.append(("interrupt", b""))
                del self.buf[0]
            elif first in b"+-":
                events.append(("ack", bytes([first])))
                del self.buf[0]
            elif first == ord("$"):
                end = self.buf.find(b"#")
                if end < 0:
                    if len(self.buf) > 2 * MAX_PACKET + 4:
                        self.buf.clear()
                        events.append(("bad", b"packet too long"))
                    break
                if len(self.buf) < end + 3:
                    break
                body, cc = bytes(self.buf[1:end]), bytes(self.buf[end + 1 : end + 3])
                del self.buf[: end + 3]
                if cc.lower() != checksum(body):
                    events.append(("bad", b"checksum"))
                elif len(body) > 2 * MAX_PACKET:
                    events.append(("bad", b"packet too long"))
                else:
                    events.append(("packet", unescape(body)))
            else:  # noise between packets
                del self.buf[0]
        return events


def hex_le32(values: list[int]) -> bytes:
    """Registers as ``g`` sends them: each 32-bit value little-endian, as hex."""
    return b"".join(int(v & 0xFFFFFFFF).to_bytes(4, "little").hex().encode() for v in values)


def parse_le32(data: bytes) -> list[int]:
    raw = bytes.fromhex(data.decode("ascii"))
    if len(raw) % 4:
        raise ValueError("not whole 32-bit registers")
    return [int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4)]


def parse_hex(text: bytes, limit: int = 1 << 32) -> int:
    """A hex number below ``limit`` (ValueError otherwise: every number a peer sends is checked)."""
    if not 0 < len(text) <= 16 or text.strip(b"0123456789abcdefABCDEF"):
        raise ValueError("bad number")
    value = int(text.decode("ascii"), 16)
    if not 0 <= value < limit:
        raise ValueError("number out of range")
    return value


def parse_thread(text: bytes) -> int:
    """A thread id as gdb writes it: hex, or -1 (all); 0 (any) is returned as 0."""
    if text == b"-1":
        return -1
    return parse_hex(text, 1 << 31)

"""The GDB remote protocol's framing (pvcluster/gdbproto.py), in process."""

from __future__ import annotations

import pytest

from pvcluster.gdbproto import MAX_PACKET, PacketReader, checksum, frame, hex_le32, parse_hex, parse_le32, unescape


def test_frame_and_checksum() -> None:
    assert frame(b"OK") == b"$OK#9a"
    assert checksum(b"") == b"00"
    assert frame(b"a#b") == b"$a}\x03b#" + checksum(b"a}\x03b")
    assert unescape(b"a}\x03b}]") == b"a#b}"


def test_reader_splits_packets_acks_and_interrupts_across_reads() -> None:
    reader = PacketReader()
    stream = b"+$qSupported#37\x03-" + frame(b"m1000,4")
    events = []
    for i in range(len(stream)):  # one byte at a time: a packet may arrive in pieces
        events += reader.feed(stream[i : i + 1])
    assert events == [("ack", b"+"), ("packet", b"qSupported"), ("interrupt", b""), ("ack", b"-"),
                      ("packet", b"m1000,4")]


def test_reader_refuses_bad_checksums_noise_and_endless_packets() -> None:
    reader = PacketReader()
    assert reader.feed(b"$g#00") == [("bad", b"checksum")]
    assert reader.feed(b"garbage" + frame(b"?")) == [("packet", b"?")]
    assert reader.feed(b"$" + b"x" * (3 * MAX_PACKET)) == [("bad", b"packet too long")]
    assert len(reader.buf) == 0


def test_registers_and_numbers() -> None:
    assert hex_le32([1, 0xC0000000]) == b"01000000000000c0"
    assert parse_le32(b"01000000000000c0") == [1, 0xC0000000]
    assert parse_hex(b"c0000258") == 0xC0000258
    for bad in (b"", b"-1", b"1_0", b"0x10", b"1" * 17, b"100000000"):
        with pytest.raises(ValueError):
            parse_hex(bad)
    with pytest.raises(ValueError):
        parse_le32(b"010203")

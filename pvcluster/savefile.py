"""The save file: a whole cluster at a window boundary (``pvcluster save``, ``pvcluster restore``).

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"PVCSAVE\\n"
    8       4     format version (FORMAT_VERSION)
    12      8     payload length in bytes
    20      32    SHA-256 of the payload
    52      ...   payload: zlib-compressed state pickle (pvcluster/statepickle.py) of the image, a dict:
                  format, vt_ns, window, spec (ClusterSpec.to_dict()), run_dir, hypervisor (the core's pickle),
                  domains {domid: {state, ram, ram_sha256}}, traces {file name: bytes}, faults_bytes

A file is checked whole before anything in it is used: magic, version, length and checksum, then the payload
decompressed within a bound and unpickled admitting only allowed classes. Every failure is a ``SaveFileError``
saying which check failed; nothing in a file can run code.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from pvcluster import statepickle

MAGIC = b"PVCSAVE\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")
HEADER_BYTES = _HEADER.size
# The most a payload may decompress to: a cluster's memory plus its state (16 domains of 256 MiB fit).
MAX_IMAGE_BYTES = 8 << 30
_IMAGE_KEYS: dict[str, type | tuple[type, ...]] = {
    "format": int, "vt_ns": int, "window": int, "spec": dict, "run_dir": str, "hypervisor": bytes, "domains": dict,
    "traces": dict, "faults_bytes": int,
}


class SaveFileError(ValueError):
    """A save file that cannot be used, and why."""


def encode(image: dict[str, Any]) -> bytes:
    payload = zlib.compress(statepickle.dumps(image), 6)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


def write(path: Path, image: dict[str, Any]) -> int:
    """Write ``image`` to ``path`` (through a temporary file renamed into place: a reader never sees half a
    file); the file's size."""
    data = encode(image)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(data)


def check_header(data: bytes) -> bytes:
    """The payload of a file's ``data`` once magic, version, length and checksum hold."""
    if len(data) < HEADER_BYTES or not data.startswith(MAGIC):
        raise SaveFileError("not a pvcluster save file (no PVCSAVE header)")
    _, version, length, digest = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise SaveFileError(f"save file format version {version}: this pvcluster reads version {FORMAT_VERSION}")
    payload = data[HEADER_BYTES:]
    if len(payload) != length:
        raise SaveFileError(f"save file is truncated or has trailing bytes: payload of {len(payload)} bytes, "
                            f"header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise SaveFileError("save file is corrupt: its checksum does not match")
    return payload


def decode(data: bytes) -> dict[str, Any]:
    payload = check_header(data)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(payload, MAX_IMAGE_BYTES)
    except zlib.error as exc:
        raise SaveFileError(f"save file payload does not decompress: {exc}") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise SaveFileError("save file payload is larger than this pvcluster accepts, or incomplete")
    try:
        image = statepickle.loads(raw)
    except statepickle.StateError as exc:
        raise SaveFileError(f"save file payload: {exc}") from None
    return check_image(image)


def check_image(image: Any) -> dict[str, Any]:
    """The image's shape: every key present with its type, each domain's parts bytes."""
    if not isinstance(image, dict):
        raise SaveFileError("save file payload is not an image")
    for key, tp in _IMAGE_KEYS.items():
        if not isinstance(image.get(key), tp):
            raise SaveFileError(f"save file image: {key!r} missing or not a {getattr(tp, '__name__', tp)}")
    if image["format"] != FORMAT_VERSION:
        raise SaveFileError(f"save file image format {image['format']}, expected {FORMAT_VERSION}")
    for domid, dom in image["domains"].items():
        if not isinstance(domid, int) or not isinstance(dom, dict) or not all(
                isinstance(dom.get(k), bytes) for k in ("state", "ram", "ram_sha256")):
            raise SaveFileError(f"save file image: domain {str(domid)[:16]} is malformed")
        if hashlib.sha256(dom["ram"]).digest() != dom["ram_sha256"]:
            raise SaveFileError(f"save file image: domain {domid}'s memory does not match its checksum")
    if not all(isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in image["traces"].items()):
        raise SaveFileError("save file image: trace positions are malformed")
    return image


def read(path: Path) -> dict[str, Any]:
    """The image saved in ``path``; SaveFileError (OSError included) for anything wrong with it."""
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise SaveFileError(f"{path}: {size} bytes is larger than any save file this pvcluster writes")
        data = path.read_bytes()
    except OSError as exc:
        raise SaveFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    return decode(data)

"""Binary framing of bus messages: msgpack arrays, validated field by field against attrs annotations.

A frame is ``[version, type_code, seq, vt_ns, [field, ...]]``. Decoding never trusts the frame: every field is
checked against the annotation of the attrs class registered for ``type_code``, and any mismatch raises
``FrameError`` with a specific reason that the receiver traces and echoes to the sender.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import msgpack

PROTO_VERSION = 1
MAX_FRAME_BYTES = 4 * 1024 * 1024
_MAX_DEPTH = 8

T = TypeVar("T")


class FrameError(Exception):
    """A received frame that cannot be accepted. ``kind`` is a stable slug used in trace events."""

    def __init__(self, kind: str, detail: str, seq: int | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.seq = seq


@attrs.frozen
class Envelope:
    seq: int
    vt_ns: int
    body: Any


_REGISTRY: dict[int, type] = {}
_CODES: dict[type, int] = {}


def message(code: int) -> Callable[[type[T]], type[T]]:
    """Register an attrs class as a bus message with a fixed wire ``code`` (codes are part of the protocol)."""

    def register(cls: type[T]) -> type[T]:
        if code in _REGISTRY:
            raise ValueError(f"message code {code} used twice ({_REGISTRY[code].__name__}, {cls.__name__})")
        attrs.resolve_types(cls)  # type: ignore[type-var]
        _REGISTRY[code] = cls
        _CODES[cls] = code
        return cls

    return register


def message_types() -> dict[int, type]:
    return dict(_REGISTRY)


def _to_wire(value: Any) -> Any:
    if attrs.has(type(value)):
        return [_to_wire(getattr(value, f.name)) for f in _fields(type(value))]  # type: ignore[arg-type]
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def encode(body: Any, *, seq: int, vt_ns: int) -> bytes:
    code = _CODES.get(type(body))
    if code is None:
        raise TypeError(f"{type(body).__name__} is not a registered bus message")
    return msgpack.packb([PROTO_VERSION, code, seq, vt_ns, _to_wire(body)], use_bin_type=True)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Bad(Exception):
    """A field that does not match its annotation. The path is built only on the way out, so a valid frame
    (the common case) costs no string formatting."""

    def __init__(self, msg: str) -> None:
        self.msg = msg
        self.where: list[str] = []


@functools.cache
def _shape(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    return typing.get_origin(tp), typing.get_args(tp)


@functools.cache
def _fields(tp: type) -> tuple[Any, ...]:
    return tuple(attrs.fields(attrs.resolve_types(tp)))  # type: ignore[type-var]


def _wire(tp: Any, value: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise _Bad("nested too deeply")
    if tp is Any:
        return value
    if tp is int:
        if not _is_int(value):
            raise _Bad(f"expected int, got {type(value).__name__}")
        return value
    if tp is str or tp is bytes or tp is bool or tp is float:
        if not isinstance(value, tp) or (tp is float and isinstance(value, bool)):
            raise _Bad(f"expected {tp.__name__}, got {type(value).__name__}")
        return value
    origin, args = _shape(tp)
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            raise _Bad(f"expected a list, got {type(value).__name__}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Bad(f"expected {len(args)} items, got {len(value)}")
            items = list(zip(args, value, strict=True))
        else:
            item = args[0] if args else Any
            items = [(item, v) for v in value]
        out = []
        for i, (a, v) in enumerate(items):
            try:
                out.append(_wire(a, v, depth + 1))
            except _Bad as bad:
                bad.where.append(f"[{i}]")
                raise
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _Bad("expected a map with string keys")
        vtype = args[1] if len(args) == 2 else Any
        result = {}
        for k, v in value.items():
            try:
                result[k] = _wire(vtype, v, depth + 1)
            except _Bad as bad:
                bad.where.append(f"[{k!r}]")
                raise
        return result
    if origin in (typing.Union, types.UnionType):
        first: _Bad | None = None
        for alt in args:
            if alt is type(None):
                if value is None:
                    return None
                continue
            try:
                return _wire(alt, value, depth + 1)
            except _Bad as bad:
                first = first or bad
        raise first if first is not None else _Bad(f"expected {tp}, got None")
    if attrs.has(tp):
        fields = _fields(tp)
        if not isinstance(value, list) or len(value) != len(fields):
            got = len(value) if isinstance(value, list) else type(value).__name__
            raise _Bad(f"{tp.__name__} needs {len(fields)} fields, got {got}")
        kwargs = {}
        for f, v in zip(fields, value, strict=True):
            try:
                kwargs[f.name] = _wire(f.type, v, depth + 1)
            except _Bad as bad:
                bad.where.append(f".{f.name}")
                raise
        try:
            return tp(**kwargs)
        except (ValueError, TypeError) as exc:
            raise _Bad(str(exc)) from None
    raise _Bad(f"unsupported annotation {tp!r}")


def _from_wire(tp: Any, value: Any, path: str, depth: int) -> Any:
    try:
        return _wire(tp, value, depth)
    except _Bad as bad:
        raise FrameError("bad-field", f"{path}{''.join(reversed(bad.where))}: {bad.msg}") from None


def decode(frame: bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> Envelope:
    """Decode and validate one frame; raise FrameError naming exactly what is wrong."""
    if len(frame) > max_bytes:
        raise FrameError("oversized", f"frame of {len(frame)} bytes exceeds the {max_bytes}-byte limit")
    if not frame:
        raise FrameError("empty", "empty frame")
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except msgpack.ExtraData:
        raise FrameError("malformed", "trailing bytes after the message") from None
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        # msgpack caps declared lengths at the buffer size, so a cut-off array or string shows up as
        # "exceeds max_..._len": the frame ends before what it declares.
        text = str(exc).lower()
        kind = "truncated" if any(w in text for w in ("insufficient", "incomplete", "exceeds max_")) else "malformed"
        raise FrameError(kind, f"not a msgpack message ({exc or type(exc).__name__})") from None
    if not isinstance(raw, list) or len(raw) != 5:
        raise FrameError("malformed", "frame is not a 5-element [version, type, seq, vt_ns, fields] array")
    version, code, seq, vt_ns, fields = raw
    if not (_is_int(seq) and seq >= 0):
        raise FrameError("malformed", "sequence number is not a non-negative integer")
    if not _is_int(version) or version != PROTO_VERSION:
        raise FrameError("bad-version", f"protocol version {version!r}, this side speaks {PROTO_VERSION}", seq)
    if not _is_int(code) or code not in _REGISTRY:
        raise FrameError("unknown-type", f"unknown message type {code!r}", seq)
    if not (_is_int(vt_ns) and vt_ns >= 0):
        raise FrameError("malformed", "virtual timestamp is not a non-negative integer", seq)
    cls = _REGISTRY[code]
    try:
        body = _from_wire(cls, fields, cls.__name__, 0)
    except FrameError as exc:
        raise FrameError(exc.kind, exc.detail, seq) from None
    return Envelope(seq=seq, vt_ns=vt_ns, body=body)

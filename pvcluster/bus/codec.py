"""Binary framing of bus messages: msgpack arrays, validated field by field against attrs annotations.

A frame is ``[version, type_code, seq, vt_ns, [field, ...]]``. Decoding never trusts the frame: every field is
checked against the annotation of the attrs class registered for ``type_code``, and any mismatch raises
``FrameError`` with a specific reason that the receiver traces and echoes to the sender.
"""

from __future__ import annotations

import functools
import types
import typing
from typing import Any

import attrs
import msgpack

PROTO_VERSION = 1
MAX_FRAME_BYTES = 4 * 1024 * 1024
_MAX_DEPTH = 8

class FrameError(Exception):
    """A received frame that cannot be accepted. ``kind`` is a stable slug used in trace events."""

    def __init__(self, kind: str, detail: str, seq: int | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.seq = seq


class EncodeError(Exception):
    """A record that cannot be put on the wire (a value out of range for its encoding)."""


@attrs.frozen
class Envelope:
    seq: int
    vt_ns: int
    body: Any


@functools.cache
def message_types() -> dict[int, type]:
    """Wire code -> message class, from ``pvcluster.bus.messages.MESSAGES`` (each class's ``WIRE`` code)."""
    from pvcluster.bus.messages import MESSAGES  # messages never import the codec; this is the only link

    return _codes(MESSAGES, "WIRE")


def _codes(classes: tuple[type, ...], attr: str) -> dict[int, type]:
    out: dict[int, type] = {}
    for cls in classes:
        code = getattr(cls, attr)
        if code in out:
            raise ValueError(f"wire {attr} {code} used twice ({out[code].__name__}, {cls.__name__})")
        attrs.resolve_types(cls)
        out[code] = cls
    return out


@functools.cache
def _variants(union: Any) -> dict[int, type] | None:
    """For a Union whose members are all tagged records (class attribute ``TAG``): tag -> class; else None."""
    members = [m for m in typing.get_args(union) if m is not type(None)]
    if not members or not all(attrs.has(m) and isinstance(getattr(m, "TAG", None), int) for m in members):
        return None
    return _codes(tuple(members), "TAG")


def _to_wire(value: Any) -> Any:
    if attrs.has(type(value)):
        fields = [_to_wire(getattr(value, f.name)) for f in _fields(type(value))]  # type: ignore[arg-type]
        tag = getattr(type(value), "TAG", None)
        return [tag, fields] if isinstance(tag, int) else fields
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def encode(body: Any, *, seq: int, vt_ns: int) -> bytes:
    code = getattr(type(body), "WIRE", None)
    if message_types().get(code) is not type(body):  # type: ignore[arg-type]
        raise TypeError(f"{type(body).__name__} is not a registered bus message")
    try:
        return msgpack.packb([PROTO_VERSION, code, seq, vt_ns, _to_wire(body)], use_bin_type=True)
    except (OverflowError, ValueError, TypeError) as exc:
        # An integer outside msgpack's 64-bit range, say: the caller decides whose fault that is.
        raise EncodeError(f"cannot encode {type(body).__name__}: {exc}") from None


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
    """``value`` as annotation ``tp`` says it must be; _Bad naming what is wrong otherwise."""
    if depth > _MAX_DEPTH:
        raise _Bad("nested too deeply")
    if tp is Any:
        return value
    if tp in _SCALARS:
        return _scalar(tp, value)
    origin, args = _shape(tp)
    if origin is list or origin is tuple:
        return _sequence(origin, args, value, depth)
    if origin is dict:
        return _mapping(args, value, depth)
    if origin in (typing.Union, types.UnionType):
        return _union(tp, args, value, depth)
    if attrs.has(tp):
        tag = getattr(tp, "TAG", None)
        if isinstance(tag, int):
            return _tagged({tag: tp}, value, depth)
        return _record(tp, value, depth)
    raise _Bad(f"unsupported annotation {tp!r}")


_SCALARS = (int, str, bytes, bool, float)


def _scalar(tp: type, value: Any) -> Any:
    # bool is an int to Python, but not on the wire: True is no vCPU number
    ok = _is_int(value) if tp is int else isinstance(value, tp) and not (tp is float and isinstance(value, bool))
    if not ok:
        raise _Bad(f"expected {tp.__name__}, got {type(value).__name__}")
    return value


def _sequence(origin: Any, args: tuple[Any, ...], value: Any, depth: int) -> Any:
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


def _mapping(args: tuple[Any, ...], value: Any, depth: int) -> dict[str, Any]:
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


def _union(tp: Any, args: tuple[Any, ...], value: Any, depth: int) -> Any:
    variants = _variants(tp)
    if variants is not None:
        return _tagged(variants, value, depth)
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


def _record(tp: Any, value: Any, depth: int) -> Any:
    """An attrs record as the list of its fields, each checked against its annotation."""
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


def _tagged(variants: dict[int, type], value: Any, depth: int) -> Any:
    """A tagged record, ``[tag, [fields...]]``: the tag picks the class, so two records with the same field types
    (FlushTlb and VcpuUp, say) cannot be mistaken for each other."""
    if not isinstance(value, list) or len(value) != 2 or not _is_int(value[0]):
        raise _Bad("expected a tagged record [tag, fields]")
    cls = variants.get(value[0])
    if cls is None:
        raise _Bad(f"unknown record tag {value[0]}")
    try:
        return _record(cls, value[1], depth + 1)
    except _Bad as bad:
        bad.where.append(f"<{cls.__name__}>")
        raise


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
    registry = message_types()
    if not _is_int(code) or code not in registry:
        raise FrameError("unknown-type", f"unknown message type {code!r}", seq)
    if not (_is_int(vt_ns) and vt_ns >= 0):
        raise FrameError("malformed", "virtual timestamp is not a non-negative integer", seq)
    cls = registry[code]
    try:
        body = _from_wire(cls, fields, cls.__name__, 0)
    except FrameError as exc:
        raise FrameError(exc.kind, exc.detail, seq) from None
    return Envelope(seq=seq, vt_ns=vt_ns, body=body)

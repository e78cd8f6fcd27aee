"""Binary framing of bus messages: msgpack arrays, validated field by field against attrs annotations.

A frame is ``[version, type_code, seq, vt_ns, [field, ...]]``. Decoding never trusts the frame: every field is
checked against the annotation of the attrs class registered for ``type_code``, and any mismatch raises
``FrameError`` with a specific reason that the receiver traces and echoes to the sender.

Two paths, one verdict. The reflective validator (``_wire`` and its helpers) walks the annotations of every value
and names exactly what is wrong; it is the reference. It costs a Python call and an annotation lookup per field,
which made validation 96% of decoding, so every frame first goes through a fast path compiled once per annotation
(``_fast_decoder``): one generated function per record class, with exact-type checks inline (msgpack only ever
produces exact ``int``/``str``/``bytes``/... instances, for which ``type(v) is int`` and the reference's
"an int but not a bool" agree), and, once the values are checked, the record built by storing its slots directly
when its ``__init__`` would do nothing else (building the records had become most of what decoding cost).

The fast path only ever accepts what the reference accepts; whenever it declines, for any reason, the reference
runs on the same value and either accepts it or raises the precise error, so a rejected frame always gets the
reference's error kind and detail. Encoding has the same shape: a generated encoder per record class, and the
reflective ``_to_wire`` whenever it declines or msgpack refuses its output.
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
# One packer for the process: packb builds a new one per call. Both processes encode from one thread, and a packer
# resets its buffer when a pack fails, so sharing it is safe.
_PACK = msgpack.Packer(use_bin_type=True, autoreset=True).pack

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
    cls: Any = type(body)
    try:
        return _PACK([PROTO_VERSION, code, seq, vt_ns, _fast_encoder(cls)(body)])
    except Exception:  # any doubt goes to the reflective encoder, which has the last word
        pass
    try:
        return _PACK([PROTO_VERSION, code, seq, vt_ns, _to_wire(body)])
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
        body = _fast_decoder(cls)(fields)
    except Exception:  # declined: the reference validator accepts it or names what is wrong
        try:
            body = _from_wire(cls, fields, cls.__name__, 0)
        except FrameError as exc:
            raise FrameError(exc.kind, exc.detail, seq) from None
    return Envelope(seq=seq, vt_ns=vt_ns, body=body)


# -- the fast path: decoders and encoders compiled once per annotation --------------------------------------------


class _Miss(Exception):
    """The fast path declines a value; the reflective path decides (and names what is wrong, if anything)."""


_Fast = typing.Callable[[Any], Any]


def _miss(value: Any) -> Any:
    raise _Miss


def _same(value: Any) -> Any:
    return value


def _compile(name: str, lines: list[str], env: dict[str, Any]) -> _Fast:
    """One generated function: straight-line checks, no per-field calls for scalars."""
    namespace: dict[str, Any] = {"_Miss": _Miss, **env}
    exec("\n".join(lines), namespace)  # the source is built here from annotations, never from input
    fn: _Fast = namespace[name]
    return fn


@functools.cache
def _fast_decoder(tp: Any, depth: int = 0) -> _Fast:
    """A function taking a msgpack value to ``tp`` as the reference validator would, raising whenever it is not
    sure. ``depth`` counts as ``_wire``'s does, so the nesting limit falls where the reference puts it."""
    if depth > _MAX_DEPTH:
        return _miss
    if tp is Any:
        return _same
    if tp in _SCALARS:
        return _compile("scalar", ["def scalar(v):", "    if type(v) is not t: raise _Miss", "    return v"],
                        {"t": tp})
    origin, args = _shape(tp)
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return _fast_sequence(origin, args[0] if args else Any, depth)
    if origin in (typing.Union, types.UnionType):
        return _fast_union(tp, args, depth)
    if origin is dict and (len(args) != 2 or args[1] is Any):
        # a map of anything: only its keys need looking at
        return _compile("mapping", ["def mapping(v):", "    if type(v) is not dict: raise _Miss", "    for k in v:",
                                    "        if type(k) is not str: raise _Miss", "    return v"], {})
    if attrs.has(tp):
        tag = getattr(tp, "TAG", None)
        if isinstance(tag, int):
            return _fast_tagged({tag: tp}, depth)
        return _fast_record(tp, depth)
    return _miss  # fixed-length tuples, typed maps, anything rare: the reference handles them


def _fast_sequence(origin: Any, item: Any, depth: int) -> _Fast:
    wrap = "tuple(v)" if origin is tuple else "v"
    if item in _SCALARS and depth + 1 <= _MAX_DEPTH:
        return _compile("seq", ["def seq(v):", "    if type(v) is not list: raise _Miss", "    for x in v:",
                                "        if type(x) is not t: raise _Miss", f"    return {wrap}"], {"t": item})
    each = _fast_decoder(item, depth + 1)
    out = "tuple(out)" if origin is tuple else "out"
    return _compile("seq", ["def seq(v):", "    if type(v) is not list: raise _Miss",
                            "    out = [each(x) for x in v]", f"    return {out}"], {"each": each})


def _fast_union(tp: Any, args: tuple[Any, ...], depth: int) -> _Fast:
    variants = _variants(tp)
    if variants is not None:
        return _fast_tagged(variants, depth)
    alts = [a for a in args if a is not type(None)]
    optional = len(alts) < len(args)
    if all(a in _SCALARS for a in alts) and depth + 1 <= _MAX_DEPTH:
        # ``bytes | None``, say: the reference tries None first, then each scalar, exactly as this does
        none = "v is None or " if optional else ""
        return _compile("union", ["def union(v):", f"    if {none}type(v) in ts: return v", "    raise _Miss"],
                        {"ts": tuple(alts)})
    return _miss


def _fast_tagged(variants: dict[int, type], depth: int) -> _Fast:
    table = {tag: _fast_record(cls, depth + 1) for tag, cls in variants.items()}
    return _compile("tagged", ["def tagged(v):", "    if type(v) is not list or len(v) != 2: raise _Miss",
                               "    tag = v[0]", "    if type(tag) is not int: raise _Miss",
                               "    dec = table.get(tag)", "    if dec is None: raise _Miss", "    return dec(v[1])"],
                    {"table": table})


def _fast_record(tp: type, depth: int) -> _Fast:
    """``def decode(v)`` for one attrs class: the field count, every scalar field's exact type in one condition,
    a call only for fields that are themselves containers or records, then the class itself."""
    fields = _fields(tp)
    n = len(fields)
    env: dict[str, Any] = {"cls": tp}
    checks, args = [], []
    for i, f in enumerate(fields):
        sub = f.type
        if sub in _SCALARS and depth + 1 <= _MAX_DEPTH:
            env[f"t{i}"] = sub
            checks.append(f"type(v[{i}]) is not t{i}")
            args.append(f"v[{i}]")
        elif sub is Any and depth + 1 <= _MAX_DEPTH:
            args.append(f"v[{i}]")
        else:
            env[f"c{i}"] = _fast_decoder(sub, depth + 1)
            args.append(f"c{i}(v[{i}])")
        if not f.init or f.kw_only:  # the reference passes keywords; positions are only the same thing when
            args[-1] = f"{f.name}={args[-1]}"  # every field is an ordinary init argument
    lines = ["def decode(v):", f"    if type(v) is not list or len(v) != {n}: raise _Miss"]
    if checks:
        lines.append(f"    if {' or '.join(checks)}: raise _Miss")
    setters = _slot_setters(tp, fields)
    if setters is None:
        lines.append(f"    return cls({', '.join(args)})")
    else:
        env["new"] = object.__new__
        lines.append("    o = new(cls)")
        for i, setter in enumerate(setters):
            env[f"s{i}"] = setter
            lines.append(f"    s{i}(o, {args[i]})")
        lines.append("    return o")
    return _compile("decode", lines, env)


def _slot_setters(tp: type, fields: tuple[Any, ...]) -> list[Any] | None:
    """For a slotted attrs class whose ``__init__`` does nothing but store its arguments (no validators,
    converters or init hooks, no extra slots): each field's slot setter, which stores exactly what ``__init__``
    would, without the frozen class's per-attribute indirection. None for any other class."""
    slots = tp.__dict__.get("__slots__")
    names = [f.name for f in fields]
    if slots is None or set(slots) - {"__weakref__"} != set(names):
        return None
    if any(f.validator is not None or f.converter is not None or not f.init or f.kw_only for f in fields):
        return None
    if any(hasattr(tp, hook) for hook in ("__attrs_pre_init__", "__attrs_post_init__", "__attrs_init__")):
        return None
    descriptors = [tp.__dict__.get(name) for name in names]
    if not all(isinstance(d, types.MemberDescriptorType) for d in descriptors):
        return None
    return [d.__set__ for d in descriptors]  # type: ignore[union-attr]


@functools.cache
def _fast_encoder(tp: Any) -> _Fast:
    """The wire form of a value annotated ``tp``, as ``_to_wire`` gives it for a well-typed value; raises when the
    value is not what the annotation says (then ``_to_wire`` handles it as it always did)."""
    if tp in _SCALARS or _leaf(tp):
        return _same  # msgpack packs it as it is (a tuple as an array, as _to_wire's list)
    origin, args = _shape(tp)
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        each = _fast_encoder(args[0] if args else Any)
        return _compile("seq", ["def seq(v):", "    return [each(x) for x in v]"], {"each": each})
    if origin in (typing.Union, types.UnionType):
        variants = _variants(tp)
        if variants is not None:
            table = {cls: _fast_encoder(cls) for cls in variants.values()}
            return _compile("union", ["def union(v):", "    return table[type(v)](v)"], {"table": table})
    if attrs.has(tp):
        return _fast_record_encoder(tp)
    return _to_wire  # Any, typed maps, anything rare: the reflective form


def _leaf(tp: Any) -> bool:
    """Annotations whose well-typed values are already their own wire form: scalars, optional scalars, lists of
    scalars."""
    if tp in _SCALARS or tp is type(None):
        return True
    origin, args = _shape(tp)
    if origin in (typing.Union, types.UnionType):
        return all(_leaf(a) for a in args) and _variants(tp) is None
    return origin is list and len(args) == 1 and args[0] in _SCALARS


def _fast_record_encoder(tp: type) -> _Fast:
    env: dict[str, Any] = {"cls": tp}
    items = []
    for i, f in enumerate(_fields(tp)):
        enc = _fast_encoder(f.type)
        if enc is _same:
            items.append(f"v.{f.name}")
        else:
            env[f"e{i}"] = enc
            items.append(f"e{i}(v.{f.name})")
    tag = getattr(tp, "TAG", None)
    body = f"[{', '.join(items)}]"
    wire = f"[{tag}, {body}]" if isinstance(tag, int) else body
    # exactly this class: a subclass or a look-alike goes to _to_wire, which encodes what it really is
    return _compile("encode", ["def encode(v):", "    if type(v) is not cls: raise _Miss", f"    return {wire}"],
                    env)

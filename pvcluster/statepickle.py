"""Pickling simulation state for save, restore and migrate, and unpickling it without trusting it.

Save files and the state a domain process sends are inputs like any other: a file someone handed you must not run
code when it is restored. ``pickle`` on its own would: unpickling calls whatever callable the stream names. So
``loads`` uses an Unpickler whose ``find_class`` admits only an explicit allow-list of classes (the project's own
state records and a few builtins and standard containers, listed in ``ALLOWED``), never a function; anything else
is refused with ``StateError`` before it is called. Enum classes and attrs records in the allow-list are called
with arguments from the stream (an enum by value, ``copyreg`` reconstruction of plain objects), which runs no code
of the stream's choosing.

What cannot be pickled (loggers, the shell, lambdas, Unicorn, sockets) is named by a ``persistent_id`` hook of the
caller's: each side says what it leaves out, and puts back its own live objects when it loads.
"""

from __future__ import annotations

import enum
import io
import pickle
from collections.abc import Callable
from typing import Any

PROTOCOL = 5
# The most guest memory one ReadRam / RestoreRam chunk carries: well under the bus's 4 MiB frame limit.
CHUNK_BYTES = 1 << 20

# (module, name) of every global a state pickle may name. Builtins and containers first; then the project's
# classes whose instances hang off the hypervisor's core and a domain process's vCPUs.
_BUILTINS = {
    ("builtins", n) for n in ("set", "frozenset", "bytearray", "complex", "slice", "range", "object", "list",
                              "dict", "tuple", "int", "str", "bytes", "float", "bool")
} | {
    ("collections", "deque"), ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("collections", "Counter"), ("copyreg", "_reconstructor"), ("random", "Random"),
}
_PROJECT_PREFIXES = ("hypervisor.", "domains.", "pvcluster.")
DOMAIN_MODULES = ("domains.", "pvcluster.")  # what a domain process's state may hold
HYPERVISOR_MODULES = ("hypervisor.", "pvcluster.")  # what the hypervisor's may
# Project modules whose classes never belong in a state pickle: processes, sockets, files, the toolstack.
_PROJECT_DENIED = ("hypervisor.shell", "hypervisor.control", "hypervisor.auth", "hypervisor.boundary",
                   "hypervisor.saving", "hypervisor.kernel_files", "hypervisor.__main__", "domains.__main__",
                   "domains.join", "domains.runtime", "domains.capture", "domains.blockhook", "pvcluster.cli",
                   "pvcluster.cluster", "pvcluster.control", "pvcluster.launch", "pvcluster.keys",
                   "pvcluster.deploy", "pvcluster.trace", "pvcluster.statepickle", "pvcluster.savefile",
                   "pvcluster.bus.zsock", "pvcluster.bus.codec", "pvcluster.pytest_plugin")


class StateError(ValueError):
    """A state pickle that cannot be loaded: malformed, or naming something not on the allow-list."""


def _allowed_project_class(module: str, name: str, prefixes: tuple[str, ...]) -> type | None:
    """A class defined in one of the project's state modules under ``prefixes`` (not a function, not a module
    attribute that is anything else), or None."""
    import importlib

    if not module.startswith(prefixes) or module.startswith(_PROJECT_DENIED) or "." in name:
        return None
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    obj = getattr(mod, name, None)
    if not isinstance(obj, type) or obj.__module__ != module:
        return None
    return obj


def _callables() -> tuple[Any, ...]:
    import collections
    import copyreg
    import random

    return (set, frozenset, bytearray, complex, slice, range, list, dict, tuple, int, str, bytes, float, bool,
            collections.deque, collections.OrderedDict, collections.defaultdict, collections.Counter,
            random.Random, copyreg._reconstructor)  # type: ignore[attr-defined]


_CALLABLES = _callables()


def _may_call(func: Any) -> bool:
    """What REDUCE may call with arguments from the stream: an enum class (by value), or an allowed builtin. A
    project class is only ever made by NEWOBJ (``cls.__new__``: no ``__init__`` runs) and filled by BUILD."""
    if isinstance(func, type) and issubclass(func, enum.Enum):
        return True
    return any(func is c for c in _CALLABLES)


class _Unpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """The pure-Python unpickler (state pickles are small: memory travels as raw bytes), whose REDUCE checks what it
    is asked to call (``_may_call``)."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, data: bytes, persistent: Callable[[Any], Any] | None, prefixes: tuple[str, ...]) -> None:
        super().__init__(io.BytesIO(data))
        self._persistent = persistent
        self._prefixes = prefixes

    def load_reduce(self) -> None:
        stack = self.stack  # type: ignore[attr-defined]
        args = stack.pop()
        func = stack[-1]
        if not _may_call(func):
            raise StateError(f"state asks to call {getattr(func, '__qualname__', type(func).__name__)}, which "
                             f"only NEWOBJ may construct")
        stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce  # type: ignore[assignment]

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _BUILTINS:
            return super().find_class(module, name)
        cls = _allowed_project_class(module, name, self._prefixes)
        if cls is None:
            raise StateError(f"state names {module}.{name}, which is not a state class this simulator loads")
        return cls

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise StateError(f"state refers to a live object ({str(pid)[:80]}) nobody supplies here")
        return self._persistent(pid)


class _Pickler(pickle.Pickler):
    def __init__(self, out: io.BytesIO, persistent: Callable[[Any], Any] | None) -> None:
        super().__init__(out, protocol=PROTOCOL)
        self._persistent = persistent

    def persistent_id(self, obj: Any) -> Any:
        return None if self._persistent is None else self._persistent(obj)


def dumps(obj: Any, persistent_id: Callable[[Any], Any] | None = None) -> bytes:
    """``obj`` pickled; ``persistent_id(o)``: a small token for a live object left out (None: pickle it)."""
    out = io.BytesIO()
    _Pickler(out, persistent_id).dump(obj)
    return out.getvalue()


def loads(data: bytes, persistent_load: Callable[[Any], Any] | None = None,
          modules: tuple[str, ...] = _PROJECT_PREFIXES) -> Any:
    """Unpickle ``data`` admitting only allowed classes (of the project's packages in ``modules``: a domain process
    loads none of the hypervisor's, nor the hypervisor a domain's); ``persistent_load(token)`` puts back a live
    object. StateError for anything malformed or not allowed."""
    try:
        return _Unpickler(data, persistent_load, modules).load()
    except StateError:
        raise
    except Exception as exc:  # a truncated or hand-made stream: any of pickle's many errors
        raise StateError(f"state cannot be loaded: {type(exc).__name__}: {str(exc)[:200]}") from None

"""The public handler API and the loading of `module:attr` handlers.

A handler sees one segment at a time through a `SegmentContext`. Its only way to make
state durable through fleet is `ctx.commit`, which etcd fences with the ownership's
token; `ctx.token` lets it fence its own writes elsewhere the same way.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
import sysconfig
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleet import clock


class LostOwnership(Exception):
    """This worker no longer owns the segment: the write was rejected (fenced out)."""


class HandlerImportError(Exception):
    """The configured handler cannot be imported or is not callable (exit code 2)."""


@dataclass
class SegmentContext:
    """What a handler call knows about the segment it is processing.

    `deadline` is the time (on `fleet.clock.now()`, which keeps counting through a host
    suspend) after which this worker can no longer prove it owns the segment;
    `time_left()` is the same as a duration. `stopping` is set when the segment is being
    handed off, the worker is stopping, or the deadline is near: a long call should check
    it and return. `stop_reason` then says why ("handoff", "shutdown" or "lost"), and
    `lost` is True once the ownership is known to be gone: nothing this call writes is
    protected any more (commits raise LostOwnership).
    """

    segment: int
    token: int
    member_id: str
    checkpoint: Any
    stopping: threading.Event
    _commit: Callable[[bytes], bool] = field(repr=False)
    _deadline: Callable[[], float] = field(repr=False)
    stop_reason: str | None = None
    _lost: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def deadline(self) -> float:
        return self._deadline()

    def time_left(self) -> float:
        """Seconds until this worker can no longer prove it owns the segment."""
        return self._deadline() - clock.now()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def commit(self, value: Any) -> None:
        """Durably record `value` as this segment's checkpoint, fenced by `token`.

        Raises LostOwnership when the ownership is gone (locally: past the lease
        deadline; in etcd: the owner key was deleted or re-created by someone else).
        """
        data = json.dumps(value, separators=(",", ":")).encode()
        if self.lost or clock.now() >= self._deadline() or not self._commit(data):
            raise LostOwnership(
                f"segment {self.segment}: ownership token {self.token} is no longer valid"
            )
        self.checkpoint = value


def _noop(_ctx: SegmentContext) -> None:
    return None


@dataclass(frozen=True)
class Handler:
    """A loaded handler: the three hooks, with absent ones as no-ops."""

    spec: str
    handle: Callable[[SegmentContext], Any]
    on_acquire: Callable[[SegmentContext], Any] = _noop
    on_release: Callable[[SegmentContext], Any] = _noop


def check_handler_module(spec: str) -> None:
    """Fail early if the handler's module cannot be found, without running any of it.

    `fleet up` must not import user code into the supervisor (it would run there,
    threads and connections included); an error inside the module still shows in the
    first worker, which exits 2 and puts its slot in FATAL at once.
    """
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise HandlerImportError(f"handler {spec!r}: expected 'package.module:attr'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(module_name)
    except Exception as exc:  # noqa: BLE001 - finding `a.b` imports `a`, which may fail
        found, error = None, _describe(exc)
    else:
        error = f"no module named {module_name!r}"
    if found is None:
        raise HandlerImportError(f"handler {spec!r}: cannot import {module_name!r}: {error}")


# Frames that are never the user's: the import machinery and this module.
_IMPORT_MACHINERY = (os.path.dirname(importlib.__file__) + os.sep, "<frozen ")


def _where(exc: BaseException) -> str | None:
    """`file:line` of the user's code that raised `exc`: where a SyntaxError is, else the
    last traceback frame outside the import machinery, fleet, the standard library and
    installed packages (so an error raised inside `json` points at the user's call);
    failing that (a handler installed into site-packages), outside fleet and the standard
    library, then anywhere but the import machinery. Paths under the working directory
    are shown relative to it."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return _short(exc.filename, exc.lineno)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if f.filename != __file__ and not f.filename.startswith(_IMPORT_MACHINERY)
    ]
    paths = {k: os.path.join(v, "") for k, v in sysconfig.get_paths().items()}
    ours = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")
    stdlib = (ours, paths["stdlib"], paths["platstdlib"])
    installed = (*stdlib, paths["purelib"], paths["platlib"])
    for skip in (installed, stdlib, ()):
        kept = [f for f in frames if not os.path.abspath(f.filename).startswith(skip)]
        if kept:
            return _short(kept[-1].filename, kept[-1].lineno)
    return None


def _short(filename: str, lineno: int | None) -> str:
    path = os.path.abspath(filename)
    with contextlib.suppress(ValueError):
        relative = os.path.relpath(path)
        if not relative.startswith(".."):
            path = relative
    return f"{path}:{lineno}" if lineno else path


def _describe(exc: BaseException) -> str:
    """`Type: message (at file:line)`, one line, for an error raised by user code."""
    text = " ".join(str(exc).split())
    if isinstance(exc, SyntaxError) and exc.msg:
        text = exc.msg  # the location follows; str() would repeat it
    where = _where(exc)
    return f"{type(exc).__name__}: {text}" + (f" (at {where})" if where else "")


def load_handler(spec: str) -> Handler:
    """Import `module:attr`; a class is instantiated once per worker.

    The working directory is importable (as with gunicorn and `python -m`), so a
    handler module next to the fleet.toml is found without setting PYTHONPATH.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise HandlerImportError(f"handler {spec!r}: expected 'package.module:attr'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a configuration error
        raise HandlerImportError(
            f"handler {spec!r}: cannot import {module_name!r}: {_describe(exc)}"
        ) from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerImportError(
                f"handler {spec!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001
            raise HandlerImportError(
                f"handler {spec!r}: creating {attr_path}() failed: {_describe(exc)}"
            ) from None
        handle = getattr(obj, "handle", None)
        if not callable(handle):
            raise HandlerImportError(f"handler {spec!r}: class has no handle(ctx) method")
        return Handler(
            spec,
            handle,
            getattr(obj, "on_acquire", _noop),
            getattr(obj, "on_release", _noop),
        )
    if not callable(obj):
        raise HandlerImportError(f"handler {spec!r}: {attr_path!r} is not callable")
    return Handler(spec, obj)

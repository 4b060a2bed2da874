"""A prefix watch that never misses an event, whatever the stream or the history does.

Split from `fleet.coord.etcd` so that module stays the thin client wrapper: this one only
knows `Etcd.add_watch`/`cancel_watch`, `decode_watch_response` and `is_compacted`, never
the client library itself (DESIGN.md: etcd.py is the only module that imports it).
"""

from __future__ import annotations

import functools
import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from fleet.coord.etcd import (
    Changes,
    Etcd,
    EtcdError,
    Resync,
    decode_watch_response,
    is_compacted,
)

log = logging.getLogger("fleet.coord.watch")


class PrefixWatch:
    """Every change under a prefix, delivered once and in order, whatever the stream does.

    A broken stream (etcd restart, failover, cancelled watch) is re-created from the
    revision after the last one delivered; a compacted revision turns into a `Resync`
    with a fresh snapshot. `restart()` forces a re-create, for a stream that may have
    gone silent while keepalives were failing. Items go to `sink`, which must not block.
    """

    def __init__(
        self,
        etcd: Etcd,
        prefix: str,
        start_revision: int,
        sink: Callable[[Changes | Resync], None],
    ) -> None:
        self._etcd = etcd
        self._prefix = prefix
        self._next = start_revision
        self._sink = sink
        self._lock = threading.Lock()
        self._generation = 0
        self._watch_id: int | None = None
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._broken = True
        self._thread = threading.Thread(target=self._run, name="fleet-watch", daemon=True)

    def start(self) -> None:
        self._wake.set()
        self._thread.start()

    def restart(self) -> None:
        with self._lock:
            self._generation += 1
            self._broken = True
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        with self._lock:
            self._generation += 1
            watch_id, self._watch_id = self._watch_id, None
        if watch_id is not None:
            self._etcd.cancel_watch(watch_id)

    def _on_response(self, generation: int, response: Any) -> None:
        with self._lock:
            if generation != self._generation or self._stopped.is_set():
                return
            if response is None or isinstance(response, BaseException):
                if response is not None and is_compacted(response):
                    self._next = -1
                log.debug("watch stream ended: %r", response)
                self._generation += 1
                self._broken = True
                self._wake.set()
                return
            changes = decode_watch_response(response)
            if changes.changes:
                self._next = changes.changes[-1].kv.mod_revision + 1
            else:
                self._next = max(self._next, changes.revision + 1)
            self._sink(changes)

    def _run(self) -> None:
        delay = 0.05
        while not self._stopped.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stopped.is_set():
                return
            with self._lock:
                if not self._broken:
                    continue
                generation = self._generation
                old, self._watch_id = self._watch_id, None
                start = self._next
            if old is not None:
                self._etcd.cancel_watch(old)
            try:
                if start < 0:
                    snapshot = self._etcd.get_prefix(self._prefix)
                    with self._lock:
                        if generation != self._generation:
                            continue
                        self._next = start = snapshot.revision + 1
                        self._sink(Resync(snapshot))
                watch_id = self._etcd.add_watch(
                    self._prefix, start, functools.partial(self._on_response, generation)
                )
            except EtcdError as exc:
                if is_compacted(exc):
                    with self._lock:
                        self._next = -1
                    self._wake.set()
                    continue
                log.debug("watch re-create failed: %s", exc)
                self._stopped.wait(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)
                self._wake.set()
                continue
            with self._lock:
                if generation == self._generation:
                    self._watch_id = watch_id
                    self._broken = False
                    delay = 0.05
                    continue
            self._etcd.cancel_watch(watch_id)
            self._wake.set()

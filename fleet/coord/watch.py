"""A watch of key ranges that never misses an event, whatever the streams or the history do.

Split from `fleet.coord.etcd` so that module stays the thin client wrapper: this one only
knows `Etcd.add_watch`/`cancel_watch`, `decode_watch_response` and `is_compacted`, never
the client library itself (DESIGN.md: etcd.py is the only module that imports it).
"""

from __future__ import annotations

import functools
import logging
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

from fleet.coord.etcd import (
    Changes,
    Etcd,
    EtcdError,
    Resync,
    Snapshot,
    decode_watch_response,
    is_compacted,
    prefix_end,
)

log = logging.getLogger("fleet.coord.watch")

# [key, range_end) in etcd's byte order: one etcd watch each.
KeyRange = tuple[str, bytes]


class RangeWatch:
    """Every change in some key ranges, delivered once and in order per key, whatever the
    streams do. Items go to `sink`, which must not block.

    One etcd watch per range, all of one *generation*: a broken stream (etcd restart,
    failover, a cancelled watch) re-creates every range's watch, each from the revision
    after the last one it delivered; `restart()` does the same on demand, for streams that
    may have gone silent while keepalives were failing. A compacted revision in any range
    turns into one `Resync` carrying `snapshot()` (which must cover every range at one
    revision), after which every range watches from that snapshot's revision + 1. One lock
    orders all deliveries, and a response of an older generation is dropped: nothing
    delivered before a `Resync` is newer than its snapshot, nothing after it older.

    Across ranges there is no order: each range is its own etcd watch (the streams are
    in revision order while etcd has them synced, but a catch-up after a re-create
    delivers each range's backlog separately). Each key lies in one range, so each key's
    changes stay in order; callers that need more must not split the keys they relate.

    `Changes.revision` is each response's own store revision, unless `progress_of` names
    a range: then every item reports the revision that range has been delivered up to
    (a caller comparing the revision with that range's keys must not be told more).
    """

    def __init__(
        self,
        etcd: Etcd,
        ranges: Sequence[KeyRange],
        start_revision: int,
        sink: Callable[[Changes | Resync], None],
        snapshot: Callable[[], Snapshot],
        *,
        progress_of: int | None = None,
    ) -> None:
        if not ranges or (progress_of is not None and not 0 <= progress_of < len(ranges)):
            raise ValueError(f"bad ranges {ranges!r} / progress_of {progress_of!r}")
        self._etcd = etcd
        self._ranges = list(ranges)
        self._next = [start_revision] * len(ranges)  # per range: first revision not delivered
        self._seen = [start_revision - 1] * len(ranges)  # per range: delivered up to here
        self._progress_of = progress_of
        self._sink = sink
        self._snapshot = snapshot
        self._lock = threading.Lock()
        self._generation = 0
        self._watch_ids: list[int] = []
        self._resync = False
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
            watch_ids, self._watch_ids = self._watch_ids, []
        for watch_id in watch_ids:
            self._etcd.cancel_watch(watch_id)

    def _on_response(self, generation: int, index: int, response: Any) -> None:
        with self._lock:
            if generation != self._generation or self._stopped.is_set():
                return
            if response is None or isinstance(response, BaseException):
                if response is not None and is_compacted(response):
                    self._resync = True
                log.debug("watch stream ended: %r", response)
                self._generation += 1
                self._broken = True
                self._wake.set()
                return
            changes = decode_watch_response(response)
            if changes.changes:
                self._next[index] = changes.changes[-1].kv.mod_revision + 1
            else:
                self._next[index] = max(self._next[index], changes.revision + 1)
            self._seen[index] = max(self._seen[index], changes.revision)
            if self._progress_of is not None:
                changes = Changes(changes.changes, self._seen[self._progress_of])
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
                old, self._watch_ids = self._watch_ids, []
                resync = self._resync
            for watch_id in old:
                self._etcd.cancel_watch(watch_id)
            created: list[int] = []
            try:
                if resync and not self._deliver_resync(generation):
                    continue
                with self._lock:
                    starts = list(self._next)
                for index, ((key, end), start) in enumerate(zip(self._ranges, starts, strict=True)):
                    callback = functools.partial(self._on_response, generation, index)
                    created.append(self._etcd.add_watch(key, start, callback, range_end=end))
            except EtcdError as exc:
                with self._lock:
                    self._generation += 1  # the watches created so far are not to be heard
                    self._resync = self._resync or is_compacted(exc)
                for watch_id in created:
                    self._etcd.cancel_watch(watch_id)
                if not is_compacted(exc):
                    log.debug("watch re-create failed: %s", exc)
                    self._stopped.wait(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 2.0)
                self._wake.set()
                continue
            with self._lock:
                if generation == self._generation:
                    self._watch_ids = created
                    self._broken = False
                    delay = 0.05
                    continue
            for watch_id in created:
                self._etcd.cancel_watch(watch_id)
            self._wake.set()

    def _deliver_resync(self, generation: int) -> bool:
        """Read the snapshot and hand it on; False if the generation moved meanwhile."""
        snapshot = self._snapshot()
        with self._lock:
            if generation != self._generation:
                return False
            self._next = [snapshot.revision + 1] * len(self._ranges)
            self._seen = [snapshot.revision] * len(self._ranges)
            self._resync = False
            self._sink(Resync(snapshot))
            return True


class PrefixWatch(RangeWatch):
    """A `RangeWatch` of every key under one prefix (a compaction re-reads the prefix)."""

    def __init__(
        self,
        etcd: Etcd,
        prefix: str,
        start_revision: int,
        sink: Callable[[Changes | Resync], None],
    ) -> None:
        super().__init__(
            etcd,
            [(prefix, prefix_end(prefix))],
            start_revision,
            sink,
            functools.partial(etcd.get_prefix, prefix),
        )

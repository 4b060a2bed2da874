"""The leader's history compaction: keeps etcd's backend from filling up with old revisions.

Every checkpoint commit is a new revision, and etcd keeps every revision until someone
compacts: at the demo's 64 commits/s the default 2 GiB quota fills in days, after which
etcd refuses every write (NOSPACE). A cluster started with `--auto-compaction-*` does this
itself (the embedded one is); an external cluster may not, so the leader does it too.

Compaction is cluster-wide and removes the history that a broken watch needs to resume
from its last revision. So the leader keeps a time window: it samples (time, revision)
and compacts only to the newest revision it saw at least `window` seconds ago. A watch
that broke less than `window` ago still resumes; an older one re-reads the prefix
(`PrefixWatch` handles that), which costs a read, not correctness.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from fleet.coord.etcd import Etcd, EtcdError, EtcdUnavailable

log = logging.getLogger("fleet.coord.compaction")

# Samples kept per window: bounds memory whatever the call rate; choosing an older
# sample than strictly possible only keeps a little more history (safe side).
SAMPLES_PER_WINDOW = 100
# After a transient failure, try again this soon (never later than the interval).
RETRY_SECONDS = 10.0


class Compactor:
    """Compacts etcd history to the newest revision observed at least `window` seconds ago,
    at most once every `interval` seconds (`interval` 0 = never).

    Not thread-safe: call it from one loop (the leader's). Cheap when nothing is due: only
    `maybe_compact` talks to etcd, with one call, bounded by the client's timeout.
    """

    def __init__(
        self,
        etcd: Etcd,
        *,
        interval: float,
        window: float,
        clock: Callable[[], float] = time.monotonic,
        probe_key: str | None = None,
    ) -> None:
        if interval < 0 or window <= 0:
            raise ValueError(f"interval {interval!r} must be >= 0 and window {window!r} > 0")
        self._etcd = etcd
        self.interval = interval
        self.window = window
        self._clock = clock
        self._granularity = window / SAMPLES_PER_WINDOW
        self._samples: deque[tuple[float, int]] = deque()
        self._next = clock()  # earliest time of the next attempt
        self.compacted = 0  # highest revision we compacted to (or found compacted)
        self._failing = False
        self._probe_key = probe_key

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def observe(self, revision: int) -> None:
        """Record that the store was at `revision` (at least) now."""
        if not self.enabled:
            return
        now = self._clock()
        if self._samples:
            last_time, last_revision = self._samples[-1]
            if revision <= last_revision or now - last_time < self._granularity:
                return
        self._samples.append((now, revision))

    def _probe(self) -> None:
        """Sample the store's revision with one read of `probe_key`, at most once per
        sample period: the leader's view no longer follows checkpoint commits (its watch
        leaves them out, fleet/coord/controlwatch.py), so the revision it observes can
        stand still while commits pile up history. A failed read just skips the sample."""
        if self._probe_key is None:
            return
        if self._samples and self._clock() - self._samples[-1][0] < self._granularity:
            return
        try:
            _, revision = self._etcd.get(self._probe_key)
        except EtcdError:
            return
        self.observe(revision)

    def target(self) -> int | None:
        """The revision a compaction now would go to, if any is due beyond the last one.

        Drops the samples older than the chosen one: they can never be chosen again.
        """
        horizon = self._clock() - self.window
        samples = self._samples
        while len(samples) > 1 and samples[1][0] <= horizon:
            samples.popleft()
        if not samples or samples[0][0] > horizon or samples[0][1] <= self.compacted:
            return None
        return samples[0][1]

    def maybe_compact(self) -> None:
        """Compact if `interval` has passed and there is a revision old enough.

        Never raises on an etcd error: compaction is upkeep, and the leader's loop must
        go on. A transient failure is retried after at most `RETRY_SECONDS`; a refusal
        (say, a user without permission to compact) is logged and tried again next interval.
        """
        if not self.enabled:
            return
        self._probe()
        now = self._clock()
        if now < self._next:
            return
        revision = self.target()
        if revision is None:
            return  # checked again at the next call: cheap, no etcd call
        try:
            done = self._etcd.compact(revision)
        except EtcdUnavailable as exc:
            self._next = now + min(self.interval, RETRY_SECONDS)
            log.debug("compaction to revision %d failed, retrying: %s", revision, exc)
            return
        except EtcdError as exc:
            self._next = now + self.interval
            if not self._failing:
                log.warning(
                    "cannot compact etcd history (set [etcd] compact_interval = 0 if etcd "
                    "compacts itself): %s",
                    exc,
                )
            self._failing = True
            return
        self._failing = False
        self._next = now + self.interval
        self.compacted = revision
        log.info(
            "compacted etcd history to revision %d%s",
            revision,
            "" if done else " (already compacted there)",
        )

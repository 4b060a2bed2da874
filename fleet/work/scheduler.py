"""A bounded pool of call threads shared by every segment runner of a worker (issue 9).

Why: one thread per owned segment made a worker's thread count grow with its share, and
a worker owning 2,000 segments ran 2,000 threads (and up to hundreds of calls at once)
for handlers that mostly wait on I/O. Here at most `concurrency` threads run steps of
runners picked from one schedule, so the thread count is bounded whatever a worker owns.

A runner is anything with `step() -> float | None`: it does one step (for a segment
runner: one user call, or its finish) and returns the `fleet.clock.now()` time at which it
is next due, or None once it is finished. The schedule is a heap of (due, seq, runner)
with lazy invalidation: `wake` pushes a fresh entry and the old one is skipped when it
surfaces, since finding it in the heap would cost O(n).

Guarantees:
- a runner is never stepped by two threads at once (calls stay serial per segment): it
  is either in the heap (once, validly) or running, never both;
- at most `concurrency` threads, started lazily (a worker owning nothing has none);
- the earliest due runner runs first; a runner that `wake` made due goes ahead of the
  backlog of overdue ones (a handoff must not queue behind every segment's next call);
- a step that raises is logged and its runner dropped; the thread lives on.

One idle thread at a time waits with a timeout for the earliest due time (the "timer");
the others wait without one, so a pool of idle threads does not wake up together for
every due runner.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
from collections.abc import Callable
from typing import Protocol

from fleet import clock

log = logging.getLogger("fleet.work.scheduler")

# The due time of a woken runner: ahead of everything that is merely due.
WOKEN = -math.inf


class Steppable(Protocol):
    def step(self) -> float | None:
        """One step; when it is next due (clock.now() time), or None once finished."""
        ...


class Scheduler:
    def __init__(
        self,
        concurrency: int,
        *,
        now: Callable[[], float] = clock.now,
        name: str = "fleet-call",
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.concurrency = concurrency
        self._now = now
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Steppable]] = []
        self._seq = itertools.count()
        self._queued: dict[int, int] = {}  # id(runner) -> seq of its one valid heap entry
        self._running: dict[int, bool] = {}  # id(runner) -> woken while it ran
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting on _cond
        self._timer = False  # an idle thread waits for the earliest due time
        self._stopped = False

    @property
    def threads(self) -> int:
        """Pool threads started so far (they end only at `stop`)."""
        with self._cond:
            return len(self._threads)

    def submit(self, runner: Steppable, at: float | None = None) -> None:
        """Schedule a new runner, due `at` (default: now)."""
        with self._cond:
            if self._stopped:
                raise RuntimeError("the scheduler is stopped")
            key = id(runner)
            if key in self._queued or key in self._running:
                raise ValueError("this runner is already scheduled")
            self._push(runner, self._now() if at is None else at)
            self._grow()

    def wake(self, runner: Steppable) -> None:
        """Make `runner` due now, ahead of the backlog; if a thread is stepping it, it is
        due again as soon as that step returns. Unknown (finished) runners are ignored."""
        with self._cond:
            key = id(runner)
            if key in self._running:
                self._running[key] = True
            elif key in self._queued:
                self._push(runner, WOKEN)
                self._grow()

    def stop(self, timeout: float = 1.0) -> None:
        """End the pool: idle threads at once, busy ones after their step (waited for up
        to `timeout` in all). Runners still scheduled are dropped without another step,
        so stop only once the runners are finished or no longer matter (process exit)."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._queued.clear()
            self._cond.notify_all()
            threads = list(self._threads)
        until = self._now() + timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, until - self._now()))

    # -- under the lock -------------------------------------------------------------------

    def _push(self, runner: Steppable, due: float) -> None:
        """(Re)schedule; any older entry of the runner becomes stale."""
        top = self._top()
        seq = next(self._seq)
        self._queued[id(runner)] = seq
        heapq.heappush(self._heap, (due, seq, runner))
        if due <= self._now():
            self._cond.notify()  # an idle thread takes it
        elif top is None or due < top:
            self._cond.notify_all()  # a new earliest due time: the timer must re-aim

    def _top(self) -> float | None:
        """The earliest valid due time, dropping stale entries on the way."""
        heap = self._heap
        while heap:
            due, seq, runner = heap[0]
            if self._queued.get(id(runner)) == seq:
                return due
            heapq.heappop(heap)
        return None

    def _grow(self) -> None:
        """One more thread when none is idle to take what is scheduled (lazily: a pool
        reaches `concurrency` threads only when that many steps were due at once)."""
        if self._idle or len(self._threads) >= self.concurrency or self._stopped:
            return
        thread = threading.Thread(
            target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _take(self) -> Steppable | None:
        """Wait for the earliest runner to be due and claim it; None once stopped."""
        while not self._stopped:
            due = self._top()
            wait: float | None = None
            if due is not None:
                wait = due - self._now()
                if wait <= 0:
                    _, _, runner = heapq.heappop(self._heap)
                    del self._queued[id(runner)]
                    self._running[id(runner)] = False
                    if self._top() is not None:
                        self._cond.notify()  # someone else: the next one, or the timer
                        self._grow()
                    return runner
            self._idle += 1
            try:
                if wait is not None and not self._timer:
                    self._timer = True
                    try:
                        self._cond.wait(wait)
                    finally:
                        self._timer = False
                else:
                    self._cond.wait()
            finally:
                self._idle -= 1
        return None

    # -- a pool thread --------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                runner = self._take()
            if runner is None:
                return
            due: float | None = None
            try:
                due = runner.step()
            except BaseException:  # noqa: BLE001 - the pool outlives a runner's bug
                log.exception("a runner's step failed; it is dropped")
            with self._cond:
                woken = self._running.pop(id(runner), False)
                if due is not None and not self._stopped:
                    self._push(runner, WOKEN if woken else due)

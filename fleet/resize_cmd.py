"""`fleet resize S`: the command line of a resize (the etcd side is fleet/coord/resize.py).

Writes the new spec, then (unless --no-wait) follows the fleet until it has settled on
the new count, printing a line whenever it got further, and ends with one summary line.
With --drop-checkpoints it then deletes the checkpoints of the segments the fleet no
longer has, each only once nobody owns that segment. Ctrl-C stops the waiting, not the
resize: the workers carry on with the new count.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from fleet import config as config_mod
from fleet.coord.spec import MAX_SEGMENTS

if TYPE_CHECKING:
    from fleet.coord.etcd import Etcd
    from fleet.coord.keys import Keys
    from fleet.coord.resize import Resized
    from fleet.coord.view import FleetView

POLL = 0.25
PROGRESS_EVERY = 1.0  # at most one progress line a second (a big fleet changes often)
DEFAULT_TIMEOUT = 300.0
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "resize", help="change the segment count of a running fleet; waits until it settled"
    )
    p.add_argument("count", metavar="S", help=f"the new segment count (1 to {MAX_SEGMENTS})")
    p.add_argument(
        "--drop-checkpoints",
        dest="drop_checkpoints",
        action="store_true",
        help="delete the checkpoints of segments >= S once they are released "
        "(default: keep them, so growing back resumes from them)",
    )
    p.add_argument(
        "--no-wait", dest="no_wait", action="store_true", help="return once the spec is written"
    )
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        help=f"wait at most this long for the fleet to settle (default {DEFAULT_TIMEOUT:g})",
    )
    common(p)


def _usage(message: str) -> Exception:
    from fleet.cli import UsageError

    return UsageError(f"resize: {message}")


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_SEGMENTS:
        raise _usage(f"segments = {text!r}: expected an integer from 1 to {MAX_SEGMENTS}")
    return int(text)


def _timeout(text: str | None) -> float:
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise _usage(f"--timeout {text!r}: expected a number of seconds > 0")
    return value


def run(args: argparse.Namespace, cfg: config_mod.Config, out: TextIO = sys.stdout) -> int:
    from fleet.coord import resize
    from fleet.coord.etcd import connect
    from fleet.coord.keys import Keys
    from fleet.supervise.rundir import with_local_etcd

    count = _count(str(args.count))
    timeout = _timeout(args.timeout)
    if args.drop_checkpoints and args.no_wait:
        raise _usage("--drop-checkpoints waits for the releases; it cannot be used with --no-wait")
    cfg = with_local_etcd(cfg)
    keys = Keys(cfg.etcd.prefix, cfg.name)
    etcd = connect(cfg.etcd)
    try:
        try:
            done = resize.resize(etcd, keys, count)
        except resize.NoFleet as exc:
            print(f"fleet: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (resize.UnreadableSpec, resize.ConcurrentResize) as exc:
            print(f"fleet: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        return _follow(etcd, keys, done, args, timeout, out)
    finally:
        etcd.close()


def _follow(
    etcd: Etcd, keys: Keys, done: Resized, args: argparse.Namespace, timeout: float, out: TextIO
) -> int:
    from fleet.coord import resize

    old, new = done.before.segments, done.after.segments
    name = keys.name
    if not done.changed:
        print(f"fleet {name!r} already has {new} segments: nothing to resize", file=out)
        if not args.drop_checkpoints:
            return EXIT_OK
    elif args.no_wait:
        print(
            f"fleet {name!r}: {old} -> {new} segments (spec written; not waiting, "
            "see fleet status)",
            file=out,
        )
        return EXIT_OK
    else:
        print(f"fleet {name!r}: resizing {old} -> {new} segments", file=out, flush=True)
    started = time.monotonic()
    after, left = _wait_settled(etcd, keys, new, started + timeout, out)
    if after is None:
        kept = "; no checkpoint dropped" if args.drop_checkpoints else ""
        print(
            f"fleet {name!r}: not settled on {new} segments after {timeout:g} s ({left}); "
            f"the spec stays at {new}, the workers go on towards it (see fleet status){kept}",
            file=out,
        )
        return EXIT_FAILURE
    tail = ""
    if args.drop_checkpoints:
        dropped = _drop(etcd, keys, new, started + timeout, out)
        if dropped is None:
            return EXIT_FAILURE
        tail = f", {dropped} checkpoints dropped"
    elif new < old:
        tail = ", checkpoints kept"
    if not done.changed:
        print(f"fleet {name!r}: {new} segments{tail}", file=out)
        return EXIT_OK
    result = resize.outcome(done.view, after, old, new)
    if new < old:
        what = f"{result.released} released"
    else:
        resumed = done.resumed
        what = f"{result.added} added" + (f" ({resumed} with kept checkpoints)" if resumed else "")
    idle = "; no workers running: they take the new count when they start"
    print(
        f"fleet {name!r}: {old} -> {new} segments, {what}, {result.moved} moved{tail}"
        f"{idle if not after.members() else ''} ({time.monotonic() - started:.1f} s)",
        file=out,
    )
    return EXIT_OK


def _wait_settled(
    etcd: Etcd, keys: Keys, segments: int, until: float, out: TextIO
) -> tuple[FleetView | None, str]:
    """The fleet view once it has settled on `segments` (None at `until`), and the last
    progress seen; a progress line whenever it changed, at most one a second."""
    from fleet.coord import resize
    from fleet.coord.view import FleetView

    shown = ""
    last_line = 0.0
    while True:
        snapshot = etcd.get_prefix(keys.root)
        view = FleetView.from_snapshot(keys, snapshot, track_checkpoints=False)
        state = resize.progress(view, segments)
        if state.settled:
            return view, ""
        now = time.monotonic()
        line = state.describe()
        if line != shown and now - last_line >= PROGRESS_EVERY:
            print(f"resize: {line}", file=out, flush=True)
            shown, last_line = line, now
        if now >= until:
            return None, line
        time.sleep(POLL)


def _drop(etcd: Etcd, keys: Keys, segments: int, until: float, out: TextIO) -> int | None:
    """Drop the checkpoints >= `segments`, waiting for owner keys still there; how many,
    or None when some were still owned at `until`."""
    from fleet.coord import resize

    total = 0
    while True:
        dropped, owned = resize.drop_checkpoints(etcd, keys, segments)
        total += len(dropped)
        if not owned:
            return total
        if time.monotonic() >= until:
            print(
                f"resize: segments {owned[:10]} still have an owner: their checkpoints are "
                f"kept ({total} dropped); run fleet resize {segments} --drop-checkpoints again",
                file=out,
            )
            return None
        time.sleep(POLL)

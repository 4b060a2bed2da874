"""A handler that fences its own writes with the ownership token.

`ctx.commit` is fenced by etcd itself. Writes to any other store must be fenced by
that store: keep the highest token seen per segment next to the data and refuse a
write that carries a lower one. A paused ex-owner that wakes up after its segment
moved then cannot overwrite what the new owner wrote, whatever its clock says.

Run it from the repository root (which makes `examples` importable); the database
(`fenced.sqlite`, or the path in $FENCED_SQLITE) and fleet's `.fleet/` go to the
directory `fleet up` runs in, here a scratch one, not into the repository:

    export PYTHONPATH=$PWD
    cd "$(mktemp -d)"
    fleet up --workers 2 --handler examples.fenced_sqlite:FencedCounter

The tokens are etcd revisions, so they only grow within one etcd data dir: after
`fleet reset` (or against another etcd) they start low again, and this database, which
keeps the highest token per segment, must be deleted too or it refuses every write.
"""

from __future__ import annotations

import os
import sqlite3
import threading

from fleet import LostOwnership, SegmentContext

SCHEMA = """
CREATE TABLE IF NOT EXISTS progress (
    segment INTEGER PRIMARY KEY,
    token   INTEGER NOT NULL,   -- highest fencing token that wrote this row
    done    INTEGER NOT NULL
)
"""


class FencedCounter:
    """Counts calls per segment in SQLite; every write is conditional on the token."""

    def __init__(self, path: str | None = None) -> None:
        # Relative to the working directory of the worker (that of `fleet up`).
        self.path = os.path.abspath(path or os.environ.get("FENCED_SQLITE", "fenced.sqlite"))
        self.local = threading.local()
        with sqlite3.connect(self.path) as db:
            db.execute(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        if not hasattr(self.local, "db"):
            self.local.db = sqlite3.connect(self.path, timeout=10)
        db: sqlite3.Connection = self.local.db
        return db

    def handle(self, ctx: SegmentContext) -> None:
        db = self._db()
        with db:
            db.execute(
                "INSERT INTO progress(segment, token, done) VALUES (?, ?, 0) "
                "ON CONFLICT(segment) DO NOTHING",
                (ctx.segment, ctx.token),
            )
            cur = db.execute(
                "UPDATE progress SET done = done + 1, token = ? "
                "WHERE segment = ? AND token <= ?",
                (ctx.token, ctx.segment, ctx.token),
            )
            if cur.rowcount == 0:
                # A newer owner has written: we are fenced out. Stop touching the segment.
                raise LostOwnership(f"segment {ctx.segment}: token {ctx.token} is stale")
        ctx.commit({"token": ctx.token})

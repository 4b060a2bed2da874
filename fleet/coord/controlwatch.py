"""A worker's control watch: every key of its fleet except the checkpoints (issue 9).

Under the fleet root the keys sort assignment < checkpoints/ < election/ < health/ <
members/ < owners/ < spec, and checkpoint commits are nearly all the writes: one prefix
watch of the root sent every commit of the fleet to every worker, which only dropped it.
The key layout stays (checkpoints are user data, and a rolling upgrade mixes versions);
the watch covers the two ranges on either side of `checkpoints/` instead, so etcd never
sends a worker a checkpoint commit. Health keys stay in: they are written rarely.

Why two streams are enough although etcd orders events only within one watch:

- Each key lies in one range, so the changes of each key arrive in revision order: what
  `Incarnation._check_deletes` reads (our member, election and owner keys, each with the
  view's copy of that same key) is as before, and all of those sit in the second range,
  with the spec: a worker still sees its own leadership, the members and the spec in
  revision order relative to each other.
- Only the assignment is in the other range, and nothing depends on its order relative
  to the rest: every decision taken from the view is a guarded transaction (an acquire
  names the assignment's mod_revision and needs the owner key absent, an assignment
  write needs the writer's election key and the assignment it was computed from
  (fleet/work/leading.py), a commit needs its token), so a view whose
  assignment is ahead of or behind its owner keys can only make a guard fail or a
  decision wait; the view is advisory. etcd delivers both watches in revision order
  while it has them synced (one gRPC stream); they can drift apart only while catching
  up after a re-create.
- The view's revision is compared with runners' tokens (owner keys' create revisions):
  it reports what the second range has delivered, never more (`progress_of`).
- A compaction re-reads both ranges at one revision (`control_snapshot`) and restarts
  both watches from there (`RangeWatch`): no key of the other range is lost.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from fleet.coord.etcd import Changes, Etcd, Resync, Snapshot, prefix_end
from fleet.coord.keys import Keys
from fleet.coord.watch import KeyRange, RangeWatch

# The range whose progress is the control watch's revision: members, election, owners.
_OWNERS_RANGE = 1


def control_ranges(keys: Keys) -> list[KeyRange]:
    """[root, checkpoints/) and [after checkpoints/, end of root): everything but checkpoints."""
    return [
        (keys.root, keys.checkpoints.encode()),
        (prefix_end(keys.checkpoints).decode(), prefix_end(keys.root)),
    ]


def control_snapshot(etcd: Etcd, keys: Keys) -> Snapshot:
    """Both ranges at one revision: one read of the root, checkpoints dropped (a `Resync`
    after a compaction is rare; the join reads the root the same way)."""
    snapshot = etcd.get_prefix(keys.root)
    kvs = [kv for kv in snapshot.kvs if not kv.key.startswith(keys.checkpoints)]
    return Snapshot(snapshot.revision, kvs)


def control_watch(
    etcd: Etcd, keys: Keys, start_revision: int, sink: Callable[[Changes | Resync], None]
) -> RangeWatch:
    """The worker's watch of its fleet from `start_revision`, checkpoints left out."""
    return RangeWatch(
        etcd,
        control_ranges(keys),
        start_revision,
        sink,
        functools.partial(control_snapshot, etcd, keys),
        progress_of=_OWNERS_RANGE,
    )

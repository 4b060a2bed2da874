"""The etcd faults of a `--cluster` chaos run (a 3-member cluster, `clusteretcd`).

`member_kill9`
    SIGKILL of one member, the raft leader or a follower (the seed chooses), restarted on
    its data dir 1-5 s later. A killed leader costs an election (about 1-2 s with etcd's
    default timing); clients connected to it fail over.
`member_pause`
    SIGSTOP of one member (leader or follower) for a while, then SIGCONT. A frozen member
    is worse than a dead one: connections to it hang until the client's timeout. Leader
    pauses are mostly shorter than the lease TTL; one in five lasts TTL + 0.5-3 s, long
    enough for etcd issue 15247 (fixed by etcd PR 16822, not in Debian's 3.4.23): the old
    leader, resumed, revokes the leases it thinks expired although their owners kept
    them alive through the new leader. fleet must notice (its keys are deleted) and
    rejoin; the history must stay clean (`clusterreport` counts the workers hit).
`leader_transfer`
    Raft leadership moved to a follower (etcd's MoveLeader), as an operator or a rolling
    etcd upgrade does.
`quorum_loss`
    Two members killed at once (the survivor is the leader or a follower), both restarted
    1-4 s later: no quorum, so nothing can commit; workers stop at their lease deadlines
    and rejoin once the cluster is back. `clusterreport` checks that no commit succeeded
    while quorum was gone and measures how long commits took to resume.

All four hold the one "etcd" resource, so two of them never overlap (a kill during a
pause of another member would be a quorum loss that nobody chose). Each is a function of
the `Injector` running it (`Injector._fault_<kind>` delegates). Member detail keys are
``paused_at``/``resumed_at`` (not the workers' ``stopped_at``): an etcd pause excuses no
overlap of a worker's calls.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.chaos.clusteretcd import ClusterEtcd
    from tests.chaos.faults import FaultRecord, Injector, Planned

KINDS = ("member_kill9", "member_pause", "leader_transfer", "quorum_loss")
WEIGHTS = {"member_kill9": 2.0, "member_pause": 2.0, "leader_transfer": 1.5, "quorum_loss": 1.0}
RESOURCES = dict.fromkeys(KINDS, "etcd")
# The single-etcd kind the cluster kinds replace.
REPLACED = ("etcd_restart",)
LONG_LEADER_PAUSE = 0.2  # share of leader pauses that outlast the lease TTL (issue 15247)


def plan_params(
    kind: str, rng: random.Random, lease_ttl: int, guaranteed: bool
) -> tuple[float, dict[str, Any]]:
    """(seconds, params) of one planned cluster fault, all drawn from the plan's rng."""
    params: dict[str, Any] = {}
    seconds = 0.0
    if kind == "member_kill9":
        params["role"] = rng.choice(["leader", "follower"])
        seconds = rng.uniform(1.0, 5.0)
    elif kind == "member_pause":
        params["role"] = rng.choice(["leader", "follower"])
        long = not guaranteed and rng.random() < LONG_LEADER_PAUSE
        if params["role"] == "leader":
            # Shorter than the TTL most of the time: a longer one trips etcd issue 15247.
            seconds = (
                rng.uniform(lease_ttl + 0.5, lease_ttl + 3.0)
                if long
                else rng.uniform(1.0, 0.8 * lease_ttl)
            )
        else:
            seconds = rng.uniform(1.0, lease_ttl + 3.0)
    elif kind == "quorum_loss":
        params["survivor"] = rng.choice(["leader", "follower"])
        seconds = rng.uniform(1.0, 4.0)
    return round(seconds, 3), params


def _etcd(inj: Injector) -> ClusterEtcd:
    from tests.chaos.clusteretcd import ClusterEtcd

    etcd = inj.cluster.etcd
    assert isinstance(etcd, ClusterEtcd), "a cluster fault needs --cluster"
    return etcd


def _leader(inj: Injector, etcd: ClusterEtcd) -> int:
    from tests.chaos.faults import NoTarget

    try:
        return etcd.leader(timeout=15.0)
    except AssertionError as exc:
        raise NoTarget(f"no etcd leader to act on: {exc}") from None


def _follower(leader: int, pick: int, size: int) -> int:
    followers = [i for i in range(size) if i != leader]
    return followers[pick % len(followers)]


def _target(planned: Planned, leader: int, size: int, role: str) -> int:
    return leader if role == "leader" else _follower(leader, planned.pick, size)


def _describe(etcd: ClusterEtcd, index: int, leader: int) -> str:
    return f"m{index} ({'leader' if index == leader else 'follower'}, pid {etcd.pid(index)})"


def _leader_after(etcd: ClusterEtcd) -> str | None:
    try:
        return f"m{etcd.leader(timeout=10.0)}"
    except AssertionError:
        return None


def member_kill9(inj: Injector, planned: Planned, record: FaultRecord) -> None:
    etcd = _etcd(inj)
    leader = _leader(inj, etcd)
    role = str(planned.params["role"])
    index = _target(planned, leader, len(etcd.members), role)
    inj._begin(record, _describe(etcd, index, leader), role=role, down=planned.seconds)
    record.detail["killed_at"] = time.monotonic()
    etcd.kill_members([index])
    inj._sleep(planned.seconds)
    if inj.stop.is_set():
        return  # torn down: heal (or the teardown) deals with it
    started = time.monotonic()
    record.detail["restarted_at"] = started
    etcd.start_members([index])
    inj._end(
        record, healthy_after=round(time.monotonic() - started, 3), leader_after=_leader_after(etcd)
    )


def member_pause(inj: Injector, planned: Planned, record: FaultRecord) -> None:
    etcd = _etcd(inj)
    leader = _leader(inj, etcd)
    role = str(planned.params["role"])
    index = _target(planned, leader, len(etcd.members), role)
    long = role == "leader" and planned.seconds > inj.lease_ttl
    inj._begin(
        record, _describe(etcd, index, leader), role=role, seconds=planned.seconds,
        past_ttl=long,
    )  # fmt: skip
    record.detail["paused_at"] = time.monotonic()
    record.detail["paused_wall"] = time.time()
    etcd.members[index].pause()
    try:
        inj._sleep(planned.seconds)
    finally:
        etcd.members[index].resume()  # also on a torn-down run: never leave it frozen
        record.detail["resumed_at"] = time.monotonic()
        record.detail["resumed_wall"] = time.time()
    inj._end(record, leader_after=_leader_after(etcd))


def leader_transfer(inj: Injector, planned: Planned, record: FaultRecord) -> None:
    etcd = _etcd(inj)
    leader = _leader(inj, etcd)
    to = _follower(leader, planned.pick, len(etcd.members))
    inj._begin(record, f"m{leader} -> m{to}")
    started = time.monotonic()
    etcd.cluster.transfer_leadership(to, timeout=20.0)
    inj._end(record, took=round(time.monotonic() - started, 3))


def quorum_loss(inj: Injector, planned: Planned, record: FaultRecord) -> None:
    etcd = _etcd(inj)
    leader = _leader(inj, etcd)
    size = len(etcd.members)
    survivor = _target(planned, leader, size, str(planned.params["survivor"]))
    victims = [i for i in range(size) if i != survivor]
    inj._begin(
        record, " + ".join(_describe(etcd, i, leader) for i in victims),
        survivor=f"m{survivor} ({'leader' if survivor == leader else 'follower'})",
        down=planned.seconds,
    )  # fmt: skip
    etcd.kill_members(victims)
    record.detail["killed_at"] = time.monotonic()  # quorum gone since the first kill
    inj._sleep(planned.seconds)
    if inj.stop.is_set():
        return
    started = time.monotonic()
    record.detail["restarted_at"] = started
    etcd.start_members(victims)
    record.detail["healthy_at"] = time.monotonic()
    inj._end(
        record, healthy_after=round(time.monotonic() - started, 3), leader_after=_leader_after(etcd)
    )

"""A read-only view of a fleet for `fleet status` (its JSON form is a contract)."""

from __future__ import annotations

import time
from typing import Any

from fleet.coord.etcd import NOSPACE_HELP, Etcd, EtcdError
from fleet.coord.health import Failing, ago, failing_lines
from fleet.coord.keys import Keys
from fleet.coord.view import FleetView, Member, Owner
from fleet.logs import plural

FAILING_SHOWN = 50  # failing-segment lines in the human form (--json lists them all)


def collect(etcd: Etcd, keys: Keys) -> dict[str, Any]:
    """One consistent read of the whole fleet (plus one TTL query per member)."""
    view = FleetView.from_snapshot(keys, etcd.get_prefix(keys.root))
    assignment = view.assignment()
    assigned_to = assignment.owner_of() if assignment else {}
    owners = view.owners()
    checkpoints = view.checkpoints()
    leader = view.leader()
    segments = view.segments() or 0
    failing, failing_count = _failing(view, owners)
    shedding = _shedding(view)
    members = []
    for member in sorted(view.members().values(), key=lambda m: m.id):
        try:
            ttl = etcd.lease_ttl(member.lease)
        except EtcdError:
            ttl = None
        members.append(
            {
                "id": member.id,
                "host": member.info.get("host"),
                "pid": member.info.get("pid"),
                "slot": member.info.get("slot"),
                "lease": member.lease,
                "ttl": ttl,
                "weight": member.info.get("weight", 1.0),
                "assigned": assignment.members.get(member.id, []) if assignment else [],
                "owned": sorted(s for s, o in owners.items() if o.member == member.id),
                "failing": failing_count.get(member.id, 0),
                "shedding": shedding.get(member.id),
            }
        )
    segment_owners = []
    for seg in range(segments):
        owner = owners.get(seg)
        segment_owners.append(
            {
                "segment": seg,
                "assigned": assigned_to.get(seg),
                "owner": owner.member if owner else None,
                "token": owner.token if owner else None,
                "checkpoint": checkpoints.get(seg),
            }
        )
    return {
        "fleet": keys.name,
        "revision": view.revision,
        "segments": segments,
        "leader": leader.value.decode() if leader else None,
        "generation": assignment.generation if assignment else 0,
        "members": members,
        "segment_owners": segment_owners,
        "unowned": [s["segment"] for s in segment_owners if s["owner"] is None],
        "moving": [
            s["segment"]
            for s in segment_owners
            if s["owner"] is None or s["owner"] != s["assigned"]
        ],
        "warnings": warnings(etcd),
        "failing": [
            {"member": member, **f.to_json()}
            for member, f in sorted(failing, key=lambda mf: (mf[1].segment, mf[0]))
        ],
    }


def _failing(
    view: FleetView, owners: dict[int, Owner]
) -> tuple[list[tuple[str, Failing]], dict[str, int]]:
    """(member, failing segment) pairs, and the failing count per member, from the health
    keys: only a key of the member's current lease, and only segments it still owns
    (a key lags its worker by up to a few seconds)."""
    members: dict[str, Member] = view.members()
    pairs: list[tuple[str, Failing]] = []
    counts: dict[str, int] = {}
    for member_id, (lease, health) in view.health().items():
        member = members.get(member_id)
        if member is None or member.lease != lease:
            continue
        listed = [
            f
            for f in health.failing
            if (o := owners.get(f.segment)) is not None and o.member == member_id
        ]
        pairs += [(member_id, f) for f in listed]
        unlisted = max(0, health.count - len(health.failing))  # over MAX_LISTED
        if listed or unlisted:
            counts[member_id] = len(listed) + unlisted
    return pairs, counts


def _shedding(view: FleetView) -> dict[str, dict[str, float]]:
    """The members shedding load because etcd is slow (fleet/work/backpressure.py), from
    the health keys of their current leases."""
    members: dict[str, Member] = view.members()
    return {
        member_id: health.shedding
        for member_id, (lease, health) in view.health().items()
        if health.shedding
        and (member := members.get(member_id)) is not None
        and member.lease == lease
    }


def warnings(etcd: Etcd) -> list[str]:
    """One line per problem of the etcd cluster itself that stops the fleet working.

    An active NOSPACE alarm is one: the fleet looks healthy (reads and keepalives still
    work) while every commit and assignment write is refused.
    """
    try:
        alarms = etcd.alarms()
    except EtcdError as exc:
        return [f"cannot read etcd alarms: {exc}"]
    out = []
    for alarm in alarms:
        if alarm.startswith("NOSPACE"):
            out.append(f"etcd alarm {alarm}: {NOSPACE_HELP}")
        else:
            out.append(f"etcd alarm {alarm}")
    return out


def render(status: dict[str, Any]) -> str:
    """The human form: a header line and one row per member."""
    owned = status["segments"] - len(status["unowned"])
    failing = sum(m.get("failing", 0) for m in status["members"])
    shedding = [m for m in status["members"] if m.get("shedding")]
    lines = [
        f"fleet {status['fleet']}: {plural(len(status['members']), 'member')}, "
        f"{owned}/{status['segments']} segments owned, "
        + (f"{failing} failing, " if failing else "")
        + (f"{len(shedding)} shedding load, " if shedding else "")
        + f"leader {status['leader'] or '-'}, "
        f"generation {status['generation']}, revision {status['revision']}",
    ]
    lines += [f"warning: {w}" for w in status.get("warnings", [])]
    if status["members"]:
        lines.append(
            f"{'MEMBER':<24} {'PID':>7} {'TTL':>4} {'OWNED':>5} {'ASSIGNED':>8} {'FAILING':>7}"
        )
    for m in status["members"]:
        mark = " *" if m["id"] == status["leader"] else ""
        ttl = "-" if m["ttl"] is None else m["ttl"]
        lines.append(
            f"{m['id'] + mark:<24} {m['pid'] or '-':>7} {ttl:>4} "
            f"{len(m['owned']):>5} {len(m['assigned']):>8} {m.get('failing', 0):>7}"
        )
    lines += _failing_lines(status)
    lines += [_shedding_line(m["id"], m["shedding"]) for m in shedding]
    if status["moving"]:
        lines.append(f"moving: {status['moving']}")
    return "\n".join(lines)


def _shedding_line(member_id: str, shed: dict[str, float]) -> str:
    return (
        f"  {member_id}: shedding load, calls spaced {shed['stretch']:.1f}x the interval "
        f"(etcd round trip p99 {shed['p99_ms']:.0f} ms) for {ago(time.time() - shed['since'])}"
    )


def _failing_lines(status: dict[str, Any]) -> list[str]:
    """One line per failing segment (at most FAILING_SHOWN), by member."""
    lines: list[str] = []
    entries = status.get("failing", [])
    for m in status["members"]:
        listed = [
            f
            for f in (Failing.from_json(e) for e in entries if e.get("member") == m["id"])
            if f is not None
        ]
        lines += failing_lines(m["id"], listed, max(m.get("failing", 0), len(listed)))
    if len(lines) > FAILING_SHOWN:
        more = len(lines) - FAILING_SHOWN
        lines = [*lines[:FAILING_SHOWN], f"  ... {more} more lines (fleet status --json)"]
    return lines

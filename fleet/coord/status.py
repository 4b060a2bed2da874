"""A read-only view of a fleet for `fleet status` (its JSON form is a contract)."""

from __future__ import annotations

from typing import Any

from fleet.coord.etcd import NOSPACE_HELP, Etcd, EtcdError
from fleet.coord.keys import Keys
from fleet.coord.view import FleetView


def collect(etcd: Etcd, keys: Keys) -> dict[str, Any]:
    """One consistent read of the whole fleet (plus one TTL query per member)."""
    view = FleetView.from_snapshot(keys, etcd.get_prefix(keys.root))
    assignment = view.assignment()
    assigned_to = assignment.owner_of() if assignment else {}
    owners = view.owners()
    checkpoints = view.checkpoints()
    leader = view.leader()
    segments = view.segments() or 0
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
    lines = [
        f"fleet {status['fleet']}: {len(status['members'])} members, "
        f"{owned}/{status['segments']} segments owned, leader {status['leader'] or '-'}, "
        f"generation {status['generation']}, revision {status['revision']}",
    ]
    lines += [f"warning: {w}" for w in status.get("warnings", [])]
    if status["members"]:
        lines.append(f"{'MEMBER':<24} {'PID':>7} {'TTL':>4} {'OWNED':>5} {'ASSIGNED':>8}")
    for m in status["members"]:
        mark = " *" if m["id"] == status["leader"] else ""
        ttl = "-" if m["ttl"] is None else m["ttl"]
        lines.append(
            f"{m['id'] + mark:<24} {m['pid'] or '-':>7} {ttl:>4} "
            f"{len(m['owned']):>5} {len(m['assigned']):>8}"
        )
    if status["moving"]:
        lines.append(f"moving: {status['moving']}")
    return "\n".join(lines)

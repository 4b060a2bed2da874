"""What the etcd faults of a `--cluster` chaos run did, from the ledgers and the logs.

`outcomes` runs after the history check: the longest stretch without a successful commit
around each etcd fault, who was killed and how fast the member came back, the leases
lost while a member was paused and the workers whose keys were deleted right after it
resumed (etcd issue 15247 shows so), and for each quorum loss the commits acknowledged
while two members were dead (must be none: `failures`) and when commits came back.
`render_lines` is its part of the one-screen summary.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.chaos.clusterfaults import KINDS

if TYPE_CHECKING:
    from tests.chaos.faults import FaultRecord

AFTER_RESUME = 3.0  # leases lost this soon after a SIGCONT count as lost to the resume
STALL_TAIL = 5.0  # a commit stall counts for a fault if it overlaps [start, end + this]


LEASE_LOST_RE = re.compile(
    r"(\d\d):(\d\d):(\d\d)\.(\d+) (\S+) WARNING lease ([0-9a-f]+) lost: (.*)$", re.MULTILINE
)


def lease_losses(logs: Mapping[str, str], day_start: float) -> list[tuple[float, str, str]]:
    """(wall time, member, why) of every "lease ... lost" line in the fleet logs."""
    found = []
    for text in logs.values():
        for m in LEASE_LOST_RE.finditer(text):
            hh, mm, ss, frac, member, _lease, why = m.groups()
            wall = day_start + int(hh) * 3600 + int(mm) * 60 + int(ss) + float(f"0.{frac}")
            found.append((wall, member, why.strip()))
    found.sort()
    return found


def ok_commits(ledger_dir: Path) -> list[tuple[float, float, str]]:
    """(call start, commit acknowledged, description) of every call whose commit succeeded.

    The acknowledgement is the end line's time, not the checker's `work_end` (which bounds
    the work): a commit retried across an outage is acknowledged only once etcd is back.
    """
    found = []
    for path in sorted(ledger_dir.glob("*.jsonl")):
        starts: dict[tuple[int, int], float] = {}
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("kind") or rec.get("ev") not in ("start", "end"):
                    continue  # hooks and child lines commit nothing
                key = (int(rec["segment"]), int(rec["token"]))
                if rec["ev"] == "start":
                    starts[key] = float(rec["t"])
                elif rec.get("commit") == "ok" and key in starts:
                    found.append(
                        (
                            starts.pop(key),
                            float(rec["t"]),
                            f"{rec['member']} pid {rec['pid']} segment {key[0]} token {key[1]}",
                        )
                    )
    found.sort(key=lambda c: c[1])
    return found


def _longest_gap(ends: Sequence[float], lo: float, hi: float) -> float | None:
    """Longest stretch without a successful commit that overlaps [lo, hi]."""
    if not ends:
        return None
    i = max(0, bisect.bisect_left(ends, lo) - 1)
    j = min(len(ends), bisect.bisect_right(ends, hi) + 1)
    window = ends[i:j]
    if len(window) < 2:
        return None
    return max(b - a for a, b in zip(window, window[1:], strict=False))


def outcomes(
    records: Sequence[FaultRecord], ledger_dir: Path, logs: Mapping[str, str], day_start: float
) -> dict[str, Any]:
    """Per cluster fault: the commit stall around it; per kill, the role and the restart;
    per pause, the leases lost meanwhile and the keys deleted right after the resume
    (issue 15247 shows as keys deleted under live workers); per quorum loss, commits that
    succeeded without quorum (must be 0) and when commits resumed."""
    commits = ok_commits(ledger_dir)
    ends = [acked for _start, acked, _what in commits]
    losses = lease_losses(logs, day_start)
    stalls: dict[str, list[float]] = {k: [] for k in KINDS}
    kills: list[dict[str, Any]] = []
    pauses: list[dict[str, Any]] = []
    transfers: list[float] = []
    quorum: list[dict[str, Any]] = []
    for r in records:
        if r.kind not in KINDS or r.start is None or r.skipped:
            continue
        gap = _longest_gap(ends, r.start, (r.end or r.start) + STALL_TAIL)
        if gap is not None:
            stalls[r.kind].append(round(gap, 3))
        d = r.detail
        if r.kind == "member_kill9" and "healthy_after" in d:
            kills.append({"index": r.index, "role": d["role"], "down": d["down"],
                          "healthy_after": d["healthy_after"]})  # fmt: skip
        elif r.kind == "leader_transfer" and "took" in d:
            transfers.append(float(d["took"]))
        elif r.kind == "member_pause" and "resumed_wall" in d:
            at = float(d["resumed_wall"])
            deleted = [
                m for t, m, why in losses if at <= t <= at + AFTER_RESUME and "was deleted" in why
            ]
            during = [m for t, m, _ in losses if float(d["paused_wall"]) <= t < at]
            pauses.append(
                {
                    "index": r.index,
                    "role": d.get("role"),
                    "seconds": d.get("seconds"),
                    "past_ttl": bool(d.get("past_ttl")),
                    "keys_deleted_after_resume": len(deleted),
                    "members": sorted(set(deleted)),
                    "leases_lost_during": len(during),
                }
            )
        elif r.kind == "quorum_loss" and "restarted_at" in d:
            down, up = float(d["killed_at"]), float(d["restarted_at"])
            # Acknowledged while two of three members were dead: impossible for a write
            # that went through raft (a call that began earlier may have landed before).
            without = [c for c in commits if c[0] > down and c[1] < up]
            after = ends[bisect.bisect_right(ends, up) :]
            quorum.append(
                {
                    "index": r.index,
                    "down_seconds": round(up - down, 3),
                    "ok_commits_without_quorum": len(without),
                    "examples": [
                        f"{what}: started {a:.3f}, acknowledged {b:.3f}"
                        for a, b, what in without[:3]
                    ],
                    "commits_resumed_after": round(after[0] - up, 3) if after else None,
                }
            )
    return {
        "stalls": stalls,
        "kills": kills,
        "pauses": pauses,
        "transfers": transfers,
        "quorum_losses": quorum,
    }


def _span(values: Sequence[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def render_lines(summary: Mapping[str, Any]) -> list[str]:
    """The cluster part of the one-screen summary."""
    out = summary.get("cluster_outcomes")
    if not out:
        return []
    lines = []
    stalls = {k: v for k, v in out["stalls"].items() if v}
    if stalls:
        lines.append(
            "  longest commit stall around each etcd fault (s, max / median): "
            + ", ".join(
                f"{k} {max(v):.2f} / {sorted(v)[len(v) // 2]:.2f}" for k, v in stalls.items()
            )
        )
    kills = out.get("kills", [])
    if kills:
        leader = sum(1 for k in kills if k["role"] == "leader")
        lines.append(
            f"  member_kill9: {leader} of the leader, {len(kills) - leader} of a follower; "
            f"restarted member healthy after {_span([k['healthy_after'] for k in kills])} s"
        )
    pauses = out["pauses"]
    if pauses:
        long = [p for p in pauses if p["past_ttl"]]
        leader = [p for p in pauses if p["role"] == "leader" and not p["past_ttl"]]
        follower = [p for p in pauses if p["role"] != "leader"]

        def hit(group: Sequence[dict[str, Any]]) -> str:
            struck = [
                p["keys_deleted_after_resume"] for p in group if p["keys_deleted_after_resume"]
            ]
            return f"{len(struck)} of {len(group)} ({sum(struck)} workers)"

        lines.append(
            f"  member_pause: leader within the TTL {len(leader)} "
            f"({_span([p['seconds'] for p in leader])} s), follower {len(follower)} "
            f"({_span([p['seconds'] for p in follower])} s), leader past the TTL {len(long)} "
            f"({_span([p['seconds'] for p in long])} s); leases lost while paused: "
            f"{sum(p['leases_lost_during'] for p in pauses)}"
        )
        lines.append(
            f"  pauses followed by workers' keys deleted within {AFTER_RESUME:g} s of SIGCONT "
            f"(etcd issue 15247): leader past the TTL {hit(long)}, leader within the TTL "
            f"{hit(leader)}, follower {hit(follower)}"
        )
    if out.get("transfers"):
        lines.append(f"  leader_transfer: new leader after {_span(out['transfers'])} s")
    q = out["quorum_losses"]
    if q:
        resumed = [x["commits_resumed_after"] for x in q if x["commits_resumed_after"] is not None]
        lines.append(
            f"  quorum_loss: {len(q)} (down {_span([x['down_seconds'] for x in q])} s), ok "
            f"commits without quorum: {sum(x['ok_commits_without_quorum'] for x in q)}, "
            f"commits again {_span(resumed)} s after the restart"
        )
    return lines


def failures(summary: Mapping[str, Any]) -> list[str]:
    """A commit that succeeded while two of three members were dead is a real bug."""
    out = summary.get("cluster_outcomes") or {}
    bad = [x for x in out.get("quorum_losses", []) if x["ok_commits_without_quorum"]]
    return [f"quorum_loss #{x['index']}: ok commits without quorum: {x['examples']}" for x in bad]

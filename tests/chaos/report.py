"""The one-screen human summary of a chaos run (`tests.chaos.run` prints it).

Kept apart from the runner, which is big enough: this only formats the summary dict.
"""

from __future__ import annotations

from typing import Any

from tests.chaos import clusterreport


def _slow_network_lines(s: dict[str, Any]) -> list[str]:
    """What the slow_network faults applied and what the proxied worker did under them."""
    done = [
        f["detail"]
        for f in s.get("faults", [])
        if f["kind"] == "slow_network" and f.get("start") is not None and not f.get("skipped")
    ]
    if not done:
        return []

    def span(key: str, scale: float = 1.0) -> str:
        values = [float(d[key]) / scale for d in done if key in d]
        return f"{min(values):.3g}-{max(values):.3g}" if values else "?"

    def total(key: str) -> int:
        return sum(int(d.get(key, 0)) for d in done)

    return [
        f"  slow_network: {len(done)} slowed, latency {span('latency')} s, bandwidth "
        f"{span('bandwidth', 1024.0)} KiB/s; {total('bytes_delayed')} bytes "
        f"delayed, {total('throttle_waits')} throttle waits, {total('connections_closed')} "
        f"connections closed; proxied worker meanwhile: {total('proxied_leases_lost')} "
        f"leases lost, {total('proxied_exits')} exits"
    ]


def render(summary: dict[str, Any]) -> str:
    """The one-screen human summary."""
    s = summary
    verdict = "PASS" if s.get("pass") else "FAIL"
    lines = [
        f"chaos seed {s['seed']}: {verdict}  ({s.get('fault_phase_seconds', '?')} s of faults, "
        f"{s['workers']} workers + proxied, {s['segments']} segments, lease TTL {s['lease_ttl']} s, "
        f"{s.get('elapsed_seconds', '?')} s in all)",
    ]
    if s.get("etcd"):
        members = ", a 3-member cluster" if s.get("cluster") else ""
        lines.append(f"etcd {s['etcd']['version']} ({s['etcd']['binary']}){members}")
    by_kind = s.get("faults_by_kind") or {}
    if by_kind:
        total = sum(v["count"] for v in by_kind.values())
        lines.append(f"faults injected: {total}")
        for kind, v in by_kind.items():
            starts = ", ".join(f"{a:.0f}" for a, _b in v["times"][:8])
            more = " ..." if len(v["times"]) > 8 else ""
            extra = "".join(f", {v[k]} {k}" for k in ("skipped", "errors") if v[k])
            lines.append(f"  {kind:<16} {v['count']:>3}  at {starts}{more} s{extra}")
    calls = s.get("calls")
    if calls:
        lines.append(
            f"history: {calls['calls']} calls, {calls['ok_commits']} ok, "
            f"{calls['lost_commits']} lost (fenced), {calls['error_commits']} error, "
            f"{calls['unterminated']} cut short; {s.get('hung_calls', 0)} hung calls; "
            f"violations: {len(s.get('violations', []))}"
        )
        if calls.get("hooks") or calls.get("child_calls"):
            lines.append(
                f"  hooks: {calls.get('hooks', 0)} runs, {calls.get('hooks_cut_short', 0)} cut "
                f"short, {calls.get('hooks_told_lost', 0)} told lost; child-process calls: "
                f"{calls.get('child_calls', 0)} ({calls.get('child_calls_cut_short', 0)} cut "
                f"short)"
            )
        hf = s.get("hook_faults")
        if hf:
            lines.append(
                f"  sigstop_in_hook: {hf['stopped_in_hook']} stopped inside a hook, "
                f"{hf['resumed']} continued by us; after SIGCONT {hf['died']} died in the "
                f"hook, {hf['hook_ended']} ended it (longest {hf['longest_after_cont']} s); "
                f"child_work: {hf['children']} children of killed workers, longest outliving "
                f"its worker {hf['longest_orphan']} s, {hf['children_still_alive']} never died"
            )
        excused = s.get("excused_overlaps", [])
        lines.append(
            f"  overlaps excused by an injected SIGSTOP (old side over within "
            f"{s.get('pause_grace_seconds', 0):g} s of SIGCONT): {len(excused)}"
        )
        lines.extend(clusterreport.render_lines(s))
        lines.extend(_slow_network_lines(s))
        for v in s.get("violations", [])[:5]:
            lines.append(f"  ! segment {v['segment']} {v['kind']}: {v['detail'][:300]}")
    ev = s.get("events")
    if ev:
        lines.append(
            f"events: {ev['watchdog_kills']} watchdog kills "
            f"({ev['watchdog_kills_of_normal_calls']} of a call neither hung nor a slow hook), "
            f"{len(ev['proxied_exits'])} proxied "
            f"worker exits, {ev['supervisor_respawns']} supervisor respawns, "
            f"{ev['supervisor_fatal']} FATAL, {ev['supervisor_hung_kills']} hung-child kills"
        )
    rec = s.get("recovery")
    if rec:
        lines.append(
            f"recovery: every segment owned and processed again {rec['seconds']} s after the "
            f"faults ended (owned {rec['owned_after']} s, processed {rec['processed_after']} s; "
            f"bound {rec['bound_seconds']:g} s)"
        )
    whole = s.get("whole")
    if whole:
        lines.append(
            f"whole again (all slots READY, converged): {whole['converged_after']} s "
            f"(respawn backoff {whole['respawn_backoff_seconds']} s, FATAL slots "
            f"{whole['fatal_slots'] or 'none'})"
        )
    sd = s.get("shutdown")
    if sd:
        lines.append(
            f"shutdown: fleet down {sd['fleet_down_seconds']} s, fleet up exit "
            f"{sd['fleet_up_exit']}, proxied exit {sd['proxied_exit']}; "
            f"{len(sd['leftover_processes'])} processes and {len(sd['leftover_keys'])} "
            f"live keys left"
        )
    for failure in s.get("failures", []):
        lines.append(f"FAIL: {failure[:600]}")
    lines.append(
        f"replay: python -m tests.chaos.run --seed {s['seed']} --duration {s['duration']:g} "
        f"--workers {s['workers']} --segments {s['segments']} --lease-ttl {s['lease_ttl']}"
        + (" --cluster" if s.get("cluster") else "")
        + (f" --kinds {','.join(s['kinds'])}" if s.get("kinds") else "")
    )
    lines.append(
        f"json: {s.get('json_path')}" + ("" if s.get("pass") else f"; logs in {s['work_dir']}")
    )
    return "\n".join(lines)

"""A quiet terminal (issue 9): `fleet up` prints lifecycle, not calls.

Default output is joins, leaves, leader changes, assignment generations, crashes and
respawns, acquires and releases as one compact line per decision (`acquired 8
segments: 0-7 (token 13)`), and one summary line per worker per `summary_interval`.
Per-call lines (the demo handler's included) are DEBUG. `--log-level` (env
FLEET_LOG_LEVEL, `log_level`) reaches the workers and the supervisor's own lines.
"""

from __future__ import annotations

import io
import re
import signal
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet import config as config_mod
from fleet.logs import level_of
from fleet.supervise.output import Output
from fleet.work.callstats import CallStats, Period
from fleet.work.lines import (
    Exits,
    decision_line,
    format_ranges,
    parse_ranges,
    summary_line,
)
from tests.support.procs import Proc, Spawner
from tests.support.supervised import fleet_env, ps, start_up, wait_alive

DEMO = "fleet.demo:handle"
SEGMENTS = 16
# The demo's per-call line, and the per-segment lines that are DEBUG now.
PER_CALL = re.compile(r"segment \d+: call \d+ \(token \d+\)")
PER_SEGMENT = re.compile(r"segment \d+ (acquired|released|dropped) \(token \d+")
DECISION = re.compile(
    r"(?P<verb>acquired|released|dropped) (?P<n>[\d,]+) segments?: "
    r"(?P<ranges>[0-9, -]+(?: … \(\+\d+ more\))?)"
    r" \(tokens? \d+(?:-\d+)?(?:, [^)]*)?\)$"
)
SUMMARY = re.compile(
    r"last \d+s: (?P<calls>[\d,]+) calls?, (?P<errors>[\d,]+) errors?, p99 (?:[\d.,]+ ms|-), "
    r"(?P<owned>\d+) segments? owned$"
)


# -- the pure part: ranges, decision lines, summary lines ---------------------------------


@settings(max_examples=300, deadline=None)
@given(st.sets(st.integers(min_value=0, max_value=5000), max_size=300))
def test_ranges_parse_back_to_the_same_set(values: set[int]) -> None:
    text = format_ranges(values)
    assert parse_ranges(text) == values
    assert format_ranges(sorted(values, reverse=True)) == text  # order does not matter
    # Compact: no two ranges could be merged, each item is "a" or "a-b" with a < b.
    items = [[int(x) for x in item.split("-")] for item in text.split(", ") if item]
    assert all(len(b) == 1 or b[0] < b[1] for b in items), text
    bounds = [(b[0], b[-1]) for b in items]
    for (_, hi), (lo, _) in zip(bounds, bounds[1:], strict=False):
        assert lo > hi + 1, text


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(min_value=0, max_value=2000), min_size=1, max_size=400),
       st.integers(min_value=1, max_value=8))  # fmt: skip
def test_a_capped_range_list_shows_a_prefix_and_counts_the_rest(
    values: set[int], limit: int
) -> None:
    text = format_ranges(values, limit=limit)
    shown, _, rest = text.partition(" … ")
    got = parse_ranges(shown)
    assert got <= values and all(v < min(values - got, default=10**9) for v in got)
    if rest:
        assert rest == f"(+{len(values - got)} more)", text
        assert shown.count(", ") + 1 == limit
    else:
        assert got == values


def test_ranges_examples() -> None:
    assert format_ranges([]) == ""
    assert format_ranges([3]) == "3"
    assert format_ranges([0, 1, 2, 3, 4, 5, 6, 7]) == "0-7"
    assert format_ranges([5, 3, 9, 10, 11]) == "3, 5, 9-11"
    assert format_ranges([1, 2]) == "1-2"
    for bad in ("x", "3-1", "1,2", "1, ", "-1", "1--3", " 1"):
        with pytest.raises(ValueError):
            parse_ranges(bad)


def test_decision_lines() -> None:
    assert decision_line("acquired", [(s, 13 + s) for s in range(8)]) == (
        "acquired 8 segments: 0-7 (tokens 13-20)"
    )
    assert decision_line("acquired", [(s, 10) for s in (4, 0, 1, 2)]) == (
        "acquired 4 segments: 0-2, 4 (token 10)"
    )
    assert decision_line("released", [(5, 9), (3, 7)]) == "released 2 segments: 3, 5 (tokens 7-9)"
    assert decision_line("released", [(3, 7)], note="left over") == (
        "released 1 segment: 3 (token 7, left over)"
    )
    many = decision_line("acquired", [(s, 1) for s in range(0, 400, 2)])
    assert len(many) < 400 and many.endswith("(+168 more) (token 1)"), many
    for line in (many, decision_line("dropped", [(1, 2)])):
        assert DECISION.fullmatch(line), line


def test_summary_lines() -> None:
    line = summary_line(Period(3840, 2, 0.0123), 60.2, 8)
    assert line == "last 60s: 3,840 calls, 2 errors, p99 12 ms, 8 segments owned"
    assert summary_line(Period(1, 1, 0.00042), 2.0, 1) == (
        "last 2s: 1 call, 1 error, p99 0.42 ms, 1 segment owned"
    )
    assert summary_line(Period(0, 0, None), 60.0, 0) == (
        "last 60s: 0 calls, 0 errors, p99 -, 0 segments owned"
    )
    assert SUMMARY.fullmatch(line)


def test_exits_wait_for_the_rest_of_a_handoff_but_not_forever() -> None:
    exits = Exits(patience=1.0)
    assert exits.take(now=0.0, waiting=False) == []
    exits.add(3, 7, released=True, now=10.0)
    exits.add(4, 7, released=True, now=10.1)
    exits.add(9, 5, released=False, now=10.1)
    assert exits.take(now=10.2, waiting=True) == []  # more of this handoff to come
    assert exits.pending
    assert exits.take(now=10.3, waiting=False) == [
        "released 2 segments: 3-4 (token 7)",
        "dropped 1 segment: 9 (token 5)",
    ]
    assert exits.take(now=10.4, waiting=False) == [] and not exits.pending
    exits.add(1, 2, released=True, now=20.0)
    assert exits.take(now=20.5, waiting=True) == []
    assert exits.take(now=21.0, waiting=True) == ["released 1 segment: 1 (token 2)"]  # patience


def test_log_level_and_summary_interval_config() -> None:
    cfg = config_mod.load({}, {}, None)
    assert (cfg.log_level, cfg.summary_interval) == ("info", 60.0)
    env = {"FLEET_LOG_LEVEL": "debug", "FLEET_SUMMARY_INTERVAL": "0"}
    cfg = config_mod.load({}, env, None)
    assert (cfg.log_level, cfg.summary_interval) == ("debug", 0.0)
    assert config_mod.load({"log_level": "error"}, env, None).log_level == "error"
    with pytest.raises(config_mod.ConfigError, match=r"^log_level = 'bogus' \(from --log-level\)"):
        config_mod.load({"log_level": "bogus"}, {}, None)
    with pytest.raises(config_mod.ConfigError, match="FLEET_SUMMARY_INTERVAL"):
        config_mod.load({}, {"FLEET_SUMMARY_INTERVAL": "-1"}, None)
    assert [level_of(n) for n in ("debug", "info", "warning", "error")] == [10, 20, 30, 40]


def test_the_supervisors_own_lines_below_the_level_are_not_printed() -> None:
    buf = io.StringIO()
    out = Output(buf, "text", "h", level="warning")
    out.supervisor_line("8/8 workers ready")
    out.supervisor_line("w3 exited: code 1; respawning in 1.0s", "warning")
    out.supervisor_line("every worker refused its configuration", "error")
    out.child_lines(0, [b"anything a child prints is the child's business"])
    assert buf.getvalue().splitlines() == [
        "fleet | w3 exited: code 1; respawning in 1.0s",
        "fleet | every worker refused its configuration",
        "w0 | anything a child prints is the child's business",
    ]


def test_call_stats_feed_the_summary() -> None:
    stats = CallStats()
    for i in range(100):
        stats.record(0.001 * (i + 1), ok=i % 10 != 0)
    line = summary_line(stats.take(), 5.0, 4)
    assert line == "last 5s: 100 calls, 10 errors, p99 99 ms, 4 segments owned"


# -- a real fleet up ------------------------------------------------------------------------


def _up(
    spawn: Spawner, tmp_path: Path, *extra: str, env: dict[str, str | None] | None = None
) -> Proc:
    return start_up(
        spawn, tmp_path, workers=2, segments=SEGMENTS, handler=DEMO,
        extra=["--interval", "0.2", *extra], env=env,
    )  # fmt: skip


def _messages(log: str) -> list[str]:
    """The message of every worker log line (`w<i> | hh:mm:ss.mmm <id> LEVEL msg`)."""
    found = re.findall(r"^w\d+ \| \S+ \S+ (?:DEBUG|INFO|WARNING|ERROR)\s+(.*)$", log, re.M)
    return [str(m) for m in found]


def _run_for(up: Proc, seconds: float, until: str) -> str:
    """Let `fleet up` run until its output matches `until`, then `seconds` more; stop it
    gracefully and return everything it printed."""
    wait_alive(up, lambda: re.search(until, up.log(), re.M), f"{until!r} in the output")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert up.alive, up.tail()
        time.sleep(0.2)
    up.signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0, up.tail()
    return up.log()


def test_fleet_up_prints_no_per_call_line_and_acquires_as_ranges(
    spawn: Spawner, tmp_path: Path
) -> None:
    up = _up(spawn, tmp_path)
    log = _run_for(up, 8.0, r"workers ready, \d+/\d+ segments owned")
    messages = _messages(log)
    assert not [m for m in messages if PER_CALL.search(m)], log
    assert not [m for m in messages if PER_SEGMENT.search(m)], log
    assert not [m for m in messages if SUMMARY.fullmatch(m)], "default summary is every 60 s"
    acquired: set[int] = set()
    released: set[int] = set()
    for m in messages:
        found = DECISION.fullmatch(m)
        if found:
            segs = parse_ranges(found["ranges"].split(" … ")[0])
            assert int(found["n"].replace(",", "")) == len(segs), m
            (acquired if found["verb"] == "acquired" else released).update(segs)
    assert acquired == set(range(SEGMENTS)), log
    assert released == set(range(SEGMENTS)), log  # the graceful stop releases everything
    # Few lines: lifecycle only (2 workers: join, leader, assignments, a few decisions).
    assert len(log.splitlines()) < 60, log


def test_log_level_debug_shows_the_demo_calls_and_each_segment(
    spawn: Spawner, tmp_path: Path
) -> None:
    up = _up(spawn, tmp_path, "--log-level", "debug")
    log = _run_for(up, 1.0, PER_CALL.pattern)
    messages = _messages(log)
    assert [m for m in messages if PER_CALL.search(m)], log
    assert [m for m in messages if PER_SEGMENT.search(m)], log
    assert [m for m in messages if DECISION.fullmatch(m)], log  # the INFO lines stay


def test_a_short_summary_interval_prints_calls_per_worker(spawn: Spawner, tmp_path: Path) -> None:
    up = _up(spawn, tmp_path, env={"FLEET_SUMMARY_INTERVAL": "2"})
    log = _run_for(up, 5.0, r"workers ready, \d+/\d+ segments owned")
    rows = [(line[:2], SUMMARY.search(line)) for line in log.splitlines()]
    summaries = [(slot, m) for slot, m in rows if m is not None]
    assert {slot for slot, _ in summaries} == {"w0", "w1"}, log
    owned = [int(m["owned"]) for _, m in summaries]
    assert max(owned) > 0, log
    # The runners record every call (CallStats): a worker that owns segments counted some.
    counted = [int(m["calls"].replace(",", "")) for _, m in summaries if int(m["owned"]) > 0]
    assert max(counted) > 0, f"no calls counted (is the runners' recording in?):\n{log}"


def test_log_level_warning_reaches_workers_and_the_supervisor(
    spawn: Spawner, tmp_path: Path
) -> None:
    up = _up(spawn, tmp_path, env={"FLEET_LOG_LEVEL": "warning"})

    def ready() -> bool:
        try:
            rows = ps(tmp_path)
        except Exception:  # noqa: BLE001 - not listening yet
            return False
        return len(rows) == 2 and all(r["state"] == "READY" and r["owned"] for r in rows)

    wait_alive(up, ready, "2 READY slots owning segments")
    up.signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0, up.tail()
    log = up.log()
    assert not re.search(r"\b(INFO|DEBUG)\b", log), log
    assert "fleet | etcd at" not in log and "workers ready" not in log, log


@pytest.mark.parametrize(
    ("command", "how"), [("up", "flag"), ("up", "env"), ("worker", "flag"), ("worker", "env")]
)
def test_a_bad_log_level_is_one_line_exit_2(
    spawn: Spawner, tmp_path: Path, command: str, how: str
) -> None:
    args = ["up", "--workers", "1"] if command == "up" else ["worker", "--etcd", "127.0.0.1:1"]
    env = fleet_env(tmp_path)
    if how == "flag":
        args += ["--log-level", "bogus"]
    else:
        env["FLEET_LOG_LEVEL"] = "bogus"
    proc = spawn(args, env=env, name="up")
    assert proc.wait(timeout=30) == 2, proc.log()
    lines = proc.log().splitlines()
    source = "--log-level" if how == "flag" else "FLEET_LOG_LEVEL"
    assert lines == [
        f"fleet: log_level = 'bogus' (from {source}): "
        "expected 'debug', 'info', 'warning' or 'error'"
    ], lines

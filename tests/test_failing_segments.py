"""Issue 10, item 7: a handler that fails on every call is visible.

Before, `fleet up` said "all owned" and `fleet ps` showed READY while every call of a
segment raised. Now the failing segments (errors in a row, last error, last success)
appear in `fleet ps` (from the workers' heartbeats), in `fleet status` (from a health key
per worker in etcd, so a fleet without a supervisor shows them too) and in fleet up's
summary line, once per change rather than once per failed call.

The pure parts first (the runner's record, the etcd write's rate limit, the key's value,
the heartbeat's parsing, the summary), then real fleets: `fleet up` and `fleet worker`
with `tests.support.failing_handler`, which fails segments 1 and 2 until a file exists.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.coord import health as coord_health
from fleet.coord.health import Failing
from fleet.coord.status import render
from fleet.supervise import settle
from fleet.supervise.childlink import ParentLink
from fleet.supervise.plumbing import MAX_FAILING_LISTED, parse_status
from fleet.work.health import MIN_GAP, REFRESH, CallHealth, Published, due
from tests.support.etcd import PausableEtcd
from tests.support.fleet import CLEAN_ENV, start_worker
from tests.support.fleet import status as read_status
from tests.support.procs import Proc, Spawner
from tests.support.supervised import fleet_env, ps, start_up, wait_alive, wait_ready
from tests.support.wait import wait_until

FAILING_HANDLER = "tests.support.failing_handler:handle"
TIMEOUT = 120.0

# -- the runner's record -----------------------------------------------------------------


def test_error_text_is_one_line_type_and_message_cut_short() -> None:
    assert coord_health.error_text(ValueError("boom")) == "ValueError: boom"
    assert coord_health.error_text(KeyError()) == "KeyError"
    assert coord_health.error_text(ValueError("a"), "on_acquire") == "on_acquire: ValueError: a"
    long = coord_health.error_text(RuntimeError("line one\nline two " + "x" * 500))
    assert "\n" not in long and len(long) <= coord_health.ERROR_TEXT_MAX
    assert long.startswith("RuntimeError: line one line two") and long.endswith("...")

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert coord_health.error_text(Unprintable()) == "Unprintable: <unprintable>"


def test_call_health_counts_errors_in_a_row_and_keeps_the_last_success() -> None:
    record = CallHealth(7)
    assert record.failing() is None and not record.failing_now
    record.failed("ValueError: a", now=100.0)
    record.failed("ValueError: b", now=101.0)
    got = record.failing()
    assert got == Failing(7, 2, 2, "ValueError: b", last_success=None, since=100.0)
    record.succeeded(now=102.0)
    assert record.failing() is None
    record.failed("ValueError: c", now=103.0)
    assert record.failing() == Failing(7, 1, 3, "ValueError: c", last_success=102.0, since=103.0)


# -- the rate limit of the etcd write ----------------------------------------------------

# A run: steps of (seconds that pass, the failing set then, whether a write succeeds).
steps = st.lists(
    st.tuples(
        st.floats(min_value=0.001, max_value=3.0),
        st.frozensets(st.integers(0, 7), max_size=8),
        st.booleans(),
    ),
    max_size=200,
)


def _run(run: list[tuple[float, frozenset[int], bool]]) -> list[tuple[float, frozenset[int]]]:
    """Drive `due` like the publisher does; the (time, set) of every attempted write."""
    state, now, writes = Published(), 0.0, []
    for gap, failing, ok in run:
        now += gap
        if due(state, failing, now):
            writes.append((now, failing))
            state = Published(failing if ok else state.segments, now, ok)
    return writes


@settings(max_examples=300, deadline=None)
@given(steps)
def test_writes_are_never_closer_than_the_minimum_gap(
    run: list[tuple[float, frozenset[int], bool]],
) -> None:
    times = [t for t, _ in _run(run)]
    assert all(b - a >= MIN_GAP - 1e-6 for a, b in zip(times, times[1:], strict=False))


@settings(max_examples=300, deadline=None)
@given(steps, st.frozensets(st.integers(0, 7), max_size=8))
def test_once_the_set_holds_still_etcd_catches_up_and_then_only_refreshes(
    run: list[tuple[float, frozenset[int], bool]], final: frozenset[int]
) -> None:
    """After any history, with the set unchanged and writes succeeding, the written set
    is the current one within REFRESH + a tick, and from then on a write comes only every
    REFRESH while something fails (none at all when nothing does)."""
    state, now = Published(), 0.0
    for gap, failing, ok in run:
        now += gap
        if due(state, failing, now):
            state = Published(failing if ok else state.segments, now, ok)
    start, tick, writes = now, 0.1, []
    while now < start + 60.0:
        now += tick
        if due(state, final, now):
            writes.append(now)
            state = Published(final, now, True)
        if now >= start + REFRESH + tick:
            assert state.segments == final
    settled = [t for t in writes if t > start + REFRESH + tick]
    if final:
        assert all(b - a >= REFRESH - 1e-6 for a, b in zip(settled, settled[1:], strict=False))
        assert len(settled) >= 60.0 / (REFRESH + tick) - 3
    else:
        assert settled == []


def test_a_thousand_segments_failing_every_call_are_one_write_per_gap() -> None:
    """1,024 segments, a different set failing at every 10 ms tick: the writes are bounded
    by the clock (one per MIN_GAP), not by the failures."""
    state, now, writes = Published(), 0.0, 0
    for i in range(6000):  # 60 s
        now += 0.01
        failing = frozenset(range(i % 2, 1024, 2))
        if due(state, failing, now):
            writes += 1
            state = Published(failing, now, True)
    assert writes <= 60 / MIN_GAP + 1


def test_a_quiet_worker_never_writes() -> None:
    assert not due(Published(), frozenset(), 1e9)


# -- the key's value ---------------------------------------------------------------------

failings = st.builds(
    Failing,
    segment=st.integers(0, 100_000),
    errors=st.integers(1, 10**9),
    total_errors=st.just(10**9),
    last_error=st.text(min_size=1, max_size=50).map(coord_health.one_line),
    last_success=st.none() | st.floats(0, 2e9),
    since=st.none() | st.floats(0, 2e9),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(failings, max_size=300, unique_by=lambda f: f.segment))
def test_the_health_value_round_trips_up_to_its_listing_limit(found: list[Failing]) -> None:
    decoded = coord_health.decode(coord_health.encode(found, updated=5.0))
    expected = sorted(found, key=lambda f: f.segment)[: coord_health.MAX_LISTED]
    assert decoded.failing == expected
    assert decoded.count == len(found) and decoded.updated == 5.0


@given(st.binary(max_size=200))
def test_a_health_value_of_any_shape_reads_as_nothing_failing_or_valid_entries(raw: bytes) -> None:
    decoded = coord_health.decode(raw)
    assert all(f.errors >= 1 for f in decoded.failing)


def test_describe_says_errors_last_error_and_last_success() -> None:
    entry = Failing(12, 57, 60, "ValueError: boom", last_success=None, since=1.0)
    assert coord_health.describe(entry) == "57 errors, last ValueError: boom, last success never"
    now = time.time()
    seen = Failing(12, 1, 1, "KeyError: 'x'", last_success=now - 125, since=now - 2)
    clock = time.strftime("%H:%M:%S", time.localtime(now - 125))
    assert coord_health.describe(seen, now) == (
        f"1 error, last KeyError: 'x', last success {clock} (2m ago)"
    )


# -- the heartbeat -----------------------------------------------------------------------


def _row(seg: int, errors: int = 3) -> dict[str, Any]:
    return Failing(seg, errors, errors, "ValueError: boom", None, 10.0).to_json()


def test_heartbeat_failing_segments_parse_bounded_and_checked() -> None:
    rows = [_row(s) for s in range(30)]
    bad = [{"segment": -1, "errors": 1}, {"segment": 3, "errors": "x"}, "nope", None]
    line = json.dumps({"hb": True, "failing": 30, "failing_segments": bad + rows}).encode()
    status = parse_status(line)
    assert status is not None and status.failing == 30
    assert status.failing_segments is not None
    assert len(status.failing_segments) == MAX_FAILING_LISTED - len(bad)
    assert status.failing_segments[0] == Failing(0, 3, 3, "ValueError: boom", None, 10.0)
    wrong = parse_status(b'{"hb": true, "failing_segments": {"1": 2}}')
    assert wrong is not None and wrong.failing_segments is None


def test_growing_error_counts_do_not_make_a_heartbeat_per_failed_call() -> None:
    read_fd, write_fd = os.pipe()
    try:
        link = ParentLink(write_fd, os.getppid())
        link.heartbeat(failing=1, details={"failing_segments": [_row(1, 1)]})
        for errors in range(2, 50):
            link.heartbeat(failing=1, details={"failing_segments": [_row(1, errors)]})
        link.heartbeat(failing=2, details={"failing_segments": [_row(1, 50), _row(2, 1)]})
        os.set_blocking(read_fd, False)
        lines = os.read(read_fd, 1 << 16).decode().splitlines()
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert len(lines) == 2, lines
    assert [json.loads(x)["failing"] for x in lines] == [1, 2]
    assert len(json.loads(lines[1])["failing_segments"]) == 2


# -- the summary line --------------------------------------------------------------------


def _infos(*failing: int) -> list[dict[str, Any]]:
    return [
        {"segments": 4, "owned": 2, "leader": "h-0", "failing": f} for f in failing
    ]


def test_the_summary_names_failing_segments() -> None:
    assert settle.summary(_infos(0, 0), 2) == (
        "2/2 workers ready, 4/4 segments owned, leader h-0"
    )
    assert settle.summary(_infos(2, 1), 2) == (
        "2/2 workers ready, 4/4 segments owned, 3 failing, leader h-0"
    )
    assert settle.summary(_infos(0, 0), 2, zero_failing=True) == (
        "2/2 workers ready, 4/4 segments owned, 0 failing, leader h-0"
    )


def test_failing_news_once_per_change_not_per_heartbeat() -> None:
    news = settle.FailingNews()
    news.printed(0, 0.0)  # the summary when the fleet became whole
    lines = []
    now = 0.0
    # Heartbeats every second: nothing failing, then 2 failing for a minute, then
    # recovered for a minute.
    for second in range(180):
        now = float(second)
        count = 0 if second < 30 or second >= 90 else 2
        line = news.line(_infos(count, 0), 2, now)
        if line is not None:
            lines.append((second, line))
    assert [s for s, _ in lines] == [30, 90], lines
    assert "2 failing" in lines[0][1] and "0 failing" in lines[1][1]


def test_failing_news_of_a_flapping_segment_is_bounded() -> None:
    news = settle.FailingNews()
    news.printed(0, 0.0)
    shown = [news.line(_infos(second % 2, 0), 2, float(second)) for second in range(1, 61)]
    assert 0 < sum(1 for s in shown if s) <= 60 / settle.FAILING_NEWS_GAP + 1


# -- fleet status, the human form --------------------------------------------------------


def test_status_render_counts_and_lists_failing_segments() -> None:
    entry = {"member": "h-1", **_row(2, 57)}
    status: dict[str, Any] = {
        "fleet": "default", "revision": 9, "segments": 4, "leader": "h-0", "generation": 1,
        "members": [
            {"id": "h-0", "pid": 1, "ttl": 9, "owned": [0, 1], "assigned": [0, 1], "failing": 0},
            {"id": "h-1", "pid": 2, "ttl": 9, "owned": [2, 3], "assigned": [2, 3], "failing": 1},
        ],
        "unowned": [], "moving": [], "warnings": [], "failing": [entry],
    }  # fmt: skip
    text = render(status)
    lines = text.splitlines()
    assert "4/4 segments owned, 1 failing, leader h-0" in lines[0], text
    assert lines[1].split()[-1] == "FAILING", text
    assert lines[3].split()[-1] == "1", text
    assert "  h-1 segment 2: 57 errors, last ValueError: boom, last success never" in lines
    healthy = render({**status, "failing": [], "members": [{**status["members"][0]}]})
    assert "failing" not in healthy.splitlines()[0] and " segment " not in healthy, healthy


def test_status_reads_only_a_members_current_key_and_the_segments_it_owns() -> None:
    from fleet.coord.etcd import KV, Snapshot
    from fleet.coord.keys import Keys
    from fleet.coord.status import _failing
    from fleet.coord.view import FleetView

    keys = Keys("/fleet", "default")

    def kv(key: str, value: bytes, lease: int, rev: int = 5) -> KV:
        return KV(key, value, rev, rev, 1, lease)

    def failing(*segs: int) -> bytes:
        return coord_health.encode(
            [Failing(s, 2, 2, "ValueError: boom", None, 1.0) for s in segs], updated=2.0
        )

    snapshot = Snapshot(9, [
        kv(keys.member("a"), b"{}", 10), kv(keys.member("b"), b"{}", 20),
        kv(keys.owner(0), b"a", 10), kv(keys.owner(1), b"a", 10), kv(keys.owner(2), b"b", 20),
        kv(keys.health_of("a"), failing(0, 2), 10),  # 2 is b's now: a's key lags
        kv(keys.health_of("b"), failing(2), 19),  # an earlier incarnation's key
        kv(keys.health_of("gone"), failing(1), 30),  # no such member
    ])  # fmt: skip
    view = FleetView.from_snapshot(keys, snapshot)
    pairs, counts = _failing(view, view.owners())
    assert [(m, f.segment) for m, f in pairs] == [("a", 0)] and counts == {"a": 1}


# -- real fleets -------------------------------------------------------------------------


def _failing_env(tmp_path: Path) -> dict[str, str | None]:
    return {"FLEET_TEST_FAILING": "1,2", "FLEET_TEST_RECOVER": str(tmp_path / "recover")}


def _run_cli(spawn: Spawner, args: list[str], env: dict[str, str | None], name: str) -> str:
    proc = spawn(args, env=env, name=name)
    assert proc.wait(timeout=60) == 0, proc.log()
    out = proc.log()
    assert "Traceback" not in out, out
    return out


def _failing_in_status(endpoint: str) -> dict[int, dict[str, Any]]:
    return {f["segment"]: f for f in read_status(endpoint).get("failing", [])}


def _assert_failing_entries(entries: dict[int, dict[str, Any]]) -> None:
    assert sorted(entries) == [1, 2], entries
    for entry in entries.values():
        assert entry["errors"] >= 1 and entry["total_errors"] >= entry["errors"], entry
        assert entry["last_error"] == "ValueError: boom", entry
        assert entry["last_success"] is None and entry["since"] is not None, entry


def _failing_lines(text: str) -> dict[int, str]:
    """Segment -> its line under a table (`  <who> segment N: ...`)."""
    found = re.findall(r"^  \S+ segment (\d+): (.*)$", text, flags=re.M)
    return {int(seg): rest for seg, rest in found}


def _summaries_with_failing(up: Proc) -> list[str]:
    return re.findall(r"segments owned, (\d+) failing, leader", up.log())


def test_failing_segments_show_in_status_ps_and_the_summary_until_they_recover(
    spawn: Spawner, tmp_path: Path
) -> None:
    env = _failing_env(tmp_path)
    up = start_up(
        spawn, tmp_path / "ledger", workers=2, segments=4, handler=FAILING_HANDLER, env=env
    )
    endpoint, _rows = wait_ready(up, tmp_path, workers=2)
    entries = wait_alive(
        up,
        lambda: (found := _failing_in_status(endpoint)) and sorted(found) == [1, 2] and found,
        "segments 1 and 2 failing in fleet status",
        timeout=TIMEOUT,
    )
    _assert_failing_entries(entries)
    failing_since = time.time()

    cli_env = fleet_env(tmp_path / "ledger")
    as_json = json.loads(_run_cli(spawn, ["status", "--json"], cli_env, "status-json"))
    _assert_failing_entries({f["segment"]: f for f in as_json["failing"]})
    per_member = {m["id"]: m["failing"] for m in as_json["members"]}
    owner = {s["segment"]: s["owner"] for s in as_json["segment_owners"]}
    assert sum(per_member.values()) == 2, per_member
    assert {f["member"] for f in as_json["failing"]} == {owner[1], owner[2]}, as_json

    text = _run_cli(spawn, ["status"], cli_env, "status")
    assert "4/4 segments owned, 2 failing, leader" in text.splitlines()[0], text
    assert "FAILING" in text, text
    lines = _failing_lines(text)
    assert sorted(lines) == [1, 2], text
    assert all(
        re.fullmatch(r"\d+ errors?, last ValueError: boom, last success never", x)
        for x in lines.values()
    ), text

    def ps_failing() -> list[dict[str, Any]] | None:
        rows = ps(tmp_path)
        listed = [f for r in rows for f in r["failing_segments"]]
        ok = sum(r["failing"] or 0 for r in rows) == 2 and len(listed) == 2
        return listed if ok else None

    listed = wait_alive(up, ps_failing, "fleet ps --json showing 2 failing", timeout=TIMEOUT)
    _assert_failing_entries({f["segment"]: f for f in listed})
    rows_json = json.loads(_run_cli(spawn, ["ps", "--json"], cli_env, "ps-json"))
    assert sum(r["failing"] for r in rows_json) == 2, rows_json
    ps_text = _run_cli(spawn, ["ps"], cli_env, "ps")
    ps_lines = re.findall(r"^  w\d segment (\d+): (.*)$", ps_text, flags=re.M)
    assert sorted(int(s) for s, _ in ps_lines) == [1, 2], ps_text
    assert all("last ValueError: boom, last success never" in x for _, x in ps_lines), ps_text

    wait_alive(up, lambda: "2" in _summaries_with_failing(up), "a summary with 2 failing")

    # The health keys are written per change and every few seconds, not per call.
    time.sleep(6)
    from fleet.coord.etcd import Etcd
    from fleet.coord.keys import Keys

    etcd = Etcd([endpoint], timeout=5.0)
    try:
        keys = Keys("/fleet", "default")
        versions = {}
        for member in per_member:
            kv, _ = etcd.get(keys.health_of(member))
            if kv is not None:
                versions[member] = kv.version
    finally:
        etcd.close()
    elapsed = time.time() - failing_since + 30  # generous: since before it was seen
    assert versions and all(v <= elapsed / REFRESH + 6 for v in versions.values()), versions

    (tmp_path / "recover").touch()
    wait_alive(up, lambda: not _failing_in_status(endpoint), "no failing segment in status",
               timeout=TIMEOUT)  # fmt: skip
    wait_alive(up, lambda: all(not r["failing"] and not r["failing_segments"]
                               for r in ps(tmp_path)), "no failing segment in ps",
               timeout=TIMEOUT)  # fmt: skip
    wait_alive(up, lambda: _summaries_with_failing(up)[-1:] == ["0"], "a summary with 0 failing",
               timeout=TIMEOUT)  # fmt: skip
    text = _run_cli(spawn, ["status"], cli_env, "status-after")
    assert "failing," not in text.splitlines()[0] and not _failing_lines(text), text
    ps_text = _run_cli(spawn, ["ps"], cli_env, "ps-after")
    assert " segment " not in ps_text, ps_text
    # Once per change: a handful of lines, however many calls failed.
    assert len(_summaries_with_failing(up)) <= 6, up.log()


def test_a_worker_without_a_supervisor_shows_its_failing_segments_in_status(
    spawn: Spawner, tmp_path: Path, etcd_server: PausableEtcd
) -> None:
    endpoint = etcd_server.endpoint
    (tmp_path / "ledger").mkdir()
    worker = start_worker(
        spawn, endpoint, "solo", tmp_path / "ledger", segments=4, handler=FAILING_HANDLER,
        env=_failing_env(tmp_path),
    )  # fmt: skip
    entries = wait_until(
        lambda: (found := _failing_in_status(endpoint)) and sorted(found) == [1, 2] and found,
        timeout=TIMEOUT,
        message="segments 1 and 2 failing in fleet status",
    )
    _assert_failing_entries(entries)
    assert {e["member"] for e in entries.values()} == {"solo"}
    env: dict[str, str | None] = {**CLEAN_ENV}
    text = _run_cli(spawn, ["status", "--etcd", endpoint], env, "status")
    assert "4/4 segments owned, 2 failing" in text.splitlines()[0], text
    assert sorted(_failing_lines(text)) == [1, 2], text
    solo = next(x for x in text.splitlines() if x.startswith("solo"))
    assert solo.split()[-1] == "2", text

    (tmp_path / "recover").touch()
    wait_until(lambda: not _failing_in_status(endpoint), timeout=TIMEOUT,
               message="no failing segment after recovery")  # fmt: skip
    as_json = json.loads(_run_cli(spawn, ["status", "--etcd", endpoint, "--json"], env, "json"))
    assert as_json["failing"] == [] and as_json["members"][0]["failing"] == 0, as_json
    # Writing its health key never cost the worker its lease (it joined once).
    assert worker.alive, worker.log()
    assert worker.log().count("joined fleet") == 1, worker.log()

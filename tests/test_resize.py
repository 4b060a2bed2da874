"""`fleet resize S` (issue 10 item 10): changing the segment count of a running fleet.

End to end with real processes: shrink and grow under `fleet up` (exactly 0..S-1 owned,
nothing above it, checkpoints kept, segments that stay keep their ownership, no segment
processed by two workers at once), --drop-checkpoints with plain `fleet worker`s, a
crashed worker respawned with the old `--segments` after a resize, and the user's
mistakes (one line, DESIGN.md's exit codes). The pure parts (spec, progress, outcome)
are property-tested, and the guarded spec write is raced against a real etcd.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet import config as config_mod
from fleet.coord import resize
from fleet.coord import spec as spec_mod
from fleet.coord.assignment import quotas
from fleet.coord.etcd import KV, Etcd, Snapshot
from fleet.coord.keys import Keys
from fleet.coord.view import FleetView
from fleet.server.embedded import EmbeddedEtcd
from tests.chaos import history
from tests.support.checker import assert_history_ok, load_calls
from tests.support.fleet import CLEAN_ENV, start_worker, status, wait_converged
from tests.support.procs import Spawner
from tests.support.supervised import ps, start_up, wait_alive, wait_ready
from tests.support.wait import wait_until

KEYS = Keys("/fleet", "default")
RECORDER = "tests.support.recording:Recorder"  # records on_release too
CLI_TIMEOUT = 180.0


# -- helpers -------------------------------------------------------------------------------


def cli(spawn: Spawner, *args: str, name: str = "cli") -> tuple[int, str]:
    """Run `fleet *args` to the end: (exit code, output)."""
    proc = spawn(list(args), env=CLEAN_ENV, name=name)
    code = proc.wait(timeout=CLI_TIMEOUT)
    return code, proc.log()


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def read_fleet(endpoint: str) -> FleetView:
    etcd = Etcd([endpoint], timeout=3.0)
    try:
        return FleetView.from_snapshot(KEYS, etcd.get_prefix(KEYS.root))
    finally:
        etcd.close()


def ownerships(view: FleetView) -> dict[int, tuple[str, int]]:
    """segment -> (owner member, fencing token): a token change means the segment moved."""
    return {s: (o.member, o.token) for s, o in view.owners().items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_checkpoints(endpoint: str, segments: range) -> dict[int, Any]:
    """Every segment in `segments` has committed at least once."""

    def check() -> dict[int, Any] | None:
        found = read_fleet(endpoint).checkpoints()
        return found if all(found.get(s) for s in segments) else None

    result: dict[int, Any] = wait_until(check, timeout=60, message=f"checkpoints of {segments}")
    return result


# -- the spec (pure) -----------------------------------------------------------------------

counts = st.integers(1, spec_mod.MAX_SEGMENTS)
specs = st.builds(
    spec_mod.Spec,
    segments=counts,
    previous=st.lists(counts, max_size=spec_mod.HISTORY, unique=True).map(tuple),
    resized_at=st.none() | st.floats(0, 4e9).map(lambda t: round(t, 3)),
    extra=st.dictionaries(st.sampled_from(["owner", "note"]), st.text(max_size=5)),
)


@given(specs)
def test_a_spec_reads_back_as_written(spec: spec_mod.Spec) -> None:
    again = spec_mod.parse(spec_mod.encode(spec))
    assert again == spec and again.extra == spec.extra
    assert next(iter(json.loads(spec_mod.encode(spec)))) == "segments"  # old readers' key


def test_a_never_resized_spec_is_what_the_first_member_always_wrote() -> None:
    assert spec_mod.encode(spec_mod.Spec(64)) == b'{"segments": 64}'
    assert spec_mod.parse(b'{"segments": 64}') == spec_mod.Spec(64)


@pytest.mark.parametrize(
    "raw",
    [b"", b"nope", b"[]", b"{}", b'{"segments": 0}', b'{"segments": "8"}',
     b'{"segments": true}', b'{"segments": 100001}'],
)  # fmt: skip
def test_anything_else_is_not_a_spec(raw: bytes) -> None:
    with pytest.raises(spec_mod.BadSpec):
        spec_mod.parse(raw)


@given(specs, counts, st.floats(0, 4e9))
def test_a_resize_remembers_the_old_count_last(
    spec: spec_mod.Spec, segments: int, now: float
) -> None:
    new = spec_mod.resized(spec, segments, now)
    assert new.segments == segments
    assert new.previous[-1] == spec.segments
    assert len(set(new.previous)) == len(new.previous) <= spec_mod.HISTORY
    assert set(new.previous) <= {*spec.previous, spec.segments}
    assert new.extra == spec.extra and new.resized_at == round(now, 3)


@given(specs, counts, st.booleans())
def test_a_starting_worker_adopts_the_count_refuses_only_a_count_never_used(
    spec: spec_mod.Spec, configured: int, explicit: bool
) -> None:
    got = spec_mod.adopt(spec, configured, explicit, "f")
    if explicit and configured != spec.segments and configured not in spec.previous:
        assert got is None
        return
    assert got is not None and got.segments == spec.segments
    warned = explicit and configured != spec.segments
    assert (got.warning is not None) == warned
    if got.warning:
        assert got.warning == (
            f"fleet 'f' was resized from {configured} to {spec.segments} (fleet resize); "
            "update segments in your config"
        )


def test_the_bound_is_the_config_bound_of_segments(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)  # no ./fleet.toml
    top = spec_mod.MAX_SEGMENTS
    assert config_mod.load({"segments": str(top)}, {}).segments == top
    with pytest.raises(config_mod.ConfigError):
        config_mod.load({"segments": str(top + 1)}, {})


# -- progress and outcome (pure) -----------------------------------------------------------


def _view(assignment: dict[str, list[int]] | None, owners: dict[int, tuple[str, int]],
          members: tuple[str, ...] = ("a", "b")) -> FleetView:  # fmt: skip
    kvs = [KV(KEYS.member(m), b"{}", 2, 2, 1, 7) for m in members]
    if assignment is not None:
        value = json.dumps({"generation": 1, "leader": "a", "members": assignment}).encode()
        kvs.append(KV(KEYS.assignment, value, 3, 3, 1, 0))
    for seg, (member, token) in owners.items():
        kvs.append(KV(KEYS.owner(seg), member.encode(), token, token, 1, 7))
    return FleetView.from_snapshot(KEYS, Snapshot(100, kvs))


@st.composite
def fleets(draw: st.DrawFn) -> tuple[FleetView, int]:
    segments = draw(st.integers(1, 12))
    listed = draw(st.integers(1, 12))  # the assignment may still be for another count
    assignment = {"a": [s for s in range(listed) if s % 2 == 0],
                  "b": [s for s in range(listed) if s % 2 == 1]}  # fmt: skip
    owners = {
        s: (draw(st.sampled_from(["a", "b"])), draw(st.integers(10, 20)))
        for s in draw(st.sets(st.integers(0, 14)))
    }
    return _view(assignment, owners), segments


@given(fleets())
def test_settled_means_every_segment_below_owned_by_its_assignee_and_none_above(
    case: tuple[FleetView, int],
) -> None:
    view, segments = case
    state = resize.progress(view, segments)
    current = view.assignment()
    assert current is not None
    assigned_to = current.owner_of()
    owners = view.owners()
    expected = (
        sorted(assigned_to) == list(range(segments))
        and all(s in owners and owners[s].member == assigned_to[s] for s in range(segments))
        and not any(s >= segments for s in owners)
    )
    assert state.settled == expected


def test_owners_in_place_under_the_old_assignment_are_not_settled() -> None:
    """Right after a shrink the segments below the count can all be owned while the leader
    has not rebalanced them yet: still waiting."""
    view = _view({"a": [0, 1, 2, 3]}, {0: ("a", 5), 1: ("a", 6)})
    assert not resize.progress(view, 2).settled
    view = _view({"a": [0, 1]}, {0: ("a", 5), 1: ("a", 6)})
    assert resize.progress(view, 2).settled
    nobody = _view(None, {}, members=())
    assert resize.progress(nobody, 2).settled  # no workers: nothing to wait for


@given(
    st.dictionaries(st.integers(0, 15), st.tuples(st.sampled_from("ab"), st.integers(1, 3))),
    st.dictionaries(st.integers(0, 15), st.tuples(st.sampled_from("ab"), st.integers(1, 3))),
    st.integers(1, 16),
    st.integers(1, 16),
)
def test_outcome_counts_moves_only_of_segments_that_stay(
    was: dict[int, tuple[str, int]], now: dict[int, tuple[str, int]], old: int, new: int
) -> None:
    got = resize.outcome(_view({}, was), _view({}, now), old, new)
    kept = [s for s in was if s < min(old, new)]
    assert got.moved == sum(1 for s in kept if now.get(s) != was[s])
    assert got.released == sum(1 for s in was if s >= new)
    assert got.added == max(0, new - old)


# -- the guarded spec write, raced against a real etcd -------------------------------------


def _put_spec(endpoint: str, value: bytes) -> None:
    etcd = Etcd([endpoint], timeout=3.0)
    try:
        etcd.put(KEYS.spec, value)
    finally:
        etcd.close()


def test_a_resize_racing_another_resize_fails_and_does_not_override_it(
    etcd_server: EmbeddedEtcd,
) -> None:
    ep = etcd_server.endpoint
    _put_spec(ep, b'{"segments": 16}')
    etcd = Etcd([ep], timeout=3.0)

    def meanwhile() -> float:  # called between the read and the guarded write
        _put_spec(ep, b'{"segments": 4, "previous": [16]}')
        return time.time()

    try:
        with pytest.raises(resize.ConcurrentResize, match="resized to 4 segments"):
            resize.resize(etcd, KEYS, 8, now=meanwhile)
        assert json.loads(etcd.get(KEYS.spec)[0].value)["segments"] == 4  # theirs stands

        rewrites = iter([b'{"segments": 4, "previous": [16], "note": "x"}'])

        def harmless() -> float:  # the spec changes once without changing its count
            if (value := next(rewrites, None)) is not None:
                _put_spec(ep, value)
            return 1000.5

        done = resize.resize(etcd, KEYS, 8, now=harmless)
        assert done.changed and done.before.segments == 4
        assert json.loads(etcd.get(KEYS.spec)[0].value) == {
            "segments": 8, "previous": [16, 4], "resized_at": 1000.5, "note": "x"
        }  # fmt: skip
        assert not resize.resize(etcd, KEYS, 8).changed  # the current count: no write
    finally:
        etcd.close()


# -- end to end ----------------------------------------------------------------------------

SUMMARY = r"fleet 'default': {old} -> {new} segments, {what}, {moved} moved{tail} \(\d+\.\d s\)"


def test_shrink_then_grow_under_fleet_up_keeps_what_stays_and_never_overlaps(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    ep = etcd_server.endpoint
    up = start_up(spawn, ledger_dir, etcd=ep, workers=3, segments=16, handler=RECORDER)
    wait_ready(up, tmp_path, workers=3)
    wait_checkpoints(ep, range(16))
    before = read_fleet(ep)

    code, out = cli(spawn, "resize", "8", "--etcd", ep, "--timeout", "120", name="shrink")
    assert code == 0, out
    after = read_fleet(ep)
    assert sorted(after.owners()) == list(range(8)), out
    assert set(after.checkpoints()) == set(range(16)), "checkpoints >= 8 are kept by default"
    was, now = ownerships(before), ownerships(after)
    moved = sum(1 for s in range(8) if was[s] != now[s])
    # Minimal movement: each member keeps as many of its segments below 8 as its quota.
    current = before.assignment()
    assert current is not None
    quota = quotas(8, {m: 1.0 for m in current.members}, current.members)
    minimal = sum(
        len(below) - min(len(below), quota[m])
        for m, segs in current.members.items()
        for below in [[s for s in segs if s < 8]]
    )
    assert moved == minimal, (was, now, current.members)
    assert re.fullmatch(
        SUMMARY.format(old=16, new=8, what="8 released", moved=moved, tail=", checkpoints kept"),
        lines(out)[-1],
    ), out
    spec = json.loads(after.kvs[KEYS.spec].value)
    assert spec["segments"] == 8 and spec["previous"] == [16], spec
    assert isinstance(spec["resized_at"], float)
    # Released the normal way: on_release ran for every segment that left, under its token.
    releases = {c.segment for c in load_calls(ledger_dir) if c.kind == "on_release"}
    assert set(range(8, 16)) <= releases
    code, shown = cli(spawn, "status", "--etcd", ep, name="status")
    assert code == 0 and "8/8 segments owned" in lines(shown)[0], shown
    time.sleep(1.0)
    assert sorted(read_fleet(ep).owners()) == list(range(8)), "it stays settled"

    code, out = cli(spawn, "resize", "12", "--etcd", ep, "--timeout", "120", name="grow")
    assert code == 0, out
    grown = read_fleet(ep)
    assert sorted(grown.owners()) == list(range(12)), out
    stayed = ownerships(grown)
    assert {s: stayed[s] for s in range(8)} == {s: now[s] for s in range(8)}, "nothing moved"
    assert re.fullmatch(
        SUMMARY.format(old=8, new=12, what=r"4 added \(4 with kept checkpoints\)", moved=0,
                       tail=""),
        lines(out)[-1],
    ), out  # fmt: skip
    kept = after.checkpoints()
    wait_until(
        lambda: all(read_fleet(ep).checkpoints()[s] > kept[s] for s in range(8, 12)),
        timeout=60, message="segments 8-11 resume from their kept checkpoints",
    )  # fmt: skip
    assert status(ep)["segments"] == 12

    up.signal(signal.SIGTERM)
    assert up.wait(timeout=120) == 0, up.tail()
    finals = read_fleet(ep).checkpoints()
    violations = history.check(ledger_dir, finals, segments=16)
    assert violations == [], "\n".join(map(str, violations))


def test_plain_workers_shrink_dropping_checkpoints_and_later_workers_with_old_counts(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path
) -> None:
    ep = etcd_server.endpoint
    workers = [start_worker(spawn, ep, member, ledger_dir, segments=8) for member in ("w0", "w1")]
    wait_converged(ep, ["w0", "w1"])
    wait_checkpoints(ep, range(8))

    code, out = cli(spawn, "resize", "4", "--drop-checkpoints", "--etcd", ep, name="shrink")
    assert code == 0, out
    view = read_fleet(ep)
    assert sorted(view.owners()) == list(range(4)), out
    assert sorted(view.checkpoints()) == list(range(4)), "checkpoints >= 4 dropped"
    assert re.fullmatch(
        SUMMARY.format(old=8, new=4, what="4 released", moved=r"\d+",
                       tail=", 4 checkpoints dropped"),
        lines(out)[-1],
    ), out  # fmt: skip

    code, out = cli(spawn, "resize", "4", "--etcd", ep, name="same")
    assert code == 0 and lines(out) == ["fleet 'default' already has 4 segments: nothing to resize"]

    # A worker configured with a count this fleet never had is refused as before...
    stranger = start_worker(spawn, ep, "w2", ledger_dir, segments=6)
    assert stranger.wait(timeout=60) == 2
    assert lines(stranger.log())[-1].startswith(
        "fleet: segments = 6 but fleet 'default' runs with 4 segments"
    ), stranger.log()
    # ...one configured with the count it was resized from joins with the current one.
    old = start_worker(spawn, ep, "w3", ledger_dir, segments=8)
    st = wait_converged(ep, ["w0", "w1", "w3"])
    assert st["segments"] == 4
    warning = "fleet 'default' was resized from 8 to 4 (fleet resize); update segments in your config"
    assert sum(warning in line for line in lines(old.log())) == 1, old.log()

    started = time.monotonic()
    code, out = cli(spawn, "resize", "6", "--no-wait", "--etcd", ep, name="nowait")
    assert code == 0, out
    assert lines(out) == [
        "fleet 'default': 4 -> 6 segments (spec written; not waiting, see fleet status)"
    ]
    assert time.monotonic() - started < 30
    wait_until(
        lambda: (s := status(ep))["segments"] == 6 and not s["unowned"] and not s["moving"],
        timeout=60, message="the fleet settles on 6 segments",
    )  # fmt: skip
    assert sorted(read_fleet(ep).owners()) == list(range(6))
    wait_checkpoints(ep, range(6))
    code, out = cli(spawn, "resize", "7", "--etcd", ep, name="grow")
    assert code == 0, out  # segment 6 never had a checkpoint: nothing resumes
    assert re.fullmatch(
        SUMMARY.format(old=6, new=7, what="1 added", moved=0, tail=""), lines(out)[-1]
    ), out

    # With no worker running the spec still changes, and nothing is waited for.
    for proc in workers + [old]:
        proc.signal(signal.SIGTERM)
    for proc in workers + [old]:
        assert proc.wait(timeout=60) == 0, proc.tail()
    code, out = cli(spawn, "resize", "3", "--drop-checkpoints", "--etcd", ep, name="idle")
    assert code == 0, out
    assert re.fullmatch(
        SUMMARY.format(old=7, new=3, what="0 released", moved=0,
                       tail=", 4 checkpoints dropped; no workers running: they take the new "
                       "count when they start"),
        lines(out)[-1],
    ), out  # fmt: skip
    assert sorted(read_fleet(ep).checkpoints()) == [0, 1, 2]
    assert_history_ok(ledger_dir, min_calls=20)


def test_fleet_up_respawns_a_crashed_worker_with_its_old_segments_after_a_resize(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    up = start_up(spawn, ledger_dir, workers=2, segments=16)  # embedded etcd
    ep, rows = wait_ready(up, tmp_path, workers=2)
    code, out = cli(spawn, "resize", "8", name="shrink")  # from the fleet up's directory
    assert code == 0, out
    assert lines(out)[0] == "fleet 'default': resizing 16 -> 8 segments", out
    victim = rows[0]
    os.kill(victim["pid"], signal.SIGKILL)

    def respawned() -> bool:
        row = next(r for r in ps(tmp_path) if r["slot"] == victim["slot"])
        return row["state"] == "READY" and row["pid"] != victim["pid"]

    wait_alive(up, respawned, "the crashed slot respawned and READY")
    st = wait_converged(ep, [r["member"] for r in rows])
    assert st["segments"] == 8 and sorted(st["members"][0]["owned"] + st["members"][1]["owned"]) \
        == list(range(8))  # fmt: skip
    warning = "was resized from 16 to 8 (fleet resize); update segments in your config"
    assert warning in up.log(), up.tail()
    assert all(r["state"] == "READY" for r in ps(tmp_path))
    assert_history_ok(ledger_dir)


@pytest.mark.parametrize("value", ["abc", "0", "-3", "8.5", "100001"])
def test_a_bad_count_is_one_line_and_exit_2(spawn: Spawner, value: str) -> None:
    code, out = cli(spawn, "resize", value, "--etcd", "127.0.0.1:2")
    assert code == 2
    assert lines(out) == [
        f"fleet: resize: segments = {value!r}: expected an integer from 1 to 100000"
    ]


def test_resize_mistakes_are_one_line_with_the_documented_exit_code(
    etcd_server: EmbeddedEtcd, spawn: Spawner
) -> None:
    ep = etcd_server.endpoint
    code, out = cli(spawn, "resize", "8", "--etcd", ep, name="nofleet")
    assert code == 2
    assert lines(out) == [
        "fleet: no fleet 'default' under '/fleet' (key /fleet/default/spec not found); check "
        "--name and --prefix, or start it first (fleet up / fleet worker)"
    ]
    code, out = cli(spawn, "resize", "8", "--etcd", f"127.0.0.1:{free_port()}", name="noetcd")
    assert code == 3 and len(lines(out)) == 1 and lines(out)[0].startswith("fleet: "), out
    code, out = cli(spawn, "resize", "8", name="noendpoint")  # no fleet up here either
    assert code == 2 and lines(out) == [
        "fleet: no etcd endpoint: pass --etcd URL, set FLEET_ETCD, or [etcd] endpoints"
    ]
    code, out = cli(spawn, "resize", "8", "--no-wait", "--drop-checkpoints", "--etcd", ep)
    assert code == 2 and lines(out) == [
        "fleet: resize: --drop-checkpoints waits for the releases; it cannot be used with "
        "--no-wait"
    ]
    code, out = cli(spawn, "resize", "8", "--timeout", "soon", "--etcd", ep)
    assert code == 2 and lines(out) == [
        "fleet: resize: --timeout 'soon': expected a number of seconds > 0"
    ]

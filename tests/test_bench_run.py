"""The benchmarks as a user runs them: `python bench/run.py --smoke` (every benchmark's
smallest mode, 2 workers x 8 segments, one trial each) on a real etcd and real
`fleet up`/`fleet worker` processes, writing its results file and benchmarks.md into a
temporary directory; plus the pure parts (percentiles, the report's growth table) and
the command-line errors.

The full and `--quick` runs take minutes and measure, so they are not run here; this
proves every benchmark still runs end to end and leaves nothing behind.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SMOKE_BENCHES = ["movement", "coldstart", "failover", "handoff", "join", "footprint"]

pytestmark = pytest.mark.timeout(900)  # the smoke run: about a minute, slower on a busy host


def _load(name: str) -> ModuleType:
    """bench/ is a directory of scripts, not a package: load the file itself."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STATS = _load("stats")


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bench-smoke")
    proc = bench(
        "bench/run.py", "--smoke", "--out", str(tmp / "results"), "--docs", str(tmp / "docs"),
        timeout=800,
    )  # fmt: skip
    files = sorted((tmp / "results").glob("*-smoke.json"))
    return {
        "proc": proc,
        "results": json.loads(files[0].read_text()) if files else None,
        "docs": tmp / "docs",
    }


def test_smoke_run_succeeds_and_writes_its_results_file(smoke: dict[str, Any]) -> None:
    proc, results = smoke["proc"], smoke["results"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert results is not None and results["mode"] == "smoke"
    assert sorted(results["benches"]) == sorted(SMOKE_BENCHES)
    for name, one in results["benches"].items():
        assert "report" in one, f"{name}: {one.get('error')}"
        assert one["exit"] == 0 and one["command"].startswith("python bench/")
    m = results["machine"]
    assert m["cpu_count"] >= 1 and m["python"] and m["etcd"]["version"] and m["fleet_revision"]
    # The headline goes to stdout, as the user sees it at the end of the run.
    assert "| kill -9 of a non-leader under `fleet up`" in proc.stdout


def test_nothing_is_left_running(smoke: dict[str, Any]) -> None:
    assert smoke["proc"].returncode is not None
    left = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid == os.getpid() or p.status() == psutil.STATUS_ZOMBIE:
                continue  # a zombie holds nothing; its parent will reap it
            env = p.environ()
            if "FLEET_BENCH_TAG" in env:
                left.append(
                    f"pid {p.pid} ppid {p.ppid()} {p.status()} tag {env['FLEET_BENCH_TAG']}: "
                    f"{' '.join(p.cmdline()[:6])}"
                )
        except psutil.Error:
            continue
    assert left == []


def report(smoke: dict[str, Any], name: str) -> dict[str, Any]:
    results = smoke["results"]
    assert results is not None, smoke["proc"].stderr[-4000:]
    rep: dict[str, Any] = results["benches"][name]["report"]
    return rep


def measured(summary: dict[str, Any], key: str) -> float:
    s = summary[key]
    assert s["n"] >= 1 and s["median_ms"] is not None, f"{key} not measured: {s}"
    return float(s["median_ms"])


def test_failover_times_every_step_of_a_kill(smoke: dict[str, Any]) -> None:
    rep = report(smoke, "failover")
    rounds = rep["raw"]["rounds"]
    assert [r["victim_was_leader"] for r in rounds] == [False, True]  # one kill of each kind
    for r in rounds:
        order = [r[f"{k}_ms"] for k in ("reaped", "gone", "assignment", "acquired", "first_call")]
        assert None not in order, r
        assert order[1:] == sorted(order[1:]), r  # revoked, assigned, acquired, called
        assert all(v >= 0 for v in r["steps"].values() if v is not None)
    for key in ("acquired_leader", "acquired_follower", "first_call", "recovery"):
        measured(rep["summary"], key)
    assert rep["raw"]["shutdown"]["down_exit"] == 0


def test_handoff_times_graceful_join_and_the_ttl_bound_kill(smoke: dict[str, Any]) -> None:
    rep = report(smoke, "handoff")
    for key in ("acquired", "first_call", "graceful_exit", "join_rebalance", "kill9_acquired"):
        measured(rep["summary"], key)
    k9 = rep["raw"]["kill9"][0]
    # Nobody revokes the lease: the takeover waits for etcd's expiry of a 2 s TTL.
    assert k9["kill9_gone_ms"] > 500 and k9["kill9_acquired_ms"] >= k9["kill9_gone_ms"]
    assert rep["raw"]["rounds"][0]["exit_code"] == 0


def test_coldstart_counts_the_acquires_from_etcd(smoke: dict[str, Any]) -> None:
    rep = report(smoke, "coldstart")
    trial = rep["raw"]["trials"][0]
    assert trial["acquires"] >= 8 and 1 <= trial["acquires_max"] <= trial["acquires"]
    assert trial["acquires_per_segment"] == pytest.approx(trial["acquires"] / 8, abs=0.001)
    assert trial["assignments_written"] >= 1
    measured(rep["summary"], "settled")
    assert trial["etcd_ready_ms"] <= trial["settled_ms"]


def test_join_and_leave_count_etcd_requests(smoke: dict[str, Any]) -> None:
    rep = report(smoke, "join")
    for key in ("join_settled", "join_rebalance", "leave_acquired", "leave_slot_gone"):
        measured(rep["summary"], key)
    trial = rep["raw"]["trials"][0]
    assert trial["join"]["segments_moved"] >= 2  # 8 segments, 2 -> 3 members
    for kind in ("join_etcd", "leave_etcd"):
        assert trial[kind]["requests_gross"] > 0, trial[kind]
    assert "requests:Txn" in trial["join_etcd"]["by_counter_net"]


def test_footprint_reads_memory_threads_traffic_and_imports(smoke: dict[str, Any]) -> None:
    rep = report(smoke, "footprint")
    idle = rep["raw"]["phases"][0]
    w = idle["worker_median"]
    assert w["rss_mib"] > 5 and w["threads"] >= 2
    assert idle["processes"]["supervisor"]["rss_mib"] > 5 and "etcd" in idle["processes"]
    assert idle["etcd_per_worker_per_min"]["bytes_in"] > 0  # keepalives at least
    imports = rep["raw"]["imports"]
    assert imports["importtime_total_ms"] > 0 and imports["modules"] > 10
    assert "fleet" in {p["package"] for p in imports["packages"]} and imports["top_self"]


def test_docs_have_tables_captions_and_charts_or_say_why_not(smoke: dict[str, Any]) -> None:
    report(smoke, "movement")
    results = smoke["results"]
    text = (smoke["docs"] / "benchmarks.md").read_text()
    for title in ("## Headline", "## Growth", "## kill -9 under `fleet up`", "## Cold start",
                  "## Footprint", "## Segments moved"):  # fmt: skip
        assert title in text
    m = results["machine"]
    caption = f"Python {m['python']}, etcd {m['etcd']['version']}, fleet {m['fleet_revision']}"
    assert text.count(caption) >= 3 and results["command"] in text
    assert "Not measured (both scale runs are needed)." in text  # no large run in smoke
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed (`pip install -e '.[bench]'`)" in text
        assert "matplotlib is not installed" in smoke["proc"].stdout
        assert not (smoke["docs"] / "benchmarks").exists()
    else:
        pngs = sorted(p.name for p in (smoke["docs"] / "benchmarks").glob("*.png"))
        assert {"steps.png", "distributions.png", "movement.png"} <= set(pngs)
        assert "![kill -9 under fleet up, step by step](benchmarks/steps.png)" in text


def test_growth_table_compares_the_two_sizes(smoke: dict[str, Any], tmp_path: Path) -> None:
    """The large run is not part of the smoke run: give the report a copy of the small one
    as if measured at 4 times the size, with every time doubled."""
    results = json.loads(json.dumps(smoke["results"]))
    large = json.loads(json.dumps(results["benches"]["join"]))
    large["report"]["parameters"].update(workers=8, segments=32)
    for s in large["report"]["summary"].values():
        s["median_ms"] = None if s["median_ms"] is None else s["median_ms"] * 2
    results["benches"]["scale"] = large
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    code = (
        "import json, sys; sys.path.insert(0, 'bench'); import report; "
        f"print('\\n'.join(report.growth(json.load(open({str(path)!r})))))"
    )
    proc = bench("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert "| median | 2 x 8 | 8 x 32 | growth |" in proc.stdout
    assert "| join -> settled, ms |" in proc.stdout and "| x2.0 |" in proc.stdout


def test_render_regenerates_the_docs_from_a_results_file(
    smoke: dict[str, Any], tmp_path: Path
) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps(smoke["results"]))
    proc = bench("bench/run.py", "--render", str(results), "--docs", str(tmp_path / "docs"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "docs" / "benchmarks.md").read_text() == (
        smoke["docs"] / "benchmarks.md"
    ).read_text()
    missing = bench("bench/run.py", "--render", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and missing.stderr.startswith("run.py: --render ")
    assert "Traceback" not in missing.stderr


def test_no_bench_file_is_over_400_lines() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in BENCH.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 420} == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench/run.py", "--only", "nope"], "--only nope: expected some of "),
        (["bench/run.py", "--quick", "--smoke"], "not allowed with argument"),
        (["bench/scale.py", "--workers", "0"], "need --workers >= 1"),
        (["bench/failover.py", "--workers", "1"], "--workers must be at least 2"),
        (["bench/footprint.py", "--intervals", "1,x"], "--intervals '1,x': expected numbers"),
    ],
)
def test_bad_arguments_are_a_usage_error(args: list[str], message: str) -> None:
    proc = bench(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=60), st.floats(0.01, 1.0))
def test_nearest_rank_is_a_sample_with_at_least_q_at_or_below(
    values: list[float], q: float
) -> None:
    got = STATS.nearest_rank(values, q)
    assert got in values
    ordered = sorted(values)
    at_or_below = sum(1 for v in values if v <= got)
    assert at_or_below >= math.ceil(q * len(values)) - 1e-9
    below = [v for v in ordered if v < got]
    assert len(below) < q * len(values)  # the smallest such sample


def test_summaries_skip_what_was_not_seen() -> None:
    s = STATS.summarize([None, 3.0, 1.0, 2.0])
    assert s == {"n": 3, "median_ms": 2.0, "p90_ms": 3.0, "p99_ms": 3.0, "max_ms": 3.0}
    assert STATS.summarize([None])["n"] == 0 and STATS.summarize([])["median_ms"] is None

"""PNG charts for docs/benchmarks.md, drawn with matplotlib (the `bench` extra).

Importing this module fails with ImportError when matplotlib is missing; `report.py`
then writes the tables alone. Each function takes the results of `bench/run.py` and
returns False when the benchmark it draws was not run.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

Results = dict[str, Any]
STEP_ORDER = ["kill", "reaped", "gone", "assignment", "acquired", "first_call"]
STEP_LABELS = ["reaped", "lease revoked", "assignment written", "acquired", "first call"]


def _report(results: Results, name: str) -> dict[str, Any] | None:
    bench = results["benches"].get(name)
    return bench.get("report") if bench else None


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def steps(results: Results, path: Path) -> bool:
    """Stacked bars: the median time of each step of a kill -9 under fleet up."""
    rep = _report(results, "failover")
    if rep is None or not rep["raw"]["rounds"]:
        return False
    fig, ax = plt.subplots(figsize=(8, 2.6))
    kinds = [("non-leader killed", False), ("leader killed", True)]
    for y, (_, leader) in enumerate(kinds):
        rounds = [r for r in rep["raw"]["rounds"] if r["victim_was_leader"] == leader]
        left = 0.0
        for i, (a, b) in enumerate(zip(STEP_ORDER, STEP_ORDER[1:], strict=False)):
            width = _median([r["steps"][f"{a}->{b}"] for r in rounds
                             if r["steps"][f"{a}->{b}"] is not None])  # fmt: skip
            ax.barh(y, width, left=left, color=f"C{i}", label=STEP_LABELS[i] if y == 0 else None)
            left += width
    ax.set_yticks(range(len(kinds)), [k for k, _ in kinds])
    ax.set_xlabel("ms after SIGKILL (median of each step)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=5, fontsize=8)
    ax.set_title("kill -9 under fleet up: where the time goes")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def distributions(results: Results, path: Path) -> bool:
    """Box plots of the handover times, log scale."""
    series: list[tuple[str, list[float]]] = []

    def add(label: str, bench: str, pick: Any) -> None:
        rep = _report(results, bench)
        if rep is not None:
            values = [v for v in pick(rep["raw"]) if v is not None]
            if values:
                series.append((label, values))

    add(
        "kill -9\nnon-leader",
        "failover",
        lambda raw: [r["acquired_ms"] for r in raw["rounds"] if not r["victim_was_leader"]],
    )
    add(
        "kill -9\nleader",
        "failover",
        lambda raw: [r["acquired_ms"] for r in raw["rounds"] if r["victim_was_leader"]],
    )
    add("kill -9\nfirst calls", "failover", lambda raw: [r["first_call_ms"] for r in raw["rounds"]])
    add("SIGTERM\nhandoff", "handoff", lambda raw: [r["acquired_ms"] for r in raw["rounds"]])
    add("scale down\nleave", "join", lambda raw: [t["leave"]["acquired_ms"] for t in raw["trials"]])
    add("join\nrebalance", "join", lambda raw: [t["join"]["rebalance_ms"] for t in raw["trials"]])
    add(
        "kill -9\nno supervisor",
        "handoff",
        lambda raw: [k["kill9_acquired_ms"] for k in raw["kill9"]],
    )
    # fmt: skip
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.boxplot([v for _, v in series], whis=(0, 100))
    ax.set_xticks(range(1, len(series) + 1), [label for label, _ in series], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale)")
    ax.set_title("Segments changing hands: trigger -> all owned by others")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def growth(results: Results, path: Path) -> bool:
    """Small vs large fleet: join, leave and cold start times, etcd requests per change."""
    small, large = _report(results, "join"), _report(results, "scale")
    if small is None or large is None:
        return False
    keys = [("cold start", "cold_start"), ("join", "join_settled"),
            ("join rebalance", "join_rebalance"), ("leave", "leave_acquired")]  # fmt: skip
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    for i, rep in enumerate((small, large)):
        p = rep["parameters"]
        label = f"{p['workers']} x {p['segments']}"
        values = [rep["summary"][k]["median_ms"] or 0.1 for _, k in keys]  # log scale
        ax1.bar([x + 0.4 * i for x in range(len(keys))], values, width=0.4, label=label)
        etcd = rep["etcd"]
        ax2.bar([x + 0.4 * i for x in range(2)],
                [etcd["join_requests_net_median"], etcd["leave_requests_net_median"]],
                width=0.4, label=label)  # fmt: skip
    ax1.set_xticks([x + 0.2 for x in range(len(keys))], [k for k, _ in keys])
    ax1.set_ylabel("median ms")
    ax1.set_yscale("log")
    ax1.legend()
    ax2.set_xticks([0.2, 1.2], ["join", "leave"])
    ax2.set_ylabel("etcd requests per change")
    ax2.legend()
    fig.suptitle("Growth from the small to the large fleet")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def movement(results: Results, path: Path) -> bool:
    """Segments moved over the lower bound, per strategy and (S, N)."""
    rep = _report(results, "movement")
    if rep is None:
        return False
    cells = rep["cells"]
    strategies = list(cells[0]["summary"])
    fig, ax = plt.subplots(figsize=(9, 3.4))
    width = 0.8 / len(strategies)
    for i, name in enumerate(strategies):
        ratios = [c["summary"][name]["moved_over_bound"] or 0.0 for c in cells]
        ax.bar([x + i * width for x in range(len(cells))], ratios, width=width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cells))],
                  [f"S={c['segments']}\nN={c['members']}" for c in cells], fontsize=8)  # fmt: skip
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("moved / lower bound")
    ax.legend(fontsize=8)
    ax.set_title(
        "Segments moved by joins and leaves (1.0 = the fewest a balanced assignment "
        "can move;\nthe hash ring moves fewer by staying unbalanced)",
        fontsize=10,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def draw(results: Results, directory: Path) -> dict[str, str]:
    """Every chart that has data; name -> file name inside `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    drawn = {}
    for name, fn in (("steps", steps), ("distributions", distributions),
                     ("growth", growth), ("movement", movement)):  # fmt: skip
        path = directory / f"{name}.png"
        if fn(results, path):
            drawn[name] = path.name
    return drawn

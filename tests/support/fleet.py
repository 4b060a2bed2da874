"""Starting workers and reading the fleet the way the other tests need it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fleet.coord.etcd import Etcd
from fleet.coord.keys import Keys
from fleet.coord.status import collect
from tests.support.procs import Proc, Spawner

RECORDING = "tests.support.recording:handle"
# Variables that would change what spawned fleet commands do if the caller had them set
# (a None value unsets a variable in `Spawner.env`).
CLEAN_ENV: dict[str, str | None] = {
    name: None
    for name in (
        "FLEET_ETCD",
        "FLEET_ID",
        "FLEET_NAME",
        "FLEET_PREFIX",
        "FLEET_WORKERS",
        "FLEET_SEGMENTS",
        "FLEET_HANDLER",
        "FLEET_CONFIG",
        "FLEET_INTERVAL",
        "FLEET_LEASE_TTL",
    )
}


def start_worker(
    spawn: Spawner,
    endpoint: str,
    member_id: str,
    ledger_dir: Path,
    *,
    segments: int = 12,
    lease_ttl: int = 10,
    interval: float = 0.05,
    handler: str = RECORDING,
    call_seconds: float = 0.05,
    args: Sequence[str] = (),
    env: Mapping[str, str | None] | None = None,
) -> Proc:
    """`fleet worker` with the recording handler (every call lands in the ledger)."""
    argv = [
        "worker", "--etcd", endpoint, "--id", member_id, "--segments", str(segments),
        "--lease-ttl", str(lease_ttl), "--interval", str(interval), "--handler", handler,
        *args,
    ]
    full_env: dict[str, str | None] = {
        "FLEET_TEST_LEDGER": str(ledger_dir),
        "FLEET_TEST_CALL_SECONDS": str(call_seconds),
    }
    full_env.update(env or {})
    return spawn(argv, env=full_env, name=member_id)


def status(endpoint: str, name: str = "default") -> dict[str, Any]:
    """`fleet status --json`, read in-process (same code path, no interpreter start-up)."""
    etcd = Etcd([endpoint], timeout=3.0)
    try:
        return collect(etcd, Keys("/fleet", name))
    finally:
        etcd.close()


def owners(st: Mapping[str, Any]) -> dict[int, str | None]:
    return {s["segment"]: s["owner"] for s in st["segment_owners"]}


def tokens(st: Mapping[str, Any]) -> dict[int, int | None]:
    return {s["segment"]: s["token"] for s in st["segment_owners"]}


def counts(st: Mapping[str, Any]) -> dict[str, int]:
    """Segments owned per member."""
    return {m["id"]: len(m["owned"]) for m in st["members"]}


def converged(st: Mapping[str, Any], members: Sequence[str]) -> bool:
    """Exactly `members` are in, every segment is owned by its assigned member, balanced."""
    ids = sorted(m["id"] for m in st["members"])
    if ids != sorted(members) or st["moving"] or st["unowned"]:
        return False
    sizes = counts(st).values()
    return bool(sizes) and max(sizes) - min(sizes) <= 1


def wait_converged(endpoint: str, members: Sequence[str], timeout: float = 60.0) -> dict[str, Any]:
    """The status once `converged` holds; fails the test with the last status otherwise."""
    from tests.support.wait import wait_until

    def check() -> dict[str, Any] | None:
        st = status(endpoint)
        return st if converged(st, members) else None

    result: dict[str, Any] = wait_until(
        check, timeout=timeout, message=f"fleet never converged on {sorted(members)}"
    )
    return result

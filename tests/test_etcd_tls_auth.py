"""Acceptance 6 of issue 8: fleet against an etcd with TLS and authentication.

One etcd serves clients over TLS (certificates made by the test with openssl) with auth
enabled: root, and a `fleet` user whose role may read and write `/fleet/` only. Simple
auth tokens are given a 2 s TTL (`--auth-token-ttl`), so every run here is many token
lifetimes long: a worker whose calls are further apart than that (lease keepalives do not
count as use) meets "invalid auth token", and so does `fleet up`'s own client, idle until
it has a lease to revoke. Both must re-authenticate instead of failing.

Secrets: the password goes in a config file (`etcd.password_file`, or `etcd.password`) or
the environment, never on a command line; it must not appear in any output, log or
/proc/<pid>/cmdline of a fleet process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fleet.coord.etcd import Etcd
from fleet.coord.keys import Keys
from fleet.coord.status import collect
from tests.conftest import register_log
from tests.support.checker import assert_history_ok
from tests.support.cluster import SecureEtcd, running_secure_etcd
from tests.support.fleet import CLEAN_ENV, RECORDING
from tests.support.procs import REPO_ROOT, Proc, Spawner
from tests.support.supervised import start_up
from tests.support.tls import OPENSSL, Certs, jwt_keys, make_certs
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")

TOKEN_TTL = 2  # seconds: etcd's --auth-token-ttl for these tests
USER = "fleet"


@pytest.fixture
def secure(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[SecureEtcd, Certs]]:
    with running_secure_etcd(
        tmp_path, request.node, auth=(USER, PASSWORD), token_ttl=TOKEN_TTL
    ) as running:
        yield running


PASSWORD = "pw-" + uuid.uuid4().hex  # distinctive, so a leak anywhere is found


def write_config(tmp_path: Path, endpoint: str, certs: Certs, **etcd: str) -> Path:
    """A fleet.toml naming the secure endpoint, the CA and the given [etcd] keys."""
    lines = ["[etcd]", f"endpoints = [{json.dumps(endpoint)}]", f'ca_cert = "{certs.ca}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in etcd.items()]
    path = tmp_path / f"fleet-{uuid.uuid4().hex[:6]}.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "etcd-password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


def client(endpoint: str, certs: Certs) -> Etcd:
    return Etcd([endpoint], user=USER, password=PASSWORD, ca_cert=str(certs.ca))


def fleet_status(endpoint: str, certs: Certs) -> dict[str, Any]:
    etcd = client(endpoint, certs)
    try:
        return collect(etcd, Keys("/fleet", "default"))
    finally:
        etcd.close()


def worker(
    spawn: Spawner, config: Path, member: str, ledger: Path, *, segments: int, interval: float
) -> Proc:
    argv = [
        "worker", "--config", str(config), "--id", member, "--segments", str(segments),
        "--interval", str(interval), "--handler", RECORDING,
    ]  # fmt: skip
    env = {**CLEAN_ENV, "FLEET_TEST_LEDGER": str(ledger), "FLEET_TEST_CALL_SECONDS": "0.02"}
    return spawn(argv, env=env, name=member)


def run_fleet(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> Any:
    full = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    full["PYTHONPATH"] = str(REPO_ROOT)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "fleet", *args],
        cwd=tmp_path,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )


def fleet_cmdlines(roots: list[Proc]) -> list[tuple[int, str]]:
    """(pid, command line) of every live process started by the test, descendants too."""
    found: list[tuple[int, str]] = []
    for proc in roots:
        try:
            top = psutil.Process(proc.pid)
            for p in [top, *top.children(recursive=True)]:
                found.append((p.pid, "\0".join(p.cmdline())))
        except psutil.Error:
            continue
    return found


def assert_no_secret(texts: list[str], where: str) -> None:
    for text in texts:
        assert PASSWORD not in text, f"the etcd password appears in {where}"


def test_workers_and_status_over_tls_with_auth_outlive_token_expiry(
    secure: tuple[SecureEtcd, Certs], spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    """Two workers (one reading the password from a file, one from FLEET_ETCD_PASSWORD)
    commit each segment every 3 s, longer than the 2 s token TTL, for 5 token lifetimes:
    every commit needs a fresh token, nobody loses its lease, nothing overlaps."""
    etcd, certs = secure
    by_file = write_config(
        tmp_path, etcd.endpoint, certs, user=USER, password_file=str(password_file(tmp_path))
    )
    by_env = write_config(tmp_path, etcd.endpoint, certs, user=USER)
    a = worker(spawn, by_file, "tls-a", ledger_dir, segments=2, interval=3.0)
    b_env = {"FLEET_ETCD_PASSWORD": PASSWORD}
    argv = [
        "worker", "--config", str(by_env), "--id", "tls-b", "--segments", "2",
        "--interval", "3.0", "--handler", RECORDING,
    ]  # fmt: skip
    b = spawn(
        argv,
        env={**CLEAN_ENV, "FLEET_TEST_LEDGER": str(ledger_dir), **b_env},
        name="tls-b",
    )

    def split() -> dict[str, Any] | None:
        st = fleet_status(etcd.endpoint, certs)
        owners = {s["owner"] for s in st["segment_owners"]}
        return st if owners == {"tls-a", "tls-b"} else None

    first = wait_until(split, timeout=40, message="both workers own a segment")
    leases = {m["id"]: m["lease"] for m in first["members"]}
    tokens = {s["segment"]: s["token"] for s in first["segment_owners"]}
    time.sleep(5 * TOKEN_TTL + 2)

    def progressed() -> dict[str, Any] | None:
        st = fleet_status(etcd.endpoint, certs)
        done = [s["checkpoint"] or 0 for s in st["segment_owners"]]
        return st if min(done) >= 3 else None

    st = wait_until(progressed, timeout=30, message="every segment committed >= 3 times")
    assert {m["id"]: m["lease"] for m in st["members"]} == leases, "a lease was lost"
    assert {s["segment"]: s["token"] for s in st["segment_owners"]} == tokens
    for proc in (a, b):
        assert proc.alive, proc.tail()
        assert "starting over" not in proc.log(), proc.tail()

    # `fleet status` as a user would run it: config file, password in the environment.
    out = run_fleet(
        ["status", "--config", str(by_env)], tmp_path, {"FLEET_ETCD_PASSWORD": PASSWORD}
    )
    assert out.returncode == 0, out.stderr
    assert "tls-a" in out.stdout and "tls-b" in out.stdout
    assert_no_secret([out.stdout, out.stderr], "fleet status output")
    assert_no_secret([c for _, c in fleet_cmdlines([a, b])], "a worker's command line")
    for proc in (a, b):
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.tail()
    assert_no_secret([a.log(), b.log()], "a worker's log")
    assert_history_ok(ledger_dir)


def test_fleet_up_with_external_tls_auth_etcd_revokes_after_token_expiry(
    secure: tuple[SecureEtcd, Certs], spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    """`fleet up`'s own client is idle until a worker dies; by then its token has expired.
    The revoke must re-authenticate: the dead worker's segments move at once, not after
    the 10 s lease TTL."""
    etcd, certs = secure
    config = write_config(
        tmp_path, etcd.endpoint, certs, user=USER, password_file=str(password_file(tmp_path))
    )
    up = start_up(
        spawn,
        ledger_dir,
        etcd=etcd.endpoint,
        workers=2,
        segments=4,
        extra=["--config", str(config), "--id", "tlsup", "--lease-ttl", "10"],
    )

    def owners() -> dict[int, str] | None:
        st = fleet_status(etcd.endpoint, certs)
        found = {s["segment"]: s["owner"] for s in st["segment_owners"]}
        return found if set(found.values()) == {"tlsup-0", "tlsup-1"} else None

    wait_until(owners, timeout=60, message="fleet up's two workers own the segments")
    cmdlines = fleet_cmdlines([up])
    assert len(cmdlines) >= 3, cmdlines  # fleet up and its two workers
    assert_no_secret([c for _, c in cmdlines], "a command line under fleet up")
    ps = run_fleet(["ps"], tmp_path)
    assert ps.returncode == 0, ps.stderr
    assert_no_secret([ps.stdout, ps.stderr], "fleet ps")

    time.sleep(2 * TOKEN_TTL + 1)  # the supervisor's token expires
    st = fleet_status(etcd.endpoint, certs)
    victim = next(m for m in st["members"] if m["id"] == "tlsup-0")
    killed = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)

    def moved() -> bool:
        st = fleet_status(etcd.endpoint, certs)
        return all(s["owner"] == "tlsup-1" for s in st["segment_owners"]) or any(
            m["id"] == "tlsup-0" and m["lease"] != victim["lease"] for m in st["members"]
        )

    wait_until(moved, timeout=30, interval=0.02, message="tlsup-0's segments moved")
    took = time.monotonic() - killed
    print(f"failover after kill -9 under fleet up with an expired token: {took:.2f} s")
    assert took < 6.0, f"the lease was not revoked (took {took:.1f} s, TTL 10 s):\n{up.tail()}"
    up.signal(signal.SIGTERM)
    assert up.wait(60) == 0, up.tail()
    assert_no_secret([up.log()], "fleet up's output")
    assert_history_ok(ledger_dir)


def test_worker_survives_etcd_restart_under_auth(
    secure: tuple[SecureEtcd, Certs], spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    """etcd keeps simple tokens in memory: after a restart every token is invalid, and a
    watch created with one is refused. The workers must re-authenticate, re-watch, and
    still see a new member join (which needs a working watch on both sides)."""
    etcd, certs = secure
    config = write_config(
        tmp_path, etcd.endpoint, certs, user=USER, password_file=str(password_file(tmp_path))
    )
    a = worker(spawn, config, "rs-a", ledger_dir, segments=4, interval=0.2)
    def a_owns_all() -> bool:
        st = fleet_status(etcd.endpoint, certs)
        return {s["owner"] for s in st["segment_owners"]} == {"rs-a"}

    wait_until(a_owns_all, timeout=40, message="rs-a owns every segment")
    etcd.kill()
    etcd.server.start()
    b = worker(spawn, config, "rs-b", ledger_dir, segments=4, interval=0.2)

    def split() -> bool:
        st = fleet_status(etcd.endpoint, certs)
        got = sorted(s["owner"] or "" for s in st["segment_owners"])
        return got == ["rs-a", "rs-a", "rs-b", "rs-b"]

    wait_until(split, timeout=45, message="rs-a and rs-b split the segments after the restart")
    for proc in (a, b):
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.tail()
    assert_history_ok(ledger_dir)


def _one_line_naming(stderr: str, endpoint: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    assert endpoint in lines[0], lines[0]
    return lines[0]


def test_wrong_password_or_missing_ca_is_exit_3_with_one_line(
    secure: tuple[SecureEtcd, Certs], tmp_path: Path
) -> None:
    etcd, certs = secure
    wrong = write_config(tmp_path, etcd.endpoint, certs, user=USER, password="not-" + PASSWORD)
    no_ca = tmp_path / "no-ca.toml"
    no_ca.write_text(f'[etcd]\nendpoints = ["{etcd.endpoint}"]\nuser = "{USER}"\n')
    other_ca = write_config(tmp_path, etcd.endpoint, certs, user=USER)
    other_ca.write_text(other_ca.read_text().replace(str(certs.ca), str(certs.other_ca)))
    pw_env = {"FLEET_ETCD_PASSWORD": PASSWORD}
    cases = [
        ("wrong password", wrong, {}, "authentication"),
        ("missing CA", no_ca, pw_env, "certificate"),
        ("wrong CA", other_ca, pw_env, "certificate"),
    ]
    for what, config, env, word in cases:
        for command in (["status"], ["worker", "--handler", RECORDING, "--id", "bad"]):
            out = run_fleet([*command, "--config", str(config)], tmp_path, env)
            assert out.returncode == 3, f"{what}, fleet {command[0]}: {out.returncode}\n{out}"
            line = _one_line_naming(out.stderr, etcd.endpoint)
            assert word in line.lower(), f"{what}: {line}"
            assert_no_secret([out.stdout, out.stderr], f"fleet {command[0]} ({what})")
    # `fleet up` authenticates before it spawns anything: a wrong password stops it.
    out = run_fleet(["up", "--config", str(wrong), "--workers", "1"], tmp_path)
    assert out.returncode == 3, out
    assert "authentication" in _one_line_naming(out.stderr, etcd.endpoint)
    assert_no_secret([out.stdout, out.stderr], "fleet up (wrong password)")


def test_password_file_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-password"
    config = tmp_path / "pf.toml"
    config.write_text(
        f'[etcd]\nendpoints = ["https://127.0.0.1:1"]\nuser = "u"\npassword_file = "{missing}"\n'
    )
    out = run_fleet(["status", "--config", str(config)], tmp_path)
    assert out.returncode == 2, out
    assert str(missing) in _one_line_naming(out.stderr, str(missing))
    pw = tmp_path / "pw"
    pw.write_text("secret-in-file\n")
    both = tmp_path / "both.toml"
    both.write_text(
        '[etcd]\nendpoints = ["https://127.0.0.1:1"]\nuser = "u"\n'
        f'password = "x"\npassword_file = "{pw}"\n'
    )
    out = run_fleet(["status", "--config", str(both)], tmp_path)
    assert out.returncode == 2, out
    line = _one_line_naming(out.stderr, "password_file")
    assert "password" in line and "secret-in-file" not in line


def _burst(c: Etcd, prefix: str, n: int) -> list[BaseException]:
    """`n` threads put one key each under `prefix` at the same moment; their errors."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        try:
            barrier.wait(5)
            c.put(f"{prefix}{i}", b"1")
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


def test_jwt_token_renewed_once_for_all_threads_on_expiry_and_auth_change(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """JWTs expire at a fixed time (here 2 s after issue) and are refused with "auth store
    is old" once any user or role changes. Eight threads sharing one client that all meet
    the refusal at once cost one Authenticate, and every call succeeds."""
    certs = make_certs(tmp_path / "pki")
    private, public = jwt_keys(tmp_path / "jwt")
    etcd = SecureEtcd(
        tmp_path,
        certs,
        auth_token=f"jwt,pub-key={public},priv-key={private},sign-method=RS256,ttl=2s",
    )
    register_log(request.node, "etcd log", tmp_path / "etcd.log")
    root_password = "root-" + uuid.uuid4().hex
    try:
        etcd.start()
        etcd.enable_auth(root_password, USER, PASSWORD, "/fleet/")
        c = client(etcd.endpoint, certs)
        try:
            c.put("/fleet/jwt", b"0")
            for round_, change in enumerate(("expiry", "auth change"), start=1):
                if change == "expiry":
                    time.sleep(3)
                else:
                    etcd.as_root(
                        root_password, "/v3/auth/user/add", {"name": "other", "password": "x"}
                    )
                generation = c._auth_generation
                errors = _burst(c, f"/fleet/jwt-{round_}-", 8)
                assert not errors, f"{change}: {errors}"
                assert c._auth_generation == generation + 1, f"{change}: one re-authentication"
                assert len(c.get_prefix(f"/fleet/jwt-{round_}-").kvs) == 8
        finally:
            c.close()
    finally:
        etcd.kill()

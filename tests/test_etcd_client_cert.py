"""Issue 8: fleet against an etcd that requires client certificates (`--client-cert-auth`).

One etcd serves clients over TLS only and checks every client's certificate against its
`--trusted-ca-file` (certificates made by the test with openssl, `tests.support.tls`).
Configured with `etcd.ca_cert`, `etcd.cert` and `etcd.key`, `fleet worker`, `fleet up`
(its supervisor's own client and its workers), `fleet status` and `fleet
supervisord-listener` work. Without a client certificate, or with one signed by another
CA, each is exit 3 with one line naming the endpoint and the reason (and no gRPC log
lines: with TLS 1.3 etcd refuses the certificate only after the handshake, which gRPC's
C core would otherwise report in three lines of its own).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.coord.etcd import Etcd
from fleet.coord.keys import Keys
from fleet.coord.status import collect
from tests.support.checker import assert_history_ok
from tests.support.cluster import SecureEtcd, running_secure_etcd
from tests.support.fleet import CLEAN_ENV, RECORDING
from tests.support.procs import REPO_ROOT, Spawner
from tests.support.supervised import start_up
from tests.support.tls import OPENSSL, Certs
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")

KEYS = Keys("/fleet", "default")
# A generous call timeout: the TLS handshakes of a loaded CI machine take seconds.
TIMEOUT = 20


@pytest.fixture
def mtls(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[SecureEtcd, Certs]]:
    with running_secure_etcd(tmp_path, request.node, client_cert_auth=True) as running:
        yield running


def write_config(tmp_path: Path, endpoint: str, certs: Certs, **etcd: Any) -> Path:
    """A fleet.toml naming the TLS endpoint, the CA, and the given [etcd] keys."""
    lines = [
        "[etcd]",
        f"endpoints = [{json.dumps(endpoint)}]",
        f"ca_cert = {json.dumps(str(certs.ca))}",
        f"timeout = {TIMEOUT}",
    ]
    lines += [f"{k} = {json.dumps(str(v))}" for k, v in etcd.items()]
    path = tmp_path / f"fleet-{uuid.uuid4().hex[:6]}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def with_cert(tmp_path: Path, etcd: SecureEtcd, certs: Certs) -> Path:
    return write_config(
        tmp_path, etcd.endpoint, certs, cert=certs.client_cert, key=certs.client_key
    )


def client(etcd: SecureEtcd, certs: Certs) -> Etcd:
    return Etcd(
        [etcd.endpoint],
        timeout=TIMEOUT,
        ca_cert=str(certs.ca),
        cert=str(certs.client_cert),
        key=str(certs.client_key),
    )


def status(etcd: SecureEtcd, certs: Certs) -> dict[str, Any]:
    c = client(etcd, certs)
    try:
        return collect(c, KEYS)
    finally:
        c.close()


def run_fleet(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "fleet", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def owners(etcd: SecureEtcd, certs: Certs) -> set[str | None]:
    return {s["owner"] for s in status(etcd, certs)["segment_owners"]}


def test_worker_up_and_status_with_a_client_certificate(
    mtls: tuple[SecureEtcd, Certs], spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    """A worker, then `fleet up` (external etcd, 2 workers) beside it: all of them reach
    the mTLS etcd, split the segments and commit; `fleet status` lists them; everything
    stops cleanly and the history is clean."""
    etcd, certs = mtls
    config = with_cert(tmp_path, etcd, certs)
    argv = [
        "worker", "--config", str(config), "--id", "cert-w", "--segments", "6",
        "--interval", "0.2", "--handler", RECORDING,
    ]  # fmt: skip
    env = {**CLEAN_ENV, "FLEET_TEST_LEDGER": str(ledger_dir), "FLEET_TEST_CALL_SECONDS": "0.02"}
    worker = spawn(argv, env=env, name="cert-w")
    wait_until(
        lambda: owners(etcd, certs) == {"cert-w"}, timeout=90, message="cert-w owns everything"
    )
    up = start_up(
        spawn, ledger_dir, workers=2, segments=6,
        extra=["--config", str(config), "--id", "certup"],
    )  # fmt: skip

    def split() -> dict[str, Any] | None:
        st = status(etcd, certs)
        done = [s["checkpoint"] or 0 for s in st["segment_owners"]]
        got = {s["owner"] for s in st["segment_owners"]} == {"cert-w", "certup-0", "certup-1"}
        balanced = sorted(len(m["owned"]) for m in st["members"]) == [2, 2, 2]
        return st if got and balanced and min(done) >= 3 else None

    st = wait_until(split, timeout=120, message="worker and fleet up's two workers share")
    assert sorted(len(m["owned"]) for m in st["members"]) == [2, 2, 2]

    out = run_fleet(["status", "--config", str(config)], tmp_path)
    assert out.returncode == 0, out.stderr
    for member in ("cert-w", "certup-0", "certup-1"):
        assert member in out.stdout, out.stdout
    up.signal(signal.SIGTERM)
    assert up.wait(90) == 0, up.tail()
    worker.signal(signal.SIGTERM)
    assert worker.wait(60) == 0, worker.tail()
    assert "starting over" not in worker.log(), worker.tail()
    assert not [kv.key for kv in client(etcd, certs).get_prefix(KEYS.members).kvs]
    assert_history_ok(ledger_dir)


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    return lines[0]


def test_no_client_certificate_or_a_foreign_one_is_exit_3_with_one_line(
    mtls: tuple[SecureEtcd, Certs], tmp_path: Path
) -> None:
    etcd, certs = mtls
    none = write_config(tmp_path, etcd.endpoint, certs)
    foreign = write_config(
        tmp_path, etcd.endpoint, certs, cert=certs.other_client_cert, key=certs.other_client_key
    )
    cases = [
        ("no client certificate", none, "set etcd.cert and etcd.key"),
        ("a certificate of another CA", foreign, str(certs.other_client_cert)),
    ]
    commands = [
        ["status"],
        ["worker", "--handler", RECORDING, "--id", "bad"],
        ["up", "--workers", "1", "--handler", RECORDING],
    ]
    for what, config, hint in cases:
        for command in commands:
            out = run_fleet([*command, "--config", str(config)], tmp_path)
            assert out.returncode == 3, f"{what}, fleet {command[0]}: {out.returncode}\n{out}"
            line = _one_line(out.stderr)
            assert line.startswith("fleet: "), line
            assert etcd.endpoint in line, f"{what}, fleet {command[0]}: {line}"
            assert "client certificate" in line, f"{what}, fleet {command[0]}: {line}"
            assert hint in line, f"{what}, fleet {command[0]}: {line}"
    assert not (tmp_path / ".fleet" / "fleet.sock").exists()  # fleet up started nothing


def test_a_certificate_without_its_key_is_a_configuration_error(
    mtls: tuple[SecureEtcd, Certs], tmp_path: Path
) -> None:
    etcd, certs = mtls
    config = write_config(tmp_path, etcd.endpoint, certs, cert=certs.client_cert)
    out = run_fleet(["status", "--config", str(config)], tmp_path)
    assert out.returncode == 2, out
    line = _one_line(out.stderr)
    assert "etcd.cert" in line and "etcd.key" in line, line


def _event(name: str, processname: str, **fields: object) -> str:
    """One supervisord event as the listener reads it on stdin."""
    body = " ".join(
        [f"processname:{processname}", f"groupname:{processname}", "from_state:RUNNING"]
        + [f"{k}:{v}" for k, v in fields.items()]
    )
    header = (
        f"ver:3.0 server:supervisor serial:1 pool:fleet-monitor poolserial:1 "
        f"eventname:{name} len:{len(body)}\n"
    )
    return header + body


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_supervisord_listener_revokes_through_a_client_certificate(
    mtls: tuple[SecureEtcd, Certs], spawn: Spawner, tmp_path: Path
) -> None:
    """`fleet supervisord-listener` (fed supervisord's protocol on a FIFO, as supervisord
    would) revokes the lease of a worker that exited, over the mTLS connection."""
    etcd, certs = mtls
    config = with_cert(tmp_path, etcd, certs)
    c = client(etcd, certs)
    try:
        lease, _ = c.grant(60)
        dead = _dead_pid()
        record = {"id": "h-0", "host": socket.gethostname(), "pid": dead, "lease": lease}
        c.put(KEYS.member("h-0"), json.dumps(record).encode(), lease)
        fifo = tmp_path / "events"
        os.mkfifo(fifo)
        # Read and write end ours (O_RDWR never blocks on a FIFO); closing it is EOF.
        fd = os.open(fifo, os.O_RDWR)
        try:
            listener = spawn.command(
                ["sh", "-c", 'exec "$@" < "$0"', str(fifo), sys.executable, "-m", "fleet",
                 "supervisord-listener", "--config", str(config), "--host-id", "h"],
                env={**CLEAN_ENV, "SUPERVISOR_SERVER_URL": None}, name="listener",
            )  # fmt: skip
            os.write(fd, _event("PROCESS_STATE_EXITED", "fleet-worker-0", expected=0,
                                pid=dead).encode())  # fmt: skip
            wait_until(lambda: c.lease_ttl(lease) == -1, timeout=60, message="the listener revoked")
        finally:
            os.close(fd)
        assert listener.wait(60) == 0, listener.tail()
        assert c.get(KEYS.member("h-0"))[0] is None
        assert "revoked lease" in listener.log(), listener.tail()
    finally:
        c.close()


@pytest.mark.parametrize(
    "details",
    [
        "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: "
        "Unwrap failed (TSI_DATA_CORRUPTED)",  # TLS 1.3: the alert after the handshake
        "Ssl handshake failed: SSL_ERROR_SSL: error:10000412:SSL routines:"
        "OPENSSL_internal:SSLV3_ALERT_BAD_CERTIFICATE",  # TLS 1.2
        "Ssl handshake failed: SSL_ERROR_SSL: error:1000045c:SSL routines:"
        "OPENSSL_internal:TLSV1_CERTIFICATE_REQUIRED",
    ],
)
def test_a_refused_client_certificate_is_named_with_the_setting_to_fix(details: str) -> None:
    from fleet.coord.etcd.tlsfailure import describe_tls_failure

    none = describe_tls_failure(details, "/ca.pem", None)
    assert none is not None and "none is configured; set etcd.cert and etcd.key" in none
    ours = describe_tls_failure(details, "/ca.pem", "/etc/fleet/client.pem")
    assert ours is not None and "'/etc/fleet/client.pem'" in ours and "trusted-ca-file" in ours
    # The server-certificate check is ours, and says so whatever client cert is set.
    server = describe_tls_failure("CERTIFICATE_VERIFY_FAILED", None, "/c.pem")
    assert server is not None and "set etcd.ca_cert" in server
    assert describe_tls_failure("Connection refused", "/ca.pem", None) is None

"""Issue 11: lease keepalives never queue behind data traffic.

`Etcd.liveness()` is the same cluster over an HTTP/2 connection of its own, and `Session`
sends its grant, keepalives and revoke over it. Shown on real etcd servers:

- it is a second TCP connection (gRPC would otherwise share one between two channels),
  made on first use, closed with its client, and it carries a watch too;
- with the data connection jammed (etcd's ``--max-concurrent-streams 1`` and a watch
  holding that one stream, so every further call on it waits), a session still gets its
  lease and keeps it for several TTLs, while a data call times out;
- under auth with a 2 s token TTL, over TLS: the session keeps its lease past the token's
  life, and a grant on the liveness connection after it sat idle (a new incarnation)
  renews the token instead of failing; with client certificates (``--client-cert-auth``)
  both connections present the certificate;
- in a 3-member cluster, killing the member the liveness connection uses fails it over to
  another member within the lease's TTL.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fleet import clock
from fleet.coord.etcd import Etcd, EtcdUnavailable, decode_watch_response
from fleet.coord.session import Session
from fleet.server.embedded import EmbeddedEtcd
from tests.conftest import register_log
from tests.support.cluster import EtcdCluster, SecureEtcd, running_secure_etcd
from tests.support.etcd import PausableEtcd
from tests.support.tls import OPENSSL, Certs
from tests.support.wait import wait_until

needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")

TOKEN_TTL = 2  # etcd's --auth-token-ttl in the auth tests
USER = "fleet"
PASSWORD = "pw-" + uuid.uuid4().hex


def connections(port: int) -> int:
    """TCP connections this process holds to `port` (etcd's client port)."""
    return sum(
        1
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def keeps_its_lease(session: Session, etcd: Etcd, seconds: float) -> None:
    """For `seconds`, the session stays alive and its lease keeps a TTL on the server
    (asked over the liveness connection); then its keepalives were acknowledged lately."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        assert session.alive(), "the session lost its lease"
        assert etcd.liveness().lease_ttl(session.lease_id) > 0
        time.sleep(0.25)
    assert clock.now() - session.last_ack < session.ttl, "no keepalive acknowledged lately"


# -- one etcd, plain ----------------------------------------------------------------------


def test_liveness_is_its_own_connection_closed_with_the_client(
    etcd_server: PausableEtcd,
) -> None:
    port = port_of(etcd_server.endpoint)
    etcd = Etcd([etcd_server.endpoint])
    try:
        etcd.put("/t/a", b"1")
        assert connections(port) == 1
        live = etcd.liveness()
        assert live is not etcd and etcd.liveness() is live and live.liveness() is live
        session = Session(etcd, 3)
        assert session.client is live
        session.start(until=clock.now() + 10)
        assert connections(port) == 2, "the keepalives share the data connection"
        # It carries a watch as well (how the control watch would move over).
        got: list[Any] = []
        _, rev = etcd.get("/t/a")
        watch_id = live.add_watch("/t/", rev + 1, got.append)
        etcd.put("/t/b", b"2")

        def seen() -> bool:
            return any(
                c.kv.key == "/t/b"
                for r in got
                if r is not None and not isinstance(r, Exception)
                for c in decode_watch_response(r).changes
            )

        wait_until(seen, timeout=10, message="the liveness watch delivers a put")
        live.cancel_watch(watch_id)
        session.close(revoke=True)
        assert etcd.lease_ttl(session.lease_id) == -1, "revoke went nowhere"
    finally:
        etcd.close()
    wait_until(lambda: connections(port) == 0, timeout=10, message="both connections closed")


@pytest.fixture
def jammable(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PausableEtcd]:
    """One etcd that lets each client connection have one stream at a time."""
    etcd = PausableEtcd(
        tmp_path / "etcd",
        log_path=tmp_path / "etcd.log",
        extra_args=["--max-concurrent-streams", "1"],
    )
    register_log(request.node, "etcd log", tmp_path / "etcd.log")
    try:
        etcd.start()
        yield etcd
    finally:
        etcd.kill()


def test_session_keeps_its_lease_while_the_data_connection_is_jammed(
    jammable: PausableEtcd,
) -> None:
    """A watch takes the data connection's only stream: every further call on that
    connection waits for a stream that never frees (what a flood of slow commits does
    to a keepalive, made deterministic). The session must not notice."""
    etcd = Etcd([jammable.endpoint], timeout=2.0)
    events: list[str] = []
    try:
        _, rev = etcd.get("/jam")
        ended = threading.Event()
        etcd.add_watch("/jam/", rev + 1, lambda r: ended.set() if r is None else None)
        session = Session(etcd, 2, events.append)
        session.start(until=clock.now() + 10)
        keeps_its_lease(session, etcd, 3 * session.ttl)  # many keepalive rounds
        assert events == [], f"the keepalive failed meanwhile: {events}"
        assert not ended.is_set()
        # The data connection really was jammed all along: a call on it times out.
        with pytest.raises(EtcdUnavailable):
            etcd.get("/jam/x")
        session.close(revoke=True)
    finally:
        etcd.close()


# -- TLS and auth -------------------------------------------------------------------------


@pytest.fixture
def secure(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[SecureEtcd, Certs]]:
    with running_secure_etcd(
        tmp_path, request.node, auth=(USER, PASSWORD), token_ttl=TOKEN_TTL
    ) as running:
        yield running


@needs_openssl
def test_keepalive_and_grant_outlive_the_auth_token_over_tls(
    secure: tuple[SecureEtcd, Certs],
) -> None:
    etcd_server, certs = secure
    etcd = Etcd([etcd_server.endpoint], 10.0, user=USER, password=PASSWORD, ca_cert=str(certs.ca))
    events: list[str] = []
    try:
        etcd.put("/fleet/t", b"1")  # the data connection, over TLS, with the token
        session = Session(etcd, 2, events.append)
        session.start(until=clock.now() + 20)
        assert connections(etcd_server.tls_port) == 2
        # Keepalives alone for several token lifetimes: the token expires meanwhile.
        time.sleep(3 * TOKEN_TTL)
        keeps_its_lease(session, etcd, 1.0)
        assert "failing" not in events and "lost" not in events, events
        # A new incarnation's grant, on a liveness connection idle past the token TTL.
        time.sleep(TOKEN_TTL + 1)
        second = Session(etcd, 2, events.append)
        second.start(until=clock.now() + 20)
        keeps_its_lease(second, etcd, 1.0)
        # The data connection renews its own token as well.
        time.sleep(TOKEN_TTL + 1)
        assert etcd.get("/fleet/t")[0] is not None
        for s in (session, second):
            s.close(revoke=True)
            assert etcd.lease_ttl(s.lease_id) == -1
    finally:
        etcd.close()


@pytest.fixture
def mtls(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[SecureEtcd, Certs]]:
    with running_secure_etcd(tmp_path, request.node, client_cert_auth=True) as running:
        yield running


@needs_openssl
def test_both_connections_present_the_client_certificate(
    mtls: tuple[SecureEtcd, Certs],
) -> None:
    etcd_server, certs = mtls
    etcd = Etcd(
        [etcd_server.endpoint],
        10.0,
        ca_cert=str(certs.ca),
        cert=str(certs.client_cert),
        key=str(certs.client_key),
    )
    try:
        etcd.put("/t", b"1")
        session = Session(etcd, 2)
        session.start(until=clock.now() + 20)
        keeps_its_lease(session, etcd, 1.0)
        assert connections(etcd_server.tls_port) == 2
        session.close(revoke=True)
    finally:
        etcd.close()


# -- a cluster ----------------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    etcd = EtcdCluster(tmp_path / "cluster", 3)
    for i, path in enumerate(etcd.log_paths):
        register_log(request.node, f"etcd member m{i}", path)
    try:
        etcd.start()
        yield etcd
    finally:
        etcd.kill_all()


def test_liveness_fails_over_to_another_member(cluster: EtcdCluster) -> None:
    """Only the session talks (no data call), so the one connection to a member is the
    liveness connection: kill that member and the lease must live on through another."""
    etcd = Etcd(cluster.endpoints, timeout=2.0)
    events: list[str] = []
    try:
        session = Session(etcd, 10, events.append)
        session.start(until=clock.now() + 20)
        used = [i for i, m in enumerate(cluster.members) if connections(port_of(m.endpoint)) > 0]
        assert len(used) == 1, f"connections to members {used}"
        killed_at = clock.now()
        cluster.members[used[0]].kill()
        wait_until(
            lambda: session.last_ack > killed_at,
            timeout=session.ttl,
            message="a keepalive acknowledged by another member",
        )
        assert session.alive() and "lost" not in events, events
        rest = [m.endpoint for m in cluster.members if m.running]
        assert any(connections(port_of(ep)) > 0 for ep in rest)
        session.close(revoke=True)
    finally:
        etcd.close()


def test_a_lease_outlives_a_slow_link_etcd_would_keep_it_over(etcd_server: EmbeddedEtcd) -> None:
    """The next keepalive goes TTL/3 after the previous *send*: waiting TTL/3 after the
    answer spent two round trips of the budget per cycle, and a TTL-3 lease was lost at
    0.36 s one-way latency (found by the chaos suite's slow_network fault)."""
    from fleet.coord.session import Session
    from tests.chaos.proxy import TcpProxy

    with TcpProxy(("127.0.0.1", etcd_server.client_port)) as proxy:
        etcd = Etcd([proxy.endpoint], timeout=5.0)
        session = Session(etcd, 3)
        try:
            session.start(until=time.monotonic() + 10)
            lease = session.lease_id
            proxy.slow(latency=0.45)  # a round trip of 0.9 s and more
            until = time.monotonic() + 10
            while time.monotonic() < until:
                assert session.alive(), "lease given up on a link etcd keeps it over"
                time.sleep(0.05)
            proxy.heal()
            assert session.alive() and session.lease_id == lease
            assert etcd.lease_ttl(lease) > 0
        finally:
            session.close(revoke=True)
            etcd.close()

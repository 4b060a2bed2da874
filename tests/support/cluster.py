"""Real multi-member etcd clusters on loopback for tests, and a TLS + auth single member.

Every member is a `fleet.server.embedded.EmbeddedEtcd` (free ports, own data dir, own log,
kill/restart/pause), turned into a cluster member by flags appended last (etcd keeps the
last value of a repeated flag): the real `--initial-cluster`, and etcd's default
heartbeat/election timing instead of the single-member tuning, because those timings are
what a production cluster runs and what the failover numbers in the tests mean.

Members start in parallel: a member reports healthy only once the cluster has a leader,
which needs a quorum, so starting them one after another would wait forever on the first.

The raft leader is found, and leadership moved, through etcd's JSON gateway
(``/v3/maintenance/status``, ``/v3/maintenance/transfer-leadership``) with plain HTTP:
no etcd client library in the harness, so the harness cannot share a bug with fleet's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fleet.server.embedded import EmbeddedEtcd
from tests.support.etcd import PausableEtcd

# etcd's defaults (the single-member helper shortens them): a 3-member cluster with these
# elects a new leader about 1-2 s after the old one dies.
HEARTBEAT_MS = 100
ELECTION_MS = 1000


def _gateway(
    url: str, path: str, body: dict[str, Any], timeout: float = 2.0, token: str | None = None
) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = token
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), headers=headers)
    with opener.open(req, timeout=timeout) as resp:
        answer: dict[str, Any] = json.loads(resp.read().decode())
        return answer


class EtcdCluster:
    """`size` etcd members on 127.0.0.1, each with free client and peer ports."""

    def __init__(
        self,
        root: Path,
        size: int = 3,
        *,
        extra_args: Sequence[str] = (),
        heartbeat_ms: int = HEARTBEAT_MS,
        election_ms: int = ELECTION_MS,
        log_dir: Path | None = None,
    ) -> None:
        self.root = Path(root)
        names = [f"m{i}" for i in range(size)]
        # Member logs: <root>/<name>.log, or <log_dir>/etcd-<name>.log beside other logs.
        log_path = {
            n: self.root / f"{n}.log" if log_dir is None else Path(log_dir) / f"etcd-{n}.log"
            for n in names
        }
        # Ports are fixed at construction, so the initial cluster can be named up front.
        while True:
            probes = [EmbeddedEtcd(self.root / n) for n in names]
            ports = [port for p in probes for port in (p.client_port, p.peer_port)]
            if len(set(ports)) == len(ports):  # the OS may hand a freed port out twice
                break
        initial = ",".join(f"{n}={p.peer_url}" for n, p in zip(names, probes, strict=True))
        token = f"fleet-test-{uuid.uuid4().hex[:8]}"
        self.members: list[PausableEtcd] = [
            PausableEtcd(
                self.root / n,
                client_port=p.client_port,
                peer_port=p.peer_port,
                name=n,
                log_path=log_path[n],
                extra_args=[
                    "--initial-cluster", initial,
                    "--initial-cluster-token", token,
                    "--heartbeat-interval", str(heartbeat_ms),
                    "--election-timeout", str(election_ms),
                    *extra_args,
                ],
            )  # fmt: skip
            for n, p in zip(names, probes, strict=True)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def log_paths(self) -> list[Path]:
        return [m.log_path for m in self.members if m.log_path is not None]

    def start(self, timeout: float = 60.0) -> None:
        """Start every member at once; returns when each is healthy (a leader exists)."""
        self._parallel(lambda m: m.start(timeout=timeout), self.members)

    def _parallel(self, action: Any, members: Sequence[EmbeddedEtcd]) -> None:
        errors: list[BaseException] = []

        def run(member: EmbeddedEtcd) -> None:
            try:
                action(member)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(m,), daemon=True) for m in members]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def start_members(self, indices: Sequence[int], timeout: float = 60.0) -> None:
        """Restart these (stopped) members on their data dirs, in parallel: after a quorum
        loss two of three report healthy only together."""
        self._parallel(lambda m: m.start(timeout=timeout), [self.members[i] for i in indices])

    def stop_all(self) -> None:
        """Graceful stop of every member (a paused one is resumed first), in parallel."""
        self._parallel(lambda m: m.stop(), self.members)

    def kill_all(self) -> None:
        """SIGKILL every member (teardown: also resumes paused ones first)."""
        for member in self.members:
            with contextlib.suppress(Exception):
                member.kill()

    # -- raft state through the gateway -----------------------------------------------

    def status(self, index: int, timeout: float = 2.0) -> dict[str, Any]:
        """One member's maintenance status (its member id, the leader it knows, the term)."""
        return _gateway(self.members[index].endpoint, "/v3/maintenance/status", {}, timeout)

    def member_id(self, index: int) -> str:
        return str(self.status(index)["header"]["member_id"])

    def leader_index(self, timeout: float = 20.0, exclude: Sequence[int] = ()) -> int:
        """Index of the member every reachable member agrees leads (waits for one)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            ids: dict[str, int] = {}
            leaders: set[str] = set()
            for i, member in enumerate(self.members):
                if i in exclude or not member.running:
                    continue
                try:
                    st = self.status(i, timeout=1.0)
                except (OSError, ValueError, urllib.error.URLError) as exc:
                    last = exc
                    continue
                ids[str(st["header"]["member_id"])] = i
                leaders.add(str(st.get("leader", "0")))
            if len(leaders) == 1:
                leader = leaders.pop()
                if leader in ids:
                    return ids[leader]
            last = leaders
            time.sleep(0.1)
        raise AssertionError(f"no agreed etcd leader within {timeout} s (last: {last!r})")

    def transfer_leadership(self, to: int, timeout: float = 20.0) -> None:
        """Ask the current leader to hand raft leadership to member `to`; waits for it."""
        target = self.member_id(to)
        leader = self.leader_index()
        if leader != to:
            _gateway(
                self.members[leader].endpoint,
                "/v3/maintenance/transfer-leadership",
                {"targetID": target},
                timeout=10.0,
            )
        deadline = time.monotonic() + timeout
        while self.leader_index() != to:
            if time.monotonic() > deadline:
                raise AssertionError(f"leadership did not move to m{to}")
            time.sleep(0.1)


# -- TLS and authentication ---------------------------------------------------------------


class SecureEtcd:
    """One etcd serving clients over TLS only on `endpoint` (https), auth-ready.

    `EmbeddedEtcd` probes health over plain HTTP on its own client port, so the member
    also listens there in plaintext: the harness's health checks and auth setup use that
    port (`plain`), fleet processes under test are given only the https `endpoint`.
    """

    def __init__(
        self,
        root: Path,
        certs: Any,
        *,
        token_ttl: int = 300,
        client_cert_auth: bool = False,
        auth_token: str = "simple",
    ) -> None:
        from fleet.server.embedded import free_port

        probe = EmbeddedEtcd(root / "etcd")
        self.tls_port = free_port()
        while self.tls_port in (probe.client_port, probe.peer_port):
            self.tls_port = free_port()
        self.endpoint = f"https://127.0.0.1:{self.tls_port}"
        self.server = EmbeddedEtcd(
            root / "etcd",
            client_port=probe.client_port,
            peer_port=probe.peer_port,
            log_path=root / "etcd.log",
            extra_args=[
                "--listen-client-urls", f"{probe.endpoint},{self.endpoint}",
                "--advertise-client-urls", self.endpoint,
                "--cert-file", str(certs.server_cert),
                "--key-file", str(certs.server_key),
                # etcd asks every client for a certificate once it has a CA to check
                # them against, so the CA goes in only with client certificates.
                *(
                    ["--trusted-ca-file", str(certs.ca), "--client-cert-auth"]
                    if client_cert_auth
                    else []
                ),
                "--auth-token", auth_token,
                "--auth-token-ttl", str(token_ttl),
            ],
        )  # fmt: skip
        self.plain = probe.endpoint

    def start(self) -> None:
        self.server.start()

    def kill(self) -> None:
        self.server.kill()

    def enable_auth(self, root_password: str, user: str, password: str, prefix: str) -> None:
        enable_auth(self.plain, root_password, user, password, prefix)

    def as_root(self, root_password: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One gateway call with root's token (auth changes once auth is on)."""
        auth = _gateway(
            self.plain, "/v3/auth/authenticate", {"name": "root", "password": root_password}
        )
        return _gateway(self.plain, path, body, token=auth["token"])


def enable_auth(url: str, root_password: str, user: str, password: str, prefix: str) -> None:
    """Through the member at `url`: root (all access), and `user` with a role reading and
    writing `prefix` only; then auth on (for the whole cluster)."""
    import base64

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    end = bytearray(prefix.encode())
    end[-1] += 1
    call = functools.partial(_gateway, url)
    call("/v3/auth/user/add", {"name": "root", "password": root_password})
    call("/v3/auth/role/add", {"name": "root"})
    call("/v3/auth/user/grant", {"user": "root", "role": "root"})
    call("/v3/auth/role/add", {"name": "fleet"})
    call(
        "/v3/auth/role/grant",
        {
            "name": "fleet",
            "perm": {
                "permType": "READWRITE",
                "key": b64(prefix.encode()),
                "range_end": b64(bytes(end)),
            },
        },
    )
    call("/v3/auth/user/add", {"name": user, "password": password})
    call("/v3/auth/user/grant", {"user": user, "role": "fleet"})
    call("/v3/auth/enable", {})


@contextlib.contextmanager
def running_secure_etcd(
    tmp_path: Path,
    node: Any,
    *,
    auth: tuple[str, str] | None = None,
    **options: Any,
) -> Iterator[tuple[SecureEtcd, Any]]:
    """A started `SecureEtcd` with fresh certificates, its log in `node`'s failure report,
    killed on exit; with `auth` (user, password), auth enabled for that user over
    "/fleet/" (the root password random). `options` go to `SecureEtcd`."""
    from tests.conftest import register_log  # the fixtures' own helper
    from tests.support.tls import make_certs

    certs = make_certs(tmp_path / "pki")
    etcd = SecureEtcd(tmp_path, certs, **options)
    register_log(node, "etcd log", tmp_path / "etcd.log")
    try:
        etcd.start()
        if auth is not None:
            etcd.enable_auth("root-" + uuid.uuid4().hex, auth[0], auth[1], "/fleet/")
        yield etcd, certs
    finally:
        etcd.kill()

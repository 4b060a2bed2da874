"""`Etcd`: one connection to an etcd cluster, a timeout on every call, transient
failures as `EtcdUnavailable`, expired auth tokens renewed, NOSPACE named."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc

from fleet import clock
from fleet.config import ConfigError, EtcdSettings
from fleet.coord.etcd.results import (
    KV,
    NOSPACE_HELP,
    Compare,
    EtcdCompacted,
    EtcdError,
    EtcdNoSpace,
    EtcdUnavailable,
    Op,
    Snapshot,
    TxnResult,
    parse_endpoint,
    prefix_end,
    retry,
)
from fleet.coord.etcd.tlsfailure import describe_tls_failure
from fleet.coord.etcd.watcher import _Client, _Watcher, _WatchRefused
from fleet.coord.etcd.wire import _has_put, _kv, _txn_request, _txn_result

log = logging.getLogger("fleet.coord.etcd")

T = TypeVar("T")


class _Refused(EtcdError):
    """etcd answered with an error that is not about reaching it (kept: code, details)."""

    def __init__(self, message: str, code: Any, details: str) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


class _TokenRejected(Exception):
    """etcd refused our auth token (expired, issued before a restart, or by a member that
    has forgotten it): authenticate again and retry. Never leaves this module."""


# Reconnect quickly after an etcd restart (gRPC's default backoff grows to 120 s), and
# ping the connection so that a frozen member breaks the watch stream instead of leaving
# it silent. etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    # etcd refuses pings on a connection without streams (too_many_pings); a worker's
    # watch keeps a stream open, which is where a silent connection matters.
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
]


_UNREACHABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# Codes after which the client marks the endpoint failed and fails over (pyetcd's list).
_FAILOVER_CODES = (*_UNREACHABLE_CODES, grpc.StatusCode.INTERNAL)


_TRANSIENT = (
    etcd_exc.ConnectionFailedError,
    etcd_exc.ConnectionTimeoutError,
    etcd_exc.NoServerAvailableError,
    etcd_exc.InternalServerError,
    etcd_exc.WatchTimedOut,
)


def _token_rejected(code: Any, details: str) -> bool:
    """An answer that means "authenticate again": an unknown or expired token
    (UNAUTHENTICATED), or one older than the auth store (any auth change, with JWTs)."""
    return code == grpc.StatusCode.UNAUTHENTICATED or (
        code == grpc.StatusCode.INVALID_ARGUMENT and "auth store is old" in details
    )


def _read_pem(label: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        # A path the user configured: a configuration error (exit 2), one line.
        raise ConfigError(f"{label} = {path!r}: cannot read it: {exc.strerror or exc}") from None


class Etcd:
    """A connection to one etcd cluster with a timeout on every call.

    Transient failures raise `EtcdUnavailable`; callers decide how long to retry
    (usually until their own lease deadline) with `retry`.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        timeout: float = 3.0,
        *,
        user: str | None = None,
        password: str | None = None,
        ca_cert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> None:
        self.endpoints = list(endpoints)
        self.timeout = timeout
        parsed = [parse_endpoint(url) for url in self.endpoints]
        self._ca_cert = ca_cert
        self._cert = cert
        creds = None
        if ca_cert or cert or any(secure for _, _, secure in parsed):
            # No ca_cert: the system's CAs (gRPC's default roots) vouch for the server.
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read_pem("etcd.ca_cert", ca_cert),
                private_key=_read_pem("etcd.key", key),
                certificate_chain=_read_pem("etcd.cert", cert),
            )
        eps = [
            pyetcd.Endpoint(
                host,
                port,
                secure=secure or creds is not None,
                creds=creds,
                time_retry=1.0,
                opts=CHANNEL_OPTIONS,
            )
            for host, port, secure in parsed
        ]
        # Credentials are ours, not the client's: it authenticates once in its constructor
        # and never again, while etcd's tokens expire (see `_reauthenticate`).
        self._client = _Client(eps, timeout=timeout, failover=True)
        self._user = user
        self._password = password
        self._auth_lock = threading.Lock()
        self._auth_generation = 0  # bumped by every new token
        self._last_failure = ""
        self._nospace = False  # NOSPACE seen and not yet followed by an accepted write
        self._nospace_since = 0.0  # when it was seen: only a write sent later proves space
        self._nospace_lock = threading.Lock()
        if user is not None:
            # Fail fast (exit 3 at start) on a wrong password; retried across endpoints.
            try:
                retry(
                    lambda: self._reauthenticate(self._auth_generation),
                    until=clock.now() + timeout,
                    what="authenticating",
                )
            except BaseException:
                self.close()
                raise

    # -- plumbing -------------------------------------------------------------------------

    def _where(self) -> str:
        return ",".join(self.endpoints)

    def _call(self, fn: Callable[[], T], *, write: bool = False) -> T:
        """Run one RPC, turning every transient failure into `EtcdUnavailable`.

        A rejected auth token (they expire: etcd's simple tokens after `--auth-token-ttl`
        without use, all of them when a member restarts) is renewed and the call sent
        once more: etcd refused it before doing anything, so the retry cannot apply twice.
        """
        generation = self._auth_generation
        try:
            return self._call_once(fn, write=write)
        except _TokenRejected:
            self._reauthenticate(generation)
        try:
            return self._call_once(fn, write=write)
        except _TokenRejected as exc:
            # Just renewed: a member that has not applied the new token yet. Transient.
            raise EtcdUnavailable(
                f"etcd at {self._where()} keeps rejecting the auth token of user "
                f"{self._user!r}: {exc}"
            ) from None

    def _reauthenticate(self, seen: int) -> None:
        """Get a new token, unless another thread already did since `seen` was read.

        One thread at a time (the keepalive, watch and runner threads share this client),
        so a burst of rejected calls costs one Authenticate. New watch streams carry the
        new token; a stream already open keeps its old one (see `add_watch`).
        """
        with self._auth_lock:
            if self._auth_generation != seen:
                return
            req = etcdrpc.AuthenticateRequest(name=self._user, password=self._password)
            try:
                resp = self._call_once(
                    lambda: self._client.authstub.Authenticate(req, self.timeout)
                )
                token: str | None = resp.token
            except _TokenRejected as exc:  # not expected from Authenticate; never escapes
                raise EtcdUnavailable(f"etcd at {self._where()}: {exc}") from None
            except _Refused as exc:
                if "authentication is not enabled" in exc.details:
                    token = None  # nothing to send; the user name is ignored
                else:
                    raise EtcdError(
                        f"etcd at {self._where()} refused user {self._user!r}: {exc.details}"
                    ) from None
            metadata = (("token", token),) if token else None
            self._client.metadata = metadata
            self._client.call_credentials = None
            watcher = self._client._stubs.get("watcher")
            if isinstance(watcher, _Watcher):
                watcher.set_token_metadata(metadata)
            self._auth_generation += 1

    def _call_once(self, fn: Callable[[], T], *, write: bool = False) -> T:
        sent = time.monotonic()
        try:
            try:
                result = fn()
                if write and self._nospace:
                    self._space_again(sent)
                return result
            except grpc.RpcError as exc:
                code, details = exc.code(), str(exc.details())
                if code in _UNREACHABLE_CODES:
                    self._last_failure = self._describe_failure(code, details)
                if self._user is not None and _token_rejected(code, details):
                    raise _TokenRejected(details) from None
                if code in _FAILOVER_CODES:
                    self._client._manage_grpc_errors(exc)  # marks the endpoint failed, raises
                raise
        except _TRANSIENT as exc:
            # While every endpoint is marked failed the client says only that; the
            # reason worth showing is the failure that marked them.
            reason = self._last_failure or str(exc) or type(exc).__name__
            raise EtcdUnavailable(
                f"etcd unreachable at {','.join(self.endpoints)}: {reason}"
            ) from None
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "space exceeded" in str(
                exc.details()
            ):
                self._no_space()
                raise EtcdNoSpace(f"etcd at {','.join(self.endpoints)}: {NOSPACE_HELP}") from None
            details = str(exc.details()) if hasattr(exc, "details") else ""
            if code == grpc.StatusCode.INVALID_ARGUMENT and "user name is empty" in details:
                details += " (etcd requires authentication: set etcd.user and etcd.password)"
            raise _Refused(
                f"etcd at {self._where()} refused the call: {code}: {details}", code, details
            ) from None

    def _describe_failure(self, code: Any, details: str) -> str:
        """The reason worth showing for an unreachable etcd; TLS failures said plainly."""
        tls = describe_tls_failure(details, self._ca_cert, self._cert)
        return tls if tls is not None else f"{code.name}: {details}"

    def _no_space(self) -> None:
        """Say it once per episode, at error level: every write fails until an operator acts."""
        with self._nospace_lock:
            if self._nospace:
                return
            self._nospace = True
            self._nospace_since = time.monotonic()
        log.error("etcd at %s: %s", ",".join(self.endpoints), NOSPACE_HELP)

    def _space_again(self, sent: float) -> None:
        """A write sent after NOSPACE was seen went through (one sent before may have
        been applied before the alarm, and says nothing)."""
        with self._nospace_lock:
            if not self._nospace or sent <= self._nospace_since:
                return
            self._nospace = False
        log.info("etcd at %s accepts writes again", ",".join(self.endpoints))

    @property
    def _kw(self) -> dict[str, Any]:
        # Read at each call, so a retry after a re-authentication sends the new token.
        return {"metadata": self._client.metadata}

    # -- key/value ------------------------------------------------------------------------

    def get(self, key: str) -> tuple[KV | None, int]:
        """The key (or None) and the store revision it was read at."""
        resp = self._call(
            lambda: self._client.kvstub.Range(
                etcdrpc.RangeRequest(key=key.encode()), self.timeout, **self._kw
            )
        )
        return (_kv(resp.kvs[0]) if resp.kvs else None), resp.header.revision

    def get_prefix(self, prefix: str) -> Snapshot:
        req = etcdrpc.RangeRequest(key=prefix.encode(), range_end=prefix_end(prefix))
        resp = self._call(lambda: self._client.kvstub.Range(req, self.timeout, **self._kw))
        return Snapshot(resp.header.revision, [_kv(kv) for kv in resp.kvs])

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        req = etcdrpc.PutRequest(key=key.encode(), value=value, lease=lease)
        resp = self._call(
            lambda: self._client.kvstub.Put(req, self.timeout, **self._kw), write=True
        )
        return int(resp.header.revision)

    def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        """One atomic transaction; `ranges` holds the result of every Get of the taken branch,
        `nested` the result of every nested `Txn`. `timeout` (default: the client's) lets a
        caller with a deadline of its own stop waiting by then."""
        req = _txn_request(compare, success, failure)
        wait = self.timeout if timeout is None else max(0.05, min(timeout, self.timeout))
        # Only a txn that carries a put is refused under NOSPACE (deletes still work), so
        # only such a txn going through proves there is space again.
        resp = self._call(
            lambda: self._client.kvstub.Txn(req, wait, **self._kw),
            write=_has_put([*success, *failure]),
        )
        return _txn_result(resp, int(resp.header.revision))

    # -- leases ---------------------------------------------------------------------------

    def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (id, granted TTL). etcd may raise a TTL below its minimum."""
        resp = self._call(
            lambda: self._client.leasestub.LeaseGrant(
                etcdrpc.LeaseGrantRequest(TTL=ttl, ID=0), self.timeout, **self._kw
            ),
            write=True,
        )
        if resp.error:
            raise EtcdError(f"lease grant refused: {resp.error}")
        return int(resp.ID), int(resp.TTL)

    def keepalive(self, lease_id: int, timeout: float | None = None) -> int:
        """Refresh a lease once; the TTL it now has, 0 when the lease no longer exists."""
        req = etcdrpc.LeaseKeepAliveRequest(ID=lease_id)

        def once() -> int:
            for resp in self._client.leasestub.LeaseKeepAlive(
                iter([req]), timeout or self.timeout, **self._kw
            ):
                return int(resp.TTL)
            raise etcd_exc.ConnectionFailedError()

        return self._call(once)

    def revoke(self, lease_id: int) -> None:
        """Revoke a lease; a lease that is already gone is not an error."""
        try:
            self._call(
                lambda: self._client.leasestub.LeaseRevoke(
                    etcdrpc.LeaseRevokeRequest(ID=lease_id), self.timeout, **self._kw
                )
            )
        except EtcdError as exc:
            if "NOT_FOUND" not in str(exc):
                raise

    def lease_ttl(self, lease_id: int) -> int:
        """Remaining TTL of a lease in seconds, -1 if it does not exist."""
        resp = self._call(
            lambda: self._client.leasestub.LeaseTimeToLive(
                etcdrpc.LeaseTimeToLiveRequest(ID=lease_id), self.timeout, **self._kw
            )
        )
        return int(resp.TTL)

    # -- maintenance ----------------------------------------------------------------------

    def compact(self, revision: int, *, physical: bool = False) -> bool:
        """Compact the cluster's history up to `revision` (cluster-wide).

        Returns once the compaction is agreed; etcd removes the old revisions in the
        background (`physical=True` waits for that, needed before a defragmentation).
        False when history was already compacted at or past it (someone else did, e.g.
        etcd's own auto-compaction): that is the state we wanted, not an error.
        """
        req = etcdrpc.CompactionRequest(revision=revision, physical=physical)
        try:
            self._call(lambda: self._client.kvstub.Compact(req, self.timeout, **self._kw))
        except EtcdUnavailable:
            raise
        except EtcdError as exc:
            if "has been compacted" in str(exc):
                return False
            raise
        return True

    def alarms(self) -> list[str]:
        """The cluster's active alarms, e.g. ``["NOSPACE (member 8e9e05c52164694d)"]``."""
        req = etcdrpc.AlarmRequest(action=etcdrpc.AlarmRequest.GET, memberID=0, alarm=etcdrpc.NONE)
        resp = self._call(lambda: self._client.maintenancestub.Alarm(req, self.timeout, **self._kw))
        return [f"{etcdrpc.AlarmType.Name(a.alarm)} (member {a.memberID:x})" for a in resp.alarms]

    def defragment(self, timeout: float = 60.0) -> None:
        """Defragment the answering member (blocks its requests meanwhile; operator action)."""
        req = etcdrpc.DefragmentRequest()
        self._call(lambda: self._client.maintenancestub.Defragment(req, timeout, **self._kw))

    def disarm_nospace(self) -> None:
        """Clear the NOSPACE alarm of every member (after compaction and defragmentation).

        Like `etcdctl alarm disarm`: etcd deactivates an alarm only for the member named.
        """
        get = etcdrpc.AlarmRequest(action=etcdrpc.AlarmRequest.GET, alarm=etcdrpc.NONE)
        resp = self._call(lambda: self._client.maintenancestub.Alarm(get, self.timeout, **self._kw))
        for alarm in resp.alarms:
            if alarm.alarm == etcdrpc.NOSPACE:
                self._call(
                    functools.partial(
                        self._client.maintenancestub.Alarm,
                        etcdrpc.AlarmRequest(
                            action=etcdrpc.AlarmRequest.DEACTIVATE,
                            memberID=alarm.memberID,
                            alarm=etcdrpc.NOSPACE,
                        ),
                        self.timeout,
                        **self._kw,
                    )
                )

    def db_size(self) -> int:
        """Size in bytes of the answering member's backend database (what the quota limits)."""
        req = etcdrpc.StatusRequest()
        resp = self._call(
            lambda: self._client.maintenancestub.Status(req, self.timeout, **self._kw)
        )
        return int(resp.dbSize)

    # -- watch ----------------------------------------------------------------------------

    def add_watch(self, prefix: str, start_revision: int, callback: Callable[[Any], None]) -> int:
        """Start a raw prefix watch (`fleet.coord.watch.PrefixWatch` is the one that resumes).

        `callback` gets raw responses (decode them with `decode_watch_response`), or an
        exception or None when the stream ends. Raises `EtcdCompacted` when
        `start_revision` is already compacted away.
        """

        def create() -> int:
            try:
                return int(
                    self._client.add_watch_callback(
                        prefix,
                        callback,
                        range_end=prefix_end(prefix),
                        start_revision=start_revision,
                        progress_notify=True,
                    )
                )
            except _WatchRefused as exc:
                # etcd says only "permission denied" for a stream opened with a token it
                # no longer knows: under auth, renew the token on a new stream, once.
                if self._user is not None and not refused:
                    refused.append(exc.reason)
                    watcher = self._client._stubs.get("watcher")
                    if isinstance(watcher, _Watcher):
                        watcher.restart_stream(wait=self.timeout)
                    raise _TokenRejected(exc.reason) from None
                raise EtcdError(
                    f"etcd at {self._where()} refused the watch of {prefix}: {exc.reason}"
                ) from None

        refused: list[str] = []
        try:
            return self._call(create)
        except etcd_exc.RevisionCompactedError as exc:
            raise EtcdCompacted(
                f"watch from revision {start_revision}: history compacted up to "
                f"revision {exc.compacted_revision}"
            ) from None

    def cancel_watch(self, watch_id: int) -> None:
        """Cancel a watch without ever blocking the caller.

        The client queues the cancel request on a bounded queue that only its stream
        thread drains: with that stream gone the put blocks forever (seen as a worker
        that logged "stopped" and never exited). So the cancel runs on its own thread.
        """

        def cancel() -> None:
            with contextlib.suppress(Exception):
                self._client.cancel_watch(watch_id)

        threading.Thread(target=cancel, name="fleet-watch-cancel", daemon=True).start()

    def close(self, wait: float = 1.0) -> None:
        """Close the channels; gives up after `wait` seconds for the same reason."""

        def close() -> None:
            # Closing a broken channel must never fail a shutdown.
            with contextlib.suppress(Exception):
                self._client.close()

        closer = threading.Thread(target=close, name="fleet-etcd-close", daemon=True)
        closer.start()
        closer.join(wait)


def connect(settings: EtcdSettings, endpoints: Sequence[str] | None = None) -> Etcd:
    """A client for the configured cluster (`endpoints` overrides the configured ones).

    Every fleet process builds its clients here (worker, `fleet up`, listener, status), so
    TLS and credentials are the same everywhere; with a user, it authenticates at once
    (a wrong password is an `EtcdError` naming the endpoints: exit 3)."""
    return Etcd(
        endpoints if endpoints is not None else settings.endpoints,
        settings.timeout,
        user=settings.user,
        password=settings.password,
        ca_cert=settings.ca_cert,
        cert=settings.cert,
        key=settings.key,
    )



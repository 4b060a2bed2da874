"""The only module that talks to the etcd client library.

Everything above this module sees small typed results (`KV`, `Snapshot`, `TxnResult`,
`Change`) and one transient error type (`EtcdUnavailable`, with `EtcdNoSpace` for a full
backend), so the traps of the client (listed in DESIGN.md) are handled once, here: a
failover client even for one endpoint, a timeout on every call, keepalive as a plain call,
and the raw watch that `fleet.coord.watch.PrefixWatch` turns into one that resumes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

# gRPC's C core logs handshake failures at info level to stderr; the error we raise names
# the reason in one line, so keep its own lines for real errors (set it to override).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402
import pyetcd  # noqa: E402
from pyetcd import etcdrpc  # noqa: E402
from pyetcd import exceptions as etcd_exc  # noqa: E402
from pyetcd import watch as etcd_watch  # noqa: E402

from fleet import clock
from fleet.config import ConfigError, EtcdSettings

log = logging.getLogger("fleet.coord.etcd")

T = TypeVar("T")


class EtcdError(Exception):
    """Base of the errors this module raises."""


class EtcdUnavailable(EtcdError):
    """etcd could not be reached or did not answer in time; the call may be retried."""


NOSPACE_HELP = (
    "etcd's database is over its space quota (NOSPACE alarm): it refuses every write "
    "until an operator compacts its history, defragments each member (etcdctl defrag) "
    "and disarms the alarm (etcdctl alarm disarm)"
)


class EtcdNoSpace(EtcdUnavailable):
    """etcd refused a write because its backend quota is exhausted (the NOSPACE alarm).

    A subclass of `EtcdUnavailable` so that every retry path waits it out instead of
    crashing: reads and lease keepalives still work, so members keep their leases, and
    writes resume once an operator has freed space and disarmed the alarm.
    """


class EtcdCompacted(EtcdError):
    """A watch asked for history that compaction has already removed."""


class _Refused(EtcdError):
    """etcd answered with an error that is not about reaching it (kept: code, details)."""

    def __init__(self, message: str, code: Any, details: str) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


class _TokenRejected(Exception):
    """etcd refused our auth token (expired, issued before a restart, or by a member that
    has forgotten it): authenticate again and retry. Never leaves this module."""


class _WatchRefused(Exception):
    """etcd cancelled a watch it had just created (or was serving), with a reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class Snapshot:
    """Every key under a prefix, as of `revision`."""

    revision: int
    kvs: list[KV]


@dataclass(frozen=True)
class Change:
    """One watch event; for a delete, `kv.value` is empty and `kv.mod_revision` is the delete's."""

    kind: Literal["put", "delete"]
    kv: KV


@dataclass(frozen=True)
class Changes:
    """What one watch response carried: changes in revision order, and the store revision."""

    changes: list[Change]
    revision: int


@dataclass(frozen=True)
class Resync:
    """The watch could not resume (compaction): replace the whole view with this snapshot."""

    snapshot: Snapshot


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    ranges: list[list[KV]]
    nested: list[TxnResult] = field(default_factory=list)  # results of nested `Txn` ops


@dataclass(frozen=True)
class Compare:
    key: str
    target: Literal["create", "mod", "value", "version", "lease"]
    value: int | bytes
    op: Literal["==", "!=", "<", ">"] = "=="


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


@dataclass(frozen=True)
class Get:
    key: str


@dataclass(frozen=True)
class Txn:
    """A transaction nested in another: evaluated on its own, applied in the same revision.

    Lets one round trip carry many independently guarded operations (etcd >= 3.3).
    """

    compare: Sequence[Compare]
    success: Sequence[Op]
    failure: Sequence[Op] = ()


Op = Put | Delete | Get | Txn

_OPS = {
    "==": etcdrpc.Compare.EQUAL,
    "!=": etcdrpc.Compare.NOT_EQUAL,
    "<": etcdrpc.Compare.LESS,
    ">": etcdrpc.Compare.GREATER,
}
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


def _kv(raw: Any) -> KV:
    return KV(
        key=raw.key.decode(),
        value=bytes(raw.value),
        create_revision=raw.create_revision,
        mod_revision=raw.mod_revision,
        version=raw.version,
        lease=raw.lease,
    )


def prefix_end(prefix: str) -> bytes:
    """The range end that covers every key starting with `prefix`."""
    raw = bytearray(prefix.encode())
    for i in reversed(range(len(raw))):
        if raw[i] < 0xFF:
            raw[i] += 1
            return bytes(raw[: i + 1])
    return b"\0"


def parse_endpoint(url: str) -> tuple[str, int, bool]:
    """(host, port, secure) of a normalised `scheme://host:port` endpoint."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"bad etcd endpoint {url!r}")
    return parts.hostname, parts.port, parts.scheme == "https"


def _compare(c: Compare) -> Any:
    msg = etcdrpc.Compare(key=c.key.encode(), result=_OPS[c.op])
    if c.target == "create":
        msg.target = etcdrpc.Compare.CREATE
        msg.create_revision = int(c.value)
    elif c.target == "mod":
        msg.target = etcdrpc.Compare.MOD
        msg.mod_revision = int(c.value)
    elif c.target == "lease":
        msg.target = etcdrpc.Compare.LEASE
        msg.lease = int(c.value)
    elif c.target == "version":
        msg.target = etcdrpc.Compare.VERSION
        msg.version = int(c.value)
    else:
        msg.target = etcdrpc.Compare.VALUE
        msg.value = c.value if isinstance(c.value, bytes) else str(c.value).encode()
    return msg


def _request(op: Op) -> Any:
    if isinstance(op, Put):
        return etcdrpc.RequestOp(
            request_put=etcdrpc.PutRequest(key=op.key.encode(), value=op.value, lease=op.lease)
        )
    if isinstance(op, Delete):
        return etcdrpc.RequestOp(
            request_delete_range=etcdrpc.DeleteRangeRequest(key=op.key.encode())
        )
    if isinstance(op, Txn):
        return etcdrpc.RequestOp(request_txn=_txn_request(op.compare, op.success, op.failure))
    return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=op.key.encode()))


def _txn_request(compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> Any:
    return etcdrpc.TxnRequest(
        compare=[_compare(c) for c in compare],
        success=[_request(op) for op in success],
        failure=[_request(op) for op in failure],
    )


def _has_put(ops: Sequence[Op]) -> bool:
    return any(
        isinstance(op, Put) or (isinstance(op, Txn) and _has_put([*op.success, *op.failure]))
        for op in ops
    )


def _txn_result(resp: Any, revision: int) -> TxnResult:
    ranges, nested = [], []
    for r in resp.responses:
        kind = r.WhichOneof("response")
        if kind == "response_range":
            ranges.append([_kv(kv) for kv in r.response_range.kvs])
        elif kind == "response_txn":
            nested.append(_txn_result(r.response_txn, revision))
    return TxnResult(bool(resp.succeeded), revision, ranges, nested)


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


class _Watcher(etcd_watch.Watcher):  # type: ignore[misc]
    """pyetcd's watcher, with two holes closed.

    - etcd answers a watch create it refuses (a stale auth token, no permission) with
      ``created`` *and* ``canceled``; pyetcd registered that as a live watch that never
      delivers anything. Here the create fails with the cancel reason, and a watch etcd
      cancels later ends with an error, so `PrefixWatch` re-creates it.
    - The stream carries the auth token it was opened with, for every watch created on it
      later: `restart_stream` ends it (its watches end with an error and are re-created),
      so the next watch opens a stream with the current token.
    """

    _request_queue: Any
    _callbacks: dict[int, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stream: Any = None

    def set_token_metadata(self, metadata: Any) -> None:
        with self._lock:
            self._metadata = metadata

    def restart_stream(self, wait: float) -> None:
        with self._lock:
            stream, thread = self._stream, self._callback_thread
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.cancel()
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait)

    def _run(self) -> None:  # pyetcd's, keeping the call so that it can be cancelled
        callback_err = None
        try:
            with self._lock:
                metadata, requests = self._metadata, self._request_queue
            response_iter = self._watch_stub.Watch(
                etcd_watch._new_request_iter(requests),
                credentials=self._credentials,
                metadata=metadata,
            )
            with self._lock:
                self._stream = response_iter
            for rs in response_iter:
                self._handle_response(rs)
        except grpc.RpcError as err:
            callback_err = err
        finally:
            with self._lock:
                self._stream = None
                self._stopping = True
                if self._new_watch:
                    self._new_watch.err = callback_err
                    self._new_watch_cond.notify_all()
                callbacks = self._callbacks
                self._callbacks = {}
                self._request_queue.put(None)
                self._request_queue = etcd_watch.queue.Queue(maxsize=10)
            for callback in callbacks.values():
                etcd_watch._safe_callback(callback, callback_err)

    def _handle_response(self, rs: Any) -> None:
        if not rs.canceled or rs.compact_revision != 0:
            super()._handle_response(rs)
            return
        reason = rs.cancel_reason or "cancelled by etcd"
        with self._lock:
            new = self._new_watch
            if rs.created:
                if new is not None and new.id is None and new.err is None:
                    new.err = _WatchRefused(reason)
                    self._new_watch_cond.notify_all()
                return
            callback = self._callbacks.pop(rs.watch_id, None)
        if callback is not None:  # None: a cancel we asked for
            etcd_watch._safe_callback(callback, _WatchRefused(reason))


class _Client(pyetcd.MultiEndpointEtcd3Client):  # type: ignore[misc]
    """The failover client whose watcher is `_Watcher` and sends the token as metadata only
    (call credentials would need a secure channel; metadata works on both)."""

    def get_watcher(self) -> _Watcher:
        return _Watcher(
            etcdrpc.WatchStub(self.channel), timeout=self.timeout, metadata=self.metadata
        )


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
        if "CERTIFICATE_VERIFY_FAILED" in details:
            trusted = (
                f"the CA in etcd.ca_cert = {self._ca_cert!r}"
                if self._ca_cert
                else "the system's CAs (etcd.ca_cert is not set)"
            )
            return (
                f"TLS handshake failed: the server's certificate is not signed by {trusted}; "
                "set etcd.ca_cert to the CA that signed etcd's certificate"
            )
        return f"{code.name}: {details}"

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


def retry(
    fn: Callable[[], T], *, until: float, what: str, stop: threading.Event | None = None
) -> T:
    """Call `fn` until it succeeds or the time `until` (on `fleet.clock.now()`) passes.

    Only `EtcdUnavailable` is retried (with jittered exponential backoff from 50 ms to
    1 s); the last one is re-raised when time runs out.
    """
    delay = 0.05
    while True:
        try:
            return fn()
        except EtcdUnavailable as exc:
            left = until - clock.now()
            if left <= 0 or (stop is not None and stop.is_set()):
                raise
            log.debug("%s: %s; retrying", what, exc)
            pause = min(delay * (0.5 + random.random()), left)
            if stop is not None:
                stop.wait(pause)
            else:
                time.sleep(pause)
            delay = min(delay * 2, 1.0)


def is_compacted(err: BaseException) -> bool:
    """Whether a watch ended (or could not start) because its history was compacted."""
    return isinstance(err, EtcdCompacted | etcd_exc.RevisionCompactedError)


def decode_watch_response(response: Any) -> Changes:
    """The changes of one raw watch response (as given to an `add_watch` callback)."""
    changes = []
    for ev in response.events:
        raw = ev._event
        kind: Literal["put", "delete"] = "put" if raw.type == 0 else "delete"
        changes.append(Change(kind, _kv(raw.kv)))
    return Changes(changes, int(response.header.revision))

"""`Connection`: what `Etcd` stands on, below the operations: the failover channels (TLS
read once), one RPC with its failures translated (`EtcdUnavailable`, `EtcdNoSpace`, a
refusal that names the reason), auth tokens renewed when etcd rejects them, and the
NOSPACE episodes said once. Kept apart from the operations (`client.py`) so that every
trap of the client library that concerns *how* a call is sent is handled in one place."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc

from fleet import clock
from fleet.config import ConfigError
from fleet.coord.etcd.results import (
    NOSPACE_HELP,
    EtcdError,
    EtcdNoSpace,
    EtcdUnavailable,
    parse_endpoint,
    retry,
)
from fleet.coord.etcd.tlsfailure import describe_tls_failure
from fleet.coord.etcd.watcher import _Client, _Watcher

if TYPE_CHECKING:
    from fleet.coord.etcd.client import Etcd

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
    has forgotten it): authenticate again and retry. Never leaves `Connection`/`Etcd`."""


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


class Connection:
    """The channels to one etcd cluster and the way every call is sent over them.

    `Etcd` adds the operations; this part owns the state they share across threads
    (auth token and its generation, the NOSPACE episode, the liveness twin's slot).
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
        channel_options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,  # TLS already read (`liveness`)
    ) -> None:
        self.endpoints = list(endpoints)
        self.timeout = timeout
        parsed = [parse_endpoint(url) for url in self.endpoints]
        self._ca_cert = ca_cert
        self._cert = cert
        creds = credentials
        if creds is None and (ca_cert or cert or any(secure for _, _, secure in parsed)):
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
                opts=[*CHANNEL_OPTIONS, *channel_options],
            )
            for host, port, secure in parsed
        ]
        self._creds = creds
        self._liveness: Etcd | None = None
        self._liveness_lock = threading.Lock()
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

    def close(self, wait: float = 1.0) -> None:
        """Close the channels, the liveness client's too; gives up after `wait` seconds
        for the same reason as `Etcd.cancel_watch` (a broken stream can block it)."""
        twin = self._liveness
        clients = [self._client]
        if twin is not None and twin is not self:
            clients.append(twin._client)

        def close() -> None:
            for client in clients:
                # Closing a broken channel must never fail a shutdown.
                with contextlib.suppress(Exception):
                    client.close()

        closer = threading.Thread(target=close, name="fleet-etcd-close", daemon=True)
        closer.start()
        closer.join(wait)

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

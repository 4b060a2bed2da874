"""`Etcd`: one connection to an etcd cluster, a timeout on every call, transient
failures as `EtcdUnavailable`, expired auth tokens renewed, NOSPACE named.

The operations live here (key/value, leases, maintenance, watch) and the liveness twin;
how each call is sent (TLS, auth, error translation, NOSPACE) is `connection.py`."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc

from fleet.config import EtcdSettings
from fleet.coord.etcd.connection import Connection, _TokenRejected
from fleet.coord.etcd.results import (
    KV,
    Compare,
    EtcdCompacted,
    EtcdError,
    EtcdUnavailable,
    Op,
    Snapshot,
    TxnResult,
    prefix_end,
)
from fleet.coord.etcd.watcher import _Watcher, _WatchRefused
from fleet.coord.etcd.wire import _has_put, _kv, _txn_request, _txn_result

# The liveness channel's own HTTP/2 connection: gRPC gives channels with the same target and
# arguments one shared connection (its global subchannel pool), so a second channel alone
# would still queue behind the data channel's commits (measured: one TCP connection).
LIVENESS_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


class Etcd(Connection):
    """A connection to one etcd cluster with a timeout on every call.

    Transient failures raise `EtcdUnavailable`; callers decide how long to retry
    (usually until their own lease deadline) with `retry`.
    """

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

    def liveness(self) -> Etcd:
        """This cluster over a connection of its own, for what must never queue behind
        commits and acquires: lease grants and keepalives (`Session`), and a watch that
        must not (its `add_watch`). Same endpoints (failover), TLS, timeout and
        credentials; made on first use without a round trip (it starts with our current
        token and renews its own), closed with this client. DESIGN.md, "etcd client"."""
        with self._liveness_lock:
            if self._liveness is None:
                twin = Etcd(
                    self.endpoints, self.timeout, ca_cert=self._ca_cert, cert=self._cert,
                    channel_options=LIVENESS_OPTIONS, credentials=self._creds,
                )  # fmt: skip
                twin._user, twin._password = self._user, self._password
                twin._client.metadata = self._client.metadata
                twin._liveness = twin
                self._liveness = twin
            return self._liveness

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

    def add_watch(
        self,
        prefix: str,
        start_revision: int,
        callback: Callable[[Any], None],
        *,
        range_end: bytes | None = None,
    ) -> int:
        """Start a raw watch of every key under `prefix`, or of [prefix, range_end) when
        `range_end` is given (`fleet.coord.watch.RangeWatch` is the one that resumes).

        `callback` gets raw responses (decode them with `decode_watch_response`), or an
        exception or None when the stream ends. Raises `EtcdCompacted` when
        `start_revision` is already compacted away.
        """
        end = prefix_end(prefix) if range_end is None else range_end

        def create() -> int:
            try:
                return int(
                    self._client.add_watch_callback(
                        prefix,
                        callback,
                        range_end=end,
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

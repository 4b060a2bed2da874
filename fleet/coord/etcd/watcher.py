"""pyetcd's watcher and failover client, with the holes that hurt us closed."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd import watch as etcd_watch


class _WatchRefused(Exception):
    """etcd cancelled a watch it had just created (or was serving), with a reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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



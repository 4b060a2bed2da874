"""What callers of the etcd client see: typed results, operations, errors, and `retry`.

Nothing here imports the etcd client library, so the types can be used (and tested)
without gRPC, and a caller's code reads the same whatever the client does underneath.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from fleet import clock

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



"""The only package that talks to the etcd client library (pyetcd).

Everything above this package sees small typed results (`KV`, `Snapshot`, `TxnResult`,
`Change`) and one transient error type (`EtcdUnavailable`, with `EtcdNoSpace` for a full
backend), so the traps of the client (listed in DESIGN.md) are handled once, here: a
failover client even for one endpoint, a timeout on every call, keepalive as a plain call
(over a connection of its own: `Etcd.liveness()`), and the raw watch that
`fleet.coord.watch.PrefixWatch` turns into one that resumes.

Modules: `results` (types, errors, `retry`; no client import), `wire` (protobuf in and
out), `watcher` (pyetcd's watcher and client with their holes closed), `tlsfailure`
(what a TLS failure means, in one line), `connection` (how a call is sent: TLS, auth and
token renewal, error translation, NOSPACE), `client` (`Etcd`'s operations, `connect`).
"""

import os

# gRPC's C core logs TLS failures to stderr itself (a refused client certificate as three
# ERROR lines); the error we raise names the reason in one line, so its own logging is
# off unless GRPC_VERBOSITY is set (ERROR or DEBUG to see it). Before any submodule
# imports grpc.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from fleet.coord.etcd.client import LIVENESS_OPTIONS, Etcd, connect  # noqa: E402
from fleet.coord.etcd.connection import CHANNEL_OPTIONS  # noqa: E402
from fleet.coord.etcd.results import (  # noqa: E402
    KV,
    NOSPACE_HELP,
    Change,
    Changes,
    Compare,
    Delete,
    EtcdCompacted,
    EtcdError,
    EtcdNoSpace,
    EtcdUnavailable,
    Get,
    Op,
    Put,
    Resync,
    Snapshot,
    Txn,
    TxnResult,
    parse_endpoint,
    prefix_end,
    retry,
)
from fleet.coord.etcd.wire import decode_watch_response, is_compacted  # noqa: E402

__all__ = [
    "CHANNEL_OPTIONS",
    "KV",
    "LIVENESS_OPTIONS",
    "NOSPACE_HELP",
    "Change",
    "Changes",
    "Compare",
    "Delete",
    "Etcd",
    "EtcdCompacted",
    "EtcdError",
    "EtcdNoSpace",
    "EtcdUnavailable",
    "Get",
    "Op",
    "Put",
    "Resync",
    "Snapshot",
    "Txn",
    "TxnResult",
    "connect",
    "decode_watch_response",
    "is_compacted",
    "parse_endpoint",
    "prefix_end",
    "retry",
]

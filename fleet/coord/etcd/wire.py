"""Our operations to etcd's protobuf messages and back; watch responses to `Changes`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc

from fleet.coord.etcd.results import (
    KV,
    Change,
    Changes,
    Compare,
    Delete,
    EtcdCompacted,
    Op,
    Put,
    Txn,
    TxnResult,
)

_OPS = {
    "==": etcdrpc.Compare.EQUAL,
    "!=": etcdrpc.Compare.NOT_EQUAL,
    "<": etcdrpc.Compare.LESS,
    ">": etcdrpc.Compare.GREATER,
}


def _kv(raw: Any) -> KV:
    return KV(
        key=raw.key.decode(),
        value=bytes(raw.value),
        create_revision=raw.create_revision,
        mod_revision=raw.mod_revision,
        version=raw.version,
        lease=raw.lease,
    )


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



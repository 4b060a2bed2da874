"""The command line of the embedded single-member etcd, and why each tuning flag is there.

Kept apart from the process handling in `embedded.py` so the flags, and the long
reasons for their values, can be read (and tested, via `EmbeddedEtcd.command()`) in
one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# A single member has nobody to lose an election to, so etcd's 100/1000 ms defaults
# only cost time: the member waits a full election timeout before leading, on every
# start and restart (about 1 s each; about 0.15 s with these). Side effect: etcd's
# minimum lease TTL, ceil(1.5 * election timeout), drops from 2 s to 1 s. Flags in
# `extra_args` come later on the command line and win (Go's flag package keeps the
# last value), so callers can restore the defaults.
SINGLE_MEMBER_TUNING = ("--heartbeat-interval", "25", "--election-timeout", "150")
# etcd keeps every revision until something compacts, and refuses all writes (NOSPACE)
# once its database reaches the quota: a fleet committing checkpoints fills etcd's 2 GiB
# default in days, or hours with thousands of segments. So etcd compacts itself, keeping
# 10 minutes of history (the same window the fleet leader keeps: [etcd] compact_window),
# and the quota is 4 GiB: room for 10 minutes of thousands of commits per second
# (about 1 GiB) with bbolt's fragmentation on top, and half etcd's suggested maximum of
# 8 GiB. The database file only grows as it fills; `extra_args` can override both
# (`--auto-compaction-retention 0` turns compaction off).
QUOTA_BACKEND_BYTES = 4 * 1024**3
HISTORY_LIMITS = (
    "--auto-compaction-mode", "periodic",
    "--auto-compaction-retention", "10m",
    "--quota-backend-bytes", str(QUOTA_BACKEND_BYTES),
)  # fmt: skip


def etcd_command(
    binary: str,
    name: str,
    data_dir: Path,
    client_url: str,
    peer_url: str,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The full command line of a single-member etcd; `extra_args` last, so they win."""
    return [
        binary,
        "--name", name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"{name}={peer_url}",
        # Only read when the data dir is empty; a restart uses the stored membership.
        "--initial-cluster-state", "new",
        "--logger", "zap",
        "--log-level", "warn",
        *SINGLE_MEMBER_TUNING,
        *HISTORY_LIMITS,
        *extra_args,
    ]  # fmt: skip

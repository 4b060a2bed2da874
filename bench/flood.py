"""A checkpoint commit flood through one client, as a busy worker's runners make it.

Shared by the benches that measure what the flood does to other traffic (keepalive.py).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Protocol

from common import BenchError

from fleet.coord import ownership
from fleet.coord.etcd import Etcd, EtcdUnavailable, Put
from fleet.coord.keys import Keys

FLOOD_LEASE_TTL = 3600  # the flood's owner keys outlive the run; etcd is killed after it


class FloodOptions(Protocol):
    threads: int
    segments: int
    value_bytes: int


class Flood:
    """`threads` threads committing fenced checkpoints back to back through `etcd`."""

    def __init__(self, etcd: Etcd, keys: Keys, opts: FloodOptions) -> None:
        self.etcd = etcd
        self.keys = keys
        self.opts = opts
        lease, _ = etcd.grant(FLOOD_LEASE_TTL)
        self.tokens: dict[int, int] = {}
        for seg in range(opts.segments):
            etcd.txn([], [Put(self.keys.owner(seg), b"bench", lease)])
            kv, _ = etcd.get(self.keys.owner(seg))
            assert kv is not None
            self.tokens[seg] = kv.create_revision
        # A later phase continues from what the last one wrote (the commit's second guard).
        saved = {kv.key: kv.mod_revision for kv in etcd.get_prefix(self.keys.checkpoints).kvs}
        self.revisions = {s: saved.get(self.keys.checkpoint(s), 0) for s in range(opts.segments)}
        self.value = os.urandom(opts.value_bytes // 2).hex().encode()[: opts.value_bytes]
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors = 0
        self.refused: list[int] = []  # segments whose commit the fence refused (a bug)
        self.threads: list[threading.Thread] = []

    def _run(self, segments: list[int]) -> None:
        lat: list[float] = []
        errors = 0
        i = 0
        while not self.stop.is_set():
            seg = segments[i % len(segments)]
            i += 1
            t0 = time.perf_counter()
            try:
                rev = ownership.commit(
                    self.etcd, self.keys, seg, self.tokens[seg], self.value, self.revisions[seg]
                )
            except EtcdUnavailable:
                errors += 1
                continue
            lat.append(time.perf_counter() - t0)
            if rev is None:
                self.refused.append(seg)
                break
            self.revisions[seg] = rev
        with self.lock:
            self.latencies += lat
            self.errors += errors

    def start(self) -> None:
        n = self.opts.threads
        for t in range(n):
            mine = [s for s in range(self.opts.segments) if s % n == t]
            thread = threading.Thread(target=self._run, args=(mine,), name=f"flood-{t}")
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
            if thread.is_alive():
                raise BenchError(f"{thread.name} did not stop")
        if self.refused:
            raise BenchError(f"segments {self.refused}: a commit was refused by its fence")

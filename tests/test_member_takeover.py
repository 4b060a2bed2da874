"""A respawned worker takes over the member record of its dead predecessor on this
host at once, instead of waiting out a lease that a quorum loss renewed.

Found by the chaos suite's cluster mode (quorum_loss, seed 2026): a slot respawned
while etcd had no leader found its dead predecessor's record; the new leader renewed
that lease to a full TTL, the record outlived register's wait, and the slot exited 2
("already registered by a live process") and went FATAL under `fleet up`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from fleet.coord.etcd import Etcd, Put
from fleet.coord.keys import Keys
from fleet.server.embedded import EmbeddedEtcd
from tests.support.fleet import CLEAN_ENV, start_worker, wait_converged
from tests.support.procs import Spawner
from tests.support.wait import wait_until

KEYS = Keys("/fleet", "default")


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _squat(endpoint: str, member: str, pid: int) -> int:
    """A record under `member` naming `pid` on this host, bound to a 120 s lease."""
    etcd = Etcd([endpoint])
    try:
        lease, _ = etcd.grant(120)
        info = {"id": member, "host": socket.gethostname(), "pid": pid, "lease": lease}
        etcd.txn([], [Put(KEYS.member(member), json.dumps(info).encode(), lease)])
        return lease
    finally:
        etcd.close()


def _record_lease(endpoint: str, member: str) -> int | None:
    etcd = Etcd([endpoint])
    try:
        kv, _ = etcd.get(KEYS.member(member))
        return kv.lease if kv is not None else None
    finally:
        etcd.close()


def test_record_of_a_dead_process_here_is_taken_over_at_once(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path
) -> None:
    endpoint = etcd_server.endpoint
    squatter = _squat(endpoint, "w1", _dead_pid())
    worker = start_worker(spawn, endpoint, "w1", ledger_dir, segments=2, lease_ttl=3, env=CLEAN_ENV)
    # Well before the squatter's 120 s lease could expire:
    wait_until(
        lambda: _record_lease(endpoint, "w1") not in (None, squatter),
        timeout=40,
        message="the dead process's record was not taken over",
    )
    st = wait_converged(endpoint, ["w1"], timeout=40)
    assert st["segments"] == 2 and not st["unowned"], st
    assert worker.alive, worker.tail()


def test_record_of_a_live_process_is_not_taken_over(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path
) -> None:
    """A live process under the id (this test's own pid) is a duplicate: waited for,
    never displaced."""
    endpoint = etcd_server.endpoint
    squatter = _squat(endpoint, "w1", os.getpid())
    worker = start_worker(spawn, endpoint, "w1", ledger_dir, segments=2, lease_ttl=3, env=CLEAN_ENV)
    deadline = time.monotonic() + 8  # past register's wait (TTL + 2 s)
    while time.monotonic() < deadline and worker.alive:
        assert _record_lease(endpoint, "w1") == squatter
        time.sleep(0.5)
    assert _record_lease(endpoint, "w1") == squatter


def test_pid_is_dead_sees_a_dying_process_whose_main_thread_is_gone() -> None:
    """What the supervisor's reap acts on before the process is reapable: the main
    thread is a zombie while another thread still runs (a SIGKILLed worker whose threads
    wait for a CPU looks the same). Killing its group then stops its helpers early."""
    from fleet.proc import pid_is_dead
    from fleet.supervise.children import has_exited

    code = (
        "import ctypes, threading, time\n"
        "threading.Thread(target=time.sleep, args=(30,)).start()\n"
        "ctypes.CDLL(None).pthread_exit(None)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert not pid_is_dead(os.getpid())
        wait_until(lambda: pid_is_dead(proc.pid), timeout=20, message="main thread never exited")
        assert not has_exited(proc.pid)  # not reapable yet: its other thread runs
    finally:
        proc.kill()
        proc.wait(timeout=20)
    assert pid_is_dead(proc.pid)

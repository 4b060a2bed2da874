"""Issue 10 audit: the first-user items whose tests did not run the user's command, or
did not assert what the user reads. Each runs the real command (real etcd, real
processes) as a user would and checks its output and exit code.

- Item 3: README's sample `fleet.toml`, copied as is, behaves exactly like no file
  (it used to set `id`, `host_id` and `segments`: copied to two hosts, both workers were
  `host-0`; `fleet up` lost its per-directory ids; a fleet with another count refused).
- Item 8: a class without `handle(ctx)` is one line, exit 2; one instance serves every
  call thread of a worker (README: "so it must be thread-safe").
- Item 13: `fleet up --workers 1` says "starting 1 worker"; a user's `kill -9` of a worker
  reads "killed by SIGKILL" in fleet up's log and `fleet ps`, never "OOM".
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

from fleet import config as config_mod
from fleet.server.embedded import EmbeddedEtcd
from tests.support.fleet import CLEAN_ENV
from tests.support.procs import REPO_ROOT, Proc, Spawner
from tests.support.supervised import fleet_env, ps, start_up, wait_alive, wait_ready
from tests.support.wait import wait_until

EXIT_OK, EXIT_USAGE = 0, 2


def _run(spawn: Spawner, args: list[str], env: dict[str, str | None], name: str) -> str:
    proc = spawn(args, env=env, name=name)
    assert proc.wait(timeout=60) == EXIT_OK, proc.log()
    out = proc.log()
    assert "Traceback" not in out, out
    return out


# -- item 3: README's sample config -------------------------------------------------------


def test_readme_sample_config_copied_as_is_is_the_defaults(tmp_path: Path) -> None:
    block = re.search(r"```toml\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S)
    assert block
    copied = tmp_path / "fleet.toml"
    copied.write_text(block.group(1))
    sample = config_mod.load({}, {}, str(copied))
    plain = config_mod.load({}, {}, default_path=str(tmp_path / "absent.toml"))
    assert sample == plain  # every value (`explicit` is not compared)
    # ...and what is compared through `explicit`: ids and the segment-count check.
    where = str(tmp_path)
    assert config_mod.supervised_id_prefix(sample, where) == config_mod.supervised_id_prefix(
        plain, where
    )
    assert not {"segments", "id", "host_id"} & sample.explicit, sample.explicit


# -- item 8: class handlers ---------------------------------------------------------------

NO_HANDLE = """
class Thing:
    def on_acquire(self, ctx):
        pass
"""

ONE_INSTANCE = """
import json, os, threading, time

LOG = os.environ["AUDIT_LOG"]
_lock = threading.Lock()


def _write(record):
    with _lock, open(LOG, "a") as f:
        f.write(json.dumps(record) + "\\n")


class Counter:
    def __init__(self):
        _write({"ev": "init", "pid": os.getpid(), "self": id(self)})

    def handle(self, ctx):
        time.sleep(0.2)  # long enough that segments' calls overlap in several threads
        _write({"ev": "handle", "pid": os.getpid(), "self": id(self), "seg": ctx.segment,
                "thread": threading.get_ident()})
"""


def test_a_class_without_handle_is_one_line_exit_2(
    spawn: Spawner, etcd_server: EmbeddedEtcd, tmp_path: Path
) -> None:
    (tmp_path / "audit_nohandle.py").write_text(NO_HANDLE)
    args = ["worker", "--etcd", etcd_server.endpoint, "--handler", "audit_nohandle:Thing"]
    proc = spawn(args, env=CLEAN_ENV, name="worker")
    assert proc.wait(timeout=60) == EXIT_USAGE, proc.log()
    out = proc.log()
    assert "Traceback" not in out, out
    last = [line for line in out.splitlines() if line.strip()][-1]
    assert last.startswith("fleet: ") and "class has no handle(ctx) method" in last, last


def test_one_class_instance_serves_every_call_thread_of_a_worker(
    spawn: Spawner, etcd_server: EmbeddedEtcd, tmp_path: Path
) -> None:
    (tmp_path / "audit_counter.py").write_text(ONE_INSTANCE)
    log = tmp_path / "calls.jsonl"
    args = [
        "worker", "--etcd", etcd_server.endpoint, "--id", "w1", "--segments", "8",
        "--interval", "0.05", "--handler", "audit_counter:Counter",
    ]  # fmt: skip
    worker = spawn(args, env={**CLEAN_ENV, "AUDIT_LOG": str(log)}, name="w1")

    def records() -> list[dict[str, Any]]:
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines() if line]

    def enough() -> list[dict[str, Any]] | None:
        assert worker.alive, worker.log()
        found = records()
        calls = [r for r in found if r["ev"] == "handle"]
        ok = {r["seg"] for r in calls} == set(range(8)) and len({r["thread"] for r in calls}) > 1
        return found if ok else None

    found = wait_until(enough, timeout=60, message="every segment called from several threads")
    assert found is not None
    inits = [r for r in found if r["ev"] == "init"]
    assert len(inits) == 1, inits  # one instance per worker process...
    assert {(r["pid"], r["self"]) for r in found if r["ev"] == "handle"} == {
        (inits[0]["pid"], inits[0]["self"])
    }  # ...serving every segment, from several threads at once
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == EXIT_OK, worker.tail()


# -- item 13: what fleet up says --------------------------------------------------------


def _ps_text(spawn: Spawner, tmp_path: Path, name: str) -> str:
    return _run(spawn, ["ps"], fleet_env(tmp_path / "ledger"), name)


def _down(spawn: Spawner, tmp_path: Path, up: Proc) -> None:
    out = _run(spawn, ["down"], fleet_env(tmp_path / "ledger"), "down")
    assert "stopped in" in out, out
    assert up.wait(timeout=60) == EXIT_OK, up.tail()


def test_one_worker_is_singular_and_a_kill_9_is_killed_by_sigkill_not_oom(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    up = start_up(spawn, ledger_dir, workers=1, segments=2)
    _endpoint, rows = wait_ready(up, tmp_path, workers=1)
    start = next(line for line in up.log().splitlines() if "etcd at http" in line)
    assert start.endswith("; starting 1 worker"), start

    victim = int(rows[0]["pid"])
    os.kill(victim, signal.SIGKILL)  # the user's kill -9

    def respawned() -> list[dict[str, Any]] | None:
        now = ps(tmp_path)
        ok = now[0]["state"] == "READY" and now[0]["pid"] not in (None, victim)
        return now if ok else None

    now = wait_alive(up, respawned, "slot 0 respawned after kill -9")
    assert now is not None
    assert now[0]["last_exit"] == "killed by SIGKILL", now[0]
    assert "w0 exited: killed by SIGKILL" in up.log(), up.tail()
    text = _ps_text(spawn, tmp_path, "ps")
    row = next(line for line in text.splitlines() if line.startswith("0 "))
    assert row.endswith("killed by SIGKILL"), text
    assert "OOM" not in text and "OOM" not in up.log(), text
    _down(spawn, tmp_path, up)


def test_one_worker_and_one_member_are_singular_everywhere(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    up = start_up(spawn, ledger_dir, workers=1, segments=2)
    wait_ready(up, tmp_path, workers=1)
    try:
        said = {
            "fleet ps": _ps_text(spawn, tmp_path, "ps"),
            "fleet status": _run(spawn, ["status"], fleet_env(ledger_dir), "status"),
            "fleet up": up.log(),
        }
    finally:
        _down(spawn, tmp_path, up)
    wrong = {
        where: re.findall(r"(?<![\d/])1 (?:workers|members)\b", text)
        for where, text in said.items()
    }
    assert not any(wrong.values()), wrong

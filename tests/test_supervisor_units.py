"""The supervisor's pure parts and its control server in-process (no etcd, no workers):
status parsing, settling, the respawn policy for recycles and failed spawns, the
open-file cap, and a control server that serves one client while another dribbles."""

from __future__ import annotations

import json
import random
import selectors
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from fleet.supervise import limits, settle, slots
from fleet.supervise.control import MAX_REQUEST, ControlServer
from fleet.supervise.plumbing import Status, parse_status
from fleet.supervise.slots import Slot, State
from tests.support.hostile import BAD_STATUS_LINES


@pytest.mark.parametrize("line", BAD_STATUS_LINES)
def test_status_lines_of_the_wrong_shape_parse_to_nothing_or_to_none_fields(line: bytes) -> None:
    status = parse_status(line.rstrip(b"\n"))
    assert status is None or (not status.ready and status.owned is None), status


def test_status_lines_of_the_right_shape_parse() -> None:
    assert parse_status(b'{"ready": true, "lease": 7, "pid": 3}') == Status(ready=True, lease=7)
    hb = parse_status(b'{"hb": true, "owned": 2, "assigned": 2, "leader": "h-0", "segments": 4}')
    assert hb == Status(ready=False, owned=2, assigned=2, leader="h-0", segments=4)


def _ready_slot(owned: int, assigned: int) -> Slot:
    slot = Slot(0)
    slots.spawned(slot, 123, 0.0)
    slots.ready(slot, 9, 1.0)
    slots.heartbeat(slot, 2.0, owned=owned, assigned=assigned)
    return slot


def test_a_slot_with_no_segments_in_a_big_multi_host_fleet_settles() -> None:
    slot = _ready_slot(owned=0, assigned=0)
    # 4 segments, 1 local worker, but more members than segments across hosts.
    info: dict[str, Any] = {"segments": 4, "in_assignment": True}
    assert settle.settled(slot, info, local_workers=1)
    assert not settle.settled(slot, {"segments": 4, "in_assignment": False}, local_workers=1)
    # An older worker without the field: the old rule.
    assert not settle.settled(slot, {"segments": 4}, local_workers=1)


def test_rss_recycle_of_a_young_child_backs_off_and_of_an_old_one_does_not() -> None:
    policy, rng = slots.RespawnPolicy(), random.Random(1)
    young = Slot(0)
    slots.spawned(young, 10, 0.0)
    slots.stopping(young, recycle="rss 90 MiB > 50 MiB")
    assert slots.exited(young, 0, 5.0, policy, rng) is State.BACKOFF
    assert young.last_exit == "exit 0 (recycled: rss 90 MiB > 50 MiB)"
    old = Slot(1)
    slots.spawned(old, 11, 0.0)
    slots.stopping(old, recycle="rss 90 MiB > 50 MiB")
    assert slots.exited(old, 0, policy.stable_after + 1, policy, rng) is State.STOPPED
    plain = Slot(2)
    slots.spawned(plain, 12, 0.0)
    slots.stopping(plain)
    assert slots.exited(plain, 0, 1.0, policy, rng) is State.STOPPED


def test_failed_spawns_back_off_then_go_fatal() -> None:
    policy, rng = slots.RespawnPolicy(), random.Random(1)
    slot = Slot(0)
    states = [
        slots.spawn_failed(slot, "[Errno 11] EAGAIN", float(t), policy, rng)
        for t in range(policy.crash_limit)
    ]
    assert states[:-1] == [State.BACKOFF] * (policy.crash_limit - 1)
    assert states[-1] is State.FATAL
    assert slot.last_exit == "spawn failed: [Errno 11] EAGAIN"


def test_open_file_capacity() -> None:
    assert limits.capacity(1024) == (1024 - limits.RESERVED_FDS) // 2
    assert limits.capacity(50) == 0
    assert limits.capacity(10**6) == limits.MAX_WORKERS


# -- the control server in-process -------------------------------------------------------


class _Server:
    def __init__(self, path: Path) -> None:
        self.selector = selectors.DefaultSelector()
        self.requests: list[dict[str, Any]] = []
        self.server = ControlServer(path, self.selector, self._dispatch)

    def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(request)
        if request.get("cmd") == "boom":
            raise TypeError("unhashable type: 'list'")
        return {"ok": True, "echo": request}

    def spin(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for key, mask in self.selector.select(0.02):
                key.data(mask)
            self.server.expire(time.monotonic())

    def close(self) -> None:
        self.server.close()
        self.selector.close()


@pytest.fixture
def server(tmp_path: Path) -> Any:
    srv = _Server(tmp_path / "c.sock")
    try:
        yield srv
    finally:
        srv.close()


def _client(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.setblocking(False)
    return sock


def _answer(srv: _Server, sock: socket.socket, seconds: float = 2.0) -> dict[str, Any]:
    data = b""
    end = time.monotonic() + seconds
    while b"\n" not in data and time.monotonic() < end:
        srv.spin(0.02)
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            continue
        if not chunk:
            break
        data += chunk
    result: dict[str, Any] = json.loads(data)
    return result


def test_control_server_answers_while_another_client_dribbles(
    server: _Server, tmp_path: Path
) -> None:
    slow = _client(tmp_path / "c.sock")
    slow.send(b'{"cmd"')
    server.spin(0.1)
    fast = _client(tmp_path / "c.sock")
    fast.send(b'{"cmd": "ps"}\n')
    assert _answer(server, fast)["ok"] is True
    slow.send(b': "ps"}\n')
    assert _answer(server, slow)["echo"] == {"cmd": "ps"}
    slow.close()
    fast.close()


def test_control_server_gives_up_on_a_request_not_complete_in_time(
    server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fleet.supervise.control as control

    monkeypatch.setattr(control, "REQUEST_DEADLINE", 0.3)
    slow = _client(tmp_path / "c.sock")
    slow.send(b'{"cmd"')
    answer = _answer(server, slow, seconds=3.0)
    assert answer["ok"] is False and "not complete" in answer["error"], answer
    assert not server.server.conns
    slow.close()


def test_control_server_survives_a_failing_command_and_oversized_requests(
    server: _Server, tmp_path: Path
) -> None:
    boom = _client(tmp_path / "c.sock")
    boom.send(b'{"cmd": "boom"}\n')
    answer = _answer(server, boom)
    assert answer["ok"] is False and "internal error" in answer["error"], answer
    big = _client(tmp_path / "c.sock")
    big.send(b"x" * (MAX_REQUEST + 10))
    answer = _answer(server, big)
    assert answer["ok"] is False and "longer than" in answer["error"], answer
    for sock in (boom, big):
        sock.close()


def test_a_status_line_over_the_limit_is_dropped_whole() -> None:
    from fleet.supervise.plumbing import MAX_LINE, LineBuffer

    buf = LineBuffer(drop_long=True)
    tail = b'{"ready": true, "lease": 5}'
    assert buf.feed(b"y" * MAX_LINE + tail + b"\n" + b'{"hb": true}\n') == [b'{"hb": true}']
    assert buf.feed(b"z" * (MAX_LINE + 3)) == []
    assert buf.feed(tail + b"\nok\n") == [b"ok"]


def test_a_run_directory_in_a_directory_others_can_write_is_flagged(tmp_path: Path) -> None:
    from fleet.supervise.rundir import RunDir

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    rd = RunDir(shared / ".fleet")
    rd.prepare()
    try:
        assert rd.exposure() is not None and "writable by other users" in str(rd.exposure())
        shared.chmod(0o1777)  # sticky, like /tmp: others cannot rename our directory
        assert rd.exposure() is None
        shared.chmod(0o755)
        assert rd.exposure() is None
    finally:
        rd.release()

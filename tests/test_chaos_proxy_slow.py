"""The chaos proxy's "slow" fault: `slow(latency=, bandwidth=)` delays and throttles what
it forwards without cutting anything; `heal()` restores full speed. Against a local echo
server (every byte crosses the proxy twice: up, then down), then one etcd client.

Timing bounds are one-sided and generous (at least the latency, at least most of the
throttled transfer time), never exact: the machine is shared.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from fleet.coord.etcd import Etcd
from fleet.server.embedded import EmbeddedEtcd
from tests.chaos.proxy import TcpProxy
from tests.support.wait import wait_until
from tests.test_chaos_proxy import EchoServer, connect, roundtrip

KIB = 1024


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[TcpProxy]:
    with TcpProxy(("127.0.0.1", echo.port)) as p:
        yield p


def timed_roundtrip(sock: socket.socket, payload: bytes, timeout: float = 30.0) -> float:
    """Seconds until `payload` came back whole (sending on a thread: the echo flows back
    while we still send, and a throttled link must not deadlock on full buffers)."""
    sock.settimeout(timeout)
    started = time.monotonic()
    sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
    sender.start()
    got = bytearray()
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed during a slow transfer"
        got += chunk
    took = time.monotonic() - started
    sender.join(timeout=timeout)
    assert bytes(got) == payload, "bytes reordered or lost"
    return took


def test_latency_is_added_to_every_round_trip(proxy: TcpProxy) -> None:
    with connect(proxy) as sock:
        fast = timed_roundtrip(sock, b"warm-up")
        proxy.slow(latency=0.3)
        assert proxy.is_slow and not proxy.is_cut
        for _ in range(3):
            # Up and down: at least two latencies per round trip.
            assert timed_roundtrip(sock, b"ping") >= 0.55
    assert fast < 0.55, f"an unslowed round trip took {fast:.3f} s"


def test_latency_delays_each_chunk_without_serialising_them(proxy: TcpProxy) -> None:
    """Ten small writes in a burst arrive about one latency late, not ten: the delay is
    a pipe's, each chunk timed from when it came in, and the order is kept."""
    proxy.slow(latency=0.4)
    with connect(proxy) as sock:
        sock.settimeout(10.0)
        started = time.monotonic()
        for i in range(10):
            sock.sendall(f"<{i}>".encode())
            time.sleep(0.01)
        want = b"".join(f"<{i}>".encode() for i in range(10))
        got = b""
        while len(got) < len(want):
            chunk = sock.recv(4096)
            assert chunk
            got += chunk
        took = time.monotonic() - started
    assert got == want
    assert took >= 0.75, f"echo back after {took:.3f} s: latency not applied both ways"
    assert took < 3.0, f"{took:.3f} s: chunks were delayed one after another"


def test_bandwidth_is_throttled_in_each_direction(proxy: TcpProxy) -> None:
    payload = bytes(range(256)) * 800  # 200 KiB
    proxy.slow(bandwidth=100 * KIB)
    with connect(proxy) as sock:
        took = timed_roundtrip(sock, payload)
    # 2 s at 100 KiB/s each way (the two directions pipeline, so not 4 s); a small burst
    # allowance and a shared machine leave well above 1.5 s.
    assert took >= 1.5, f"200 KiB through a 100 KiB/s proxy in {took:.3f} s"


def test_slow_keeps_live_connections_open_and_heal_restores_speed(
    proxy: TcpProxy, echo: EchoServer
) -> None:
    payload = bytes(range(256)) * 800  # 200 KiB
    with connect(proxy) as sock:
        assert roundtrip(sock, b"before") == b"before"
        wait_until(lambda: proxy.active == 1, timeout=5)
        proxy.slow(latency=0.2, bandwidth=50 * KIB)
        assert timed_roundtrip(sock, b"slow") >= 0.35
        assert proxy.active == 1 and proxy.stats.killed == 0, "slow() cut a connection"
        proxy.heal()
        assert not proxy.is_slow
        fast = timed_roundtrip(sock, payload)
        assert fast < 1.5, f"200 KiB took {fast:.3f} s after heal (4 s at the slow rate)"
        assert echo.connections == 1, "the client had to reconnect"
    assert proxy.stats.slowed == 1


def test_heal_releases_what_is_queued_at_once(proxy: TcpProxy) -> None:
    """Bytes held back by a long latency go out as soon as the proxy is healed."""
    proxy.slow(latency=5.0)
    with connect(proxy) as sock:
        sock.settimeout(10.0)
        sock.sendall(b"held")
        time.sleep(0.3)
        started = time.monotonic()
        proxy.heal()
        assert sock.recv(16) == b"held"
        assert time.monotonic() - started < 3.0


def test_order_is_kept_across_slow_and_heal(proxy: TcpProxy) -> None:
    """A stream of numbered records, switched between slow and fast while it flows,
    comes back complete and in order (the fast path must not overtake queued bytes)."""
    records = [f"{i:06d}\n".encode() for i in range(3000)]
    want = b"".join(records)
    with connect(proxy) as sock:
        sock.settimeout(20.0)
        got = bytearray()

        def read() -> None:
            while len(got) < len(want):
                chunk = sock.recv(65536)
                if not chunk:
                    return
                got.extend(chunk)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for i, record in enumerate(records):
            sock.sendall(record)
            if i % 500 == 0:
                proxy.slow(latency=0.05, bandwidth=200 * KIB)
            elif i % 500 == 250:
                proxy.heal()
            if i % 50 == 0:
                time.sleep(0.005)
        proxy.heal()
        reader.join(timeout=20.0)
    assert bytes(got) == want


def test_cut_while_slow_breaks_the_connection_and_heal_clears_both(proxy: TcpProxy) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock, b"x") == b"x"
        proxy.slow(latency=1.0)
        sock.sendall(b"queued")  # waits in the proxy when the cut comes
        time.sleep(0.1)
        assert proxy.cut() == 1
        sock.settimeout(3.0)
        try:
            data = sock.recv(16)
        except ConnectionResetError:
            data = b""
        assert data == b"", "queued bytes were delivered after the cut"
    proxy.heal()
    assert not proxy.is_cut and not proxy.is_slow
    with connect(proxy) as again:
        assert roundtrip(again, b"after") == b"after"


def test_stop_while_slow_ends_every_thread(echo: EchoServer) -> None:
    proxy = TcpProxy(("127.0.0.1", echo.port)).start()
    before = threading.active_count()
    sock = connect(proxy)
    proxy.slow(latency=2.0, bandwidth=1 * KIB)
    sock.sendall(b"y" * 8192)
    time.sleep(0.2)
    proxy.stop()
    sock.close()
    wait_until(
        lambda: threading.active_count() <= before - 1,  # the accept thread is gone too
        timeout=10,
        message="proxy threads ended after stop()",
    )


def test_slow_rejects_nonsense(proxy: TcpProxy) -> None:
    with pytest.raises(ValueError):
        proxy.slow(latency=-1.0)
    with pytest.raises(ValueError):
        proxy.slow(bandwidth=0)
    assert not proxy.is_slow


def test_etcd_client_through_a_slow_proxy(etcd_server: EmbeddedEtcd) -> None:
    """What the chaos fault relies on: etcd calls still succeed, only later."""
    with TcpProxy(("127.0.0.1", etcd_server.client_port)) as proxy:
        etcd = Etcd([proxy.endpoint], timeout=5.0)
        try:
            etcd.put("/chaos-slow/k", b"v1")
            proxy.slow(latency=0.25, bandwidth=20 * KIB)
            started = time.monotonic()
            kv, _rev = etcd.get("/chaos-slow/k")
            took = time.monotonic() - started
            assert kv is not None and kv.value == b"v1"
            assert took >= 0.45, f"a get through 0.25 s latency took {took:.3f} s"
            etcd.put("/chaos-slow/k", b"v2")
            proxy.heal()
            kv, _rev = etcd.get("/chaos-slow/k")
            assert kv is not None and kv.value == b"v2"
            assert proxy.stats.killed == 0
        finally:
            etcd.close()

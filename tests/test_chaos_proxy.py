"""The chaos suite's TCP proxy: forwards, `cut()` breaks live connections and new ones
fail (reset or blackholed), `heal()` restores; also end to end with an etcd client."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from fleet.coord.etcd import Etcd, EtcdError
from fleet.server.embedded import EmbeddedEtcd
from tests.chaos.proxy import CutMode, TcpProxy
from tests.support.wait import wait_until


class EchoServer:
    """Echoes every byte back, one thread per connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


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


def connect(proxy: TcpProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=2.0)
    sock.settimeout(2.0)
    return sock


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def broken(sock: socket.socket, timeout: float = 2.0) -> bool:
    """True if the connection is closed or reset by the other end (within `timeout`)."""
    sock.settimeout(timeout)
    try:
        sock.sendall(b"ping")
        return sock.recv(16) == b""
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        return True
    except TimeoutError:
        return False


def new_connection_fails(proxy: TcpProxy) -> bool:
    """The kernel completes the handshake, then the proxy resets: the reset may already
    surface in connect() itself, or on the first exchange."""
    try:
        sock = connect(proxy)
    except OSError:
        return True
    with sock:
        return broken(sock)


def test_forwards_both_ways(proxy: TcpProxy, echo: EchoServer) -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB, several chunks each way
    with connect(proxy) as a, connect(proxy) as b:
        assert roundtrip(a, payload) == payload
        assert roundtrip(b, b"hello") == b"hello"
    assert proxy.stats.forwarded == 2
    # The pump threads count a chunk after forwarding it: the echo can arrive first.
    wait_until(
        lambda: proxy.stats.bytes_up >= len(payload) + 5
        and proxy.stats.bytes_down >= len(payload) + 5,
        timeout=5,
        message="every byte counted both ways",
    )
    wait_until(lambda: proxy.active == 0, timeout=5, message="closed connections forgotten")


def test_cut_breaks_live_connections_and_refuses_new_ones(proxy: TcpProxy) -> None:
    live = connect(proxy)
    assert roundtrip(live, b"before") == b"before"
    wait_until(lambda: proxy.active == 1, timeout=5)

    assert proxy.cut() == 1
    assert proxy.is_cut
    assert broken(live), "a live connection survived cut()"
    live.close()
    for _ in range(3):
        assert new_connection_fails(proxy), "a new connection was forwarded while cut"
    wait_until(lambda: proxy.stats.refused == 3, timeout=5)

    proxy.heal()
    assert not proxy.is_cut
    with connect(proxy) as again:
        assert roundtrip(again, b"after") == b"after"


def test_blackhole_holds_new_connections_silently(proxy: TcpProxy, echo: EchoServer) -> None:
    before = echo.connections
    proxy.cut("blackhole")
    held = connect(proxy)  # connects, but nothing comes back
    held.sendall(b"anyone?")
    held.settimeout(0.5)
    with pytest.raises(TimeoutError):
        held.recv(16)
    assert echo.connections == before, "a blackholed connection reached the upstream"

    proxy.heal()  # held connections are reset, so their clients reconnect
    assert broken(held)
    held.close()
    with connect(proxy) as again:
        assert roundtrip(again, b"back") == b"back"


def test_cut_and_heal_repeatedly(proxy: TcpProxy) -> None:
    for i in range(5):
        with connect(proxy) as sock:
            assert roundtrip(sock, f"round {i}".encode()) == f"round {i}".encode()
            proxy.cut("refuse" if i % 2 else "blackhole")
            assert broken(sock)
        proxy.heal()
    assert proxy.stats.cuts == 5


def test_unreachable_upstream_resets_the_client() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with TcpProxy(("127.0.0.1", port)) as proxy:
        assert new_connection_fails(proxy)
        wait_until(lambda: proxy.stats.refused == 1, timeout=5)


def test_stop_closes_everything(echo: EchoServer) -> None:
    proxy = TcpProxy(("127.0.0.1", echo.port)).start()
    sock = connect(proxy)
    assert roundtrip(sock, b"x") == b"x"
    proxy.stop()
    assert broken(sock)
    sock.close()
    with pytest.raises(OSError):
        connect(proxy).close()
    proxy.stop()  # idempotent


def test_etcd_client_through_the_proxy(etcd_server: EmbeddedEtcd) -> None:
    """What the chaos run relies on: a cut makes etcd calls fail fast, heal brings them back."""
    with TcpProxy(("127.0.0.1", etcd_server.client_port)) as proxy:
        etcd = Etcd([proxy.endpoint], timeout=1.0)
        try:
            etcd.put("/chaos-proxy/k", b"v1")
            kv, _rev = etcd.get("/chaos-proxy/k")
            assert kv is not None and kv.value == b"v1"

            modes: tuple[CutMode, ...] = ("refuse", "blackhole")
            for mode in modes:
                proxy.cut(mode)
                started = time.monotonic()
                with pytest.raises(EtcdError):
                    etcd.get("/chaos-proxy/k")
                assert time.monotonic() - started < 5.0, f"{mode}: the failure took too long"
                proxy.heal()

                def works() -> bool:
                    kv, _ = etcd.get("/chaos-proxy/k")
                    return kv is not None and kv.value == b"v1"

                wait_until(works, timeout=10, interval=0.1, message=f"etcd back after {mode}")
        finally:
            etcd.close()

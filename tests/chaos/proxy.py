"""A small TCP forwarder on 127.0.0.1 that the chaos runner can cut and heal.

One worker of the chaos fleet reaches etcd only through this proxy, so a "network
partition" of that worker is a method call: `cut()` closes every live connection at
once (both sides see it go) and, until `heal()`, refuses new ones (accept, then reset)
or blackholes them (accept and hold, forwarding nothing: the client's connect succeeds
and its requests time out). No external tools (iptables, tc) and no root needed.

Threads, one per direction per connection, with blocking sockets: few connections
(a gRPC channel multiplexes everything over one), and every blocked call is released
by `shutdown()` when a cut or `stop()` closes the sockets under it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

CutMode = Literal["refuse", "blackhole"]
CONNECT_TIMEOUT = 2.0
CHUNK = 65536


@dataclass
class ProxyStats:
    """Counters for tests and the chaos report."""

    accepted: int = 0
    forwarded: int = 0  # connections joined to the upstream
    refused: int = 0  # reset while cut (mode "refuse") or upstream unreachable
    blackholed: int = 0  # held silently while cut (mode "blackhole")
    killed: int = 0  # live connections closed by cut() or stop()
    cuts: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class _Conn:
    client: socket.socket
    upstream: socket.socket | None = None
    pumps: int = 2  # directions still open; the last one to end forgets the connection


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): the peer sees 'connection reset', at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv() on it
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    """Forward ``host:port`` (port 0: any free one) to `upstream`, until cut.

    Usage::

        with TcpProxy(("127.0.0.1", etcd_port)) as proxy:
            endpoint = proxy.endpoint     # http://127.0.0.1:<port>
            proxy.cut()                   # partition
            proxy.heal()
    """

    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream
        self.host = host
        self._requested_port = port
        self.port = 0
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []
        self._held: list[socket.socket] = []  # blackholed while cut
        self._mode: CutMode | None = None  # None: forwarding
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopped = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self._requested_port))
        listener.listen(64)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"proxy-accept-{self.port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection; idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._listener is not None:
            _close(self._listener)
        self._drop_all(reset=False)
        with self._lock:
            held, self._held = self._held, []
        for sock in held:
            _close(sock)
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)

    def __enter__(self) -> TcpProxy:
        return self.start() if self._listener is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._mode is not None

    @property
    def active(self) -> int:
        """Live forwarded connections."""
        with self._lock:
            return len(self._conns)

    # -- faults ---------------------------------------------------------------------------

    def cut(self, mode: CutMode = "refuse") -> int:
        """Partition: close every live connection; refuse or blackhole new ones until heal().

        Returns the number of live connections closed.
        """
        if mode not in ("refuse", "blackhole"):
            raise ValueError(f"cut mode {mode!r}: expected 'refuse' or 'blackhole'")
        with self._lock:
            self._mode = mode
            self.stats.cuts += 1
        return self._drop_all(reset=True)

    def heal(self) -> None:
        """Forward new connections again; blackholed ones are closed so clients reconnect."""
        with self._lock:
            self._mode = None
            held, self._held = self._held, []
        for sock in held:
            _reset(sock)

    # -- internals ------------------------------------------------------------------------

    def _drop_all(self, reset: bool) -> int:
        with self._lock:
            conns, self._conns = self._conns, []
            self.stats.killed += len(conns)
        for conn in conns:
            for sock in (conn.client, conn.upstream):
                if sock is not None:
                    (_reset if reset else _close)(sock)
        return len(conns)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                client, _addr = self._listener.accept()
            except OSError:
                return  # listener closed by stop()
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.stats.accepted += 1
                mode = self._mode
                if mode == "blackhole":
                    self._held.append(client)
                    self.stats.blackholed += 1
                    continue
                if mode == "refuse":
                    self.stats.refused += 1
                conn = None if mode == "refuse" else _Conn(client)
                if conn is not None:
                    self._conns.append(conn)
            if conn is None:
                _reset(client)
                continue
            # Connecting may take a while: do it off the accept thread.
            threading.Thread(
                target=self._join, args=(conn,), name=f"proxy-conn-{self.port}", daemon=True
            ).start()

    def _join(self, conn: _Conn) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=CONNECT_TIMEOUT)
        except OSError:
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)
                    self.stats.refused += 1
            _reset(conn.client)
            return
        upstream.settimeout(None)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            alive = conn in self._conns  # a cut may have dropped it while we connected
            if alive:
                conn.upstream = upstream
                self.stats.forwarded += 1
        if not alive:
            _reset(upstream)
            return
        for src, dst, upward in ((conn.client, upstream, True), (upstream, conn.client, False)):
            threading.Thread(
                target=self._pump,
                args=(conn, src, dst, upward),
                name=f"proxy-pump-{self.port}",
                daemon=True,
            ).start()

    def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)  # pass the half-close on
                    return
                dst.sendall(data)
                with self._lock:
                    if upward:
                        self.stats.bytes_up += len(data)
                    else:
                        self.stats.bytes_down += len(data)
        except OSError:
            # One side failed (or a cut closed it): the connection is over.
            self._forget(conn)
        finally:
            with self._lock:
                conn.pumps -= 1
                last = conn.pumps == 0
            if last:
                self._forget(conn)

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            if conn not in self._conns:
                return
            self._conns.remove(conn)
        for sock in (conn.client, conn.upstream):
            if sock is not None:
                _close(sock)

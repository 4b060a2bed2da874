"""A small TCP forwarder on 127.0.0.1 that the chaos runner can cut, slow and heal.

One worker of the chaos fleet reaches etcd only through this proxy, so a "network
partition" of that worker is a method call: `cut()` closes every live connection at
once (both sides see it go) and, until `heal()`, refuses new ones (accept, then reset)
or blackholes them (accept and hold, forwarding nothing: the client's connect succeeds
and its requests time out). `slow(latency=, bandwidth=)` cuts nothing: every chunk, in
either direction, goes out `latency` seconds after it came in, and each direction is
throttled to `bandwidth` bytes/s (a token bucket shared by the connections, like one
link), until `heal()`. No external tools (iptables, tc) and no root needed.

Threads, a reader and a sender per direction per connection, blocking sockets: few
connections (a gRPC channel multiplexes everything over one); a cut or `stop()` frees
every blocked call by `shutdown()`. While the link is fast and nothing is queued the
reader forwards a chunk itself, else it queues the chunk with its arrival time: order
kept, chunks delayed side by side (a pipe's latency, not one per chunk in turn), the
directions independent. A queue holds about a latency of bandwidth, so a throttled
link pushes back on its sender as a real one does instead of buffering without end.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

CutMode = Literal["refuse", "blackhole"]
CONNECT_TIMEOUT = 2.0
CHUNK = 65536
BURST_SECONDS = 0.05  # a throttled direction may send this long's worth of bytes at once
QUEUE_SLACK = 0.25  # a slow direction queues (latency + this) x bandwidth, plus a chunk
MAX_QUEUED = 16 << 20  # the bound of a direction's queue when only latency is added


@dataclass(frozen=True)
class Slowness:
    """What `slow()` applied: added one-way latency (s) and bandwidth per direction (B/s)."""

    latency: float = 0.0
    bandwidth: float | None = None  # None: not throttled

    def queue_limit(self) -> int:
        """Bytes a direction may hold before its reader stops reading (back-pressure)."""
        if self.bandwidth is None:
            return MAX_QUEUED
        return CHUNK + int(self.bandwidth * (self.latency + QUEUE_SLACK))


@dataclass
class ProxyStats:
    """Counters for tests and the chaos report."""

    accepted: int = 0
    forwarded: int = 0  # connections joined to the upstream
    refused: int = 0  # reset while cut (mode "refuse") or upstream unreachable
    blackholed: int = 0  # held silently while cut (mode "blackhole")
    killed: int = 0  # live connections closed by cut() or stop()
    cuts: int = 0
    slowed: int = 0  # slow() calls
    bytes_up: int = 0
    bytes_down: int = 0
    delayed_bytes: int = 0  # forwarded through a queue (slow, or behind queued bytes)
    throttled: int = 0  # times a sender waited for its bandwidth


@dataclass
class _Lane:
    """One direction of one connection: chunks waiting for the sender, oldest first."""

    items: deque[tuple[float, bytes | None]] = field(default_factory=deque)  # None: EOF
    queued: int = 0  # bytes in `items` plus the chunk being sent
    sending: bool = False
    closed: bool = False


@dataclass
class _Conn:
    client: socket.socket
    upstream: socket.socket | None = None
    pumps: int = 2  # directions still open; the last one to end forgets the connection
    lanes: tuple[_Lane, _Lane] = field(default_factory=lambda: (_Lane(), _Lane()))


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
            proxy.slow(latency=0.5, bandwidth=50_000)  # a bad link, connections kept
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
        # Guards the lanes, the buckets and `_slow`; every change wakes every waiter.
        self._cv = threading.Condition()
        self._slow: Slowness | None = None
        # Token buckets, up and down: [tokens, last refill]; a debt (< 0) keeps the rate exact.
        self._buckets = ([0.0, 0.0], [0.0, 0.0])

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
    def is_slow(self) -> bool:
        return self._slow is not None

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

    def slow(self, latency: float = 0.0, bandwidth: float | None = None) -> Slowness:
        """Delay every chunk by `latency` s and throttle each direction to `bandwidth`
        bytes/s, live connections included, until heal(); nothing is closed."""
        if latency < 0 or (bandwidth is not None and bandwidth <= 0):
            raise ValueError(f"slow(latency={latency!r}, bandwidth={bandwidth!r}): out of range")
        slowness = Slowness(float(latency), None if bandwidth is None else float(bandwidth))
        with self._cv:
            now = time.monotonic()
            for bucket in self._buckets:
                bucket[:] = [0.0, now]
            self._slow = slowness
            self._cv.notify_all()
        with self._lock:
            self.stats.slowed += 1
        return slowness

    def heal(self) -> None:
        """Full speed, and forward new connections again; blackholed ones are closed so
        clients reconnect. What a slow link still holds goes out at once, in order."""
        with self._cv:
            self._slow = None
            self._cv.notify_all()
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
        self._close_lanes(conns)  # queued bytes die with the connection
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
            for target in (self._read, self._send):
                threading.Thread(
                    target=target,
                    args=(conn, src, dst, upward),
                    name=f"proxy-pump-{self.port}",
                    daemon=True,
                ).start()

    def _count(self, upward: bool, n: int, delayed: bool) -> None:
        with self._lock:
            if upward:
                self.stats.bytes_up += n
            else:
                self.stats.bytes_down += n
            if delayed:
                self.stats.delayed_bytes += n

    def _read(self, conn: _Conn, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        """Read `src`; forward directly while fast with nothing queued, else queue."""
        lane = conn.lanes[0 if upward else 1]
        try:
            while True:
                with self._cv:
                    while not lane.closed and lane.queued >= self._queue_limit():
                        self._cv.wait(0.5)
                    if lane.closed:
                        return
                data = src.recv(CHUNK)
                with self._cv:
                    # Only this thread queues: seen empty and idle, it stays so while we send.
                    direct = bool(data) and not (self._slow or lane.items or lane.sending)
                    if not direct:
                        lane.items.append((time.monotonic(), data or None))
                        lane.queued += len(data)
                        self._cv.notify_all()
                if not data:
                    return  # the sender passes the half-close on after what is queued
                if direct:
                    dst.sendall(data)
                    self._count(upward, len(data), delayed=False)
        except OSError:
            self._forget(conn)  # one side failed (or a cut closed it): the connection is over

    def _send(self, conn: _Conn, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        """Send the queued chunks, each once its latency has passed, at the allowed rate."""
        lane = conn.lanes[0 if upward else 1]
        try:
            while True:
                with self._cv:
                    data = self._next_due(lane)
                    if lane.closed:
                        return
                if data is None:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)  # pass the half-close on
                    return
                view = memoryview(data)
                while view:
                    n = self._take(upward, lane, len(view))
                    dst.sendall(view[:n])
                    view = view[n:]
                    self._count(upward, n, delayed=True)
                with self._cv:
                    lane.sending = False
                    lane.queued -= len(data)
                    self._cv.notify_all()
        except OSError:
            self._forget(conn)
        finally:
            with self._lock:
                conn.pumps -= 1
                last = conn.pumps == 0
            if last:
                self._forget(conn)

    def _queue_limit(self) -> int:
        return self._slow.queue_limit() if self._slow else MAX_QUEUED

    def _next_due(self, lane: _Lane) -> bytes | None:
        """(Under `_cv`.) Wait for the oldest chunk's time to come and take it (None: EOF,
        or the lane closed). The latency in force now counts, so heal() releases at once."""
        while not lane.closed:
            if not lane.items:
                self._cv.wait()
                continue
            arrival, data = lane.items[0]
            wait = arrival + (self._slow.latency if self._slow else 0.0) - time.monotonic()
            if wait > 0:
                self._cv.wait(wait)
                continue
            lane.items.popleft()
            lane.sending = data is not None
            return data
        return None

    def _take(self, upward: bool, lane: _Lane, want: int) -> int:
        """How many of `want` bytes may go now, waiting for tokens while throttled."""
        with self._cv:
            while True:
                if lane.closed:
                    raise OSError("connection closed")
                rate = self._slow.bandwidth if self._slow else None
                if rate is None:
                    return want
                bucket = self._buckets[0 if upward else 1]
                now = time.monotonic()
                burst = rate * BURST_SECONDS
                bucket[:] = [min(burst, bucket[0] + (now - bucket[1]) * rate), now]
                if bucket[0] >= 0:
                    n = min(want, max(1, int(burst)))
                    bucket[0] -= n
                    return n
                with self._lock:
                    self.stats.throttled += 1
                self._cv.wait(-bucket[0] / rate)

    def _close_lanes(self, conns: list[_Conn]) -> None:
        with self._cv:
            for conn in conns:
                for lane in conn.lanes:
                    lane.closed = True
            self._cv.notify_all()

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            if conn not in self._conns:
                return
            self._conns.remove(conn)
        self._close_lanes([conn])
        for sock in (conn.client, conn.upstream):
            if sock is not None:
                _close(sock)

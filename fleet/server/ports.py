"""Loopback ports for a local etcd: free ones, the preferred ones, and who holds one."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping

from fleet.config import ConfigError

DEFAULT_CLIENT_PORT = 2379
DEFAULT_PEER_PORT = 2380
PORT_ENV = "FLEET_EMBEDDED_PORT"


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the OS for a currently unused TCP port on `host` (bind to port 0).

    The port is not reserved once the probe socket closes; callers that lose the
    race (another process binds it first) must pick again.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(host: str, port: int) -> bool:
    """True if `port` can be bound on `host` right now (used to prefer 2379/2380)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Same option etcd (Go) sets, so TIME_WAIT leftovers don't count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def preferred_ports(env: Mapping[str, str]) -> tuple[int, int] | None:
    """The (client, peer) ports a local etcd tries first, from FLEET_EMBEDDED_PORT.

    Unset or empty: 2379/2380, so the default client config just works. ``0``: None,
    any free ports (several fleets on one host, tests). ``n``: n and n+1, so a test can
    make the etcd prefer a port it holds itself, which 2379 may not be on a shared
    machine. Anything else is a configuration error (exit 2).
    """
    raw = env.get(PORT_ENV, "").strip()
    if not raw:
        return DEFAULT_CLIENT_PORT, DEFAULT_PEER_PORT
    if raw.isdigit() and int(raw) == 0:
        return None
    if raw.isdigit() and 1 <= int(raw) <= 65534:
        return int(raw), int(raw) + 1
    raise ConfigError(
        f"{PORT_ENV} = {raw!r} (from the environment): expected 0 (any free ports) or a "
        "client port from 1 to 65534 to prefer (the peer port is the next one)"
    )


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on `port`, on any address (Linux /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table, encoding="ascii") as fh:
            next(fh, None)  # header
            for row in fh:
                fields = row.split()
                # fields: sl, local "HEXIP:HEXPORT", remote, state (0A = LISTEN), ..., inode
                listening = len(fields) > 9 and fields[3] == "0A"
                if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def _holds_socket(pid: int, inodes: set[str]) -> bool:
    """Whether process `pid` has a descriptor on one of the socket `inodes`."""
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(os.path.join(fd_dir, fd))
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return True
    return False


def holder_pid(port: int) -> int | None:
    """The pid of a process listening on TCP `port`, as far as /proc shows it.

    Lets a fallback to another port say who took the preferred one (another fleet's
    etcd, a stray process). None when /proc cannot tell: no /proc, or the holder
    belongs to another user (its descriptors cannot be read), or nobody listens.
    """
    try:
        inodes = _listening_inodes(port)
    except (OSError, ValueError):
        return None
    if not inodes:
        return None
    try:
        pids = sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
    except OSError:
        return None
    for pid in pids:
        with contextlib.suppress(OSError):
            if _holds_socket(pid, inodes):
                return pid
    return None


def _listens_on(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds a listening TCP socket on `port` (Linux /proc).

    Needed because ``/health`` answering on our endpoint does not prove that *our*
    etcd answered: another process may own the port, and our etcd is about to die
    of "address already in use". Returns None where /proc cannot tell (other OSes,
    permissions), and callers then trust the health check alone.
    """
    try:
        inodes = _listening_inodes(port)
        return bool(inodes) and _holds_socket(pid, inodes)
    except (OSError, ValueError):
        return None


def _url_host(host: str) -> str:
    """Bracket IPv6 literals, as URLs require."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host

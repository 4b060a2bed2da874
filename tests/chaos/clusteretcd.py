"""The etcd of a `--cluster` chaos run: three members, and one proxy per member.

`ClusterEtcd` wraps `tests.support.cluster.EtcdCluster` (etcd's default 100 ms heartbeat
and 1 s election, the timing production runs) with what the run and its faults need:
every endpoint, the raft leader, kill/restart/pause of single members, and `heal()`,
which brings every member back (resumed, restarted) after the faults. It also answers
the few calls the runner makes of a single `EmbeddedEtcd` (`start`, `stop`, `kill`,
`command`, `running`), so the runner treats both alike.

`ProxyGroup` is the proxied worker's view of the cluster: one `TcpProxy` per member, so
the worker fails over between members as any client does, and a network partition of
that worker is a cut of all three at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from fleet.server.embedded import EmbeddedEtcd
from tests.chaos.proxy import CutMode, ProxyStats, TcpProxy
from tests.support.cluster import EtcdCluster
from tests.support.etcd import PausableEtcd, _proc_state

SIZE = 3
START_TIMEOUT = 60.0  # a member restarted under a loaded machine catches up slowly


class ClusterEtcd:
    """A 3-member etcd on loopback for the chaos run; member logs go to `log_dir`."""

    def __init__(self, root: Path, log_dir: Path, size: int = SIZE) -> None:
        self.cluster = EtcdCluster(root, size, log_dir=log_dir)

    # -- what the runner asks of any etcd ---------------------------------------------------

    @property
    def members(self) -> list[PausableEtcd]:
        return self.cluster.members

    @property
    def endpoints(self) -> list[str]:
        return self.cluster.endpoints

    def command(self) -> list[str]:
        return self.members[0].command()

    @property
    def running(self) -> bool:
        """Every member running and none paused."""
        return all(m.running and not self.paused(i) for i, m in enumerate(self.members))

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.cluster.start(timeout=timeout)

    def stop(self) -> None:
        self.cluster.stop_all()

    def kill(self) -> None:
        self.cluster.kill_all()

    # -- members ----------------------------------------------------------------------------

    def paused(self, index: int) -> bool:
        pid = self.members[index].pid
        return pid is not None and _proc_state(pid) in ("T", "t")

    def leader(self, timeout: float = 15.0) -> int:
        """Index of the member all reachable members agree leads (AssertionError: none)."""
        return self.cluster.leader_index(timeout=timeout)

    def pid(self, index: int) -> int | None:
        return self.members[index].pid

    def kill_members(self, indices: Sequence[int]) -> None:
        """SIGKILL these members, as close together as the calls allow."""
        for i in indices:
            self.members[i].kill()

    def start_members(self, indices: Sequence[int], timeout: float = START_TIMEOUT) -> None:
        """Restart these members on their data dirs, in parallel (two of three make a
        quorum only together); returns once each is healthy."""
        self.cluster.start_members(indices, timeout=timeout)

    def heal(self) -> list[str]:
        """Resume every paused member and restart every dead one; what was done."""
        actions = []
        for i, member in enumerate(self.members):
            if member.running and self.paused(i):
                member.resume()
                actions.append(f"resumed etcd member m{i}")
        dead = [i for i, m in enumerate(self.members) if not m.running]
        if dead:
            self.start_members(dead)
            actions.append(f"restarted etcd members {', '.join(f'm{i}' for i in dead)}")
        return actions


class ProxyGroup:
    """One `TcpProxy` per member; cut and heal all of them at once.

    Offers what the runner and the faults use of a single proxy: `endpoint` (every
    member's, comma-separated, as `--etcd` takes them), `port`, `cut`, `heal`, `is_cut`,
    `stats` (summed), `stop`.
    """

    def __init__(self, upstreams: Sequence[tuple[str, int]]) -> None:
        self.proxies = [TcpProxy(up) for up in upstreams]

    def start(self) -> ProxyGroup:
        for proxy in self.proxies:
            proxy.start()
        return self

    def stop(self) -> None:
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                proxy.stop()

    @property
    def endpoint(self) -> str:
        return ",".join(p.endpoint for p in self.proxies)

    @property
    def port(self) -> str:
        return ",".join(str(p.port) for p in self.proxies)

    @property
    def is_cut(self) -> bool:
        return any(p.is_cut for p in self.proxies)

    def cut(self, mode: CutMode = "refuse") -> int:
        return sum(p.cut(mode) for p in self.proxies)

    def heal(self) -> None:
        for proxy in self.proxies:
            proxy.heal()

    @property
    def stats(self) -> ProxyStats:
        total = ProxyStats()
        for proxy in self.proxies:
            for name, value in vars(proxy.stats).items():
                setattr(total, name, getattr(total, name) + value)
        return total


def endpoints_of(etcd: EmbeddedEtcd | ClusterEtcd) -> list[str]:
    """The client endpoints of either kind of etcd."""
    return etcd.endpoints if isinstance(etcd, ClusterEtcd) else [etcd.endpoint]


def proxy_for(etcd: EmbeddedEtcd | ClusterEtcd) -> TcpProxy | ProxyGroup:
    """The proxied worker's way to etcd: one proxy, or one per member (started)."""
    if isinstance(etcd, ClusterEtcd):
        return ProxyGroup([("127.0.0.1", m.client_port) for m in etcd.members]).start()
    return TcpProxy(("127.0.0.1", etcd.client_port)).start()

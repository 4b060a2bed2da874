"""How `fleet up` finds its etcd: the one configured, the `fleet etcd` already serving
the data dir, or an embedded one it starts and keeps running (teardown.py is the end).

An external etcd that cannot be reached at start would only send every worker into a
crash loop, so it is checked first (exit 3 with one line naming the endpoints, as
`fleet worker` does). An embedded etcd that fails to start says why in one line and
points at its log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleet import clock
from fleet.coord.etcd import Etcd, EtcdUnavailable, retry
from fleet.supervise.etcdkeeper import EtcdKeeper, embedded_etcd, running_fleet_etcd

if TYPE_CHECKING:
    from fleet.supervise.supervisor import Supervisor


def start_etcd(sup: Supervisor) -> None:
    """Set the supervisor's endpoints (and what serves them) unless some are configured."""
    if sup.endpoints:
        return
    wait = max(3.0, sup.config.etcd.timeout)
    running = running_fleet_etcd(sup.run_dir.root, wait)  # exit 3 if it does not answer
    if running is not None:
        sup.external_etcd = running
        sup.endpoints = (running.endpoint,)
        sup._say(
            f"using the running fleet etcd (pid {running.fleet_etcd_pid}) at {running.endpoint}"
        )
        return
    server = embedded_etcd(sup.run_dir.root, sup._say)
    sup.etcd_server = server  # set first, so an interrupted start is still stopped
    try:
        server.start()
    except RuntimeError as exc:  # the full log tail is in .fleet/etcd.log
        first = str(exc).splitlines()[0] if str(exc) else "no reason given"
        raise EtcdUnavailable(
            f"the embedded etcd did not start: {first} (see {server.log_path})"
        ) from None
    sup.keeper = EtcdKeeper(server, sup._say)
    sup.endpoints = (server.endpoint,)
    if server.port_note is not None:
        sup.etcd_note = f", {server.port_note}"


def check_etcd(sup: Supervisor, etcd: Etcd) -> None:
    """One read, retried for a few seconds: an unreachable cluster raises
    EtcdUnavailable, which the CLI prints as one line naming the endpoints (exit 3)."""
    retry(
        lambda: etcd.get(sup.config.etcd.prefix + "/"),
        until=clock.now() + max(3.0, sup.config.etcd.timeout),
        what="reaching etcd",
    )

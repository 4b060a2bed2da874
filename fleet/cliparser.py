"""The `fleet` command line's grammar: every command, flag and help text, the exit codes,
and how parsed flags become a `Config` (`load_config`).

Kept apart from the command bodies (`fleet.cli` and the `*_cmd` modules) so that `--help`
and the flag names are read and changed in one place; nothing here does any work.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from fleet import config as config_mod
from fleet import resize_cmd

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_ETCD = 0, 1, 2, 3


class UsageError(Exception):
    """Raised instead of argparse's own exit so every usage error is one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("fleet").strip()
        raise UsageError(f"{command}: {message}" if command else message)


_DEFAULTS = config_mod.Config(etcd=config_mod.EtcdSettings())  # help shows the real defaults
_DESCRIPTION = (
    "Run a fleet of worker processes that split a fixed set of segments through etcd. "
    "Start with `fleet up --workers N` (supervised workers on this host, on an embedded "
    "etcd); `fleet COMMAND --help` for each command. Exit codes: 0 ok, 1 failure, "
    "2 usage or configuration error, 3 etcd unreachable."
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML file (default ./fleet.toml if present)")
    p.add_argument(
        "--etcd",
        metavar="URL[,URL...]",
        help="etcd endpoints (env FLEET_ETCD; none: fleet up starts an embedded etcd)",
    )
    p.add_argument(
        "--name", metavar="FLEET", help=f"fleet name (env FLEET_NAME, default {_DEFAULTS.name!r})"
    )
    p.add_argument(
        "--prefix",
        help=f"etcd key prefix (env FLEET_PREFIX, default {_DEFAULTS.etcd.prefix})",
    )
    p.add_argument(
        "--log-format",
        dest="log_format",
        metavar="text|json",
        help=f"log lines as text or JSON (env FLEET_LOG_FORMAT, default {_DEFAULTS.log_format})",
    )


def _log_level_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level",
        dest="log_level",
        metavar="LEVEL",
        help="debug|info|warning|error: info is the lifecycle (joins, leaders, assignments, "
        "acquires and releases, a summary per worker per minute), debug adds every call "
        f"(env FLEET_LOG_LEVEL, default {_DEFAULTS.log_level})",
    )


def _worker_flags(p: argparse.ArgumentParser, *, supervised: bool = False) -> None:
    d = _DEFAULTS
    _log_level_flag(p)
    p.add_argument(
        "--segments",
        metavar="N",
        help=f"segment count, used by the first member (env FLEET_SEGMENTS, default {d.segments})",
    )
    p.add_argument(
        "--handler", metavar="MOD:ATTR", help=f"handler (env FLEET_HANDLER, default {d.handler})"
    )
    p.add_argument(
        "--interval",
        metavar="SECONDS",
        help=f"pause between calls per segment (env FLEET_INTERVAL, default {d.interval:g})",
    )
    p.add_argument(
        "--lease-ttl",
        dest="lease_ttl",
        metavar="SECONDS",
        help=f"lease TTL (env FLEET_LEASE_TTL, default {d.lease_ttl})",
    )
    if supervised:
        id_help = (
            "id of this fleet's workers: they are named <ID>-<slot> "
            "(env FLEET_ID, default the --host-id value)"
        )
    else:
        id_help = (
            "member id (env FLEET_ID, default <hostname>-<pid>; "
            "fleet up names its workers <ID>-<slot>)"
        )
    p.add_argument("--id", metavar="ID", help=id_help)
    p.add_argument(
        "--weight",
        metavar="W",
        help=f"relative share of segments (env FLEET_WEIGHT, default {d.weight:g})",
    )
    p.add_argument(
        "--graceful-timeout",
        dest="graceful_timeout",
        metavar="SECONDS",
        help=f"how long a stop waits for running calls (default {d.graceful_timeout:g})",
    )
    p.add_argument(
        "--handler-timeout",
        dest="handler_timeout",
        metavar="SECONDS",
        help="a call running longer is a hang: dump stacks, exit, be replaced "
        "(env FLEET_HANDLER_TIMEOUT, default 0 = off)",
    )
    p.add_argument(
        "--concurrency",
        metavar="N",
        help="most user calls one worker runs at once, whatever it owns "
        f"(env FLEET_CONCURRENCY, default {d.concurrency})",
    )
    p.add_argument(
        "--settle",
        metavar="SECONDS",
        help=f"leader's coalescing window for membership changes (default {d.settle:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fleet", description=_DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    worker = sub.add_parser("worker", help="run one worker process")
    _common(worker)
    _worker_flags(worker)
    status = sub.add_parser("status", help="show the fleet as etcd sees it")
    _common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    up = sub.add_parser("up", help="run a supervised fleet of workers on this host")
    _common(up)
    _worker_flags(up, supervised=True)
    _host_id_flag(
        up,
        "host part of member ids: slot i is <ID>-<i> (env FLEET_HOST_ID; default "
        "<hostname>-<4 hex of sha1 of this directory>: unique per directory and host, "
        "the same on every restart here)",
    )
    sup = _DEFAULTS.supervisor
    up.add_argument(
        "--workers",
        metavar="N",
        help=f"number of workers (env FLEET_WORKERS, default {sup.workers})",
    )
    up.add_argument(
        "--heartbeat-timeout",
        dest="heartbeat_timeout",
        metavar="SECONDS",
        help="a READY worker silent this long is killed (SIGABRT, then SIGKILL) and "
        f"respawned (default {sup.heartbeat_timeout:g})",
    )
    up.add_argument(
        "--startup-timeout",
        dest="startup_timeout",
        metavar="SECONDS",
        help=f"a worker not READY this long after its spawn is killed (default "
        f"{sup.startup_timeout:g})",
    )
    up.add_argument(
        "--max-rss-mb",
        dest="max_rss_mb",
        metavar="MIB",
        help="recycle a worker whose resident size exceeds this "
        f"(default {sup.max_rss_mb} = no limit)",
    )
    ps = sub.add_parser("ps", help="the slots of the fleet up running in this directory")
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    scale = sub.add_parser(
        "scale", help="change the number of workers of fleet up; waits until they are READY"
    )
    scale.add_argument("workers", help="the new number of workers")
    restart = sub.add_parser(
        "restart", help="rolling restart (one slot at a time); waits until it is done"
    )
    restart.add_argument("--slot", help="restart only this slot")
    for p in (scale, restart):
        p.add_argument(
            "--no-wait", dest="no_wait", action="store_true", help="return once fleet up accepted"
        )
    sub.add_parser(
        "down", help="stop the fleet up running here; returns when all exited (nothing: exit 0)"
    )
    etcd = sub.add_parser("etcd", help="run a local etcd for development in the foreground")
    etcd.add_argument(
        "--data-dir", default=".fleet/etcd", metavar="DIR", help="etcd data (default .fleet/etcd)"
    )
    etcd.add_argument(
        "--port", type=int, default=None, help="client port (default 2379 if free, else any)"
    )
    reset = sub.add_parser(
        "reset", help="discard the local etcd data (.fleet/etcd); refuses while it is in use"
    )
    reset.add_argument(
        "--data-dir", default=".fleet/etcd", metavar="DIR", help="etcd data (default .fleet/etcd)"
    )
    reset.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    resize_cmd.add_parser(sub, _common)
    _supervisord_parsers(sub)
    return parser


def _host_id_flag(p: argparse.ArgumentParser, text: str | None = None) -> None:
    p.add_argument(
        "--host-id",
        dest="host_id",
        metavar="ID",
        help=text
        or "host part of member ids: slot i is <ID>-<i> (env FLEET_HOST_ID, "
        "default the host name)",
    )


def _supervisord_parsers(sub: Any) -> None:
    conf = sub.add_parser(
        "supervisord-conf", help="render supervisord.conf.tmpl for N workers on this host"
    )
    _common(conf)
    flags = argparse.ArgumentParser(add_help=False)
    _worker_flags(flags)
    for action in flags._actions:  # every worker flag but --id (ids are <host id>-<slot>)
        if "--id" not in action.option_strings:
            conf._add_action(action)
    _host_id_flag(conf)
    conf.add_argument(
        "--workers", metavar="N", help="number of worker programs (env FLEET_WORKERS, default 1)"
    )
    conf.add_argument(
        "--run-dir",
        dest="run_dir",
        metavar="DIR",
        default=".fleet/supervisord",
        help="supervisord's socket, pidfile and logs (created 0700; default .fleet/supervisord)",
    )
    conf.add_argument("--user", metavar="USER", help="run the programs as this user")
    conf.add_argument(
        "--template", metavar="FILE", help="template (default supervisord.conf.tmpl of fleet)"
    )
    conf.add_argument(
        "-o", "--output", metavar="FILE", help="write here (mode 0600) instead of stdout"
    )
    listener = sub.add_parser(
        "supervisord-listener",
        help="supervisord event listener: kill and revoke ended workers at once",
    )
    _common(listener)
    _log_level_flag(listener)
    _host_id_flag(listener)


# What `fleet up` passes on to each `fleet worker` it spawns, when given on its command line
# (the environment and --config are inherited as they are).
WORKER_KEYS = (
    "name",
    "prefix",
    "log_format",
    "log_level",
    "segments",
    "handler",
    "interval",
    "lease_ttl",
    "weight",
    "graceful_timeout",
    "handler_timeout",
    "concurrency",
    "settle",
)
CONFIG_KEYS = (
    "etcd",
    "id",
    "host_id",
    *WORKER_KEYS,
    "workers",
    "heartbeat_timeout",
    "startup_timeout",
    "max_rss_mb",
)


def load_config(args: argparse.Namespace) -> config_mod.Config:
    """The Config of a command: its flags (None = not given) over env, file, defaults."""
    values = {k: getattr(args, k) for k in CONFIG_KEYS if hasattr(args, k)}
    return config_mod.load(values, os.environ, args.config)

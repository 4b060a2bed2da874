"""The `fleet` command line: parse, load the config, hand over. No logic lives here.

Errors a user can cause end as one line on stderr and the exit codes of DESIGN.md:
2 for usage and configuration, 3 for an etcd that cannot be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from fleet import config as config_mod
from fleet import logs, resize_cmd
from fleet.proc import set_parent_death_signal
from fleet.supervise.control import ControlError, RunDir, request
from fleet.supervise.rundir import with_local_etcd

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


def _worker_flags(p: argparse.ArgumentParser, *, supervised: bool = False) -> None:
    d = _DEFAULTS
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
    _host_id_flag(listener)


# What `fleet up` passes on to each `fleet worker` it spawns, when given on its command line
# (the environment and --config are inherited as they are).
_WORKER_KEYS = (
    "name",
    "prefix",
    "log_format",
    "segments",
    "handler",
    "interval",
    "lease_ttl",
    "weight",
    "graceful_timeout",
    "handler_timeout",
    "settle",
)
_CONFIG_KEYS = (
    "etcd",
    "id",
    "host_id",
    *_WORKER_KEYS,
    "workers",
    "heartbeat_timeout",
    "startup_timeout",
    "max_rss_mb",
)


def _load(args: argparse.Namespace) -> config_mod.Config:
    values = {k: getattr(args, k) for k in _CONFIG_KEYS if hasattr(args, k)}
    return config_mod.load(values, os.environ, args.config)


def cmd_worker(args: argparse.Namespace) -> int:
    supervised = os.environ.get("FLEET_SUPERVISOR_PID", "")
    if supervised.isdigit():
        # First of all, before any import that may take a while: a supervisor that dies
        # from here on takes us with it, and one already gone is noticed now.
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != int(supervised):
            return EXIT_FAILURE
    # A worker killed as hung (SIGABRT) or asked with SIGUSR1 shows where every thread is.
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    from fleet.coord.etcd import EtcdError
    from fleet.coord.membership import DuplicateMember, SpecMismatch
    from fleet.handler import load_handler
    from fleet.work.worker import Worker

    cfg = _load(args)
    member_id = cfg.member_id or config_mod.member_id_default()
    logs.setup(member_id, cfg.log_format)
    if not cfg.etcd.endpoints:
        raise config_mod.ConfigError(
            "no etcd endpoint: pass --etcd URL, set FLEET_ETCD, or [etcd] endpoints"
        )
    handler = load_handler(cfg.handler)
    worker = Worker(cfg, handler, member_id, segments_explicit="segments" in cfg.explicit)
    code = EXIT_FAILURE
    try:
        code = worker.run()
    except (config_mod.ConfigError, SpecMismatch, DuplicateMember) as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except EtcdError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        code = EXIT_ETCD
    except BaseException:  # noqa: BLE001 - whatever escaped, leave through os._exit below
        logging.getLogger("fleet").exception("worker failed")
    finally:
        # Leave without the interpreter's teardown: handler threads that are still
        # running must not outlive the watchdog (it lives until this exit), and gRPC's
        # threads can hang an exit that nothing depends on any more.
        logging.shutdown()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def cmd_status(args: argparse.Namespace) -> int:
    from fleet.coord.etcd import connect
    from fleet.coord.keys import Keys
    from fleet.coord.status import collect, render

    cfg = with_local_etcd(_load(args))
    etcd = connect(cfg.etcd)
    try:
        status = collect(etcd, Keys(cfg.etcd.prefix, cfg.name))
    finally:
        etcd.close()
    print(json.dumps(status, indent=2) if args.json else render(status))
    return EXIT_OK


def cmd_resize(args: argparse.Namespace) -> int:
    return resize_cmd.run(args, _load(args))


def cmd_up(args: argparse.Namespace) -> int:
    from fleet.handler import check_handler_module
    from fleet.supervise.supervisor import Supervisor

    cfg = _load(args)
    logs.setup("fleet", cfg.log_format)
    check_handler_module(cfg.handler)  # a typo is a config error now, not a FATAL slot later
    flags: list[str] = []
    if args.config:
        flags += ["--config", str(Path(args.config).resolve())]
    for key in _WORKER_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            flags += ["--" + key.replace("_", "-"), str(value)]
    return Supervisor(cfg, flags, RunDir()).run()


def cmd_ps(args: argparse.Namespace) -> int:
    answer = request(RunDir(), {"cmd": "ps"})
    if args.json:
        print(json.dumps(answer["slots"], indent=2))
        return EXIT_OK
    print(f"fleet up pid {answer['pid']}, {answer['workers']} workers")
    server = answer.get("etcd_server")
    if server and server.get("fleet_etcd_pid"):  # a `fleet etcd` fleet up uses, not keeps
        print(
            f"etcd  pid {server['pid'] or '-'} {server['state']} at {server['endpoint']} "
            f"(fleet etcd pid {server['fleet_etcd_pid']}; fleet up does not restart or stop it)"
        )
    elif server:  # the embedded etcd `fleet up` supervises (absent for an external cluster)
        last = f", last exit {server['last_exit']}" if server.get("last_exit") else ""
        print(
            f"etcd  pid {server['pid'] or '-'} {server['state']} at {server['endpoint']}, "
            f"restarts {server['restarts']}{last}"
        )
    print(
        f"{'SLOT':<5} {'MEMBER':<24} {'STATE':<9} {'PID':>7} {'UPTIME':>8} {'RESTARTS':>8} "
        f"{'HB AGE':>6} {'RSS MB':>7} {'OWNED':>5} {'FAILING':>7} {'OLDEST':>6}  LAST EXIT"
    )
    for row in answer["slots"]:

        def show(value: object, fmt: str = "") -> str:
            return "-" if value is None else format(value, fmt)

        print(
            f"{row['slot']:<5} {row['member']:<24} {row['state']:<9} {show(row['pid']):>7} "
            f"{show(row['uptime'], '.1f'):>8} {row['restarts']:>8} "
            f"{show(row['heartbeat_age'], '.1f'):>6} {show(row['rss_mb'], '.0f'):>7} "
            f"{show(row.get('owned')):>5} {show(row.get('failing')):>7} "
            f"{show(row.get('oldest_call')):>6}  {row['last_exit'] or ''}"
        )
    _print_failing_slots(answer["slots"])
    return EXIT_OK


def _print_failing_slots(rows: list[dict[str, Any]]) -> None:
    """Under the ps table, one line per failing segment the heartbeats listed."""
    from fleet.coord.health import Failing, failing_lines

    for row in rows:
        entries = row.get("failing_segments") or []
        listed = [f for f in (Failing.from_json(e) for e in entries) if f is not None]
        failing = row.get("failing")
        count = failing if isinstance(failing, int) else len(listed)
        for line in failing_lines(f"w{row['slot']}", listed, count):
            print(line)


# How long `fleet scale` / `fleet restart` wait at most (a rolling restart of many slots
# waits for each new worker to own its share).
WAIT_LIMIT = 3600.0


def cmd_scale(args: argparse.Namespace) -> int:
    from fleet.supervise.waiting import wait_scaled

    text = str(args.workers)
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise UsageError(f"scale: workers = {text!r}: expected an integer from 1 to 1024")
    run_dir = RunDir()
    before = len(request(run_dir, {"cmd": "ps"})["slots"])
    request(run_dir, {"cmd": "scale", "workers": int(text)})
    print(f"scaling {before} -> {int(text)} workers", flush=True)
    if args.no_wait:
        return EXIT_OK
    return wait_scaled(run_dir, int(text), sys.stdout, WAIT_LIMIT)


def cmd_restart(args: argparse.Namespace) -> int:
    from fleet.supervise.waiting import wait_restarted

    slot = args.slot
    if slot is not None and not str(slot).isdigit():
        raise UsageError(f"restart: --slot {slot!r}: expected a slot number")
    run_dir = RunDir()
    rows = request(run_dir, {"cmd": "ps"})["slots"]
    target = int(slot) if slot is not None else None
    request(run_dir, {"cmd": "restart", "slot": target})
    chosen = [r for r in rows if target is None or r["slot"] == target]
    print(f"rolling restart of {len(chosen)} slot(s), one at a time", flush=True)
    if args.no_wait:
        return EXIT_OK
    return wait_restarted(run_dir, chosen, sys.stdout, WAIT_LIMIT)


def cmd_down(args: argparse.Namespace) -> int:
    run_dir = RunDir()
    if run_dir.running_pid() is None:
        # Idempotent, like `docker compose down`: nothing to stop is not an error.
        print(f"nothing running in {run_dir.root.resolve().parent}")
        return EXIT_OK
    started = time.monotonic()
    pid = request(run_dir, {"cmd": "down"})["pid"]
    print(f"stopping fleet up (pid {pid})", flush=True)
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    print(f"stopped in {time.monotonic() - started:.1f} s")
    return EXIT_OK


def cmd_etcd(args: argparse.Namespace) -> int:
    from fleet.server.foreground import run_foreground

    return run_foreground(Path(args.data_dir), port=args.port)


def cmd_reset(args: argparse.Namespace) -> int:
    from fleet.server.reset import ResetRefused, reset

    try:
        return reset(Path(args.data_dir), yes=args.yes)
    except ResetRefused as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cmd_supervisord_conf(args: argparse.Namespace) -> int:
    from fleet.supervise import supervisord

    cfg = _load(args)
    config = str(Path(args.config).resolve()) if args.config else None
    if config is None and Path("fleet.toml").is_file():
        config = str(Path("fleet.toml").resolve())  # what the workers would find by themselves
    from_file = config_mod.load({}, {}, config)
    if not cfg.etcd.endpoints:
        raise config_mod.ConfigError(
            "no etcd endpoint: pass --etcd URL, set FLEET_ETCD, or [etcd] endpoints"
        )
    shared: list[str] = ["--config", config] if config else []
    if args.etcd is not None or not from_file.etcd.endpoints:
        shared += ["--etcd", ",".join(cfg.etcd.endpoints)]  # not only in this shell's env
    for key in ("name", "prefix", "log_format"):
        if getattr(args, key) is not None:
            shared += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    worker = list(shared)
    for key in _WORKER_KEYS:
        value = getattr(args, key, None)
        if value is not None and key not in ("name", "prefix", "log_format"):
            worker += ["--" + key.replace("_", "-"), str(value)]
    run_dir = Path(args.run_dir).absolute()
    template = Path(args.template) if args.template else supervisord.default_template()
    try:
        text = template.read_text(encoding="utf-8")
    except OSError as exc:
        raise config_mod.ConfigError(
            f"--template {str(template)!r}: cannot read it ({exc.strerror}); pass --template FILE"
        ) from None
    plan = supervisord.Plan(
        workers=cfg.supervisor.workers,
        host_id=cfg.host_id,
        python=os.path.abspath(sys.executable),
        run_dir=run_dir,
        directory=Path.cwd(),
        worker_flags=tuple(worker),
        listener_flags=tuple(shared),
        graceful_timeout=cfg.graceful_timeout,
        etcd_timeout=cfg.etcd.timeout,
        user=args.user,
    )
    rendered = supervisord.render(
        plan, text, path=str(template), secrets=[cfg.etcd.password or ""]
    )
    try:
        for part in reversed([run_dir, *run_dir.parents]):  # every new one 0700
            if not part.exists():
                part.mkdir(mode=0o700)
    except OSError as exc:
        raise config_mod.ConfigError(
            f"--run-dir {str(run_dir)!r}: cannot create it ({exc.strerror})"
        ) from None
    if args.output:
        supervisord.write(rendered, Path(args.output))
    else:
        sys.stdout.write(rendered)
    return EXIT_OK


def cmd_supervisord_listener(args: argparse.Namespace) -> int:
    from fleet.coord.etcd import connect
    from fleet.coord.keys import Keys
    from fleet.supervise import listener

    out = listener.protocol_stdout()  # before anything can print: stdout is the protocol
    cfg = _load(args)
    logs.setup("fleet-monitor", cfg.log_format)
    if not cfg.etcd.endpoints:
        raise config_mod.ConfigError(
            "no etcd endpoint: pass --etcd URL, set FLEET_ETCD, or [etcd] endpoints"
        )
    revocations = listener.Revocations(
        lambda: connect(cfg.etcd), Keys(cfg.etcd.prefix, cfg.name)
    )
    def exited(slot: int, pid: int) -> None:
        listener.ended(slot, pid, "exit", cfg.host_id, revocations)

    watch = listener.ExitWatch(exited, listener.rpc_interface())
    watch.track_all()
    try:
        return listener.serve(cfg.host_id, revocations, sys.stdin, out, watch)
    finally:
        revocations.close()


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "worker": cmd_worker,
    "status": cmd_status,
    "resize": cmd_resize,
    "up": cmd_up,
    "ps": cmd_ps,
    "scale": cmd_scale,
    "restart": cmd_restart,
    "down": cmd_down,
    "etcd": cmd_etcd,
    "reset": cmd_reset,
    "supervisord-conf": cmd_supervisord_conf,
    "supervisord-listener": cmd_supervisord_listener,
}


def main(argv: Sequence[str] | None = None) -> int:
    from fleet.coord.etcd import EtcdError
    from fleet.coord.membership import DuplicateMember, SpecMismatch
    from fleet.handler import HandlerImportError
    from fleet.server.embedded import EtcdBinaryNotFound, EtcdStartError
    from fleet.supervise.supervisor import AlreadyRunning

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return EXIT_USAGE
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (
        ControlError,
        AlreadyRunning,
        config_mod.ConfigError,
        HandlerImportError,
        SpecMismatch,
        DuplicateMember,
        EtcdBinaryNotFound,
        EtcdStartError,
    ) as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EtcdError as exc:  # EtcdUnavailable included: the message names the endpoints
        print(f"fleet: {exc}", file=sys.stderr)
        return EXIT_ETCD
    except KeyboardInterrupt:
        return 130

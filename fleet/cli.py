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
from collections.abc import Callable, Sequence
from pathlib import Path

from fleet import config as config_mod
from fleet import logs, resize_cmd
from fleet.cliparser import (
    EXIT_ETCD,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    WORKER_KEYS,
    UsageError,
    build_parser,
    load_config,
)
from fleet.control_cmd import cmd_down, cmd_ps, cmd_restart, cmd_scale
from fleet.proc import set_parent_death_signal
from fleet.supervise.control import ControlError, RunDir
from fleet.supervise.rundir import with_local_etcd
from fleet.supervisord_cmd import cmd_supervisord_conf, cmd_supervisord_listener

__all__ = [  # what others import from here (the entry point, tests, resize_cmd)
    "COMMANDS",
    "EXIT_ETCD",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "main",
]


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

    cfg = load_config(args)
    member_id = cfg.member_id or config_mod.member_id_default()
    logs.setup(member_id, cfg.log_format, cfg.log_level)
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

    cfg = with_local_etcd(load_config(args))
    etcd = connect(cfg.etcd)
    try:
        status = collect(etcd, Keys(cfg.etcd.prefix, cfg.name))
    finally:
        etcd.close()
    print(json.dumps(status, indent=2) if args.json else render(status))
    return EXIT_OK


def cmd_resize(args: argparse.Namespace) -> int:
    return resize_cmd.run(args, load_config(args))


def cmd_up(args: argparse.Namespace) -> int:
    from fleet.handler import check_handler_module
    from fleet.supervise.supervisor import Supervisor

    cfg = load_config(args)
    logs.setup("fleet", cfg.log_format, cfg.log_level)
    check_handler_module(cfg.handler)  # a typo is a config error now, not a FATAL slot later
    flags: list[str] = []
    if args.config:
        flags += ["--config", str(Path(args.config).resolve())]
    for key in WORKER_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            flags += ["--" + key.replace("_", "-"), str(value)]
    return Supervisor(cfg, flags, RunDir()).run()


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

"""`fleet supervisord-conf` and `fleet supervisord-listener`: fleet under supervisord
instead of `fleet up` (the rendering and the listener protocol: `fleet.supervise`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fleet import config as config_mod
from fleet import logs
from fleet.cliparser import EXIT_OK, WORKER_KEYS, load_config


def cmd_supervisord_conf(args: argparse.Namespace) -> int:
    from fleet.supervise import supervisord

    cfg = load_config(args)
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
    for key in ("name", "prefix", "log_format", "log_level"):
        if getattr(args, key) is not None:
            shared += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    worker = list(shared)
    for key in WORKER_KEYS:
        value = getattr(args, key, None)
        if value is not None and key not in ("name", "prefix", "log_format", "log_level"):
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
    cfg = load_config(args)
    logs.setup("fleet-monitor", cfg.log_format, cfg.log_level)
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

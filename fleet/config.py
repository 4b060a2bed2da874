"""Configuration: defaults < TOML file < ``FLEET_*`` environment < command line, one frozen value.

Every other module reads settings only from the :class:`Config` that :func:`load` returns, so
each value is parsed, checked and explained to the user in exactly one place, and a bad value
stops the process at start-up (exit 2) instead of deep inside a worker. Defaults live only in
the dataclasses; parsing and checking rules live only in the ``KEYS`` table of
:mod:`fleet.configkeys`. No logging, no etcd: reading the TOML file is the only I/O, so all
of this is cheap to test.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet.configkeys import BY_CLI, BY_LABEL, KEYS, PAIRS, TLS, Bad, Key


class ConfigError(Exception):
    """str(exc) is the one-line message shown to the user (exit code 2)."""


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd. ``endpoints == ()`` means "not configured" (``fleet up`` then
    starts an embedded etcd). Paths are kept as given, relative to the working directory."""

    endpoints: tuple[str, ...] = ()
    prefix: str = "/fleet"
    user: str | None = None
    password: str | None = field(default=None, repr=False)  # kept out of logs and tracebacks
    # Where `password` was read from (once, by `load`), if it came from a file.
    password_file: str | None = None
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    timeout: float = 3.0
    # The leader compacts etcd history every `compact_interval` seconds (0 = never), keeping
    # the last `compact_window` seconds so that broken watches can resume (DESIGN.md).
    compact_interval: float = 300.0
    compact_window: float = 600.0


@dataclass(frozen=True)
class SupervisorSettings:
    """`fleet up`: how many workers, and when a worker counts as unhealthy."""

    workers: int = 1
    heartbeat_timeout: float = 30.0  # a READY child silent this long is killed
    startup_timeout: float = 60.0  # a child not READY this long after spawn is killed
    max_rss_mb: int = 0  # recycle a child above this resident size; 0 = no limit


@dataclass(frozen=True)
class Config:
    """Everything a fleet process needs to know; see DESIGN.md for what each value drives."""

    etcd: EtcdSettings
    supervisor: SupervisorSettings = field(default_factory=SupervisorSettings)
    name: str = "default"
    segments: int = 64
    handler: str = "fleet.demo:handle"
    interval: float = 1.0
    lease_ttl: int = 10
    member_id: str | None = None
    weight: float = 1.0
    log_format: str = "text"
    log_level: str = "info"  # debug shows every call; info is the lifecycle (issue 9)
    # Each worker logs one line of its calls (count, errors, p99) this often. 0 = never.
    summary_interval: float = 60.0
    settle: float = 0.05
    graceful_timeout: float = 30.0
    # A user call (handle, on_acquire, on_release) running longer than this is a hang:
    # the worker dumps every stack and exits so its supervisor replaces it. 0 = off.
    handler_timeout: float = 0.0
    # At most this many user calls run at once in one worker (its call threads), however
    # many segments it owns. 16: handlers are mostly I/O-bound polling, so at the demo's
    # 1 s interval 16 threads carry hundreds of segments; raise it for slow calls.
    concurrency: int = 16
    # The host part of supervised member ids: slot i of this host is `<host_id>-<i>`, so
    # ids stay unique across hosts and a restarted slot keeps its id (issue 8).
    host_id: str = field(default_factory=socket.gethostname)
    # Names of the keys some layer set explicitly (not defaulted): a worker told
    # `segments` on purpose refuses a fleet with another count; one left at the
    # default takes the fleet's.
    explicit: frozenset[str] = field(default=frozenset(), compare=False)


def member_id_default() -> str:
    """The id a worker uses when none is configured: unique per live process on a host."""
    return f"{socket.gethostname()}-{os.getpid()}"


def directory_host_id(host: str, directory: str) -> str:
    """`<host>-<4 hex of sha1(directory)>`: the default id prefix of `fleet up`'s workers.

    Two `fleet up` on one host (in two directories) must not both call their slot 0
    `<host>-0`: sharing one etcd, the second would wait on the first's member keys and
    then refuse them as live duplicates. The directory's hash tells them apart and is the
    same on every restart there, so a restarted fleet (and a respawned slot) keeps its
    ids. The host part is cut so that `<prefix>-<slot>` stays a valid 128-character id.
    """
    digest = hashlib.sha1(directory.encode("utf-8", "surrogateescape")).hexdigest()[:4]
    return f"{host[:115]}-{digest}"


def supervised_id_prefix(config: Config, directory: str) -> str:
    """What `fleet up` in `directory` names its workers before `-<slot>`: `--id`/FLEET_ID,
    else an explicit `host_id`, else `directory_host_id(hostname, directory)`.

    `host_id` itself keeps defaulting to the host name: the supervisord template and
    listener use it, and there is one supervisord per host.
    """
    if config.member_id:
        return config.member_id
    if "host_id" in config.explicit:
        return config.host_id
    return directory_host_id(config.host_id, directory)


# Tables of the TOML file and the dataclass that holds each one. None = reserved name:
# accepted as an empty table so files written for a later version fail loudly, not silently.
# Adding a section = a frozen dataclass here, a field on Config, and rows in
# fleet.configkeys.KEYS.
_SECTIONS: dict[str, type[Any] | None] = {
    "etcd": EtcdSettings,
    "supervisor": SupervisorSettings,
}


_Found = dict[Key, tuple[object, str]]  # key -> (checked value, source it came from)


def _message(key: Key, value: object, source: str, expect: str) -> str:
    shown = "<hidden>" if key.secret else repr(value)
    return f"{key.label} = {shown} (from {source}): expected {expect}"


def _check(key: Key, raw: object, source: str, text: bool) -> tuple[object, str]:
    try:
        return key.kind.parse(raw, text), source
    except Bad as bad:
        shown = bad.args[0] if bad.args else raw
        raise ConfigError(_message(key, shown, source, key.kind.expect)) from None


def _unknown(section: str, name: str, path: str) -> ConfigError:
    names = [k.name for k in KEYS if k.section == section]
    if section:
        where, accepted = f"[{section}] of {path}", f"accepted keys in [{section}]"
    else:
        where, accepted = path, "accepted top-level keys"
        names += [f"[{s}]" for s in _SECTIONS]
    return ConfigError(
        f"unknown key {name!r} in {where}; {accepted}: {', '.join(names) or '(none yet)'}"
    )


def _read_file(path: str) -> _Found:
    """Parse and check the TOML file; every key must be known, in every table."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {' '.join(str(exc).split())}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    found: _Found = {}
    for name, raw in data.items():
        if name not in _SECTIONS:
            items, section = {name: raw}, ""
        elif isinstance(raw, dict):
            items, section = raw, name
        else:
            raise ConfigError(f"{name} = {raw!r} (from {path}): expected a table [{name}]")
        for sub, value in items.items():
            key = BY_LABEL.get(f"{section}.{sub}" if section else sub)
            if key is None:
                raise _unknown(section, sub, path)
            found[key] = _check(key, value, path, text=False)
    return found


def _read_password_file(found: _Found) -> None:
    """`etcd.password_file` -> `etcd.password`, read once here: a process never rereads it,
    and the secret travels only in memory (never on a command line). One line of error
    naming the file (never its contents) if it cannot be used."""
    pf, pw = BY_LABEL["etcd.password_file"], BY_LABEL["etcd.password"]
    if pf not in found:
        return
    path, source = found[pf]
    assert isinstance(path, str)
    if pw in found:
        raise ConfigError(
            f"etcd.password_file = {path!r} (from {source}) and etcd.password "
            f"(from {found[pw][1]}) are both set: give one of them"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(65537)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(
            f"etcd.password_file = {path!r} (from {source}): cannot read it: {reason}"
        ) from None
    secret = text.rstrip("\r\n")
    if not secret or len(text) > 65536 or "\n" in secret:
        raise ConfigError(
            f"etcd.password_file = {path!r} (from {source}): expected one non-empty line "
            "holding the password"
        )
    found[pw] = (secret, path)


def _cross_check(found: _Found) -> None:
    """Cross-key rules: credentials and client cert come in pairs; TLS implies https."""
    _read_password_file(found)
    for a, b in PAIRS:
        for have, lack in ((a, b), (b, a)):
            if BY_LABEL[have] in found and BY_LABEL[lack] not in found:
                value, source = found[BY_LABEL[have]]
                raise ConfigError(
                    _message(
                        BY_LABEL[have],
                        value,
                        source,
                        f"{lack} to be set too ({a} and {b}: both or neither)",
                    )
                )
    key = BY_LABEL["etcd.endpoints"]
    if key not in found:
        return
    raw, source = found[key]
    assert isinstance(raw, tuple)
    tls = any(BY_LABEL[t] in found for t in TLS)
    out: list[str] = []
    for ep in raw:
        if "://" not in ep:
            ep = ("https://" if tls else "http://") + ep
        elif tls and ep.startswith("http://"):
            raise ConfigError(
                _message(
                    key,
                    ep,
                    source,
                    "an https:// endpoint, since TLS is "
                    "configured (etcd.ca_cert / etcd.cert / etcd.key)",
                )
            )
        if ep not in out:
            out.append(ep)
    found[key] = (tuple(out), source)


def load(
    cli: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    path: str | None = None,
    *,
    default_path: str = "fleet.toml",
) -> Config:
    """Build the Config: defaults < TOML file < FLEET_* env < ``cli`` (None values = not given).

    ``env`` None means ``os.environ``; empty env values count as unset. ``path`` None means
    ``default_path`` if that file exists in the working directory, else no file. Every value
    given is checked, even one a later layer overrides: a broken file is an error, not a
    latent one. Raises ConfigError (one line) for bad input, KeyError for an unknown cli key.
    """
    cli = dict(cli or {})
    if unknown := [name for name in cli if name not in BY_CLI]:
        raise KeyError(f"unknown cli config key(s) {unknown}; known: {', '.join(BY_CLI)}")
    env = os.environ if env is None else env
    if path is None and os.path.isfile(default_path):
        path = default_path
    found = _read_file(path) if path is not None else {}
    for key in KEYS:
        if key.env and env.get(key.env):
            found[key] = _check(key, env[key.env], key.env, text=True)
    for name, raw in cli.items():
        if raw is not None:
            key = BY_CLI[name]
            flag = "--" + name.replace("_", "-")
            found[key] = _check(key, raw, flag, text=isinstance(raw, str))
    _cross_check(found)
    sections: dict[str, dict[str, Any]] = {"": {}, **{s: {} for s in _SECTIONS}}
    for key, (value, _) in found.items():
        sections[key.section][key.attr or key.name] = value
    top = sections.pop("")
    top["explicit"] = frozenset(key.name for key in found)
    for name, cls in _SECTIONS.items():
        if cls is not None:
            top[name] = cls(**sections[name])
    return Config(**top)

"""The table of configuration keys: for each, where it lives (TOML table, env variable,
CLI key) and how its value is parsed and checked, with the validators that table uses.

Kept apart from `fleet.config` (dataclasses, defaults, the layered loading) so that a rule
for one value is found, and changed, in one row here; `fleet.config.load` applies them.
Pure: no I/O, no imports from the rest of fleet but the segment limit.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from typing import NamedTuple

from fleet.coord.spec import MAX_SEGMENTS


class Bad(Exception):
    """A value failed its check. args[0], if given, is the part of the value to show."""


class Kind(NamedTuple):
    """How to read one kind of value. parse(raw, text): text=True when raw is an env/CLI string
    to coerce; False when it came typed (TOML) and must already have the right type."""

    parse: Callable[[object, bool], object]
    expect: str  # completes "expected ..." in error messages


_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _number(lo: int, hi: int, what: str, *, integer: bool = False, above: bool = False) -> Kind:
    """Finite numbers in [lo, hi], or (lo, hi] if ``above``: never NaN, infinity or a bool.
    Text must be a plain decimal ("1_000", "0x10", " 5" are refused, as int() would take them);
    an integer key refuses floats, even 1.0, while a float key takes integers."""
    pattern = _INT_TEXT if integer else _FLOAT_TEXT

    def parse(raw: object, text: bool) -> object:
        try:
            if text and isinstance(raw, str) and pattern.fullmatch(raw):
                raw = int(raw) if integer else float(raw)
            if isinstance(raw, bool) or not isinstance(raw, int if integer else int | float):
                raise Bad
            value = raw if integer else float(raw)
            if not math.isfinite(value) or not lo <= value <= hi or (above and value == lo):
                raise Bad
        except (ValueError, OverflowError):  # more digits than int()/float() will convert
            raise Bad from None
        return value

    rng = f"greater than {lo} and at most {hi}" if above else f"from {lo} to {hi}"
    return Kind(parse, f"{what} {rng}")


def _text(pattern: str, expect: str) -> Kind:
    """Strings matching ``pattern`` in full; used as given (no stripping, no case folding)."""
    rx = re.compile(pattern)

    def parse(raw: object, text: bool) -> object:
        if not isinstance(raw, str) or not rx.fullmatch(raw):
            raise Bad
        return raw

    return Kind(parse, expect)


# Only the form of a handler is checked here; importing it is the worker's job at start-up.
_DOTTED = r"[^\W\d]\w*(?:\.[^\W\d]\w*)*"  # dotted Python identifiers
_HANDLER = _text(rf"{_DOTTED}:{_DOTTED}", "'module.path:attr' (dotted Python identifiers)")
_ENDPOINT = re.compile(
    r"(?:(?P<scheme>[A-Za-z]+)://)?(?P<host>\[[^]/]*]|[^:/[\]]+):(?P<port>[0-9]{1,5})"
)
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def _endpoint(item: object) -> str:
    """One endpoint -> "scheme://host:port", or "host:port" when no scheme was written
    (the scheme then depends on whether TLS is configured; see fleet.config's _cross_check)."""
    m = _ENDPOINT.fullmatch(item.strip()) if isinstance(item, str) else None
    if m is None or not 1 <= int(m["port"]) <= 65535:
        raise Bad(item)
    scheme, host = (m["scheme"] or "").lower(), m["host"]
    try:
        if host.startswith("["):
            host = f"[{ipaddress.IPv6Address(host[1:-1])}]"
        elif re.fullmatch(r"[0-9.]+", host):
            host = str(ipaddress.IPv4Address(host))
        elif len(host) <= 253 and _HOSTNAME.fullmatch(host):
            host = host.lower()
        else:
            raise ValueError(host)
    except ValueError:
        raise Bad(item) from None
    if scheme not in ("", "http", "https"):
        raise Bad(item)
    return f"{scheme}://{host}:{int(m['port'])}" if scheme else f"{host}:{int(m['port'])}"


def _parse_endpoints(raw: object, text: bool) -> object:
    """A list of strings or one comma-separated string; a blank string means none."""
    if isinstance(raw, str):
        raw = raw.split(",") if raw.strip() else []
    if not isinstance(raw, list | tuple):
        raise Bad
    return tuple(_endpoint(item) for item in raw)


_ENDPOINTS = Kind(
    _parse_endpoints,
    "host:port, http://host:port or https://host:port (host: "
    "name, IPv4 or [IPv6]; port 1-65535), as a list or one comma-separated string",
)
_NONEMPTY = _text(r"(?s).+", "a non-empty string")
_SECS = "a number of seconds"


class Key(NamedTuple):
    """One setting: where it lives in the file, its env variable, its CLI key, its rules."""

    name: str  # key inside its TOML table
    section: str  # "" for the top level, else a name in fleet.config._SECTIONS
    kind: Kind
    env: str | None = None
    cli: str | None = None  # key in load()'s ``cli`` mapping
    attr: str = ""  # dataclass field, if it differs from name
    secret: bool = False  # never echo the value in messages

    @property
    def label(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name


KEYS: tuple[Key, ...] = (
    Key(
        "name",
        "",
        _text(r"[A-Za-z0-9._-]{1,64}", "1-64 characters of A-Z a-z 0-9 . _ -"),
        "FLEET_NAME",
        "name",
    ),
    Key(
        "segments",
        "",
        _number(1, MAX_SEGMENTS, "an integer", integer=True),
        "FLEET_SEGMENTS",
        "segments",
    ),
    Key("handler", "", _HANDLER, "FLEET_HANDLER", "handler"),
    Key("interval", "", _number(0, 86400, _SECS), "FLEET_INTERVAL", "interval"),
    Key(
        "lease_ttl",
        "",
        _number(2, 3600, "an integer number of seconds", integer=True),
        "FLEET_LEASE_TTL",
        "lease_ttl",
    ),
    Key(
        "id",
        "",
        _text(r"[A-Za-z0-9._@:-]{1,128}", "1-128 characters of A-Z a-z 0-9 . _ @ : -"),
        "FLEET_ID",
        "id",
        attr="member_id",
    ),
    Key(
        "host_id",
        "",
        _text(r"[A-Za-z0-9._@:-]{1,120}", "1-120 characters of A-Z a-z 0-9 . _ @ : -"),
        "FLEET_HOST_ID",
        "host_id",
    ),
    Key("weight", "", _number(0, 1000, "a number", above=True), "FLEET_WEIGHT", "weight"),
    Key(
        "log_format", "", _text(r"text|json", "'text' or 'json'"), "FLEET_LOG_FORMAT", "log_format"
    ),
    Key(
        "log_level",
        "",
        _text(r"debug|info|warning|error", "'debug', 'info', 'warning' or 'error'"),
        "FLEET_LOG_LEVEL",
        "log_level",
    ),
    Key(
        "summary_interval",
        "",
        _number(0, 86400, f"{_SECS} (0 = never)"),
        "FLEET_SUMMARY_INTERVAL",
    ),
    Key("settle", "", _number(0, 10, _SECS), cli="settle"),
    Key("graceful_timeout", "", _number(0, 3600, _SECS, above=True), cli="graceful_timeout"),
    Key(
        "handler_timeout",
        "",
        _number(0, 86400, f"{_SECS} (0 = off)"),
        "FLEET_HANDLER_TIMEOUT",
        "handler_timeout",
    ),
    Key(
        "concurrency",
        "",
        _number(1, 4096, "an integer", integer=True),
        "FLEET_CONCURRENCY",
        "concurrency",
    ),
    Key("endpoints", "etcd", _ENDPOINTS, "FLEET_ETCD", "etcd"),
    Key(
        "prefix",
        "etcd",
        _text(
            r"(?:/[^/\s]+)+",
            "'/' followed by a path without whitespace, "
            "empty parts or a trailing '/', e.g. '/fleet'",
        ),
        "FLEET_PREFIX",
        "prefix",
    ),
    Key("user", "etcd", _NONEMPTY, "FLEET_ETCD_USER"),
    Key("password", "etcd", _NONEMPTY, "FLEET_ETCD_PASSWORD", secret=True),
    Key("password_file", "etcd", _NONEMPTY, "FLEET_ETCD_PASSWORD_FILE"),
    Key("ca_cert", "etcd", _NONEMPTY, "FLEET_ETCD_CA_CERT"),
    Key("cert", "etcd", _NONEMPTY, "FLEET_ETCD_CERT"),
    Key("key", "etcd", _NONEMPTY, "FLEET_ETCD_KEY"),
    Key("timeout", "etcd", _number(0, 60, _SECS, above=True)),
    Key(
        "compact_interval",
        "etcd",
        _number(0, 86400, "a number of seconds (0 = never)"),
        "FLEET_ETCD_COMPACT_INTERVAL",
    ),
    Key(
        "compact_window",
        "etcd",
        _number(0, 7 * 86400, _SECS, above=True),
        "FLEET_ETCD_COMPACT_WINDOW",
    ),
    Key(
        "workers",
        "supervisor",
        _number(1, 1024, "an integer", integer=True),
        "FLEET_WORKERS",
        "workers",
    ),
    Key(
        "heartbeat_timeout",
        "supervisor",
        _number(0, 3600, _SECS, above=True),
        cli="heartbeat_timeout",
    ),
    Key(
        "startup_timeout", "supervisor", _number(0, 3600, _SECS, above=True), cli="startup_timeout"
    ),
    Key(
        "max_rss_mb",
        "supervisor",
        _number(0, 1_000_000, "an integer number of MiB (0 = no limit)", integer=True),
        cli="max_rss_mb",
    ),
)
BY_LABEL = {k.label: k for k in KEYS}
BY_CLI = {k.cli: k for k in KEYS if k.cli}
PAIRS = (("etcd.user", "etcd.password"), ("etcd.cert", "etcd.key"))
TLS = ("etcd.ca_cert", "etcd.cert", "etcd.key")

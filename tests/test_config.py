"""fleet.config: layering, validation messages, endpoints, credentials, TOML handling.

Env is always passed as an explicit dict (os.environ is never read or changed) and every
test runs in an empty temporary directory, so a stray ./fleet.toml cannot leak in.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fleet.config import Config, ConfigError, EtcdSettings, load, member_id_default


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "fleet.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error(**kwargs: Any) -> str:
    """The ConfigError message of load(**kwargs); env defaults to an empty dict."""
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# --- defaults and precedence -------------------------------------------------------------


def test_defaults() -> None:
    config = load(env={})
    assert config == Config(etcd=EtcdSettings())
    assert config.etcd.endpoints == () and config.member_id is None


def test_every_default_written_to_a_file_is_valid(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        name = "default"
        segments = 64
        handler = "fleet.demo:handle"
        interval = 1.0
        lease_ttl = 10
        weight = 1.0
        log_format = "text"
        settle = 0.05
        graceful_timeout = 30.0
        [etcd]
        endpoints = []
        prefix = "/fleet"
        timeout = 3.0
        [supervisor]
    """,
    )
    assert load(env={}, path=path) == Config(etcd=EtcdSettings())


# (toml line, [etcd] table?, env var, cli key, attribute path, file/env/cli raw, expected values)
LAYERS = [
    (
        "segments",
        False,
        "FLEET_SEGMENTS",
        "segments",
        "segments",
        ("10", "20", "30"),
        (10, 20, 30),
        64,
    ),
    ("name", False, "FLEET_NAME", "name", "name", ('"f"', "e", "c"), ("f", "e", "c"), "default"),
    (
        "handler",
        False,
        "FLEET_HANDLER",
        "handler",
        "handler",
        ('"a.b:f"', "c:d.e", "x_1:y"),
        ("a.b:f", "c:d.e", "x_1:y"),
        "fleet.demo:handle",
    ),
    (
        "interval",
        False,
        "FLEET_INTERVAL",
        "interval",
        "interval",
        ("2", "0.5", "0"),
        (2.0, 0.5, 0.0),
        1.0,
    ),
    (
        "lease_ttl",
        False,
        "FLEET_LEASE_TTL",
        "lease_ttl",
        "lease_ttl",
        ("5", "6", "7"),
        (5, 6, 7),
        10,
    ),
    (
        "id",
        False,
        "FLEET_ID",
        "id",
        "member_id",
        ('"f@h:1"', "e-2", "c.3"),
        ("f@h:1", "e-2", "c.3"),
        None,
    ),
    (
        "weight",
        False,
        "FLEET_WEIGHT",
        "weight",
        "weight",
        ("2.5", "3", "1e-3"),
        (2.5, 3.0, 0.001),
        1.0,
    ),
    (
        "log_format",
        False,
        "FLEET_LOG_FORMAT",
        "log_format",
        "log_format",
        ('"json"', "text", "json"),
        ("json", "text", "json"),
        "text",
    ),
    (
        "prefix",
        True,
        "FLEET_PREFIX",
        "prefix",
        "etcd.prefix",
        ('"/a"', "/b/c", "/d"),
        ("/a", "/b/c", "/d"),
        "/fleet",
    ),
    (
        "endpoints",
        True,
        "FLEET_ETCD",
        "etcd",
        "etcd.endpoints",
        ('["f:1"]', "e:2,e:3", "c:4"),
        (("http://f:1",), ("http://e:2", "http://e:3"), ("http://c:4",)),
        (),
    ),
]


def attr(config: Config, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize(
    ("key", "in_etcd", "env_var", "cli_key", "dotted", "raws", "values", "default"),
    LAYERS,
    ids=[row[0] for row in LAYERS],
)
def test_precedence_defaults_file_env_cli(
    tmp_path: Path,
    key: str,
    in_etcd: bool,
    env_var: str,
    cli_key: str,
    dotted: str,
    raws: tuple[str, str, str],
    values: tuple[object, object, object],
    default: object,
) -> None:
    text = f"[etcd]\n{key} = {raws[0]}\n" if in_etcd else f"{key} = {raws[0]}\n"
    path = write(tmp_path, text, "f.toml")  # not ./fleet.toml: no file unless path is given
    env, cli = {env_var: raws[1]}, {cli_key: raws[2]}
    assert attr(load(cli, env, path), dotted) == values[2]
    assert attr(load({cli_key: None}, env, path), dotted) == values[1]
    assert attr(load({}, {env_var: ""}, path), dotted) == values[0]
    assert attr(load(cli, {}, path), dotted) == values[2]
    assert attr(load(None, env), dotted) == values[1]
    assert attr(load(None, {}), dotted) == default


def test_file_only_keys_and_cli_only_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "settle = 1\ngraceful_timeout = 5\n[etcd]\ntimeout = 7\n")
    config = load(env={}, path=path)
    assert (config.settle, config.graceful_timeout, config.etcd.timeout) == (1.0, 5.0, 7.0)
    assert isinstance(config.settle, float) and isinstance(config.etcd.timeout, float)
    config = load({"settle": "0", "graceful_timeout": "0.5"}, {}, path)
    assert (config.settle, config.graceful_timeout) == (0.0, 0.5)


def test_only_known_fleet_env_vars_are_read() -> None:
    env = {"FLEET_WORKER_INDEX": "3", "FLEET_SETTLE": "nonsense", "FLEET_BOGUS": "x"}
    assert load(env=env) == Config(etcd=EtcdSettings())


def test_empty_env_values_are_unset() -> None:
    env = {
        name: ""
        for name in (
            "FLEET_ETCD",
            "FLEET_NAME",
            "FLEET_SEGMENTS",
            "FLEET_ID",
            "FLEET_ETCD_USER",
            "FLEET_ETCD_PASSWORD",
            "FLEET_PREFIX",
        )
    }
    assert load(env=env) == Config(etcd=EtcdSettings())


def test_etcd_settings_from_env() -> None:
    env = {
        "FLEET_ETCD_USER": "u",
        "FLEET_ETCD_PASSWORD": "p w",
        "FLEET_ETCD_CA_CERT": "ca.pem",
        "FLEET_ETCD_CERT": "c.pem",
        "FLEET_ETCD_KEY": "k.pem",
        "FLEET_ETCD": "h:2379",
    }
    assert load(env=env).etcd == EtcdSettings(
        endpoints=("https://h:2379",),
        user="u",
        password="p w",
        ca_cert="ca.pem",
        cert="c.pem",
        key="k.pem",
    )


def test_unknown_cli_key_is_a_programming_error() -> None:
    with pytest.raises(KeyError, match="bogus"):
        load({"bogus": "1"}, {})
    with pytest.raises(KeyError):
        load({"password": "x"}, {})  # secrets are never taken from the command line


def test_non_string_cli_values_are_checked_like_typed_values() -> None:
    config = load({"segments": 5, "interval": 2, "etcd": ["a:1", "b:2"]}, {})
    assert (config.segments, config.interval) == (5, 2.0)
    assert config.etcd.endpoints == ("http://a:1", "http://b:2")
    assert error(cli={"segments": True}) == (
        "segments = True (from --segments): expected an integer from 1 to 100000"
    )


def test_config_is_frozen() -> None:
    config = load(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.segments = 3  # type: ignore[misc]


def test_member_id_default() -> None:
    assert member_id_default() == f"{socket.gethostname()}-{os.getpid()}"


# --- files ---------------------------------------------------------------------------------


def test_default_path_in_cwd_is_used(tmp_path: Path) -> None:
    write(tmp_path, "segments = 7\n")
    assert load(env={}).segments == 7
    write(tmp_path, "segments = 8\n", "other.toml")
    assert load(env={}, default_path="other.toml").segments == 8
    assert load(env={}, path="other.toml").segments == 8
    assert load(env={}, default_path="absent.toml").segments == 64


def test_missing_explicit_file(tmp_path: Path) -> None:
    assert error(path="nope.toml") == "config file not found: nope.toml"


def test_bad_toml_names_file_and_parser_message(tmp_path: Path) -> None:
    path = write(tmp_path, "segments = \nname = 'x'\n")
    assert error(path=path) == f"{path} is not valid TOML: Invalid value (at line 1, column 12)"


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "bin.toml").write_bytes(b"name = '\xff'\n")
    assert error(path="bin.toml").startswith("cannot read config file bin.toml: ")
    assert error(path=str(tmp_path)).startswith(f"cannot read config file {tmp_path}: ")


TOP_KEYS = (
    "name, segments, handler, interval, lease_ttl, id, host_id, weight, log_format, log_level, "
    "summary_interval, settle, "
    "graceful_timeout, handler_timeout, concurrency, [etcd], [supervisor]"
)
ETCD_KEYS = (
    "endpoints, prefix, user, password, password_file, ca_cert, cert, key, timeout, "
    "compact_interval, compact_window"
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("segmets = 3", f"unknown key 'segmets' in f.toml; accepted top-level keys: {TOP_KEYS}"),
        (
            "[etcd]\nendpoint = 'a:1'",
            f"unknown key 'endpoint' in [etcd] of f.toml; accepted keys in [etcd]: {ETCD_KEYS}",
        ),
        (
            "[etcd.tls]\nca = 'x'",
            f"unknown key 'tls' in [etcd] of f.toml; accepted keys in [etcd]: {ETCD_KEYS}",
        ),
        (
            "[supervisor]\nwrokers = 4",
            "unknown key 'wrokers' in [supervisor] of f.toml; accepted keys in [supervisor]: "
            "workers, heartbeat_timeout, startup_timeout, max_rss_mb",
        ),
        (
            "[fleet]\nname = 'x'",
            f"unknown key 'fleet' in f.toml; accepted top-level keys: {TOP_KEYS}",
        ),
        ("etcd = 'a:1'", "etcd = 'a:1' (from f.toml): expected a table [etcd]"),
        ("supervisor = 1", "supervisor = 1 (from f.toml): expected a table [supervisor]"),
    ],
)
def test_unknown_keys_and_misplaced_tables(tmp_path: Path, text: str, message: str) -> None:
    write(tmp_path, text + "\n", "f.toml")
    assert error(path="f.toml") == message


def test_empty_supervisor_table_is_accepted(tmp_path: Path) -> None:
    assert load(env={}, path=write(tmp_path, "[supervisor]\n")) == Config(etcd=EtcdSettings())


# --- validation: one line naming key, value, source and what is accepted -------------------

SEG = "expected an integer from 1 to 100000"
TTL = "expected an integer number of seconds from 2 to 3600"
NAME = "expected 1-64 characters of A-Z a-z 0-9 . _ -"
ID = "expected 1-128 characters of A-Z a-z 0-9 . _ @ : -"
HANDLER = "expected 'module.path:attr' (dotted Python identifiers)"
PREFIX = (
    "expected '/' followed by a path without whitespace, empty parts or a trailing '/', "
    "e.g. '/fleet'"
)
INTERVAL = "expected a number of seconds from 0 to 86400"
WEIGHT = "expected a number greater than 0 and at most 1000"
ENDPOINTS = (
    "expected host:port, http://host:port or https://host:port (host: name, IPv4 or "
    "[IPv6]; port 1-65535), as a list or one comma-separated string"
)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('segments = "ten"', f"segments = 'ten' (from f.toml): {SEG}"),
        ("segments = 0", f"segments = 0 (from f.toml): {SEG}"),
        ("segments = 100001", f"segments = 100001 (from f.toml): {SEG}"),
        ("segments = 1.0", f"segments = 1.0 (from f.toml): {SEG}"),
        ("segments = true", f"segments = True (from f.toml): {SEG}"),
        ("lease_ttl = 1", f"lease_ttl = 1 (from f.toml): {TTL}"),
        ("lease_ttl = 3601", f"lease_ttl = 3601 (from f.toml): {TTL}"),
        ("name = 5", f"name = 5 (from f.toml): {NAME}"),
        ("name = ''", f"name = '' (from f.toml): {NAME}"),
        (f"name = '{'x' * 65}'", f"name = '{'x' * 65}' (from f.toml): {NAME}"),
        ("id = 'a b'", f"id = 'a b' (from f.toml): {ID}"),
        ("handler = 'mod'", f"handler = 'mod' (from f.toml): {HANDLER}"),
        ("interval = -1", f"interval = -1 (from f.toml): {INTERVAL}"),
        ("interval = nan", f"interval = nan (from f.toml): {INTERVAL}"),
        ("interval = '1'", f"interval = '1' (from f.toml): {INTERVAL}"),
        ("weight = inf", f"weight = inf (from f.toml): {WEIGHT}"),
        ("weight = 0", f"weight = 0 (from f.toml): {WEIGHT}"),
        ("log_format = 'JSON'", "log_format = 'JSON' (from f.toml): expected 'text' or 'json'"),
        ("settle = 10.5", "settle = 10.5 (from f.toml): expected a number of seconds from 0 to 10"),
        (
            "graceful_timeout = 0",
            "graceful_timeout = 0 (from f.toml): expected a number of seconds greater than 0 and at most "
            "3600",
        ),
        (
            "[etcd]\ntimeout = 61",
            "etcd.timeout = 61 (from f.toml): expected a number of seconds greater than 0 and at most 60",
        ),
        (
            "[etcd]\ntimeout = -inf",
            "etcd.timeout = -inf (from f.toml): expected a number of seconds greater than 0 and at most "
            "60",
        ),
        ("[etcd]\nprefix = 'fleet'", f"etcd.prefix = 'fleet' (from f.toml): {PREFIX}"),
        ("[etcd]\nendpoints = 2379", f"etcd.endpoints = 2379 (from f.toml): {ENDPOINTS}"),
        ("[etcd]\nendpoints = ['a:1', 2]", f"etcd.endpoints = 2 (from f.toml): {ENDPOINTS}"),
        ("[etcd]\nuser = ''", "etcd.user = '' (from f.toml): expected a non-empty string"),
        ("[etcd]\ncert = 1", "etcd.cert = 1 (from f.toml): expected a non-empty string"),
        (
            "[etcd]\npassword = 12345",
            "etcd.password = <hidden> (from f.toml): expected a non-empty string",
        ),
    ],
)
def test_file_values_must_have_the_right_type_and_range(
    tmp_path: Path, line: str, message: str
) -> None:
    write(tmp_path, line + "\n", "f.toml")
    assert error(path="f.toml") == message


def test_int_is_fine_for_float_keys(tmp_path: Path) -> None:
    config = load(env={}, path=write(tmp_path, "interval = 3\nweight = 2\n[etcd]\ntimeout = 1\n"))
    assert (config.interval, config.weight, config.etcd.timeout) == (3.0, 2.0, 1.0)
    assert all(type(v) is float for v in (config.interval, config.weight, config.etcd.timeout))


@pytest.mark.parametrize(
    ("var", "raw", "message"),
    [
        ("FLEET_SEGMENTS", "ten", f"segments = 'ten' (from FLEET_SEGMENTS): {SEG}"),
        ("FLEET_SEGMENTS", "1.0", f"segments = '1.0' (from FLEET_SEGMENTS): {SEG}"),
        ("FLEET_SEGMENTS", " 5", f"segments = ' 5' (from FLEET_SEGMENTS): {SEG}"),
        ("FLEET_SEGMENTS", "1_000", f"segments = '1_000' (from FLEET_SEGMENTS): {SEG}"),
        ("FLEET_SEGMENTS", "9" * 5000, f"segments = '{'9' * 5000}' (from FLEET_SEGMENTS): {SEG}"),
        ("FLEET_LEASE_TTL", "1", f"lease_ttl = '1' (from FLEET_LEASE_TTL): {TTL}"),
        ("FLEET_NAME", "a/b", f"name = 'a/b' (from FLEET_NAME): {NAME}"),
        ("FLEET_ID", "x" * 129, f"id = '{'x' * 129}' (from FLEET_ID): {ID}"),
        ("FLEET_HANDLER", "a.:b", f"handler = 'a.:b' (from FLEET_HANDLER): {HANDLER}"),
        ("FLEET_HANDLER", "a:b:c", f"handler = 'a:b:c' (from FLEET_HANDLER): {HANDLER}"),
        ("FLEET_HANDLER", "1a:b", f"handler = '1a:b' (from FLEET_HANDLER): {HANDLER}"),
        ("FLEET_HANDLER", "a:b-c", f"handler = 'a:b-c' (from FLEET_HANDLER): {HANDLER}"),
        ("FLEET_HANDLER", "a :b", f"handler = 'a :b' (from FLEET_HANDLER): {HANDLER}"),
        ("FLEET_INTERVAL", "nan", f"interval = 'nan' (from FLEET_INTERVAL): {INTERVAL}"),
        ("FLEET_INTERVAL", "1e999", f"interval = '1e999' (from FLEET_INTERVAL): {INTERVAL}"),
        (
            "FLEET_WEIGHT",
            "inf",
            "weight = 'inf' (from FLEET_WEIGHT): expected a number greater than 0 and at most 1000",
        ),
        (
            "FLEET_WEIGHT",
            "1000.5",
            "weight = '1000.5' (from FLEET_WEIGHT): expected a number greater than 0 and at most 1000",
        ),
        (
            "FLEET_LOG_FORMAT",
            "xml",
            "log_format = 'xml' (from FLEET_LOG_FORMAT): expected 'text' or 'json'",
        ),
        ("FLEET_PREFIX", "/fleet/", f"etcd.prefix = '/fleet/' (from FLEET_PREFIX): {PREFIX}"),
        ("FLEET_PREFIX", "/a b", f"etcd.prefix = '/a b' (from FLEET_PREFIX): {PREFIX}"),
        ("FLEET_PREFIX", "/", f"etcd.prefix = '/' (from FLEET_PREFIX): {PREFIX}"),
        ("FLEET_PREFIX", "/a//b", f"etcd.prefix = '/a//b' (from FLEET_PREFIX): {PREFIX}"),
        ("FLEET_ETCD", "a:1,b", f"etcd.endpoints = 'b' (from FLEET_ETCD): {ENDPOINTS}"),
    ],
)
def test_env_values_are_coerced_and_checked(var: str, raw: str, message: str) -> None:
    assert error(env={var: raw}) == message


@pytest.mark.parametrize(
    ("key", "raw", "message"),
    [
        ("segments", "0", f"segments = '0' (from --segments): {SEG}"),
        ("segments", "", f"segments = '' (from --segments): {SEG}"),
        ("lease_ttl", "3601", f"lease_ttl = '3601' (from --lease-ttl): {TTL}"),
        ("id", "", f"id = '' (from --id): {ID}"),
        ("etcd", "a:99999", f"etcd.endpoints = 'a:99999' (from --etcd): {ENDPOINTS}"),
        ("prefix", "x", f"etcd.prefix = 'x' (from --prefix): {PREFIX}"),
        (
            "settle",
            "-0.1",
            "settle = '-0.1' (from --settle): expected a number of seconds from 0 to 10",
        ),
        (
            "graceful_timeout",
            "0",
            "graceful_timeout = '0' (from --graceful-timeout): expected a number of seconds greater "
            "than 0 and at most 3600",
        ),
        (
            "log_format",
            "Text",
            "log_format = 'Text' (from --log-format): expected 'text' or 'json'",
        ),
    ],
)
def test_cli_values_are_coerced_and_checked(key: str, raw: str, message: str) -> None:
    assert error(cli={key: raw}) == message


def test_an_overridden_bad_value_is_still_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "segments = 0\n")
    assert error(cli={"segments": "5"}, path=path) == f"segments = 0 (from {path}): {SEG}"


def test_valid_boundaries_are_accepted() -> None:
    config = load(
        {
            "segments": "100000",
            "lease_ttl": "2",
            "interval": "86400",
            "settle": "10",
            "weight": "1000",
            "graceful_timeout": "3600",
            "name": "A" * 64,
            "id": "h-1@x:9." + "z" * 120,
            "handler": "a.b_c.d:E.f",
        },
        {},
    )
    assert (config.segments, config.lease_ttl, config.interval, config.weight) == (
        100000,
        2,
        86400.0,
        1000.0,
    )
    assert load({"segments": "+1", "interval": ".5", "weight": "1E2"}, {}).interval == 0.5


# --- endpoints and credentials ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("127.0.0.1:2379", ("http://127.0.0.1:2379",)),
        ("HTTP://Etcd-1.Example.COM:02379", ("http://etcd-1.example.com:2379",)),
        ("https://[::1]:2379", ("https://[::1]:2379",)),
        ("[0:0:0:0:0:0:0:1]:1", ("http://[::1]:1",)),
        (" a:1 , b:2,a:1,http://a:1, https://a:1", ("http://a:1", "http://b:2", "https://a:1")),
        ("etcd_1:65535", ("http://etcd_1:65535",)),
        ("", ()),
        (["b:1", "a:1", "b:1"], ("http://b:1", "http://a:1")),
        ([], ()),
    ],
)
def test_endpoint_normalisation(raw: str | list[str], expected: tuple[str, ...]) -> None:
    assert load({"etcd": raw}, {}).etcd.endpoints == expected


@pytest.mark.parametrize(
    "bad",
    [
        "localhost",
        "a:0",
        "a:65536",
        "a:",
        ":1",
        "ftp://a:1",
        "http://a:1/",
        "http://a:1/v3",
        "http://a",
        "a:b",
        "1.2.3:4",
        "256.1.1.1:1",
        "::1:2379",
        "[::g]:1",
        "[1.2.3.4]:1",
        "user@a:1",
        "-a:1",
        "a..b:1",
        "a b:1",
        "http:/a:1",
        "a:1:2",
        "",
        " ",
    ],
)
def test_bad_endpoints(bad: str) -> None:
    message = error(cli={"etcd": ["ok:1", bad]})
    assert message == f"etcd.endpoints = {bad!r} (from --etcd): {ENDPOINTS}"


def test_endpoints_in_file_as_list_or_string(tmp_path: Path) -> None:
    path = write(tmp_path, "[etcd]\nendpoints = 'a:1,b:2'\n")
    assert load(env={}, path=path).etcd.endpoints == ("http://a:1", "http://b:2")
    path = write(tmp_path, "[etcd]\nendpoints = ['a:1', 'https://b:2']\n")
    assert load(env={}, path=path).etcd.endpoints == ("http://a:1", "https://b:2")


def test_empty_cli_endpoints_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[etcd]\nendpoints = 'a:1'\n")
    assert load({"etcd": ""}, {}, path).etcd.endpoints == ()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"FLEET_ETCD_USER": "bob"},
            "etcd.user = 'bob' (from FLEET_ETCD_USER): expected etcd.password to be set too "
            "(etcd.user and etcd.password: both or neither)",
        ),
        (
            {"FLEET_ETCD_PASSWORD": "s3cret"},
            "etcd.password = <hidden> (from FLEET_ETCD_PASSWORD): expected etcd.user to be set too "
            "(etcd.user and etcd.password: both or neither)",
        ),
        (
            {"FLEET_ETCD_CERT": "c.pem"},
            "etcd.cert = 'c.pem' (from FLEET_ETCD_CERT): expected etcd.key to be set too "
            "(etcd.cert and etcd.key: both or neither)",
        ),
        (
            {"FLEET_ETCD_KEY": "k.pem", "FLEET_ETCD_CA_CERT": "ca.pem"},
            "etcd.key = 'k.pem' (from FLEET_ETCD_KEY): expected etcd.cert to be set too "
            "(etcd.cert and etcd.key: both or neither)",
        ),
        (
            {"FLEET_ETCD_CA_CERT": "ca.pem", "FLEET_ETCD": "a:1,http://b:2"},
            "etcd.endpoints = 'http://b:2' (from FLEET_ETCD): expected an https:// endpoint, since "
            "TLS is configured (etcd.ca_cert / etcd.cert / etcd.key)",
        ),
    ],
)
def test_credentials_both_or_neither_and_tls(env: dict[str, str], message: str) -> None:
    assert error(env=env) == message
    assert "s3cret" not in message


def test_password_is_not_in_the_repr() -> None:
    config = load(env={"FLEET_ETCD_USER": "u", "FLEET_ETCD_PASSWORD": "s3cret"})
    assert config.etcd.password == "s3cret" and "s3cret" not in repr(config)


def test_credential_pairs_may_come_from_different_layers(tmp_path: Path) -> None:
    path = write(tmp_path, "[etcd]\nuser = 'bob'\ncert = 'c.pem'\nendpoints = ['a:1']\n")
    etcd = load(env={"FLEET_ETCD_PASSWORD": "pw", "FLEET_ETCD_KEY": "k.pem"}, path=path).etcd
    assert (etcd.user, etcd.password, etcd.cert, etcd.key) == ("bob", "pw", "c.pem", "k.pem")
    assert etcd.endpoints == ("https://a:1",)


def test_https_without_tls_files_and_ca_alone_are_fine() -> None:
    assert load({"etcd": "https://a:1"}, {}).etcd.endpoints == ("https://a:1",)
    etcd = load({"etcd": "a:1,https://a:1"}, {"FLEET_ETCD_CA_CERT": "ca.pem"}).etcd
    assert etcd.endpoints == ("https://a:1",) and etcd.ca_cert == "ca.pem"


# --- properties --------------------------------------------------------------------------------

INT_VARS = [("FLEET_SEGMENTS", "segments", 1, 100000), ("FLEET_LEASE_TTL", "lease_ttl", 2, 3600)]
FLOAT_VARS = [
    ("FLEET_INTERVAL", "interval", 0.0, 86400.0, False),
    ("FLEET_WEIGHT", "weight", 0.0, 1000.0, True),
]
FLOAT_FLAGS = [("settle", 0.0, 10.0, False), ("graceful_timeout", 0.0, 3600.0, True)]


@given(st.data())
def test_valid_integers_round_trip_from_env(data: st.DataObject) -> None:
    var, field, lo, hi = data.draw(st.sampled_from(INT_VARS))
    value = data.draw(st.integers(lo, hi))
    assert getattr(load(env={var: str(value)}), field) == value


@given(st.data())
def test_valid_floats_round_trip_from_env_and_cli(data: st.DataObject) -> None:
    var, field, lo, hi, above = data.draw(st.sampled_from(FLOAT_VARS))
    value = data.draw(st.floats(lo, hi, exclude_min=above, allow_nan=False))
    assert getattr(load(env={var: repr(value)}), field) == value
    flag, lo, hi, above = data.draw(st.sampled_from(FLOAT_FLAGS))
    value = data.draw(st.floats(lo, hi, exclude_min=above, allow_nan=False))
    assert getattr(load({flag: repr(value)}, {}), flag) == value


def is_integer_text(text: str) -> bool:
    digits = text[1:] if text.startswith(("+", "-")) else text
    return digits.isascii() and digits.isdigit()


@given(st.text().filter(lambda s: not is_integer_text(s)))
@example("1.5")
@example("0x10")
@example("1e3")
@example(" 7")
@example("7\n")
@example("٣")
@example("1_000")
@example("")
@example("+")
@example("True")
def test_segments_rejects_every_non_integer_string(text: str) -> None:
    message = error(cli={"segments": text})
    assert "segments" in message and repr(text) in message
    if text:
        message = error(env={"FLEET_SEGMENTS": text})
        assert "segments" in message and repr(text) in message


@given(st.integers().filter(lambda n: not 1 <= n <= 100000))
def test_segments_rejects_integers_out_of_range(value: int) -> None:
    assert error(env={"FLEET_SEGMENTS": str(value)}) == (
        f"segments = {str(value)!r} (from FLEET_SEGMENTS): {SEG}"
    )

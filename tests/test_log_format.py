"""`--log-format` under `fleet up` (issue 10, item 6).

JSON: every line `fleet up` prints on stdout is one JSON object. A worker's own log
record passes through with `"slot"` added; anything else a child prints (a `print`, a C
library's stderr, a piece of a line cut at MAX_LINE, a traceback Python printed itself)
is wrapped as `{"ts", "member", "slot", "level", "stream": "output", "msg"}`; the
supervisor's own lines are `{"ts", "member": "fleet", "level", "logger", "msg"}`, the
field names of `fleet.logs.JsonFormatter`. A logged traceback is one field (`exc`).

Text: unchanged (`w<slot> | ...`, `fleet | ...`), except that a logged traceback follows
its log line, one line each as Python prints it, indented by four spaces, and under
`fleet up` each of those lines has its slot's prefix.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.logs import JsonFormatter, TextFormatter
from fleet.supervise.output import Output, plain_level
from tests.support.procs import Proc, Spawner
from tests.support.raising_handler import MESSAGE, PRINTED, PRINTED_EXC
from tests.support.supervised import start_up, wait_alive

RAISING = "tests.support.raising_handler:handle"
HOST_ID = "lf"
SUPERVISOR_FIELDS = {"ts", "member", "level", "logger", "msg"}
OUTPUT_FIELDS = {"ts", "member", "slot", "level", "stream", "msg"}


def _record(msg: str = "segment 0: handle raised", exc: bool = True) -> logging.LogRecord:
    try:
        raise RuntimeError("boom\nsecond line of the message")
    except RuntimeError:
        info = sys.exc_info() if exc else None
    return logging.LogRecord("fleet.work.runner", logging.ERROR, __file__, 1, msg, (), info)


def _reject(name: str) -> Any:
    raise ValueError(name)


def _strict_object(text: str) -> dict[str, Any] | None:
    """What a strict JSON reader makes of `text`, when it is an object."""
    try:
        value = json.loads(text, parse_constant=_reject)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# -- the formatters ------------------------------------------------------------------------


def test_text_formatter_puts_a_traceback_under_its_line_indented() -> None:
    record = _record()
    expected = logging.Formatter().formatException(record.exc_info)  # type: ignore[arg-type]
    lines = TextFormatter("m-0").format(record).split("\n")
    assert "segment 0: handle raised" in lines[0] and " ERROR " in lines[0], lines
    assert "Traceback" not in lines[0], lines[0]
    assert lines[1] == "    Traceback (most recent call last):", lines
    assert all(line.startswith("    ") for line in lines[1:]), lines
    assert [line[4:] for line in lines[1:]] == expected.split("\n")
    assert lines[-2:] == ["    RuntimeError: boom", "    second line of the message"]


def test_text_formatter_without_a_traceback_is_one_line() -> None:
    line = TextFormatter("m-0").format(_record("segment 3 acquired (token 7)", exc=False))
    assert "\n" not in line and line.endswith(" m-0 ERROR   segment 3 acquired (token 7)"), line


def test_json_formatter_keeps_a_traceback_in_one_field() -> None:
    line = JsonFormatter("m-0").format(_record())
    assert "\n" not in line
    data = json.loads(line)
    assert set(data) == {"ts", "member", "level", "logger", "msg", "exc"}
    assert data["exc"].startswith("Traceback (most recent call last):")
    assert data["exc"].endswith("RuntimeError: boom\nsecond line of the message")


# -- Output, text ----------------------------------------------------------------------------


def test_text_output_is_what_it_always_was() -> None:
    buf = io.StringIO()
    out = Output(buf, "text", "h")
    out.supervisor_line("etcd at http://x; starting 2 workers")
    out.supervisor_line("w1 exited: exit 1; restarting in 0.5s", "warning")
    out.child_lines(1, [b"plain", b'{"msg": "json"}', b"bad \xff byte", b""])
    assert buf.getvalue() == (
        "fleet | etcd at http://x; starting 2 workers\n"
        "fleet | w1 exited: exit 1; restarting in 0.5s\n"
        "w1 | plain\n"
        'w1 | {"msg": "json"}\n'
        "w1 | bad \ufffd byte\n"
        "w1 | \n"
    )


def test_a_logged_traceback_gets_its_slot_prefix_on_every_line() -> None:
    buf = io.StringIO()
    formatted = TextFormatter("h-2").format(_record())
    Output(buf, "text", "h").child_lines(2, [ln.encode() for ln in formatted.split("\n")])
    lines = buf.getvalue().splitlines()
    assert all(line.startswith("w2 | ") for line in lines), lines
    assert lines[1] == "w2 |     Traceback (most recent call last):", lines


# -- Output, JSON ----------------------------------------------------------------------------


def test_json_supervisor_line_has_the_formatters_field_names() -> None:
    buf = io.StringIO()
    out = Output(buf, "json", "h", clock=lambda: 1700000000.123456)
    out.supervisor_line("internal error: KeyError: 'x' (traceback in .fleet/crash.log)", "error")
    out.supervisor_line("2/2 workers ready, 4/4 segments owned, leader h-0, 1.2 s")
    first, second = (json.loads(line) for line in buf.getvalue().splitlines())
    assert first == {
        "ts": 1700000000.123,
        "member": "fleet",
        "level": "error",
        "logger": "fleet.supervise",
        "msg": "internal error: KeyError: 'x' (traceback in .fleet/crash.log)",
    }
    assert second["level"] == "info" and set(second) == SUPERVISOR_FIELDS


def test_json_passes_a_workers_record_through_with_its_slot() -> None:
    buf = io.StringIO()
    line = JsonFormatter("h-1").format(_record())
    Output(buf, "json", "h").child_lines(1, [line.encode()])
    out = buf.getvalue()
    assert out.count("\n") == 1
    # The worker's own text is kept, the slot spliced in before its closing brace.
    assert out == line[:-1] + ',"slot":1}\n'
    assert json.loads(out) == {**json.loads(line), "slot": 1}


def test_json_wraps_every_other_line() -> None:
    buf = io.StringIO()
    out = Output(buf, "json", "h", clock=lambda: 12.3456)
    cut = b'{"ts":1.0,"member":"h-0","msg":"' + b"x" * 50  # a piece of a line cut at MAX_LINE
    lines = [b"hello from print()", cut, b"42", b"[1, 2]", b'{"v": NaN}', b"\xff\xfe", b""]
    out.child_lines(0, lines)
    records = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert len(records) == len(lines)
    for record, raw in zip(records, lines, strict=True):
        assert record == {
            "ts": 12.346,
            "member": "h-0",
            "slot": 0,
            "level": "info",
            "stream": "output",
            "msg": raw.decode(errors="replace"),
        }


def test_json_member_of_a_slot_without_a_host_id_is_its_slot_name() -> None:
    buf = io.StringIO()
    Output(buf, "json").child_lines(3, [b"plain"])
    assert json.loads(buf.getvalue())["member"] == "w3"


def test_json_slot_of_the_supervisor_wins_over_one_the_child_wrote() -> None:
    buf = io.StringIO()
    Output(buf, "json", "h").child_lines(2, [b'{"slot": 9, "msg": "mine"}', b"{}", b" { } "])
    records = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert records == [{"slot": 2, "msg": "mine"}, {"slot": 2}, {"slot": 2}]


def test_json_line_breaks_inside_a_childs_object_are_re_encoded() -> None:
    """A raw CR between tokens, or U+2028 inside a string, is valid JSON that a line reader
    (universal newlines, str.splitlines) would cut in two."""
    for raw in ['{"a":\r1}', '{"msg": "x\u2028y"}']:
        buf = io.StringIO()
        Output(buf, "json", "h").child_lines(0, [raw.encode()])
        text = buf.getvalue()
        assert text.splitlines() == [text[:-1]], repr(text)
        assert json.loads(text) == {**json.loads(raw), "slot": 0}


def test_json_lines_of_a_traceback_python_printed_itself_are_errors() -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as exc:
            raise ValueError("outer") from exc
    except ValueError:
        printed = traceback.format_exc().rstrip("\n").split("\n")
    lines = ["before", *printed, "after", "fleet: segment 0: handle still running; exiting"]
    buf = io.StringIO()
    Output(buf, "json", "h").child_lines(0, [ln.encode() for ln in lines])
    levels = [(r["msg"], r["level"]) for r in map(json.loads, buf.getvalue().splitlines())]
    assert levels[0] == ("before", "info")
    assert levels[-2] == ("after", "info")
    assert levels[-1][1] == "error"
    inside = [(msg, level) for msg, level in levels[1:-2] if msg.strip()]
    assert all(level == "error" for _msg, level in inside), levels
    assert ("ValueError: outer", "error") in inside and ("KeyError: 'inner'", "error") in inside


def test_json_a_record_between_a_tracebacks_lines_does_not_end_it() -> None:
    """Found in CI: a worker's log line from another thread landed inside a traceback
    `print_exc` wrote, and the traceback's last line came out as "info"."""
    record = json.dumps({"ts": 1.0, "level": "info", "msg": "segment 3 acquired"})
    lines = ["Traceback (most recent call last):", '  File "h.py", line 1, in handle',
             record, "    raise ValueError(x)", record, "ValueError: x", "after"]  # fmt: skip
    buf = io.StringIO()
    Output(buf, "json", "h").child_lines(0, [ln.encode() for ln in lines])
    levels = [(r["msg"], r["level"]) for r in map(json.loads, buf.getvalue().splitlines())]
    plain = [(msg, level) for msg, level in levels if msg != "segment 3 acquired"]
    assert plain[:-1] == [(ln, "error") for ln in lines if ln != record][:-1], levels
    assert plain[-1] == ("after", "info"), levels


def test_plain_level_of_a_stack_dump_ends_before_the_next_unindented_line() -> None:
    dump = ["Thread 0x00007f (most recent call first):", '  File "x.py", line 1 in f', ""]
    state = None
    levels = []
    for line in [*dump, "Current thread 0x00007e (most recent call first):", "  File y", "next"]:
        level, state = plain_level(line, state)
        levels.append(level)
    assert levels == ["error"] * 5 + ["info"]


# A line of child output: anything but a newline, or a JSON object (how a worker logs).
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
_lines = st.lists(
    st.binary().map(lambda b: b.replace(b"\n", b""))
    | st.dictionaries(st.text(), _json_values).map(lambda d: json.dumps(d).encode())
    | st.dictionaries(st.text(), _json_values).map(
        lambda d: json.dumps(d, ensure_ascii=False).encode()
    ),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(lines=_lines, slot=st.integers(min_value=0, max_value=1023))
def test_json_output_is_one_object_per_child_line(lines: list[bytes], slot: int) -> None:
    buf = io.StringIO()
    Output(buf, "json", "h").child_lines(slot, lines)
    out = buf.getvalue().split("\n")
    assert out.pop() == "" and len(out) == len(lines)
    for line, raw in zip(out, lines, strict=True):
        assert line.splitlines() == [line], repr(line)  # no reader splits it
        record = json.loads(line, parse_constant=_reject)
        text = raw.decode(errors="replace")
        child = _strict_object(text)
        if child is not None:
            assert record == {**child, "slot": slot}
        else:
            assert set(record) == OUTPUT_FIELDS and record["msg"] == text, record
            assert record["slot"] == slot and record["member"] == f"h-{slot}"


@settings(max_examples=100, deadline=None)
@given(text=st.text(), level=st.sampled_from(["info", "warning", "error"]))
def test_json_supervisor_output_is_one_object_per_line(text: str, level: str) -> None:
    buf = io.StringIO()
    Output(buf, "json").supervisor_line(text, level)
    line = buf.getvalue()
    assert line.endswith("\n") and line[:-1].splitlines() == [line[:-1]]
    assert json.loads(line)["msg"] == text


@settings(max_examples=100, deadline=None)
@given(lines=st.lists(st.binary().map(lambda b: b.replace(b"\n", b"")), max_size=5))
def test_text_output_prefixes_every_child_line(lines: list[bytes]) -> None:
    buf = io.StringIO()
    Output(buf, "text", "h").child_lines(4, lines)
    expected = "".join(f"w4 | {raw.decode(errors='replace')}\n" for raw in lines)
    assert buf.getvalue() == expected


def test_a_closed_stdout_loses_lines_not_the_fleet() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    pipe = open(write_end, "w")  # noqa: PTH123, SIM115 - a pipe, not a path
    try:
        for fmt in ("text", "json"):
            out = Output(pipe, fmt, "h")
            out.supervisor_line("stopping (graceful)")  # EPIPE: dropped
            out.child_lines(0, [b"a line"])
    finally:
        with contextlib.suppress(BrokenPipeError):  # what is still buffered
            pipe.close()
    closed = io.StringIO()
    closed.close()
    Output(closed, "json").supervisor_line("after close")  # ValueError: dropped


# -- end to end: `fleet up` ------------------------------------------------------------------


def _start(spawn: Spawner, ledger_dir: Path, tmp_path: Path, extra: list[str]) -> Proc:
    """`fleet up` with the raising handler, its stderr apart in `stderr.log`."""
    apart = ["sh", "-c", 'exec "$@" 2>>"$0"', str(tmp_path / "stderr.log")]
    return start_up(
        spawn, ledger_dir, workers=2, segments=4, handler=RAISING,
        extra=["--host-id", HOST_ID, *extra], prefix=apart,
    )  # fmt: skip


def _stop(up: Proc) -> str:
    up.signal(signal.SIGTERM)
    assert up.wait(timeout=90) == 0, up.tail()
    return up.log()


def _json_lines(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n{text[-4000:]}")
        assert isinstance(record, dict), line
        records.append(record)
    return records


@pytest.mark.parametrize("how", ["flag", "fleet.toml"])
def test_fleet_up_json_prints_one_json_object_per_line(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path, how: str
) -> None:
    extra: list[str] = []
    if how == "flag":
        extra = ["--log-format", "json"]
    else:
        (tmp_path / "fleet.toml").write_text('log_format = "json"\n')
    up = _start(spawn, ledger_dir, tmp_path, extra)

    def seen() -> bool:
        records = []
        for line in up.log().splitlines():  # the last one may be half written yet
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        records = [r for r in records if isinstance(r, dict)]
        return any("workers ready" in r.get("msg", "") for r in records) and any(
            MESSAGE in r.get("exc", "") for r in records
        )

    wait_alive(up, seen, "the summary line and a handler traceback", timeout=90)
    records = _json_lines(_stop(up))

    fleet = [r for r in records if r.get("member") == "fleet"]
    assert fleet and all(set(r) == SUPERVISOR_FIELDS for r in fleet), fleet
    assert all(r["logger"] == "fleet.supervise" and isinstance(r["ts"], float) for r in fleet)
    said = [r["msg"] for r in fleet]
    assert any(m.startswith("etcd at ") for m in said), said
    assert any(m.startswith("2/2 workers ready, 4/4 segments owned") for m in said), said
    assert "stopping (graceful)" in said, said

    children = [r for r in records if r.get("member") != "fleet"]
    assert {r["slot"] for r in children} == {0, 1}, children[:5]
    for r in children:
        assert r["member"] == f"{HOST_ID}-{r['slot']}", r
    logged = [r for r in children if "logger" in r]  # the workers' own records
    assert any(r["msg"].startswith("joined fleet") for r in logged), logged[:5]
    raised = [r for r in logged if MESSAGE in r.get("exc", "")]
    assert raised, logged
    assert raised[0]["level"] == "error" and "segment 0: handle raised" in raised[0]["msg"]
    assert raised[0]["exc"].startswith("Traceback (most recent call last):")
    assert "raising_handler.py" in raised[0]["exc"]

    output = [r for r in children if r.get("stream") == "output"]
    assert all(set(r) == OUTPUT_FIELDS for r in output), output
    printed = [r for r in output if r["msg"].startswith(PRINTED)]
    assert {r["slot"] for r in printed} == {0, 1} and all(r["level"] == "info" for r in printed)
    exc_lines = [r for r in output if r["msg"] == f"ValueError: {PRINTED_EXC}"]
    assert exc_lines and all(r["level"] == "error" for r in exc_lines), exc_lines
    starts = [r for r in output if r["msg"] == "Traceback (most recent call last):"]
    assert starts and all(r["level"] == "error" for r in starts), starts

    # The supervisor's own log records (stderr) are JSON too.
    _json_lines((tmp_path / "stderr.log").read_text())


def test_fleet_up_text_puts_a_traceback_under_its_line_with_the_slot_prefix(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    up = _start(spawn, ledger_dir, tmp_path, [])
    done = f"RuntimeError: {MESSAGE}"

    def seen() -> bool:
        log = up.log()
        return "workers ready" in log and done in log

    wait_alive(up, seen, "the summary line and a handler traceback", timeout=90)
    log = _stop(up)
    lines = log.splitlines()
    assert any(line.startswith("fleet | etcd at ") for line in lines), log[-4000:]
    assert any(line.startswith("fleet | 2/2 workers ready, ") for line in lines), log[-4000:]
    for slot in (0, 1):
        assert any(line.startswith(f"w{slot} | {PRINTED}") for line in lines), log[-4000:]

    found = 0
    for slot in (0, 1):
        mine = [line for line in lines if line.startswith(f"w{slot} | ")]
        for i, line in enumerate(mine):
            if "segment 0: handle raised" not in line:
                continue
            found += 1
            assert " ERROR " in line and "Traceback" not in line, line
            block = []
            for follow in mine[i + 1 :]:
                if not follow.startswith(f"w{slot} |     "):
                    break
                block.append(follow.removeprefix(f"w{slot} |     "))
            assert block[0] == "Traceback (most recent call last):", mine[i : i + 8]
            assert any("raising_handler.py" in b for b in block), block
            assert block[-1] == done, block
    assert found, log[-4000:]

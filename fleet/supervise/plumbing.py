"""The supervisor's end of each child's two pipes: output lines and status messages.

Every child has an output pipe (its stdout and stderr, passed on to our stdout by
`fleet.supervise.output.Output`: with a ``w<slot> | `` prefix, or as JSON) and a status
pipe (JSON lines, see DESIGN.md "Supervisor pipe protocol"). A child is untrusted input
here: it may write without newlines (progress bars), close its end while it lives on (a
handler that daemonizes), flood, or send JSON of a shape another version of fleet would
not. None of that may cost the arbiter more than bounded memory and time: lines are cut
at `MAX_LINE`, only new bytes are scanned for a newline, a read takes at most
`READ_BUDGET` bytes per wake-up, an EOF closes the fd at once (it would otherwise be
readable forever: a busy loop), and a status message that does not have the expected
shape is dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.supervise.output import Output

from fleet.coord.health import Failing

MAX_LINE = 64 * 1024  # a longer line is passed on in pieces of this size
READ_BUDGET = 256 * 1024  # bytes read from one fd per wake-up, so no child starves the rest
MAX_FAILING_LISTED = 20  # failing segments kept from one heartbeat (the count says the rest)


class LineBuffer:
    """Bytes in, complete lines out; a line longer than `MAX_LINE` comes out in pieces.

    Pending bytes are kept as a list of chunks, and each `feed` searches only the new
    chunk for newlines, so a long line arriving in many small reads costs linear time
    (re-splitting the whole buffer on each read was quadratic).
    """

    def __init__(self, limit: int = MAX_LINE, drop_long: bool = False) -> None:
        """With `drop_long`, a line over the limit is dropped whole instead (status
        messages: a piece of one is not a message, and its tail must not pass as one)."""
        self.limit = limit
        self.drop_long = drop_long
        self._parts: list[bytes] = []
        self._size = 0
        self._cut = False  # the last line out was cut at the limit, with nothing since
        self._dropping = False  # inside a line over the limit, with drop_long

    def __len__(self) -> int:
        return self._size

    def feed(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            self._add(data[start:end], lines)
            if self._dropping:
                self._dropping = False
            elif self._size or not self._cut:  # a newline right after a cut ends nothing new
                lines.append(self._take())
            self._cut = False
            start = end + 1
        self._add(data[start:], lines)
        return lines

    def _add(self, data: bytes, lines: list[bytes]) -> None:
        if self._dropping:
            return
        while data:
            room = self.limit - self._size
            self._parts.append(data[:room])
            self._size += min(room, len(data))
            data = data[room:]
            self._cut = False
            if self._size >= self.limit:
                line = self._take()
                if self.drop_long:
                    self._dropping = True
                    return
                lines.append(line)
                self._cut = True

    def _take(self) -> bytes:
        line = b"".join(self._parts)
        self._parts, self._size = [], 0
        return line

    def flush(self) -> list[bytes]:
        """What is left of an unfinished line (the child exited, or closed its output)."""
        self._dropping = False
        return [self._take()] if self._size else []


def read_some(fd: int, budget: int = READ_BUDGET) -> tuple[bytes, bool]:
    """Whatever `fd` has now (up to `budget` bytes) and whether it reached EOF."""
    chunks: list[bytes] = []
    size = 0
    while size < budget:
        try:
            chunk = os.read(fd, min(65536, budget - size))
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            return b"".join(chunks), True
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False


@dataclass(frozen=True)
class Status:
    """One status message of a valid shape: READY (with its lease) or a heartbeat."""

    ready: bool
    lease: int = 0
    owned: int | None = None
    assigned: int | None = None
    leader: str | None = None
    segments: int | None = None
    in_assignment: bool | None = None  # whether the current assignment lists this member
    failing: int | None = None  # segments whose last call failed
    oldest_call: int | None = None  # seconds the oldest running user call has run
    # The first few of those: errors in a row, last error, last success, since when.
    failing_segments: tuple[Failing, ...] | None = None


def _count(value: object) -> int | None:
    """A non-negative int (not a bool, not a float), else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def parse_status(line: bytes) -> Status | None:
    """The message in `line`, or None when it is not one this version understands."""
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(msg, dict):
        return None
    if msg.get("ready") is True:
        lease = _count(msg.get("lease"))
        return Status(ready=True, lease=lease) if lease else None
    if msg.get("hb") is True:
        leader = msg.get("leader")
        segments = msg.get("segments")
        return Status(
            ready=False,
            owned=_count(msg.get("owned")),
            assigned=_count(msg.get("assigned")),
            leader=leader if isinstance(leader, str) else None,
            segments=_count(segments),
            in_assignment=msg.get("in_assignment")
            if isinstance(msg.get("in_assignment"), bool)
            else None,
            failing=_count(msg.get("failing")),
            oldest_call=_count(msg.get("oldest_call")),
            failing_segments=_failing_segments(msg.get("failing_segments")),
        )
    return None


def _failing_segments(value: object) -> tuple[Failing, ...] | None:
    """The well-formed entries of a heartbeat's `failing_segments` (at most
    MAX_FAILING_LISTED, malformed ones dropped); None when it is not a list."""
    if not isinstance(value, list):
        return None
    found = (Failing.from_json(entry) for entry in value[:MAX_FAILING_LISTED])
    return tuple(f for f in found if f is not None)


class ChildPipes:
    """The read ends of one child's status and output pipes, registered in the arbiter's
    selector while open; each closes itself at EOF."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        status_fd: int,
        output_fd: int,
        slot: int,
        output: Output,
        on_status: Callable[[Status], None],
    ) -> None:
        self.selector = selector
        self.status_fd: int | None = status_fd
        self.output_fd: int | None = output_fd
        self.slot = slot
        self.output = output
        self.on_status = on_status
        self.status_buf = LineBuffer(drop_long=True)
        self.output_buf = LineBuffer()
        for fd in (status_fd, output_fd):
            os.set_blocking(fd, False)
        selector.register(status_fd, selectors.EVENT_READ, self._status_ready)
        selector.register(output_fd, selectors.EVENT_READ, self._output_ready)

    def _status_ready(self, _mask: int) -> None:
        self.read_status()

    def _output_ready(self, _mask: int) -> None:
        self.read_output()

    def read_status(self) -> None:
        if self.status_fd is None:
            return
        data, eof = read_some(self.status_fd)
        lines = self.status_buf.feed(data)
        if eof:
            self._close(self.status_fd)
            self.status_fd = None
        for line in lines:
            status = parse_status(line)
            if status is not None:
                self.on_status(status)

    def read_output(self, final: bool = False) -> None:
        if self.output_fd is None:
            return
        data, eof = read_some(self.output_fd)
        lines = self.output_buf.feed(data)
        if eof or final:
            lines += self.output_buf.flush()
        if eof:
            self._close(self.output_fd)
            self.output_fd = None
        self._write(lines)

    def _write(self, lines: list[bytes]) -> None:
        self.output.child_lines(self.slot, lines)  # it drops what a closed stdout refuses

    def _close(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def close(self) -> None:
        """Read what is left (the child is gone), then close both ends."""
        self.read_status()
        self.read_output(final=True)
        for fd in (self.status_fd, self.output_fd):
            if fd is not None:
                self._close(fd)
        self.status_fd = self.output_fd = None

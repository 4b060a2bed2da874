"""A handler for tests/test_log_format.py that makes every kind of child output.

Segment 0 raises `RuntimeError(MESSAGE)` on every call (the worker logs it with its
traceback, then backs off); the other segments just work. The first call in each worker
also prints a plain line to stdout (`PRINTED`, then the segment) and a traceback Python
prints itself (`traceback.print_exc()` to stderr), the kind of output a user's code or a
library makes outside fleet's logging.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet import SegmentContext

MESSAGE = "boom from the raising handler"
PRINTED = "plain print from segment"
PRINTED_EXC = "printed by traceback.print_exc"

_lock = threading.Lock()
_printed = False


def handle(ctx: SegmentContext) -> None:
    global _printed
    with _lock:
        first, _printed = not _printed, True
    if first:
        # One write: print() writes its end apart, so under PYTHONUNBUFFERED a log
        # record from another thread may land between the text and its newline.
        sys.stdout.write(f"{PRINTED} {ctx.segment}\n")
        sys.stdout.flush()
        try:
            raise ValueError(PRINTED_EXC)
        except ValueError:
            traceback.print_exc()
        sys.stderr.flush()
    if ctx.segment == 0:
        raise RuntimeError(MESSAGE)
    time.sleep(0.01)

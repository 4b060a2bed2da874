"""The default handler: shows the API by counting its calls (each logged at DEBUG)."""

from __future__ import annotations

import logging

from fleet.handler import SegmentContext

log = logging.getLogger("fleet.demo")


def handle(ctx: SegmentContext) -> None:
    count = (ctx.checkpoint or 0) + 1
    # DEBUG: one line per call is a thousand lines a second at 1,024 segments; the
    # worker's summary line counts the calls (`--log-level debug` shows each).
    log.debug("segment %d: call %d (token %d)", ctx.segment, count, ctx.token)
    ctx.commit(count)

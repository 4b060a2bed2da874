"""The default handler: shows the API by logging its segment and counting its calls."""

from __future__ import annotations

import logging

from fleet.handler import SegmentContext

log = logging.getLogger("fleet.demo")


def handle(ctx: SegmentContext) -> None:
    count = (ctx.checkpoint or 0) + 1
    log.info("segment %d: call %d (token %d)", ctx.segment, count, ctx.token)
    ctx.commit(count)

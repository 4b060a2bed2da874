"""The subprocess a recording-handler call does its work in (child-process work).

``python -I child_work.py LEDGER_DIR MEMBER PARENT_PID CALL_ID SEGMENT TOKEN SECONDS``

Standard library only and run in isolated mode, so it starts fast and imports nothing of
the worker's. For SECONDS it writes one ledger line every TICK seconds (``"ev": "child"``,
with the call id, segment, token, member, its own pid, its parent's pid and the time),
a stand-in for a subprocess that writes to some external store on the call's behalf.
It does not watch its parent: if the worker dies mid-call the child goes on until
SECONDS are up, unless someone kills its process group. Each line is one ``write()``
(line buffering), so a SIGKILL leaves at most a torn last line, which the checker skips.
"""

from __future__ import annotations

import json
import os
import sys
import time

TICK = 0.05


def main(argv: list[str]) -> int:
    if len(argv) != 7:
        print(f"usage: {__doc__.splitlines()[2]}", file=sys.stderr)
        return 2
    directory, member, parent, call_id, segment, token, seconds = argv
    pid = os.getpid()
    safe_member = member.replace(os.sep, "_")
    path = os.path.join(directory, f"{safe_member}-{parent}-child-{pid}.jsonl")
    base = {
        "ev": "child", "call": call_id, "segment": int(segment), "token": int(token),
        "member": member, "pid": pid, "parent": int(parent),
    }  # fmt: skip
    until = time.monotonic() + float(seconds)
    with open(path, "a", buffering=1, encoding="utf-8") as fh:
        n = 0
        while True:
            now = time.monotonic()
            done = now >= until
            line = {**base, "n": n, "t": now, "wall": time.time()}
            if done:
                line["done"] = True
            fh.write(json.dumps(line, separators=(",", ":")) + "\n")
            if done:
                return 0
            n += 1
            time.sleep(min(TICK, max(0.0, until - now)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

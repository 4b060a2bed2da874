"""`python -m tests.support.faulty_fleet up ...`: `fleet` with faults injected into the
supervisor through small seams, for tests of what `fleet up` does when its own calls fail.

The module name ends in ``fleet`` on purpose: `RunDir.running_pid` recognises a
`fleet up` by its command line, so `fleet ps` and friends find this one too.

Environment:
    FLEET_TEST_FAIL_SPAWNS: the first N spawns of `fleet worker` raise
        ``OSError(EAGAIN)`` from Popen, as fork does at the process limit.
    FLEET_TEST_RAISE_FILE: once this file exists, the arbiter's `manage` raises
        RuntimeError (an unexpected bug in the loop).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from typing import Any

from fleet import cli
from fleet.supervise import supervisor

_real_popen = subprocess.Popen
_fail_left = [int(os.environ.get("FLEET_TEST_FAIL_SPAWNS", "0"))]


def _popen(argv: Any, *args: Any, **kwargs: Any) -> Any:
    if _fail_left[0] > 0 and "worker" in list(argv):
        _fail_left[0] -= 1
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable (injected)")
    return _real_popen(argv, *args, **kwargs)


def _install() -> None:
    subprocess.Popen = _popen  # type: ignore[misc,assignment]
    raise_file = os.environ.get("FLEET_TEST_RAISE_FILE")
    if raise_file:
        real_manage = supervisor.Supervisor.manage

        def manage(self: supervisor.Supervisor) -> None:
            if os.path.exists(raise_file):
                raise RuntimeError("injected bug in the arbiter loop")
            real_manage(self)

        supervisor.Supervisor.manage = manage  # type: ignore[method-assign]


if __name__ == "__main__":
    _install()
    sys.exit(cli.main(sys.argv[1:]))

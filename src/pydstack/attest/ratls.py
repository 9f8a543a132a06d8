"""RA-TLS certificate extensions (arc 1.3.6.1.4.1.62397.1) and the key-to-quote binding.

Each custom extension's extnValue is a DER OCTET STRING wrapping the raw content. `.8` carries a
stripped versioned attestation whose report_data must be sha512("ratls-cert:" || SPKI DER) of
the certificate key; legacy certificates carry the raw quote in `.1` and a JSON event log in `.2`.
"""

from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from pydstack.types.capped import read_capped

from .attestation import Attestation, decode_versioned, from_quote_and_event_log
from .errors import ParseError, VerifyError
from .eventlog import event_log_from_json
from .quote import parse_quote
from .report_data import ratls_report_data

_ARC = "1.3.6.1.4.1.62397.1"
OID_TDX_QUOTE = x509.ObjectIdentifier(_ARC + ".1")
OID_EVENT_LOG = x509.ObjectIdentifier(_ARC + ".2")
OID_APP_ID = x509.ObjectIdentifier(_ARC + ".3")
OID_SPECIAL_USAGE = x509.ObjectIdentifier(_ARC + ".4")
OID_ATTESTATION = x509.ObjectIdentifier(_ARC + ".8")
OID_APP_INFO = x509.ObjectIdentifier(_ARC + ".9")
MAX_EXTENSION_SIZE = 1024 * 1024
GZIP_MAGIC = b"ELGZv1"
MAX_DECOMPRESSED = 16 * 1024


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def wrap_extension_value(raw: bytes) -> bytes:
    """DER OCTET STRING around the raw content (what goes into extnValue)."""
    return b"\x04" + _der_length(len(raw)) + raw


def unwrap_extension_value(value: bytes) -> bytes:
    """the content of a DER OCTET STRING that fills `value` exactly (strict DER lengths)."""
    if len(value) > MAX_EXTENSION_SIZE + 8:
        raise ParseError("ra-tls extension too large")
    if len(value) < 2 or value[0] != 0x04:
        raise ParseError("ra-tls extension is not an octet string")
    first = value[1]
    if first < 0x80:
        length, start = first, 2
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or len(value) < 2 + n:
            raise ParseError("ra-tls extension has an invalid length")
        length, start = int.from_bytes(value[2 : 2 + n], "big"), 2 + n
        if length < 0x80 or value[2] == 0:
            raise ParseError("ra-tls extension length is not minimally encoded")
    if start + length != len(value):
        raise ParseError("ra-tls extension length does not match its content")
    return value[start:]


def get_extension_bytes(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    """the unwrapped content of a custom extension, None when absent."""
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as e:
        # reading any extension parses them all: duplicates, malformed standard extensions
        # and general names cryptography does not support (x400Address) end here
        raise ParseError(f"certificate extensions are malformed: {e}") from e
    value = ext.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else None
    if raw is None:
        raise ParseError(f"extension {oid.dotted_string} is not a raw extension")
    if len(raw) > MAX_EXTENSION_SIZE:
        raise ParseError(f"extension {oid.dotted_string} too large")
    return unwrap_extension_value(raw)


def compress_ext_value(data: bytes) -> bytes:
    """`ELGZv1` + gzip, the legacy compressed extension form."""
    return GZIP_MAGIC + gzip.compress(data, compresslevel=9)


def decompress_ext_value(data: bytes) -> bytes:
    """undo the legacy `ELGZv1` + gzip compression (16 KiB cap); other values pass through."""
    if not data.startswith(GZIP_MAGIC):
        return data
    if len(data) == len(GZIP_MAGIC):
        raise ParseError("compressed extension is corrupt: no gzip data")
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data[len(GZIP_MAGIC) :])) as f:
            out = read_capped(f, MAX_DECOMPRESSED)
    except (OSError, EOFError, zlib.error) as e:
        raise ParseError(f"compressed extension is corrupt: {e}") from e
    if len(out) > MAX_DECOMPRESSED:
        raise ParseError("compressed extension exceeds 16 KiB")
    return out


@dataclass(frozen=True)
class RaTlsCertInfo:
    attestation: bytes | None
    app_id: bytes | None
    special_usage: str | None
    app_info: bytes | None
    legacy_quote: bytes | None = None
    legacy_event_log: bytes | None = None


def parse_ratls_cert(cert: x509.Certificate) -> RaTlsCertInfo:
    """the dstack extensions of a certificate (raw, unverified).

    Contract: ParseError when the certificate's extensions cannot be read (duplicates,
    malformed standard extensions, unsupported general names), a dstack extension is not a
    DER OCTET STRING of minimal length filling its value, is over `MAX_EXTENSION_SIZE`
    (1 MiB), or the legacy event log does not decompress within `MAX_DECOMPRESSED` (16 KiB).
    Linear in the certificate's size.
    """
    usage = get_extension_bytes(cert, OID_SPECIAL_USAGE)
    try:
        usage_str = usage.decode() if usage is not None else None
    except UnicodeDecodeError as e:
        raise ParseError("certificate usage extension is not utf-8") from e
    event_log = get_extension_bytes(cert, OID_EVENT_LOG)
    return RaTlsCertInfo(
        attestation=get_extension_bytes(cert, OID_ATTESTATION),
        app_id=get_extension_bytes(cert, OID_APP_ID),
        special_usage=usage_str,
        app_info=get_extension_bytes(cert, OID_APP_INFO),
        legacy_quote=get_extension_bytes(cert, OID_TDX_QUOTE),
        legacy_event_log=None if event_log is None else decompress_ext_value(event_log),
    )


def cert_attestation(cert: x509.Certificate) -> Attestation | None:
    """the attestation a certificate carries (`.8`, else legacy `.1` + `.2`), or None;
    ParseError (an AttestError) as `parse_ratls_cert`, `decode_versioned`, `parse_quote` and
    `event_log_from_json` raise it."""
    info = parse_ratls_cert(cert)
    if info.attestation is not None:
        return decode_versioned(info.attestation)
    if info.legacy_quote is not None:
        if info.legacy_event_log is None:
            raise ParseError("legacy ra-tls certificate has a quote but no event log")
        return from_quote_and_event_log(
            info.legacy_quote, event_log_from_json(info.legacy_event_log)
        )
    return None


def verify_cert_binding(cert: x509.Certificate) -> Attestation:
    """the certificate's attestation, after checking it binds the certificate key.

    Both the attestation's report_data and its quote's report_data must equal
    sha512("ratls-cert:" || SPKI DER). The quote itself still needs DCAP verification.
    AttestError for every refusal: ParseError for what cannot be read, VerifyError for an
    attestation that is absent or not bound to the key. Linear in the certificate's size.
    """
    att = cert_attestation(cert)
    if att is None:
        raise VerifyError("certificate carries no attestation")
    try:
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ParseError(f"certificate public key is unusable: {e}") from e
    expected = ratls_report_data(spki)
    if att.report_data != expected:
        raise VerifyError(
            "ratls certificate is not bound to its quote: attestation report_data does not "
            "match the certificate key"
        )
    if parse_quote(att.quote).report_data != expected:
        raise VerifyError(
            "ratls certificate is not bound to its quote: quote report_data does not match "
            "the certificate key"
        )
    return att

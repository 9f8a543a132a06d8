"""report_data conventions: `H(tag || ":" || content)` zero-padded to 64 bytes.

Tags in use: `ratls-cert` (content = certificate SubjectPublicKeyInfo DER), `app-data` (the legacy
TdxQuote default), `kms-root-ca`, or any caller prefix. `raw` takes exactly 64 bytes as they are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from pydstack.crypto.keccak import keccak

HASH_ALGORITHMS = (
    "sha256",
    "sha384",
    "sha512",
    "sha3-256",
    "sha3-384",
    "sha3-512",
    "keccak256",
    "keccak384",
    "keccak512",
    "raw",
)


def _keccak(bits: int) -> Callable[[bytes], bytes]:
    def digest(data: bytes) -> bytes:
        return keccak(bits, data)

    return digest


_HASHES: dict[str, Callable[[bytes], bytes]] = {
    "sha256": lambda d: hashlib.sha256(d).digest(),
    "sha384": lambda d: hashlib.sha384(d).digest(),
    "sha512": lambda d: hashlib.sha512(d).digest(),
    "sha3-256": lambda d: hashlib.sha3_256(d).digest(),
    "sha3-384": lambda d: hashlib.sha3_384(d).digest(),
    "sha3-512": lambda d: hashlib.sha3_512(d).digest(),
    "keccak256": _keccak(256),
    "keccak384": _keccak(384),
    "keccak512": _keccak(512),
}


def to_report_data(tag: str, content: bytes, hash_alg: str = "sha512") -> bytes:
    """64 bytes of report data for `content` under `tag` with hash `hash_alg`."""
    if hash_alg == "raw":
        if len(content) != 64:
            raise ValueError("invalid content length")
        return bytes(content)
    fn = _HASHES.get(hash_alg)
    if fn is None:
        raise ValueError("invalid hash algorithm")
    return fn(tag.encode() + b":" + content).ljust(64, b"\0")


def ratls_report_data(spki_der: bytes) -> bytes:
    """what a quote must carry to bind an RA-TLS certificate key."""
    return hashlib.sha512(b"ratls-cert:" + spki_der).digest()

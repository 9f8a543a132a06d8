"""the original Keccak (Ethereum's padding, not SHA-3's), from pycryptodome, loaded on first use.

pycryptodome's import parses C declarations through cffi and pycparser: 75 ms on the host and
over a second of a QEMU guest's boot under TCG, where nothing at boot hashes with Keccak.
"""

from __future__ import annotations


def keccak(bits: int, data: bytes) -> bytes:
    """Keccak-`bits` (256, 384 or 512) of `data`."""
    from Crypto.Hash import keccak as pycryptodome_keccak

    return bytes(pycryptodome_keccak.new(digest_bits=bits, data=data).digest())


def keccak256(data: bytes) -> bytes:
    """Keccak-256, as Ethereum and the KMS signature chain use it."""
    return keccak(256, data)

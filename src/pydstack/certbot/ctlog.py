"""RFC 6962 certificate transparency, sans I/O: log entries, the Merkle tree, signed tree heads.

* :func:`parse_leaf` reads a ``MerkleTreeLeaf`` (``leaf_input`` of ``get-entries``): version 0,
  ``timestamped_entry``, an ``x509_entry`` (the certificate DER) or a ``precert_entry`` (issuer
  key hash and the TBSCertificate); :meth:`LogEntry.certificate` gives a certificate object for
  either (a precert's TBS is wrapped, unsigned, so its names and key can be read);
* :class:`CompactMerkleTree` keeps O(log n) subtree hashes of a log read from its start, and its
  root after any number of leaves (RFC 6962 §2.1 hashing: ``0x00`` leaves, ``0x01`` nodes);
* :func:`parse_sth` and :func:`verify_sth` read ``get-sth`` and check its ``TreeHeadSignature``
  under the log's key (ECDSA P-256 or RSA, SHA-256);
* the writer side (:func:`encode_leaf`, :func:`sign_sth`, :func:`sign_sct`, :func:`encode_extra`)
  serves a local log (:mod:`.devctlog`).

Every parser bounds its lengths (:data:`MAX_CERT` per certificate, :data:`MAX_CHAIN` per chain)
and raises :class:`CtError` for malformed or oversized input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from pydstack.crypto.certload import load_cert_der
from pydstack.errors import InputError

X509_ENTRY, PRECERT_ENTRY = 0, 1
MAX_CERT = 128 * 1024
MAX_CHAIN = 16
MAX_LEAF = MAX_CERT + 1024
HASH_SHA256 = 4
SIG_RSA, SIG_ECDSA = 1, 3
TREE_HASH, CERT_TIMESTAMP = 1, 0
MAX_TREE_SIZE = 1 << 48


class CtError(InputError):
    """a log answer that is malformed, too large, or does not verify."""


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CtError(f"{self.what} is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def opaque(self, len_bytes: int, limit: int) -> bytes:
        n = self.uint(len_bytes)
        if n > limit:
            raise CtError(f"{self.what} holds a field of {n} bytes (max {limit})")
        return self.take(n)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise CtError(f"{self.what} has {len(self.data) - self.pos} trailing bytes")


def _b64(value: Any, what: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > (limit * 4) // 3 + 4:
        raise CtError(f"{what} must be base64 of at most {limit} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise CtError(f"{what} is not base64") from e


# ---------------------------------------------------------------------------- entries


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der_tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end) of the DER element at `pos`."""
    if pos + 2 > len(data):
        raise CtError("tbs certificate is truncated")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise CtError("tbs certificate has a bad length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise CtError("tbs certificate is truncated")
    return tag, pos, pos + length


def wrap_tbs(tbs: bytes) -> bytes:
    """a Certificate around a TBSCertificate, with its own signature algorithm and an empty
    signature: parseable for names and key, never valid. CtError if `tbs` is not a SEQUENCE
    that starts like a TBSCertificate."""
    tag, start, end = _der_tlv(tbs, 0)
    if tag != 0x30 or end != len(tbs):
        raise CtError("tbs certificate is not a der sequence")
    pos = start
    tag, _, nxt = _der_tlv(tbs, pos)
    if tag == 0xA0:  # [0] version
        pos = nxt
        tag, _, nxt = _der_tlv(tbs, pos)
    if tag != 0x02:  # serial number
        raise CtError("tbs certificate has no serial number")
    pos = nxt
    tag, _, nxt = _der_tlv(tbs, pos)
    if tag != 0x30:
        raise CtError("tbs certificate has no signature algorithm")
    alg = tbs[pos:nxt]
    sig = b"\x03\x01\x00"
    body = tbs + alg + sig
    return b"\x30" + _der_len(len(body)) + body


def _der_elements(data: bytes, start: int, end: int) -> list[bytes]:
    out = []
    pos = start
    while pos < end:
        _, _, nxt = _der_tlv(data, pos)
        out.append(data[pos:nxt])
        pos = nxt
    return out


def _der(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


#: the precertificate poison extension (RFC 6962 §3.1), DER of its OID
POISON_OID = bytes.fromhex("060a2b06010401d679020403")


def strip_poison(tbs: bytes) -> bytes:
    """a precertificate's TBSCertificate without its poison extension (what the log hashes);
    CtError if `tbs` is not a DER sequence."""
    tag, start, end = _der_tlv(tbs, 0)
    if tag != 0x30 or end != len(tbs):
        raise CtError("tbs certificate is not a der sequence")
    parts = []
    for el in _der_elements(tbs, start, end):
        if el[0] == 0xA3:
            _, s1, _ = _der_tlv(el, 0)
            _, s2, e2 = _der_tlv(el, s1)
            exts = [x for x in _der_elements(el, s2, e2) if not _is_poison(x)]
            if not exts:
                continue
            el = _der(0xA3, _der(0x30, b"".join(exts)))
        parts.append(el)
    return _der(0x30, b"".join(parts))


def _is_poison(ext: bytes) -> bool:
    _, start, _ = _der_tlv(ext, 0)
    return ext[start : start + len(POISON_OID)] == POISON_OID


@dataclass(frozen=True)
class LogEntry:
    """one parsed ``MerkleTreeLeaf``: `der` is the certificate (x509) or the TBS (precert)."""

    timestamp: int
    entry_type: int
    der: bytes
    issuer_key_hash: bytes = b""

    @property
    def kind(self) -> str:
        return "x509" if self.entry_type == X509_ENTRY else "precert"

    def certificate(self) -> x509.Certificate:
        """the certificate, or the precertificate's TBS wrapped; CtError when it does not
        parse."""
        der = self.der if self.entry_type == X509_ENTRY else wrap_tbs(self.der)
        try:
            return load_cert_der(der)
        except ValueError as e:
            raise CtError(f"{self.kind} entry does not parse: {e}") from e


def parse_leaf(leaf: bytes) -> LogEntry:
    """a ``MerkleTreeLeaf``; CtError for another version, leaf type or entry type."""
    if len(leaf) > MAX_LEAF:
        raise CtError(f"leaf is larger than {MAX_LEAF} bytes")
    r = _Reader(leaf, "merkle tree leaf")
    version, leaf_type = r.uint(1), r.uint(1)
    if version != 0 or leaf_type != 0:
        raise CtError(f"unknown leaf version {version} or type {leaf_type}")
    timestamp, entry_type = r.uint(8), r.uint(2)
    if entry_type == X509_ENTRY:
        entry = LogEntry(timestamp, entry_type, r.opaque(3, MAX_CERT))
    elif entry_type == PRECERT_ENTRY:
        issuer = r.take(32)
        entry = LogEntry(timestamp, entry_type, r.opaque(3, MAX_CERT), issuer)
    else:
        raise CtError(f"unknown log entry type {entry_type}")
    r.opaque(2, 0xFFFF)  # extensions
    r.end()
    return entry


def encode_leaf(entry: LogEntry, extensions: bytes = b"") -> bytes:
    """the ``MerkleTreeLeaf`` of `entry`."""
    out = struct.pack(">BBQH", 0, 0, entry.timestamp, entry.entry_type)
    if entry.entry_type == PRECERT_ENTRY:
        out += entry.issuer_key_hash
    out += len(entry.der).to_bytes(3, "big") + entry.der
    return out + struct.pack(">H", len(extensions)) + extensions


def encode_extra(entry_type: int, chain: list[bytes]) -> bytes:
    """``extra_data``: the chain (x509), or the precertificate then its chain (precert)."""

    def certs(items: list[bytes]) -> bytes:
        body = b"".join(len(c).to_bytes(3, "big") + c for c in items)
        return len(body).to_bytes(3, "big") + body

    if entry_type == X509_ENTRY:
        return certs(chain[1:])
    return len(chain[0]).to_bytes(3, "big") + chain[0] + certs(chain[1:])


def parse_entries(obj: Any, requested: int) -> list[bytes]:
    """the ``leaf_input`` of each entry of a ``get-entries`` answer (between 1 and `requested`
    of them); CtError otherwise."""
    entries = obj.get("entries") if isinstance(obj, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise CtError("get-entries answer has no entries")
    if len(entries) > requested:
        raise CtError(f"get-entries answered {len(entries)} entries for {requested} asked")
    out = []
    for e in entries:
        if not isinstance(e, Mapping):
            raise CtError("get-entries entry must be an object")
        out.append(_b64(e.get("leaf_input"), "leaf_input", MAX_LEAF))
    return out


# ---------------------------------------------------------------------------- merkle tree


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


EMPTY_ROOT = hashlib.sha256(b"").digest()


class CompactMerkleTree:
    """the roots of the perfect subtrees covering the leaves so far (left to right, one per set
    bit of `size`): enough to append and to give the RFC 6962 root at this size."""

    def __init__(self, size: int = 0, hashes: Iterable[bytes] = ()) -> None:
        self.size = size
        self.hashes = list(hashes)
        if len(self.hashes) != bin(size).count("1") or any(len(h) != 32 for h in self.hashes):
            raise CtError("compact tree state does not match its size")

    def copy(self) -> CompactMerkleTree:
        return CompactMerkleTree(self.size, self.hashes)

    def append(self, lh: bytes) -> None:
        """adds a leaf by its leaf hash."""
        h = lh
        size = self.size
        while size & 1:
            h = node_hash(self.hashes.pop(), h)
            size >>= 1
        self.hashes.append(h)
        self.size += 1

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        h = self.hashes[-1]
        for left in reversed(self.hashes[:-1]):
            h = node_hash(left, h)
        return h

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "hashes": [h.hex() for h in self.hashes]}

    @classmethod
    def from_json(cls, obj: Any) -> CompactMerkleTree:
        try:
            size, hashes = obj["size"], [bytes.fromhex(h) for h in obj["hashes"]]
        except (KeyError, TypeError, ValueError) as e:
            raise CtError("compact tree state is malformed") from e
        if not isinstance(size, int) or not 0 <= size < MAX_TREE_SIZE:
            raise CtError("compact tree size is out of range")
        return cls(size, hashes)


# ---------------------------------------------------------------------------- tree heads


@dataclass(frozen=True)
class SignedTreeHead:
    tree_size: int
    timestamp: int
    root_hash: bytes
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "tree_size": self.tree_size,
            "timestamp": self.timestamp,
            "sha256_root_hash": base64.b64encode(self.root_hash).decode(),
            "tree_head_signature": base64.b64encode(self.signature).decode(),
        }


def parse_sth(obj: Any) -> SignedTreeHead:
    """a ``get-sth`` answer; CtError for a missing or malformed field."""
    if not isinstance(obj, Mapping):
        raise CtError("get-sth answer must be an object")
    size, ts = obj.get("tree_size"), obj.get("timestamp")
    for name, v in (("tree_size", size), ("timestamp", ts)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 63:
            raise CtError(f"get-sth {name} must be a non-negative integer")
    assert isinstance(size, int) and isinstance(ts, int)
    if size >= MAX_TREE_SIZE:
        raise CtError("get-sth tree_size is out of range")
    root = _b64(obj.get("sha256_root_hash"), "sha256_root_hash", 32)
    if len(root) != 32:
        raise CtError("sha256_root_hash must be 32 bytes")
    sig = _b64(obj.get("tree_head_signature"), "tree_head_signature", 1024)
    return SignedTreeHead(size, ts, root, sig)


def _tree_head_input(size: int, timestamp: int, root: bytes) -> bytes:
    return struct.pack(">BBQQ", 0, TREE_HASH, timestamp, size) + root


def _digitally_signed(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    sig = key.sign(data, ec.ECDSA(hashes.SHA256()))
    return struct.pack(">BBH", HASH_SHA256, SIG_ECDSA, len(sig)) + sig


def _verify_signed(key: Any, signed: bytes, data: bytes, what: str) -> None:
    r = _Reader(signed, what)
    hash_alg, sig_alg = r.uint(1), r.uint(1)
    sig = r.opaque(2, 1024)
    r.end()
    if hash_alg != HASH_SHA256:
        raise CtError(f"{what} uses hash {hash_alg}, not sha256")
    try:
        if sig_alg == SIG_ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        elif sig_alg == SIG_RSA and isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise CtError(f"{what} algorithm {sig_alg} does not match the log key")
    except InvalidSignature as e:
        raise CtError(f"{what} does not verify under the log key") from e


def verify_sth(sth: SignedTreeHead, log_key: Any) -> None:
    """CtError unless `sth` is signed by `log_key` (an ECDSA or RSA public key)."""
    data = _tree_head_input(sth.tree_size, sth.timestamp, sth.root_hash)
    _verify_signed(log_key, sth.signature, data, "tree head signature")


def sign_sth(
    key: ec.EllipticCurvePrivateKey, size: int, timestamp: int, root: bytes
) -> SignedTreeHead:
    sig = _digitally_signed(key, _tree_head_input(size, timestamp, root))
    return SignedTreeHead(size, timestamp, root, sig)


def log_id(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """the log's id: SHA-256 of its SubjectPublicKeyInfo."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def sign_sct(key: ec.EllipticCurvePrivateKey, entry: LogEntry) -> dict[str, Any]:
    """the ``add-chain`` answer: an SCT v1 over `entry` (no extensions)."""
    signed = struct.pack(">BBQH", 0, CERT_TIMESTAMP, entry.timestamp, entry.entry_type)
    if entry.entry_type == PRECERT_ENTRY:
        signed += entry.issuer_key_hash
    signed += len(entry.der).to_bytes(3, "big") + entry.der + b"\x00\x00"
    return {
        "sct_version": 0,
        "id": base64.b64encode(log_id(key.public_key())).decode(),
        "timestamp": entry.timestamp,
        "extensions": "",
        "signature": base64.b64encode(_digitally_signed(key, signed)).decode(),
    }


def load_log_key(pem: bytes) -> Any:
    """a log's public key from PEM (CtError if it is neither ECDSA nor RSA)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise CtError(f"log key does not parse: {e}") from e
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CtError("log key must be ecdsa or rsa")
    return key

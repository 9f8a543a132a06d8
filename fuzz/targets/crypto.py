"""targets of `pydstack.crypto`: the KMS certificate signing request and encrypted env."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fuzz import mutators as m
from fuzz.harness import Target
from fuzz.targets import common as c
from pydstack.attest.errors import AttestError
from pydstack.crypto.csr import CONFIRM, CertConfigV2, CertSigningRequestV2
from pydstack.crypto.envcrypt import (
    MAX_ENV_ITEMS,
    MAX_ENV_TOTAL,
    EnvError,
    decrypt_env,
    filter_allowed_envs,
)

# -- CSR -----------------------------------------------------------------------------------


def csr_seeds() -> list[tuple[str, bytes]]:
    """CSRs of the fixed `csr` key, each with an attestation bound to that key."""
    k = c.key("csr")
    spki = c.spki(k)
    configs = {
        "plain": CertConfigV2(None, "app.example", ("app.example",), True, False, ext_quote=True),
        "full": CertConfigV2(
            "org", "app", ("a.example", "10.0.0.1", "b"), True, True, True, True, 1, 2**40
        ),
        "app-info": CertConfigV2(None, "", (), False, True, False, ext_app_info=True),
    }
    out = []
    for label, config in configs.items():
        for version, v1 in ((1, False), (1, True), (2, True)):
            att = c.attestation_bytes(version, bound_to=spki, v1=v1)
            csr = CertSigningRequestV2(CONFIRM, spki, config, att)
            out.append((f"{label}-{'v1' if v1 else 'v0'}-ev{version}", csr.encode()))
    return out


def _make_csr() -> Callable[[bytes], object]:
    k = c.key("csr")

    def call(data: bytes) -> None:
        csr = CertSigningRequestV2.decode(data)
        assert csr.encode() == data, "a decoded csr encodes to other bytes"
        csr.verify(k.sign(data, ec.ECDSA(hashes.SHA256())))

    return call


CSR = Target(
    name="csr",
    doc="`crypto/csr.py::CertSigningRequestV2.decode` (SCALE) and `verify` (the input signed "
    "by its key, as a peer would), and that a decoded CSR encodes to the same bytes",
    make=_make_csr,
    allowed=(AttestError,),
    seeds=csr_seeds,
    mutators=m.SCALE,
    tokens=(b"\x44" + CONFIRM.encode(), CONFIRM.encode(), b"\x01", b"\x00"),
    max_len=32 * 1024,
)

# -- encrypted env ---------------------------------------------------------------------------

ENV_SECRET = bytes(range(1, 33))
_EPH = X25519PrivateKey.from_private_bytes(bytes(range(33, 65)))
_IV = b"\x07" * 12


def seal(plaintext: bytes) -> bytes:
    """`plaintext` encrypted to ENV_SECRET's public key (fixed ephemeral key and IV)."""
    pub = X25519PrivateKey.from_private_bytes(ENV_SECRET).public_key()
    shared = _EPH.exchange(pub)
    eph_pub = _EPH.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return eph_pub + _IV + AESGCM(shared).encrypt(_IV, plaintext, None)


ALLOWED_ENVS = ("A", "B", "KEY", "1BAD", "with space", "")


def _envcrypt(data: bytes) -> None:
    c.refusing((EnvError,), decrypt_env, ENV_SECRET, data)  # the blob as a peer sends it
    envs = decrypt_env(ENV_SECRET, seal(data))  # the plaintext as a peer encrypts it
    assert len(envs) <= MAX_ENV_ITEMS
    assert sum(len(k.encode()) + len(v.encode()) for k, v in envs) <= MAX_ENV_TOTAL
    c.refusing((EnvError,), filter_allowed_envs, envs, ALLOWED_ENVS)


def _env_seeds() -> list[tuple[str, bytes]]:
    docs = {
        "env": {"env": [{"key": "A", "value": "1"}, {"key": "B", "value": "x\ny"}]},
        "bare-list": [{"key": "KEY", "value": "v"}],
        "empty": {"env": []},
        "odd-key": {"env": [{"key": "1BAD", "value": ""}, {"key": "A", "value": "\u00e9"}]},
    }
    out = [(label, json.dumps(doc).encode()) for label, doc in docs.items()]
    out.append(("sealed", seal(out[0][1])))
    return out


ENVCRYPT = Target(
    name="envcrypt",
    doc="`crypto/envcrypt.py`: `decrypt_env` of the input as a blob, and of the input "
    "encrypted as env JSON (`parse_env_json`), then `filter_allowed_envs`",
    make=lambda: _envcrypt,
    allowed=(EnvError,),
    seeds=_env_seeds,
    mutators=m.JSON,
    tokens=(b'"env"', b'"key"', b'"value"'),
    max_len=16 * 1024,
    calls=2,
)

TARGETS: Sequence[Target] = (CSR, ENVCRYPT)

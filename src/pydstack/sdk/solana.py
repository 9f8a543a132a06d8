"""Solana keypairs from GetKey results (optional extra: solders)."""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

from .models import GetKeyResponse, GetTlsKeyResponse

TLS_WARNING = "Please don't use getTlsKey method to get key, use getKey instead."


def _keypair_cls() -> Any:
    try:
        from solders.keypair import Keypair
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise ImportError("solana helpers need solders: pip install 'pydstack[solana]'") from e
    return Keypair


def to_keypair(result: GetKeyResponse | GetTlsKeyResponse) -> Any:
    if isinstance(result, GetTlsKeyResponse):
        warnings.warn(TLS_WARNING, DeprecationWarning, stacklevel=2)
        return _keypair_cls().from_seed(result.as_uint8array(32))
    return _keypair_cls().from_seed(result.decode_key()[:32])


def to_keypair_secure(result: GetKeyResponse | GetTlsKeyResponse) -> Any:
    if isinstance(result, GetTlsKeyResponse):
        warnings.warn(TLS_WARNING, DeprecationWarning, stacklevel=2)
        return _keypair_cls().from_seed(hashlib.sha256(result.as_uint8array()).digest())
    return _keypair_cls().from_seed(result.decode_key()[:32])

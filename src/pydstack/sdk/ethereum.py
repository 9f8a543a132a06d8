"""Ethereum accounts from GetKey results (optional extra: eth-account)."""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

from .models import GetKeyResponse, GetTlsKeyResponse

TLS_WARNING = "Please don't use getTlsKey method to get key, use getKey instead."


def _account_cls() -> Any:
    try:
        from eth_account import Account
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise ImportError(
            "ethereum helpers need eth-account: pip install 'pydstack[ethereum]'"
        ) from e
    return Account


def to_account(result: GetKeyResponse | GetTlsKeyResponse) -> Any:
    if isinstance(result, GetTlsKeyResponse):
        warnings.warn(TLS_WARNING, DeprecationWarning, stacklevel=2)
        return _account_cls().from_key(hashlib.sha256(result.as_uint8array()).digest())
    return _account_cls().from_key(result.decode_key())


def to_account_secure(result: GetKeyResponse | GetTlsKeyResponse) -> Any:
    if isinstance(result, GetTlsKeyResponse):
        warnings.warn(TLS_WARNING, DeprecationWarning, stacklevel=2)
        return _account_cls().from_key(hashlib.sha256(result.as_uint8array()).digest())
    return _account_cls().from_key(result.decode_key())

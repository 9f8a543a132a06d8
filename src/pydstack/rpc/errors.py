"""the error a prpc caller sees: exactly this message, HTTP 400."""

from __future__ import annotations

from pydstack.errors import DstackError


class RpcError(DstackError):
    """an expected failure at the service edge: the caller sees exactly this message."""

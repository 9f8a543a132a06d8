"""shared TLS session-ticket keys for the worker processes.

Each OpenSSL server context makes its own random ticket keys, so a client that resumes with a
ticket from one worker process and lands on another (SO_REUSEPORT spreads connections by hash)
pays a full handshake. :func:`set_ticket_keys` installs the pool's 80-byte key (16 name, 32
HMAC, 32 AES; made by the parent with ``os.urandom``) on a context with
``SSL_CTX_set_tlsext_ticket_keys``, which Python's ``ssl`` module does not expose: it reaches
the context's ``SSL_CTX*`` through ctypes and first checks that pointer by reading the
context's options through OpenSSL and comparing them with ``SSLContext.options``. Anything
unexpected (another OpenSSL, another object layout) leaves the context alone and returns False:
tickets then work within one worker, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import ssl
import sys

log = logging.getLogger(__name__)

TICKET_KEY_BYTES = 80
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59


def _libssl() -> ctypes.CDLL | None:
    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        return lib
    except (OSError, AttributeError, ImportError):
        return None


_LIB = _libssl()


def _ctx_pointer(ctx: ssl.SSLContext) -> int | None:
    """the SSL_CTX* of `ctx` (the first field after the object header), verified."""
    if _LIB is None or sys.implementation.name != "cpython":
        return None
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        return None
    if int(_LIB.SSL_CTX_get_options(ptr)) != int(ctx.options):
        return None
    return int(ptr)


def set_ticket_keys(ctx: ssl.SSLContext, keys: bytes) -> bool:
    """use `keys` (80 bytes) for the context's session tickets; False when not possible.
    ValueError for a key of another length."""
    if len(keys) != TICKET_KEY_BYTES:
        raise ValueError(f"ticket keys must be {TICKET_KEY_BYTES} bytes")
    ptr = _ctx_pointer(ctx)
    if ptr is None or _LIB is None:
        log.debug("shared ticket keys not available; tickets stay per process")
        return False
    buf = ctypes.create_string_buffer(keys, TICKET_KEY_BYTES)
    ok = _LIB.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEY_BYTES, buf)
    ctypes.memset(buf, 0, TICKET_KEY_BYTES)
    return bool(ok)

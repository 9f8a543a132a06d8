"""the root of every pydstack error, and the kinds every component shares.

Domain code raises domain errors (subclasses of :class:`DstackError`); the RPC layer maps them to
wire errors at the service edge (:class:`pydstack.rpc.errors.RpcError` carries the exact message
a caller sees). A bad input from a peer is an :class:`InputError` (also a ``ValueError``), so
older ``except ValueError`` clauses keep catching it; every parser of peer input raises its own
subclass of it and nothing else.
"""

from __future__ import annotations


class DstackError(Exception):
    """anything pydstack refuses or fails at, with a lower-case message that says why."""


class InputError(DstackError, ValueError):
    """input from a peer, a file or a user is malformed or out of bounds."""


class ConfigError(InputError):
    """a configuration file or option is invalid."""


class NotFoundError(DstackError):
    """the thing asked for does not exist."""


class UnavailableError(DstackError):
    """a service this depends on cannot be reached or refused to work."""

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


#: the most characters of a peer's value an error message shows
SHOW_MAX = 40


def show_value(value: object) -> str:
    """a value a peer sent, for an error message: bounded whatever the value (a string cut to
    SHOW_MAX characters, an integer's digits while short, else only its kind), so a message
    never grows with its input, nor repeats a large structure."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return str(value) if -(10**SHOW_MAX) < value < 10**SHOW_MAX else "a number too long to show"
    if isinstance(value, str):
        return repr(value[:SHOW_MAX]) + ("..." if len(value) > SHOW_MAX else "")
    if isinstance(value, float):
        return repr(value)
    return f"a {type(value).__name__}"

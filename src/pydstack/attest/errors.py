"""errors raised by the attestation cores.

Every parser in :mod:`pydstack.attest` raises :class:`ParseError` (never IndexError, struct.error
or the like) on malformed input, and every verification step raises :class:`VerifyError` when
evidence is refused. Messages start lower-case and say what was wrong.
"""

from pydstack.errors import InputError


class AttestError(InputError):
    """base class of attestation errors."""


class ParseError(AttestError):
    """the input bytes are not a well-formed instance of the expected format."""


class VerifyError(AttestError):
    """the evidence was parsed but is refused (signature, policy, binding, replay...)."""

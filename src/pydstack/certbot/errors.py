"""what the certbot refuses or fails at (all :class:`~pydstack.errors.DstackError`)."""

from __future__ import annotations

from pydstack.errors import DstackError, InputError, UnavailableError


class CertbotError(DstackError):
    """a certificate could not be obtained, stored or attested."""


class CertbotInputError(CertbotError, InputError):
    """a domain, credential, setting or stored record is malformed or out of bounds."""


class DnsProviderError(CertbotError):
    """a DNS provider refused or failed a change (the message carries its answer, never a
    credential)."""


class AcmeUnavailableError(CertbotError, UnavailableError):
    """the ACME server could not be reached or answered with a server error (worth a retry)."""


class AcmeRefusedError(CertbotError):
    """the ACME server refused the account, order or challenge (not worth a retry as is)."""

"""the VMM's domain errors, and the upstream wire strings clients match on.

The VMM raises these; the prpc server turns any :class:`~pydstack.errors.DstackError` into an
HTTP 400 whose body carries the message, so a message here is exactly what a caller reads.
Messages start lower-case, except upstream's own strings, kept verbatim as named constants
because clients compare them.
"""

from __future__ import annotations

from pydstack.errors import DstackError, InputError, NotFoundError, UnavailableError

#: upstream's reply to GetAppEnvEncryptPubKey when the VMM has no `kms_url`
KMS_NOT_CONFIGURED = "KMS is not configured"


class VmmError(DstackError):
    """the VMM refuses or fails at a request."""


class VmNotFound(VmmError, NotFoundError):
    """no VM has this id."""

    def __init__(self, vm_id: str) -> None:
        super().__init__(f"vm not found: {vm_id}")
        self.vm_id = vm_id


class Refused(VmmError, InputError):
    """a request the VMM will not carry out as asked: malformed, over a limit, or in conflict
    with another VM. Nothing was changed."""


class Unsupported(Refused):
    """a field the CVM backend cannot honour; the message names the field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


class InvalidState(Refused):
    """the VM's current state does not allow the request (e.g. resizing a running VM)."""


class GuestUnavailable(VmmError, UnavailableError):
    """the CVM's guest API cannot be reached (not running, still booting, or gone)."""


class KmsUnavailable(VmmError, UnavailableError):
    """the KMS the VMM proxies to cannot be reached."""


class BackendError(VmmError):
    """the host cannot run, stop or clean up a CVM (a tool failed, a resource is missing)."""

"""BootInfo (what the KMS tells its authorization backend) lives in the shared verification
core, :mod:`pydstack.attest.bootinfo`; this name stays for the KMS's modules and plugins."""

from pydstack.attest.bootinfo import HASH_LEN, OPTIONAL_HASHES, BootInfo

__all__ = ["HASH_LEN", "OPTIONAL_HASHES", "BootInfo"]

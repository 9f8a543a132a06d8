"""the host share: the files a VMM writes for its CVM and the guest reads at boot.

Names and size caps are upstream's (`dstack-types`); the guest copies each file with its cap
before reading it, so a host cannot make it read more.
"""

from __future__ import annotations

from dataclasses import dataclass

APP_COMPOSE = "app-compose.json"
SYS_CONFIG = ".sys-config.json"
INSTANCE_INFO = ".instance_info"
ENCRYPTED_ENV = ".encrypted-env"
USER_CONFIG = ".user-config"
#: written by the guest into its own copy of the share, never by the host
APP_KEYS = ".appkeys.json"
DECRYPTED_ENV = ".decrypted-env"
DECRYPTED_ENV_JSON = ".decrypted-env.json"

MiB = 1024 * 1024


@dataclass(frozen=True)
class SharedFile:
    name: str
    max_size: int
    required: bool
    #: holds secrets of the app (kept 0600 on the host)
    secret: bool = False


#: what the host may put in the share, with upstream's caps
SHARED_FILES: tuple[SharedFile, ...] = (
    SharedFile(APP_COMPOSE, 50 * MiB, True),
    SharedFile(SYS_CONFIG, 32 * 1024, True),
    SharedFile(INSTANCE_INFO, 10 * 1024, False),
    SharedFile(ENCRYPTED_ENV, 256 * 1024, False, secret=True),
    SharedFile(USER_CONFIG, 50 * MiB, False, secret=True),
)
SHARED_NAMES = tuple(f.name for f in SHARED_FILES)
SECRET_NAMES = frozenset(f.name for f in SHARED_FILES if f.secret)

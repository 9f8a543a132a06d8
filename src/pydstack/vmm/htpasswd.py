"""`[auth] htpasswd_file`: Apache htpasswd users for the VMM's Basic auth (bcrypt entries only,
as upstream: `htpasswd -B`).

The file is read at start (an unreadable file, a malformed line or a non-bcrypt entry refuses
the start, naming the line) and read again whenever it changes (size, mtime or inode); a change
that makes it invalid is logged and denies every htpasswd login until it is fixed (tokens keep
working). Users are compared in constant time over every entry, and an unknown user costs one
bcrypt check like a known one. bcrypt's check blocks for tens of milliseconds, so callers run
:meth:`Htpasswd.verify` in a thread; a successful check is remembered (keyed by a keyed hash of
user and password, never the password) until the file changes, so a polling web UI does not pay
it on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from pydstack.errors import ConfigError

log = logging.getLogger("dstack-vmm")

#: bcrypt hashes: $2a$, $2b$ or $2y$, a two-digit cost, 53 characters of salt and hash
BCRYPT_RE = re.compile(rb"\$2[aby]\$[0-9]{2}\$[./A-Za-z0-9]{53}")
MAX_FILE = 1024 * 1024
MAX_USER = 255
#: how many verified (user, password) pairs are remembered
CACHE_SIZE = 64
#: checked against when the user is unknown, so that costs what a known user costs
_DUMMY_HASH = bcrypt.hashpw(b"unknown user", bcrypt.gensalt(rounds=10))


@dataclass(frozen=True)
class _Stamp:
    size: int
    mtime_ns: int
    inode: int


def parse(text: bytes, where: str) -> dict[bytes, bytes]:
    """`user:hash` lines (blank lines and `#` comments skipped) -> {user: hash}; ConfigError
    naming the line for anything that is not a bcrypt entry."""
    users: dict[bytes, bytes] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        user, sep, hashed = line.partition(b":")
        if not sep or not user or len(user) > MAX_USER:
            raise ConfigError(f"{where} line {n}: expected user:hash")
        if not BCRYPT_RE.fullmatch(hashed):
            raise ConfigError(
                f"{where} line {n}: the entry of {user[:40].decode(errors='replace')!r} is not "
                "bcrypt (create it with `htpasswd -B`)"
            )
        users[user] = hashed
    return users


class Htpasswd:
    """an htpasswd file kept current; `load` raises ConfigError for a bad file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._users: dict[bytes, bytes] = {}
        self._stamp: _Stamp | None = None
        self._valid = False
        self._cache_key = os.urandom(32)
        self._cache: OrderedDict[bytes, None] = OrderedDict()

    @classmethod
    def load(cls, path: Path) -> Htpasswd:
        h = cls(path)
        h._reload(strict=True)
        return h

    def _read(self) -> tuple[_Stamp, dict[bytes, bytes]]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size > MAX_FILE:
                    raise ConfigError(f"{self.path} is over {MAX_FILE} bytes")
                text = f.read(MAX_FILE + 1)
        except OSError as e:
            raise ConfigError(f"cannot read the htpasswd file {self.path}: {e.strerror}") from e
        return _Stamp(st.st_size, st.st_mtime_ns, st.st_ino), parse(text, str(self.path))

    def _reload(self, strict: bool) -> None:
        try:
            stamp, users = self._read()
        except ConfigError as e:
            if strict:
                raise
            if self._valid:
                log.error("%s; htpasswd logins are refused until it is fixed", e)
            self._valid = False
            self._stamp = None
            self._cache.clear()
            return
        self._users, self._stamp, self._valid = users, stamp, True
        self._cache.clear()

    def _current(self) -> None:
        """read the file again if it changed since the last read."""
        try:
            st = os.stat(self.path)
            stamp: _Stamp | None = _Stamp(st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            stamp = None
        if stamp is None or stamp != self._stamp:
            self._reload(strict=False)

    def verify(self, user: str, password: str) -> bool:
        """whether `user` with `password` is an entry of the (current) file."""
        u, p = user.encode(), password.encode()
        key = hmac.new(self._cache_key, u + b"\0" + p, hashlib.sha256).digest()
        with self._lock:
            self._current()
            if not self._valid:
                return False
            if key in self._cache:
                self._cache.move_to_end(key)
                return True
            hashed = _DUMMY_HASH
            found = False
            for name, h in self._users.items():
                if hmac.compare_digest(name, u):
                    hashed, found = h, True
            stamp = self._stamp
        try:
            ok = bcrypt.checkpw(p, hashed) and found
        except ValueError:
            ok = False
        if ok:
            with self._lock:
                if self._stamp == stamp:  # the file did not change meanwhile
                    self._cache[key] = None
                    while len(self._cache) > CACHE_SIZE:
                        self._cache.popitem(last=False)
        return ok

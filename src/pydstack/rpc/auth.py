"""shared authentication of operator listeners (the VMM's API, the gateway's admin server):
a token and Apache htpasswd users for Basic auth (bcrypt entries only, as upstream: `htpasswd -B`).

:func:`auth_middleware` accepts `Authorization: Bearer <token>`, `X-Admin-Token: <token>`,
Basic with the token as password (or as user with an empty password), `?token=<token>` on GET,
and Basic users of an :class:`Htpasswd` file; anything else is 401 with a Basic challenge naming
the realm. Tokens are compared by SHA-256 digest in constant time.

:class:`Htpasswd`:

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

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from aiohttp import web

from pydstack.errors import ConfigError
from pydstack.types.capped import read_capped

log = logging.getLogger(__name__)

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
                text = read_capped(f, MAX_FILE)
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


Middleware = Callable[..., Awaitable[web.StreamResponse]]


def auth_middleware(
    tokens: tuple[str, ...], htpasswd: Htpasswd | None = None, *, realm: str
) -> Middleware:
    """an aiohttp middleware admitting the `tokens` and `htpasswd`'s users (see the module)."""
    digests = [hashlib.sha256(t.encode()).digest() for t in tokens if t]

    def ok(candidate: str) -> bool:
        d = hashlib.sha256(candidate.encode()).digest()
        return any(hmac.compare_digest(d, x) for x in digests)

    challenge = {"WWW-Authenticate": f'Basic realm="{realm}"'}

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        cands: list[str] = []
        basic: tuple[str, str] | None = None
        if auth.startswith("Bearer "):
            cands.append(auth[7:].strip())
        elif auth.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                cands += [password] if password else [user]
                basic = (user, password)
            except (ValueError, UnicodeDecodeError):
                pass
        if "X-Admin-Token" in request.headers:
            cands.append(request.headers["X-Admin-Token"])
        if request.method == "GET" and "token" in request.query:
            cands.append(request.query["token"])
        if any(ok(c) for c in cands if c):
            return await handler(request)
        if basic is not None and await _htpasswd_ok(htpasswd, *basic):
            return await handler(request)
        return web.Response(status=401, text="unauthorized\n", headers=challenge)

    return middleware


async def _htpasswd_ok(htpasswd: Htpasswd | None, user: str, password: str) -> bool:
    if htpasswd is None or not user or not password:
        return False
    return await asyncio.to_thread(htpasswd.verify, user, password)

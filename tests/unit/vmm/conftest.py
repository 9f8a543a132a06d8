"""fixtures for the VMM's unit tests: a started VmmApp on a FakeBackend in a temp dir."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pydstack.vmm.app import VmmApp

from .fakes import FakeBackend, FakeClock, vmm_config

AppFactory = Callable[..., Awaitable[VmmApp]]


@pytest.fixture
async def make_app(tmp_path: Path) -> AsyncIterator[AppFactory]:
    """`await make_app(backend=..., **config)`: a started VmmApp on a FakeBackend (closed at the
    end of the test)."""
    apps: list[VmmApp] = []

    async def make(
        backend: FakeBackend | None = None, clock: FakeClock | None = None, **overrides: Any
    ) -> VmmApp:
        app = VmmApp(
            vmm_config(tmp_path, **overrides),
            backend if backend is not None else FakeBackend(),
            clock=clock or FakeClock(),
        )
        await app.start()
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.close()

"""CVM backends: the :class:`~.base.CvmBackend` protocol and the factory that picks one from
vmm.toml (`[cvm] backend`, settings in `[cvm.<backend>]`, parsed by the backend itself).

Available: `sandbox` and `qemu`.

The names of :mod:`.base` are loaded on first use: the sandbox's per-CVM launcher is a module
of this package, started once per boot, and needs none of them (importing them cost it some
40 ms before each CVM's start).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydstack.errors import ConfigError

if TYPE_CHECKING:
    from ..config import VmmConfig
    from .base import (
        BootSpec,
        Capabilities,
        CvmBackend,
        GpuDevice,
        HostApiChannel,
        InterfaceStatus,
        ProcessInfo,
    )

__all__ = [
    "AVAILABLE",
    "BootSpec",
    "Capabilities",
    "CvmBackend",
    "GpuDevice",
    "HostApiChannel",
    "InterfaceStatus",
    "ProcessInfo",
    "make_backend",
    "parse_backend_config",
]
#: the names of `.base`, loaded on first use
_BASE_NAMES = frozenset(__all__) - {"AVAILABLE", "make_backend", "parse_backend_config"}


def __getattr__(name: str) -> Any:
    if name in _BASE_NAMES:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


AVAILABLE = ("sandbox", "qemu")
PLANNED: tuple[str, ...] = ()


def parse_backend_config(name: str, table: Mapping[str, Any]) -> Any:
    """the settings of backend `name` from its `[cvm.<name>]` table; ConfigError for an unknown
    or not yet available backend, or an invalid key."""
    if name == "sandbox":
        from .sandbox.config import SandboxConfig

        return SandboxConfig.from_table(table)
    if name == "qemu":
        from .qemu.config import QemuConfig

        return QemuConfig.from_table(table)
    if name in PLANNED:
        raise ConfigError(
            f"cvm.backend {name!r} is not available yet: this build runs CVMs in the sandbox "
            "backend (Linux namespaces + simulated TDX)"
        )
    raise ConfigError(f"unknown cvm.backend {name!r} (available: {', '.join(AVAILABLE)})")


def make_backend(config: VmmConfig) -> CvmBackend:
    """the backend `config` names, with its parsed settings."""
    if config.backend == "sandbox":
        from .sandbox.backend import SandboxBackend
        from .sandbox.config import SandboxConfig

        settings = config.backend_config
        if not isinstance(settings, SandboxConfig):
            raise ConfigError("cvm.backend is sandbox but the config holds no [cvm.sandbox]")
        return SandboxBackend(config, settings)
    if config.backend == "qemu":
        from .qemu.backend import QemuBackend
        from .qemu.config import QemuConfig

        qemu = config.backend_config
        if not isinstance(qemu, QemuConfig):
            raise ConfigError("cvm.backend is qemu but the config holds no [cvm.qemu]")
        return QemuBackend(config, qemu)
    parse_backend_config(config.backend, {})  # raises: unknown or planned
    raise ConfigError(f"cvm.backend {config.backend!r} has no implementation")

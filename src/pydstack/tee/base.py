"""what every TDX backend offers the guest."""

from __future__ import annotations

from typing import Protocol

from pydstack.attest.eventlog import RuntimeEvent, TdxEvent


class TdxPlatform(Protocol):
    #: True for the simulated TDX (full event log and an attestation in GetQuote)
    simulated: bool
    #: True when quotes are signed in this process (CPU only, well under a millisecond): callers
    #: on an event loop may ask inline; others (a kernel, a host) are asked from a thread
    in_process: bool

    def get_quote(self, report_data: bytes) -> bytes: ...

    def extend_rtmr3(self, event: RuntimeEvent) -> None: ...

    def runtime_events(self) -> list[RuntimeEvent]: ...

    def event_log(self) -> list[TdxEvent]: ...

"""what every TDX backend offers the guest."""

from __future__ import annotations

from typing import Protocol

from pydstack.attest.eventlog import RuntimeEvent, TdxEvent


class TdxPlatform(Protocol):
    #: True for the simulated TDX (full event log and an attestation in GetQuote)
    simulated: bool

    def get_quote(self, report_data: bytes) -> bytes: ...

    def extend_rtmr3(self, event: RuntimeEvent) -> None: ...

    def runtime_events(self) -> list[RuntimeEvent]: ...

    def event_log(self) -> list[TdxEvent]: ...

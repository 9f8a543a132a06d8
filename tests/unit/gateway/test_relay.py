"""the relay's flow control and ordering, on stand-in transports (the relay's own logic only;
the integration tests run it on real sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from pydstack.gateway.relay import TLS_WRITE_HIGH_WATER, Relay, Side


class FakeTransport:
    """a transport that keeps what is written and calls pause/resume_writing at its marks, as
    asyncio's do."""

    def __init__(self, protocol: Side, *, tls: bool = False) -> None:
        self.protocol = protocol
        self.tls = tls
        self.buffered = 0
        self.written: list[bytes] = []
        self.reading = True
        self.high = 64 * 1024
        self.low = self.high // 4
        self.writing_paused = False
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return object() if name == "ssl_object" and self.tls else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        assert high is not None
        self.high = high
        self.low = high // 4 if low is None else low

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.buffered += len(data)
        if not self.writing_paused and self.buffered > self.high:
            self.writing_paused = True
            self.protocol.pause_writing()

    def drain(self) -> None:
        """the peer read everything."""
        self.buffered = 0
        if self.writing_paused:
            self.writing_paused = False
            self.protocol.resume_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def _relay(
    *, client_tls: bool, high: int = 64 * 1024
) -> tuple[Relay, FakeTransport, FakeTransport]:
    closed: list[Relay] = []
    relay = Relay(high_water=high, shutdown_timeout=5, started=0.0, on_close=closed.append)
    client = FakeTransport(relay.client, tls=client_tls)
    backend = FakeTransport(relay.backend)
    relay.client.connection_made(client)  # type: ignore[arg-type]
    relay.backend.connection_made(backend)  # type: ignore[arg-type]
    return relay, client, backend


def test_a_client_that_does_not_read_pauses_the_backend() -> None:
    """bytes pile up for a client only to the pause mark: the backend is not read beyond it
    until the client drains (what bounds a slow reader's memory)."""
    relay, client, backend = _relay(client_tls=False)
    relay.link()
    chunk = b"x" * 16 * 1024
    sent = 0
    while backend.reading:
        relay.backend.data_received(chunk)
        sent += len(chunk)
        assert sent < 1 << 20, "the backend was never paused"
    assert client.buffered <= client.high + len(chunk)
    assert client.high == 64 * 1024
    client.drain()
    assert backend.reading


@pytest.mark.parametrize(("configured", "expected"), [(16 * 1024, TLS_WRITE_HIGH_WATER),
                                                      (1 << 20, 1 << 20)])  # fmt: skip
def test_a_tls_side_pauses_no_lower_than_one_read(configured: int, expected: int) -> None:
    """a TLS side's pause mark is at least one read of the other side; a plain side keeps the
    configured buffer size; a larger configured size holds for both."""
    relay, client, backend = _relay(client_tls=True, high=configured)
    relay.link()
    assert client.high == expected
    assert backend.high == configured


def test_bytes_sent_before_the_link_go_first_and_in_order() -> None:
    relay, client, backend = _relay(client_tls=True)
    relay.client.data_received(b"hello ")
    relay.client.data_received(b"world")
    assert not client.reading  # held, and reading paused until both sides exist
    relay.backend.data_received(b"early reply")
    relay.link(b"PROXY-HEADER")
    assert backend.written == [b"PROXY-HEADER", b"hello ", b"world"]
    assert client.written == [b"early reply"]
    assert client.reading and backend.reading
    relay.client.data_received(b"!")
    assert backend.written[-1] == b"!"

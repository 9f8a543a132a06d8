"""the ClientHello parser: real OpenSSL hellos, every prefix, hand-built edge cases, fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydstack.errors import InputError
from pydstack.gateway.sni import (
    MAX_CLIENT_HELLO,
    ClientHello,
    ClientHelloError,
    NoSniError,
    NotClientHelloError,
    parse_client_hello,
)

from .hello import alpn_ext, built, ext, handshake, hello_body, openssl_hello, records, sni_ext


def test_real_hello_gives_sni_and_alpn() -> None:
    data = openssl_hello("App1-8080.Example.COM", ["h2", "http/1.1"])
    assert parse_client_hello(data) == ClientHello("app1-8080.example.com", ("h2", "http/1.1"))


def test_real_hello_without_alpn() -> None:
    assert parse_client_hello(openssl_hello("a.example.com")) == ClientHello("a.example.com", ())


def test_real_hello_without_sni_is_no_sni() -> None:
    with pytest.raises(NoSniError, match="no sni found"):
        parse_client_hello(openssl_hello(None))


def test_every_prefix_asks_for_more() -> None:
    data = openssl_hello("x.example.com", ["h2"])
    for n in range(len(data)):
        assert parse_client_hello(data[:n]) is None, n
    assert parse_client_hello(data) is not None


def test_trailing_application_bytes_are_ignored() -> None:
    # bytes after the hello's record belong to the stream, not the hello
    data = openssl_hello("x.example.com") + b"\x17\x03\x03\x00\x01z"
    assert parse_client_hello(data) == ClientHello("x.example.com", ())


def test_hello_split_over_two_records() -> None:
    msg = handshake(hello_body(sni_ext((0, b"split.example.com"))))
    for split in (1, 3, 4, 20, len(msg) - 1):
        data = records(msg, split=split)
        assert parse_client_hello(data) == ClientHello("split.example.com", ()), split
        assert parse_client_hello(data[:-1]) is None


def test_first_host_name_wins_and_other_name_types_are_skipped() -> None:
    data = built(sni_ext((1, b"ignored"), (0, b"first.example.com"), (0, b"second.example.com")))
    assert parse_client_hello(data) == ClientHello("first.example.com", ())


def test_alpn_before_and_after_sni() -> None:
    data = built(alpn_ext(b"h2") + sni_ext((0, b"a.b")) + ext(0x2B, b"\x02\x03\x04"))
    assert parse_client_hello(data) == ClientHello("a.b", ("h2",))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "not a tls handshake record"),
        (b"\x16\x02", "bad version"),
        (b"\x17\x03\x03\x00\x05hello", "not a tls handshake record"),
        (b"\x16\x03\x01\x00\x00", "bad tls record length"),
        (b"\x16\x03\x01\x40\x01" + b"\x01", "bad tls record length"),
        (records(handshake(b"\x03\x03", htype=2)), "not a client hello"),
        (built(None, session=b"s" * 33), "session id longer"),
        (built(None, ciphers=b""), "bad cipher suites length"),
        (built(None, ciphers=b"\x13"), "bad cipher suites length"),
        (built(None, compression=b""), "no compression methods"),
        (built(sni_ext((0, b"a.b")) + sni_ext((0, b"c.d"))), "duplicate extension"),
        (built(sni_ext((0, b"bad host!"))), "not a host name"),
        (built(sni_ext((0, b"a..b"))), "not a host name"),
        (built(sni_ext((0, b""))), "bad sni length"),
        (built(sni_ext((0, b"a" * 254))), "bad sni length"),
        (built(alpn_ext(b"")), "empty alpn protocol"),
        (built(ext(0, b"\x00\x09\x00\x00\x03abc")), "truncated"),
        (built(ext(0, b"\x00\x06\x00\x00\x03abcZ")), "trailing bytes"),
        (records(handshake(hello_body(sni_ext((0, b"a.b"))) + b"x")), "trailing bytes"),
    ],
)
def test_malformed_hellos_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(NotClientHelloError, match=message):
        parse_client_hello(data)


def test_hello_without_extensions_is_no_sni() -> None:
    with pytest.raises(NoSniError):
        parse_client_hello(built(None))
    with pytest.raises(NoSniError):
        parse_client_hello(built(ext(0x2B, b"\x02\x03\x04")))


def test_hello_larger_than_the_bound_is_refused_before_it_is_read() -> None:
    padding = ext(21, b"\x00" * (MAX_CLIENT_HELLO))
    data = built(sni_ext((0, b"a.b")) + padding)
    # the declared lengths already exceed the bound: refused from the first record header
    with pytest.raises(NotClientHelloError, match="larger than 4096"):
        parse_client_hello(data[:5])
    with pytest.raises(NotClientHelloError, match="larger than 4096"):
        parse_client_hello(data)


def test_many_small_records_stop_at_the_bound() -> None:
    msg = handshake(hello_body(ext(21, b"\x00" * 5000)))
    data = b"".join(b"\x16\x03\x01\x00\x10" + msg[i : i + 16] for i in range(0, len(msg), 16))
    with pytest.raises(NotClientHelloError, match="larger than 4096"):
        parse_client_hello(data)


def test_errors_are_input_errors() -> None:
    assert issubclass(ClientHelloError, InputError)
    assert issubclass(NoSniError, ClientHelloError)
    assert issubclass(NotClientHelloError, ClientHelloError)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_parse_or_are_refused(data: bytes) -> None:
    try:
        result = parse_client_hello(data)
    except ClientHelloError:
        return
    assert result is None or isinstance(result, ClientHello)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_real_hellos_parse_or_are_refused(data: st.DataObject) -> None:
    base = bytearray(openssl_hello("m.example.com", ["h2"]))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(base) - 1))
        base[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    try:
        result = parse_client_hello(bytes(base[:cut]))
    except ClientHelloError:
        return
    assert result is None or isinstance(result, ClientHello)


def _reassembled(data: bytes) -> ClientHello | None:
    """what the general path (records reassembled, then parsed) makes of `data`."""
    from pydstack.gateway.sni import _handshake_bytes, _parse_hello

    msg = _handshake_bytes(data)
    return None if msg is None else _parse_hello(msg)


def _outcome(parse: object, data: bytes) -> object:
    try:
        return parse(data)  # type: ignore[operator]
    except ClientHelloError as e:
        return (type(e), str(e))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_one_record_fast_path_answers_as_reassembly_does(data: st.DataObject) -> None:
    """a hello in one record takes a shorter path; on every input, mutated or not, the answer
    (a hello, more to read, or the same refusal) is the general path's."""
    base = bytearray(
        data.draw(
            st.sampled_from(
                [
                    openssl_hello("fast.example.com", ["h2", "http/1.1"]),
                    openssl_hello("t12.example.com", tls12=True),
                    openssl_hello(None),
                    built(sni_ext((0, b"a.example.com")) + alpn_ext(b"h2")),
                ]
            )
        )
    )
    for _ in range(data.draw(st.integers(0, 3))):
        # the headers' length fields as often as the rest
        i = data.draw(st.one_of(st.integers(0, 8), st.integers(0, len(base) - 1)))
        base[i] = data.draw(st.integers(0, 255))
    cut = len(base) if data.draw(st.booleans()) else data.draw(st.integers(0, len(base)))
    sample = bytes(base[:cut])
    assert _outcome(parse_client_hello, sample) == _outcome(_reassembled, sample)


def test_the_fast_path_is_taken_for_a_real_hello(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydstack.gateway import sni

    def no_reassembly(buf: bytes) -> bytes | None:
        raise AssertionError("reassembled a hello that fits one record")

    monkeypatch.setattr(sni, "_handshake_bytes", no_reassembly)
    hello = openssl_hello("one.example.com", ["h2"])
    assert parse_client_hello(hello) == ClientHello("one.example.com", ("h2",))
    # two records still go the general way
    with pytest.raises(AssertionError):
        parse_client_hello(records(handshake(hello_body(sni_ext((0, b"x.y")))), split=10))

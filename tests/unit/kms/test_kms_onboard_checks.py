"""onboarding's checks on the source: one pinned key, and answers that hang together."""

from __future__ import annotations

import pytest
from cryptography import x509

from pydstack.crypto.certs import cert_pem, generate_p256_key, key_pem
from pydstack.kms.keys import ca_certs, rpc_cert
from pydstack.kms.onboard import SourcePin, _source_ca
from pydstack.rpc.proto import kms_rpc_pb2 as pb
from pydstack.rpc.server import RpcError


def _kms() -> tuple[pb.GetTempCaCertResponse, x509.Certificate]:
    root_key, tmp_key = generate_p256_key(), generate_p256_key()
    root, tmp = ca_certs(root_key, tmp_key)
    server = rpc_cert("kms.local", generate_p256_key(), root_key, root)
    answer = pb.GetTempCaCertResponse(
        temp_ca_cert=cert_pem(tmp), temp_ca_key=key_pem(tmp_key), ca_cert=cert_pem(root)
    )
    return answer, server


def test_pin_takes_the_first_key_and_refuses_any_other():
    _, server = _kms()
    _, other = _kms()
    pin = SourcePin("https://source:8000")
    pin.check(server)
    pin.check(server)  # the same key again is fine
    with pytest.raises(RpcError, match=r"source kms key mismatch.*refusing to onboard"):
        pin.check(other)
    assert pin.cert is server


def test_source_answer_must_hang_together():
    answer, server = _kms()
    assert _source_ca(answer, server).subject == server.issuer  # consistent: accepted
    other_answer, other_server = _kms()
    # a temp ca key that is not the temp ca certificate's
    mixed = pb.GetTempCaCertResponse()
    mixed.CopyFrom(answer)
    mixed.temp_ca_key = other_answer.temp_ca_key
    with pytest.raises(RpcError, match="temp ca key does not match"):
        _source_ca(mixed, server)
    # the server certificate is not issued by the ca the source reports
    with pytest.raises(RpcError, match="not issued by the ca it reports"):
        _source_ca(answer, other_server)
    with pytest.raises(RpcError, match="unusable"):
        _source_ca(pb.GetTempCaCertResponse(temp_ca_cert="x", temp_ca_key="y", ca_cert="z"), server)

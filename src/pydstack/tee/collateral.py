"""DCAP collateral for the mock PKI: TCB info (TDX, v3), QE identity (TD_QE, v2), CRLs.

TCB info and QE identity are signed by the mock TCB signing key over their compact JSON text
(raw r||s, as Intel signs them) and exported in dcap-qvl's `QuoteCollateralV3` JSON form, or
served as PCCS responses by :mod:`pydstack.tee.collateral_server`.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .mockpki import MockPki

#: the simulated TDX module's TEE_TCB_SVN and the QE the simulator runs
TEE_TCB_SVN = bytes([3, 0, 2] + [0] * 13)
QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
QE_ISVPRODID = 2
QE_ISVSVN = 4
QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")
VALIDITY = dt.timedelta(days=30)
TCB_EVALUATION_DATA_NUMBER = 17


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def sign_raw(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """raw 64-byte r || s ECDSA-P256-SHA256 signature."""
    r, s = decode_dss_signature(key.sign(data, _ECDSA_SHA256))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@dataclass(frozen=True)
class TcbPolicy:
    """what the collateral says about the simulated platform's TCB."""

    status: str = "UpToDate"
    advisory_ids: tuple[str, ...] = field(default_factory=tuple)


def _components(svns: bytes) -> list[dict[str, int]]:
    return [{"svn": v} for v in svns]


def tcb_info(pki: MockPki, issue: dt.datetime, policy: TcbPolicy) -> dict[str, Any]:
    p = pki.platform
    level: dict[str, Any] = {
        "tcb": {
            "sgxtcbcomponents": _components(p.cpu_svn),
            "pcesvn": p.pce_svn,
            "tdxtcbcomponents": _components(TEE_TCB_SVN),
        },
        "tcbDate": "2024-03-13T00:00:00Z",
        "tcbStatus": policy.status,
    }
    if policy.advisory_ids:
        level["advisoryIDs"] = list(policy.advisory_ids)
    return {
        "id": "TDX",
        "version": 3,
        "issueDate": _iso(issue),
        "nextUpdate": _iso(issue + VALIDITY),
        "fmspc": p.fmspc.hex().upper(),
        "pceId": p.pce_id.hex().upper(),
        "tcbType": 0,
        "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
        "tdxModule": {
            "mrsigner": "00" * 48,
            "attributes": "0000000000000000",
            "attributesMask": "FFFFFFFFFFFFFFFF",
        },
        "tdxModuleIdentities": [],
        "tcbLevels": [level],
    }


def qe_identity(issue: dt.datetime) -> dict[str, Any]:
    return {
        "id": "TD_QE",
        "version": 2,
        "issueDate": _iso(issue),
        "nextUpdate": _iso(issue + VALIDITY),
        "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
        "miscselect": "00000000",
        "miscselectMask": "FFFFFFFF",
        "attributes": QE_ATTRIBUTES.hex().upper(),
        "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
        "mrsigner": QE_MRSIGNER.hex().upper(),
        "isvprodid": QE_ISVPRODID,
        "tcbLevels": [
            {
                "tcb": {"isvsvn": QE_ISVSVN},
                "tcbDate": "2024-03-13T00:00:00Z",
                "tcbStatus": "UpToDate",
            }
        ],
    }


def default_issue_date(now: dt.datetime | None = None) -> dt.datetime:
    """midnight UTC a day before `now`: stable for a day, valid for about 30."""
    now = now or dt.datetime.now(dt.UTC)
    day = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - dt.timedelta(days=1)


@dataclass(frozen=True)
class SignedCollateral:
    """the signed documents, in the forms both dcap-qvl and a PCCS use."""

    tcb_info: str
    tcb_info_signature: bytes
    qe_identity: str
    qe_identity_signature: bytes
    root_ca_crl: bytes
    pck_crl: bytes
    pck_crl_issuer_chain: str
    tcb_info_issuer_chain: str

    def to_qvl_json(self) -> str:
        return json.dumps(
            {
                "pck_crl_issuer_chain": self.pck_crl_issuer_chain,
                "root_ca_crl": self.root_ca_crl.hex(),
                "pck_crl": self.pck_crl.hex(),
                "tcb_info_issuer_chain": self.tcb_info_issuer_chain,
                "tcb_info": self.tcb_info,
                "tcb_info_signature": self.tcb_info_signature.hex(),
                "qe_identity_issuer_chain": self.tcb_info_issuer_chain,
                "qe_identity": self.qe_identity,
                "qe_identity_signature": self.qe_identity_signature.hex(),
            }
        )


def make_collateral(
    pki: MockPki, *, issue: dt.datetime | None = None, policy: TcbPolicy | None = None
) -> SignedCollateral:
    issue = issue or default_issue_date()
    tcb = compact(tcb_info(pki, issue, policy or TcbPolicy()))
    qe = compact(qe_identity(issue))
    return SignedCollateral(
        tcb_info=tcb,
        tcb_info_signature=sign_raw(pki.tcb_key, tcb.encode()),
        qe_identity=qe,
        qe_identity_signature=sign_raw(pki.tcb_key, qe.encode()),
        root_ca_crl=pki.root_ca_crl(),
        pck_crl=pki.pck_crl(),
        pck_crl_issuer_chain=pki.pck_crl_issuer_chain,
        tcb_info_issuer_chain=pki.tcb_issuer_chain,
    )

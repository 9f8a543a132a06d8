"""Intel DCAP quotes: v3 (SGX), v4 and v5 (TDX), parsed and built.

Layout (all integers little-endian): a 48-byte header; the body (v4: a TD report 1.0 of 584
bytes at offset 48; v5: a 6-byte descriptor `u16 type, u32 size` then a TD report 1.0 (type 2)
or 1.5 (type 3, 648 bytes); v3: a 384-byte SGX enclave report); then `u32 auth_data_len` and the
ECDSA auth data: signature (64, raw r||s over header+body), attestation key (64, raw x||y), and
certification data type 6 (QE report, its signature by the PCK key, QE auth data, and inner
certification data type 5: the PEM PCK chain). Real quotes carry trailing zero padding, which is
ignored.

The parsed parts are named tuples (immutable, and built several times faster than frozen
dataclasses: a verification parses one quote and builds four of them).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from .errors import ParseError

TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
ATT_KEY_TYPE_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
BODY_SGX_ENCLAVE = 1
BODY_TD_REPORT10 = 2
BODY_TD_REPORT15 = 3
CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6

HEADER_LEN = 48
TD_REPORT10_LEN = 584
TD_REPORT15_LEN = 648
ENCLAVE_REPORT_LEN = 384
MAX_QUOTE_LEN = 64 * 1024

_TD10_FIELDS = (
    ("tee_tcb_svn", 16),
    ("mr_seam", 48),
    ("mr_signer_seam", 48),
    ("seam_attributes", 8),
    ("td_attributes", 8),
    ("xfam", 8),
    ("mr_td", 48),
    ("mr_config_id", 48),
    ("mr_owner", 48),
    ("mr_owner_config", 48),
    ("rtmr0", 48),
    ("rtmr1", 48),
    ("rtmr2", 48),
    ("rtmr3", 48),
    ("report_data", 64),
)
_TD10_SIZES = tuple(size for _, size in _TD10_FIELDS)
_HEADER = struct.Struct("<HHIHH16s20s")
_TD10 = struct.Struct("<" + "".join(f"{size}s" for _, size in _TD10_FIELDS))
#: cpu_svn, misc_select, attributes, mr_enclave, mr_signer, isv_prod_id, isv_svn, report_data
_ENCLAVE = struct.Struct("<16sI28x16s32s32x32s96xHH60x64s")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
#: signature, attestation key, certification data type and size (the auth data's head), then
#: the qe report, its signature and the qe auth data length
_AUTH_FIXED = struct.Struct("<64s64sHI384s64sH")
_AUTH_HEAD = 64 + 64 + 2 + 4
_INNER = struct.Struct("<HI")
_V5_BODY_SIZES = {
    BODY_SGX_ENCLAVE: ENCLAVE_REPORT_LEN,
    BODY_TD_REPORT10: TD_REPORT10_LEN,
    BODY_TD_REPORT15: TD_REPORT15_LEN,
}


class _Cursor:
    """a bounded reader over a byte string."""

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise ParseError(f"quote truncated: {what} needs {n} bytes at offset {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def _need(self, n: int, what: str) -> int:
        pos = self.pos
        if pos + n > self.end:
            raise ParseError(f"quote truncated: {what} needs {n} bytes at offset {pos}")
        self.pos = pos + n
        return pos

    def u16(self, what: str) -> int:
        return int(_U16.unpack_from(self.data, self._need(2, what))[0])

    def u32(self, what: str) -> int:
        return int(_U32.unpack_from(self.data, self._need(4, what))[0])


class QuoteHeader(NamedTuple):
    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes

    def to_bytes(self) -> bytes:
        if len(self.qe_vendor_id) != 16 or len(self.user_data) != 20:
            raise ValueError("qe_vendor_id must be 16 bytes and user_data 20 bytes")
        return struct.pack(
            "<HHIHH16s20s",
            self.version,
            self.attestation_key_type,
            self.tee_type,
            self.qe_svn,
            self.pce_svn,
            self.qe_vendor_id,
            self.user_data,
        )

    @classmethod
    def parse(cls, data: bytes) -> QuoteHeader:
        if len(data) < HEADER_LEN:
            raise ParseError(f"quote header needs {HEADER_LEN} bytes, got {len(data)}")
        return cls(*_HEADER.unpack_from(data))


class TdReport(NamedTuple):
    """a TD report 1.0 (584 bytes), or 1.5 (648 bytes) when tee_tcb_svn2 is set."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_service_td: bytes | None = None

    def to_bytes(self) -> bytes:
        fields = self[:15]
        if tuple(map(len, fields)) != _TD10_SIZES:
            for (name, size), value in zip(_TD10_FIELDS, fields, strict=True):
                if len(value) != size:
                    raise ValueError(f"td report field {name} must be {size} bytes")
        out = b"".join(fields)
        if self.tee_tcb_svn2 is not None or self.mr_service_td is not None:
            svn2 = self.tee_tcb_svn2 or bytes(16)
            service = self.mr_service_td or bytes(48)
            if len(svn2) != 16 or len(service) != 48:
                raise ValueError("td report 1.5 fields have the wrong size")
            out += svn2 + service
        return bytes(out)

    @classmethod
    def parse(cls, data: bytes, *, v15: bool = False) -> TdReport:
        return cls._parse_at(data, 0, v15=v15, end=len(data))

    @classmethod
    def _parse_at(cls, data: bytes, pos: int, *, v15: bool, end: int) -> TdReport:
        """the report at `pos` of `data`, which must hold it before `end`."""
        need = TD_REPORT15_LEN if v15 else TD_REPORT10_LEN
        if end - pos < need:
            raise ParseError(f"td report needs {need} bytes, got {end - pos}")
        values: tuple[bytes, ...] = _TD10.unpack_from(data, pos)
        if v15:
            at = pos + TD_REPORT10_LEN
            values += (data[at : at + 16], data[at + 16 : at + 64])
        return cls(*values)

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    @property
    def is_debug(self) -> bool:
        return bool(self.td_attributes[0] & 0x01)


class EnclaveReport(NamedTuple):
    """the 384-byte SGX enclave report (the QE report of a quote, or an SGX quote's body)."""

    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes

    def to_bytes(self) -> bytes:
        out = bytearray(ENCLAVE_REPORT_LEN)
        out[0:16] = self.cpu_svn
        out[16:20] = struct.pack("<I", self.misc_select)
        out[48:64] = self.attributes
        out[64:96] = self.mr_enclave
        out[128:160] = self.mr_signer
        out[256:258] = struct.pack("<H", self.isv_prod_id)
        out[258:260] = struct.pack("<H", self.isv_svn)
        out[320:384] = self.report_data
        if len(out) != ENCLAVE_REPORT_LEN:
            raise ValueError("enclave report fields have the wrong size")
        return bytes(out)

    @classmethod
    def parse(cls, data: bytes) -> EnclaveReport:
        if len(data) < ENCLAVE_REPORT_LEN:
            raise ParseError(f"enclave report needs {ENCLAVE_REPORT_LEN} bytes, got {len(data)}")
        return cls(*_ENCLAVE.unpack_from(data))


class Quote(NamedTuple):
    raw: bytes
    header: QuoteHeader
    body_type: int
    td_report: TdReport | None
    enclave_report: EnclaveReport | None
    signed_length: int
    ecdsa_signature: bytes
    attestation_key: bytes
    qe_report: EnclaveReport
    qe_report_raw: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_cert_chain_pem: bytes

    @property
    def is_tdx(self) -> bool:
        return self.header.tee_type == TEE_TYPE_TDX

    @property
    def report_data(self) -> bytes:
        if self.td_report is not None:
            return self.td_report.report_data
        assert self.enclave_report is not None
        return self.enclave_report.report_data

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[: self.signed_length]


_AuthFields = tuple[bytes, bytes, bytes, bytes, bytes, bytes]


def _auth_checked(data: bytes, pos: int, end: int, version: int) -> _AuthFields:
    """signature, attestation key, qe report, its signature, qe auth data and pck chain of the
    auth data in data[pos:end], each length checked before it is read (ParseError naming the
    first that does not fit)."""
    auth = _Cursor(data, pos, end)
    signature = auth.take(64, "ecdsa signature")
    att_key = auth.take(64, "attestation key")
    if version == 3:
        # sgx v3 flattens the qe report certification data into the auth data
        cert = auth
    else:
        cert_type = auth.u16("certification data type")
        cert_size = auth.u32("certification data size")
        if cert_type != CERT_TYPE_QE_REPORT:
            raise ParseError(f"unsupported certification data type {cert_type}")
        cert = _Cursor(data, auth.pos, auth.pos + cert_size)
        if cert.end > auth.end:
            raise ParseError("certification data exceeds the auth data")
    qe_raw = cert.take(ENCLAVE_REPORT_LEN, "qe report")
    qe_sig = cert.take(64, "qe report signature")
    qe_auth = cert.take(cert.u16("qe auth data length"), "qe auth data")
    inner_type = cert.u16("inner certification data type")
    inner_size = cert.u32("inner certification data size")
    if inner_type != CERT_TYPE_PCK_CHAIN:
        raise ParseError(f"unsupported inner certification data type {inner_type}")
    chain = cert.take(inner_size, "pck certificate chain")
    return signature, att_key, qe_raw, qe_sig, qe_auth, chain


def _auth_fast(data: bytes, pos: int, end: int) -> _AuthFields | None:
    """`_auth_checked` of a v4/v5 auth data in one unpack when every part fits and has the
    expected type; None otherwise (the checked path then says what is wrong)."""
    if pos + _AUTH_FIXED.size > end:
        return None
    signature, att_key, cert_type, cert_size, qe_raw, qe_sig, qe_auth_len = _AUTH_FIXED.unpack_from(
        data, pos
    )
    cert_end = pos + _AUTH_HEAD + cert_size
    inner = pos + _AUTH_FIXED.size + qe_auth_len
    if cert_type != CERT_TYPE_QE_REPORT or cert_end > end or inner + 6 > cert_end:
        return None
    inner_type, inner_size = _INNER.unpack_from(data, inner)
    chain_end = inner + 6 + inner_size
    if inner_type != CERT_TYPE_PCK_CHAIN or chain_end > cert_end:
        return None
    qe_auth = data[inner - qe_auth_len : inner]
    return signature, att_key, qe_raw, qe_sig, qe_auth, data[inner + 6 : chain_end]


def parse_quote(data: bytes) -> Quote:
    """parse a v3, v4 or v5 quote; trailing bytes after the auth data are ignored.

    Contract: ParseError for anything that is not such a quote (wrong type, over
    `MAX_QUOTE_LEN` = 64 KiB, truncated, a length field pointing past its container, unknown
    version, body or certification data type). Every length is checked against the bytes
    that remain before anything is sliced; time and memory are linear in the input.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ParseError("quote must be bytes")
    if type(data) is not bytes:
        data = bytes(data)
    size = len(data)
    if size > MAX_QUOTE_LEN:
        raise ParseError(f"quote too large ({size} bytes, max {MAX_QUOTE_LEN})")
    header = QuoteHeader.parse(data)
    if header.attestation_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise ParseError(f"unsupported attestation key type {header.attestation_key_type}")
    cur = _Cursor(data, HEADER_LEN)
    td_report: TdReport | None = None
    enclave: EnclaveReport | None = None
    version = header.version
    if version == 4:
        if header.tee_type != TEE_TYPE_TDX:
            raise ParseError(f"unsupported tee type {header.tee_type:#x} in a v4 quote")
        body_type = BODY_TD_REPORT10
        at = cur._need(TD_REPORT10_LEN, "td report")
        td_report = TdReport._parse_at(data, at, v15=False, end=cur.pos)
    elif version == 5:
        body_type = cur.u16("body type")
        body_size = cur.u32("body size")
        expected = _V5_BODY_SIZES.get(body_type)
        if expected is None:
            raise ParseError(f"unsupported quote body type {body_type}")
        if body_size != expected:
            raise ParseError(
                f"quote body type {body_type} must be {expected} bytes, not {body_size}"
            )
        at = cur._need(body_size, "quote body")
        if body_type == BODY_SGX_ENCLAVE:
            enclave = EnclaveReport.parse(data[at : cur.pos])
        else:
            td_report = TdReport._parse_at(data, at, v15=body_type == BODY_TD_REPORT15, end=cur.pos)
    elif version == 3:
        if header.tee_type != TEE_TYPE_SGX:
            raise ParseError("a v3 quote must be an sgx quote")
        body_type = BODY_SGX_ENCLAVE
        enclave = EnclaveReport.parse(cur.take(ENCLAVE_REPORT_LEN, "enclave report"))
    else:
        raise ParseError(f"unsupported quote version {version}")
    signed_length = cur.pos
    auth_len = cur.u32("auth data length")
    auth_end = cur.pos + auth_len
    if auth_end > size:
        raise ParseError(f"quote auth data length {auth_len} exceeds the quote")
    fields = None if version == 3 else _auth_fast(data, cur.pos, auth_end)
    if fields is None:
        fields = _auth_checked(data, cur.pos, auth_end, version)
    signature, att_key, qe_raw, qe_sig, qe_auth, chain = fields
    return Quote(
        raw=data,
        header=header,
        body_type=body_type,
        td_report=td_report,
        enclave_report=enclave,
        signed_length=signed_length,
        ecdsa_signature=signature,
        attestation_key=att_key,
        qe_report=EnclaveReport.parse(qe_raw),
        qe_report_raw=qe_raw,
        qe_report_signature=qe_sig,
        qe_auth_data=qe_auth,
        pck_cert_chain_pem=chain,
    )


class QuoteTemplate:
    """what the v4 quotes of one quoting enclave share: the header, the attestation key and
    the certification data (QE report, its signature, auth data, PCK chain), laid out once;
    :meth:`build` adds a TD report and its signature."""

    __slots__ = ("_auth_len", "_header", "_rest")

    def __init__(
        self,
        header: QuoteHeader,
        *,
        attestation_key: bytes,
        qe_report: bytes,
        qe_report_signature: bytes,
        qe_auth_data: bytes,
        pck_cert_chain_pem: bytes,
    ) -> None:
        if header.version != 4:
            raise ValueError("build_quote writes v4 quotes")
        if len(attestation_key) != 64:
            raise ValueError("signature and attestation key must be 64 bytes each")
        if len(qe_report) != ENCLAVE_REPORT_LEN or len(qe_report_signature) != 64:
            raise ValueError("qe report must be 384 bytes and its signature 64")
        inner = struct.pack("<HI", CERT_TYPE_PCK_CHAIN, len(pck_cert_chain_pem))
        cert_body = b"".join(
            (
                qe_report,
                qe_report_signature,
                struct.pack("<H", len(qe_auth_data)),
                qe_auth_data,
                inner,
                pck_cert_chain_pem,
            )
        )
        self._header = header.to_bytes()
        #: what follows the signature in the signature data
        self._rest = (
            attestation_key + struct.pack("<HI", CERT_TYPE_QE_REPORT, len(cert_body)) + cert_body
        )
        self._auth_len = struct.pack("<I", 64 + len(self._rest))

    def build(self, report: bytes, sign: Callable[[bytes], bytes]) -> bytes:
        """the quote of a TD report's bytes; `sign` returns the raw 64-byte r||s ECDSA
        signature of its input."""
        signed = self._header + report
        signature = sign(signed)
        if len(signature) != 64:
            raise ValueError("signature and attestation key must be 64 bytes each")
        return b"".join((signed, self._auth_len, signature, self._rest))


def build_quote(
    header: QuoteHeader,
    report: TdReport,
    *,
    sign: Callable[[bytes], bytes],
    attestation_key: bytes,
    qe_report: bytes,
    qe_report_signature: bytes,
    qe_auth_data: bytes,
    pck_cert_chain_pem: bytes,
) -> bytes:
    """a v4 TDX quote; `sign` returns the raw 64-byte r||s ECDSA signature of its input."""
    template = QuoteTemplate(
        header,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        pck_cert_chain_pem=pck_cert_chain_pem,
    )
    return template.build(report.to_bytes(), sign)

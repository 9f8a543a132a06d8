"""a CVM's vm_config as the KMS and the verifier read it to measure its image: ParseError for
anything malformed (the callers catch exactly that), never a ValueError from int()."""

from __future__ import annotations

import pytest

from pydstack.attest.errors import ParseError
from pydstack.mr.machine import VmMeasureConfig, qemu_version

HASH = "00" * 32


def test_qemu_versions_are_three_ascii_numbers() -> None:
    assert qemu_version("8.2.2") == (8, 2, 2) and qemu_version("10.0.0") == (10, 0, 0)
    # a superscript two: str.isdigit() says yes and int() raised a plain ValueError, past the
    # `except ParseError` of the KMS's and the verifier's check_os_image; Arabic-Indic digits
    # int() read as a second spelling of the version
    for bad in ("8.\u00b2.0", "8.\u0662.0", "\uff18.2.2", "8.2", "8.2.2.1", "8..2", "1234567.0.0"):
        with pytest.raises(ParseError):
            qemu_version(bad)
        with pytest.raises(ParseError):
            VmMeasureConfig.from_obj({"os_image_hash": HASH, "qemu_version": bad})
    with pytest.raises(ParseError, match="not supported"):
        qemu_version("7.2.0")

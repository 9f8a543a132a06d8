"""the QEMU guest's firewall: its rules, and a boot that stops when they cannot be set."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from pydstack.guest import qemu
from pydstack.guest.boot import BootError


def test_the_rules_keep_apps_off_the_host_api_and_the_host_alone_on_the_guest_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[list[str]] = []

    def run(args: list[str], **_: Any) -> subprocess.CompletedProcess[bytes]:
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, b"", b"")

    monkeypatch.setattr(qemu.subprocess, "run", run)
    qemu._firewall()
    assert calls[0] == ["iptables", "-A", "OUTPUT", "-d", "10.0.2.100", "-m", "owner", "!",
                        "--uid-owner", "0", "-j", "REJECT"]  # fmt: skip
    assert calls[1][:6] == ["iptables", "-A", "INPUT", "-p", "tcp", "--dport"]
    assert calls[1][-5:] == ["!", "-i", "eth0", "-j", "REJECT"]


def test_a_rule_that_cannot_be_set_stops_the_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(args: list[str], **_: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.CompletedProcess(args, 4, b"", b"iptables: can't initialize table\n")

    monkeypatch.setattr(qemu.subprocess, "run", run)
    with pytest.raises(BootError, match=r"cannot set the guest firewall.*initialize table"):
        qemu._firewall()

"""toy fuzz targets that misbehave on purpose: the guard must report each as its kind of
finding (loaded by `fuzz/run.py --module tests/fuzz/toy_targets.py`)."""

from __future__ import annotations

import os
import time

from fuzz import mutators as m
from fuzz.harness import Target

BUSY = 0.25  # seconds of CPU: five times the guard's fixed allowance of 50 ms
HOG = 48 * 1024 * 1024  # three times its fixed memory allowance of 16 MiB


def refuse(data: bytes) -> None:
    raise ValueError("bad input")  # the allowed error: never a finding


def raise_key_error(data: bytes) -> None:
    {}[data]  # a KeyError, outside the allowed ValueError


def busy(data: bytes) -> None:
    end = time.thread_time() + BUSY  # CPU time: the guard judges the smaller of wall and CPU
    while time.thread_time() < end:
        pass


def hog(data: bytes) -> None:
    block = bytearray(HOG)
    del block


def abort(data: bytes) -> None:
    os.abort()


def _toy(name: str, call: object) -> Target:
    return Target(
        name=name,
        doc=f"a toy that calls {name}",
        make=lambda: call,
        allowed=(ValueError,),
        seeds=lambda: [("one", b"seed")],
        mutators=m.BINARY,
        max_len=64,
    )


TARGETS = [
    _toy("toy_refuses", refuse),
    _toy("toy_raises", raise_key_error),
    _toy("toy_slow", busy),
    _toy("toy_memory", hog),
    _toy("toy_crash", abort),
]

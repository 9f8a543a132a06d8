"""small helpers for the benchmark scripts: timing loops and percentile tables."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def rate(fn: Callable[[], object], seconds: float = 2.0) -> tuple[float, list[float]]:
    """calls per second of `fn` run back to back for about `seconds`, and each call's latency."""
    lat: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    return len(lat) / sum(lat), lat


def pct(lat: list[float], p: float) -> float:
    if not lat:
        return float("nan")
    s = sorted(lat)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def row(name: str, per_s: float, lat: list[float]) -> str:
    return (
        f"{name:<48} {per_s:>10.1f}/s   p50 {pct(lat, 50) * 1e3:8.3f} ms"
        f"   p99 {pct(lat, 99) * 1e3:8.3f} ms   n={len(lat)}"
        + (f"   mean {statistics.mean(lat) * 1e3:.3f} ms" if lat else "")
    )

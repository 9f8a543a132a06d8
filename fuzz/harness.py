"""the fuzzing harness: what a target is, the guard around every input, and findings.

A :class:`Target` names one parser of peer input: how to call it on one input, the error types
its contract allows for bad input, its seeds, its mutators and a dictionary of tokens. The
:class:`Guard` runs each input and turns into a *finding*:

- ``exception``: an exception outside the allowed types (any ``BaseException`` but
  ``KeyboardInterrupt``), assertion failures of a target's own checks included;
- ``slow``: an input that takes longer than ``ms_per_kib`` per KiB of input plus ``fixed_ms``
  per parser call (a target that calls several parsers, or one parser on several forms of the
  input, says how many in ``calls``); the time judged is the smaller of wall and CPU time
  (of this thread), so a process the scheduler starves makes no finding;
- ``memory``: an input whose peak traced Python memory (tracemalloc) exceeds ``mem_factor``
  times its size plus ``fixed_mem``.

Time and memory are confirmed before they count: an input over a bound is run again twice and
the smallest figure is the one judged (a busy machine or a first call that fills a cache does
not make a finding). Findings are deduplicated by kind, exception type and the innermost frame
in pydstack (for slow inputs: the pydstack function where the time went, by a profile; for
memory: the pydstack frame running when traced memory peaked), saved under
``fuzz/findings/<target>/<kind>-<id>.bin`` with a ``.txt`` beside it, and the run continues.
Crashes, libFuzzer timeouts and out-of-memory kills end the worker process; libFuzzer saves
those inputs (``crash-*``, ``timeout-*``, ``oom-*``) and ``fuzz/run.py`` starts it again.
"""

from __future__ import annotations

import cProfile
import functools
import hashlib
import importlib.util
import json
import os
import pstats
import random
import sys
import time
import traceback
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from fuzz.mutators import Mutator

REPO = Path(__file__).resolve().parents[1]
FUZZ_DIR = REPO / "fuzz"
_spec = importlib.util.find_spec("pydstack")
PYDSTACK_DIR = (
    Path(next(iter(_spec.submodule_search_locations))).resolve()
    if _spec is not None and _spec.submodule_search_locations
    else REPO / "src" / "pydstack"
)
KINDS = ("exception", "slow", "memory", "crash", "timeout", "oom")


@dataclass(frozen=True)
class Known:
    """a finding reported rather than fixed here (it lies in code another team owns)."""

    kind: str  # exception, slow or memory
    where: str  # "vmm/td.py:resume": the pydstack file and function the finding names
    why: str
    exc_type: str = ""  # for exceptions: the class name


@dataclass(frozen=True)
class Target:
    """one parser of peer input under the fuzzer."""

    name: str
    doc: str  # what the target covers
    make: Callable[[], Callable[[bytes], object]]  # builds the call (keys, loops) once
    allowed: tuple[type[BaseException], ...]  # the error types of the parser's contract
    seeds: Callable[[], Sequence[tuple[str, bytes]]]  # (label, input), deterministic
    mutators: tuple[Mutator, ...]
    tokens: tuple[bytes, ...] = ()  # libFuzzer dictionary, also inserted by token_insert
    max_len: int = 16 * 1024
    known: tuple[Known, ...] = ()
    calls: int = 1  # parser calls per input: the time bound applies to each


@dataclass(frozen=True)
class Limits:
    """the guard's bounds for one input of `size` bytes."""

    ms_per_kib: float = 100.0
    fixed_ms: float = 50.0
    mem_factor: float = 20.0
    fixed_mem: int = 16 * 1024 * 1024

    def time_budget(self, size: int) -> float:
        """seconds an input of `size` bytes may take."""
        return (self.ms_per_kib * size / 1024 + self.fixed_ms) / 1000

    def mem_budget(self, size: int) -> int:
        """bytes of peak traced memory an input of `size` bytes may use."""
        return int(self.mem_factor * size) + self.fixed_mem


@dataclass
class Outcome:
    seconds: float  # per parser call: the smaller of wall and CPU time, over the target's calls
    peak: int
    error: BaseException | None
    wall: float = 0.0  # the whole input's wall time


@dataclass
class FindingRecord:
    kind: str
    key: str
    file: str
    hits: int = 0
    known: str = ""


@dataclass
class Worst:
    """the input closest to the time bound and the one closest to the memory bound."""

    ms_per_kib: float = 0.0
    ms_size: int = 0
    mem_ratio: float = 0.0
    mem_peak: int = 0
    mem_size: int = 0


def ms_per_kib(seconds: float, size: int) -> float:
    """milliseconds per KiB of input, an input under 1 KiB counted as 1 KiB."""
    return seconds * 1000 / max(size / 1024, 1.0)


def mem_ratio(peak: int, size: int) -> float:
    """peak memory per byte of input, an input under 1 KiB counted as 1 KiB."""
    return peak / max(size, 1024)


@functools.lru_cache(maxsize=4096)
def _rel(filename: str) -> str | None:
    """`filename` relative to pydstack's source, or None (cached: the memory-peak hook asks
    for every frame of every line traced)."""
    try:
        return str(Path(filename).resolve().relative_to(PYDSTACK_DIR))
    except ValueError:
        return None


def innermost_frame(tb: TracebackType | None) -> tuple[str, str, int]:
    """(file, function, line) of the innermost traceback frame in pydstack, else of the
    innermost frame (file by name)."""
    last: tuple[str, str, int] = ("?", "?", 0)
    ours: tuple[str, str, int] | None = None
    while tb is not None:
        code = tb.tb_frame.f_code
        rel = _rel(code.co_filename)
        last = (rel or Path(code.co_filename).name, code.co_name, tb.tb_lineno)
        if rel is not None:
            ours = (rel, code.co_name, tb.tb_lineno)
        tb = tb.tb_next
    return ours or last


def _stack_frame(frame: FrameType | None) -> tuple[str, str, int] | None:
    while frame is not None:
        rel = _rel(frame.f_code.co_filename)
        if rel is not None:
            return rel, frame.f_code.co_name, frame.f_lineno
        frame = frame.f_back
    return None


def _fmt(where: tuple[str, str, int]) -> str:
    return f"{where[0]}:{where[2]} in {where[1]}"


class Guard:
    """runs one input under the limits and records what it finds."""

    def __init__(
        self,
        target: Target,
        call: Callable[[bytes], object],
        *,
        limits: Limits | None = None,
        findings_dir: Path | None = None,
        stats_path: Path | None = None,
        confirm: int = 2,
    ) -> None:
        self.target = target
        self.call = call
        self.limits = limits or Limits()
        self.findings_dir = findings_dir
        self.stats_path = stats_path
        self.confirm = confirm
        self.inputs = 0
        self.findings: dict[str, FindingRecord] = {}
        self.worst = Worst()
        self._flushed = time.monotonic()

    # -- measuring -----------------------------------------------------------------------
    def measure(self, data: bytes) -> Outcome:
        """one call: wall time, peak traced memory above what was live before, and the
        exception it raised outside the allowed types."""
        if not tracemalloc.is_tracing():
            tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        error: BaseException | None = None
        cpu = time.thread_time()
        start = time.perf_counter()
        try:
            self.call(data)
        except self.target.allowed:
            pass
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            error = e
        wall = time.perf_counter() - start
        cpu = time.thread_time() - cpu
        peak = max(tracemalloc.get_traced_memory()[1] - base, 0)
        return Outcome(min(wall, cpu) / self.target.calls, peak, error, wall)

    def _again(self, data: bytes, first: Outcome) -> Outcome:
        """the smallest time and memory of `first` and `confirm` more runs."""
        seconds, peak, wall = first.seconds, first.peak, first.wall
        for _ in range(self.confirm):
            o = self.measure(data)
            seconds, peak, wall = min(seconds, o.seconds), min(peak, o.peak), min(wall, o.wall)
        return Outcome(seconds, peak, first.error, wall)

    def __call__(self, data: bytes) -> None:
        """libFuzzer's TestOneInput."""
        self.inputs += 1
        size = len(data)
        o = self.measure(data)
        over_time = o.seconds > self.limits.time_budget(size)
        over_mem = o.peak > self.limits.mem_budget(size)
        new_worst = (
            ms_per_kib(o.seconds, size) > self.worst.ms_per_kib
            or mem_ratio(o.peak, size) > self.worst.mem_ratio
        )
        if over_time or over_mem or new_worst:
            o = self._again(data, o)
            self._note_worst(o, size, data)
        if o.error is not None:
            self.record_exception(data, o.error)
        if o.seconds > self.limits.time_budget(size):
            self.record_slow(data, o)
        if o.peak > self.limits.mem_budget(size):
            self.record_memory(data, o)
        if time.monotonic() - self._flushed > 2.0:
            self.flush()

    def _note_worst(self, o: Outcome, size: int, data: bytes) -> None:
        """keep the figures (and, under the findings directory, the input) of the slowest
        input per KiB and of the one with the highest peak memory per byte."""
        w = self.worst
        if ms_per_kib(o.seconds, size) > w.ms_per_kib:
            w.ms_per_kib, w.ms_size = ms_per_kib(o.seconds, size), size
            self._save_worst("worst-time.bin", data)
        if mem_ratio(o.peak, size) > w.mem_ratio:
            w.mem_ratio, w.mem_peak, w.mem_size = mem_ratio(o.peak, size), o.peak, size
            self._save_worst("worst-memory.bin", data)

    def _save_worst(self, name: str, data: bytes) -> None:
        if self.findings_dir is not None:
            self.findings_dir.mkdir(parents=True, exist_ok=True)
            (self.findings_dir / name).write_bytes(data)

    # -- findings ------------------------------------------------------------------------
    def record_exception(self, data: bytes, error: BaseException) -> None:
        where = innermost_frame(error.__traceback__)
        name = type(error).__name__
        key = f"{name} @ {_fmt(where)}"
        detail = "".join(traceback.format_exception(error))
        self.record("exception", key, data, detail, self._known("exception", where, name))

    def _known(self, kind: str, where: tuple[str, str, int] | None, exc_type: str = "") -> str:
        """why the finding is known (reported, not fixed), or ""."""
        at = f"{where[0]}:{where[1]}" if where else ""
        for k in self.target.known:
            if k.kind == kind and k.where == at and k.exc_type == exc_type:
                return k.why
        return ""

    def record_slow(self, data: bytes, o: Outcome) -> None:
        where, profile = self._hot_function(data)
        budget = self.limits.time_budget(len(data))
        key = f"slow in {_fmt(where) if where else 'code outside pydstack'}"
        detail = (
            f"{o.seconds * 1000:.1f} ms per parser call ({self.target.calls} per input, "
            f"{o.wall * 1000:.1f} ms of wall time in all) for {len(data)} bytes "
            f"(bound {budget * 1000:.1f} ms)\n\n{profile}"
        )
        self.record("slow", key, data, detail, self._known("slow", where))

    def record_memory(self, data: bytes, o: Outcome) -> None:
        where = self._memory_peak_frame(data)
        key = f"memory at {_fmt(where) if where else 'code outside pydstack'}"
        detail = (
            f"peak {o.peak} bytes of traced memory for {len(data)} bytes of input "
            f"(bound {self.limits.mem_budget(len(data))})"
        )
        self.record("memory", key, data, detail, self._known("memory", where))

    def record(self, kind: str, key: str, data: bytes, detail: str, known: str = "") -> None:
        ident = f"{kind}-{hashlib.sha1(f'{self.target.name}:{key}'.encode()).hexdigest()[:12]}"
        rec = self.findings.get(ident)
        if rec is None:
            rec = self.findings[ident] = FindingRecord(kind, key, ident + ".bin", known=known)
            print(f"FINDING {kind}: {key}{' (known)' if known else ''}", file=sys.stderr)
            if self.findings_dir is not None:
                self.findings_dir.mkdir(parents=True, exist_ok=True)
                path = self.findings_dir / rec.file
                if not path.exists() or len(data) < path.stat().st_size:
                    path.write_bytes(data)
                note = f"target: {self.target.name}\nkind: {kind}\nkey: {key}\n"
                if known:
                    note += f"known: {known}\n"
                note += f"reproduce: python fuzz/run.py --target {self.target.name} --repro "
                note += f"fuzz/findings/{self.target.name}/{rec.file}\n\n{detail}\n"
                (self.findings_dir / (ident + ".txt")).write_text(note)
            self.flush()
        rec.hits += 1

    def _hot_function(self, data: bytes) -> tuple[tuple[str, str, int] | None, str]:
        """the pydstack function where the time of `data` went (its own time and that of what
        it called outside pydstack), and the profile's top lines."""
        prof = cProfile.Profile()
        prof.enable()
        try:
            self.call(data)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
        finally:
            prof.disable()
        stats: dict[Any, Any] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        own: dict[Any, float] = {}
        for func, (_cc, _nc, _tt, ct, _callers) in stats.items():
            if _rel(func[0]) is not None:
                own[func] = own.get(func, 0.0) + ct
        for func, (_cc, _nc, _tt, _ct, callers) in stats.items():
            if _rel(func[0]) is None:
                continue
            for caller, cstats in callers.items():
                if caller in own and caller != func:
                    own[caller] -= cstats[3]
        lines = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:8]
        profile = "\n".join(
            f"{s[2] * 1000:9.1f} ms own {s[3] * 1000:9.1f} ms total  {f[0]}:{f[1]}({f[2]})"
            for f, s in lines
        )
        if not own:
            return None, profile
        func = max(own, key=lambda f: own[f])
        return (str(_rel(func[0])), str(func[2]), int(func[1])), profile

    def _memory_peak_frame(self, data: bytes) -> tuple[str, str, int] | None:
        """the innermost pydstack frame that was running when traced memory last rose to its
        peak (for a C function, the frame that called it)."""
        tracemalloc.reset_peak()
        last = [tracemalloc.get_traced_memory()[1]]
        found: list[tuple[str, str, int] | None] = [None]

        def hook(frame: FrameType, event: str, arg: object) -> None:
            peak = tracemalloc.get_traced_memory()[1]
            if peak > last[0]:
                last[0] = peak
                found[0] = _stack_frame(frame)

        sys.setprofile(hook)
        try:
            self.call(data)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
        finally:
            sys.setprofile(None)
        return found[0]

    # -- stats ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "target": self.target.name,
            "inputs": self.inputs,
            "worst": self.worst.__dict__,
            "findings": {k: v.__dict__ for k, v in self.findings.items()},
        }

    def flush(self) -> None:
        self._flushed = time.monotonic()
        if self.stats_path is not None:
            tmp = self.stats_path.with_name(self.stats_path.name + ".tmp")
            tmp.write_text(json.dumps(self.stats()))
            os.replace(tmp, self.stats_path)


# -- the mutator atheris calls -------------------------------------------------------------


@dataclass
class MutatorState:
    """the mutators of a target and a pool of inputs to splice with (its seeds, and corpus
    entries the mutator was handed lately)."""

    mutators: tuple[Mutator, ...]
    pool: list[bytes] = field(default_factory=list)
    seen: int = 0
    pool_max: int = 256

    def remember(self, data: bytes, rng: random.Random) -> None:
        self.seen += 1
        if len(self.pool) < self.pool_max:
            self.pool.append(data)
        elif rng.randrange(self.seen) < self.pool_max:
            self.pool[rng.randrange(self.pool_max)] = data


def custom_mutator(
    state: MutatorState, mutate: Callable[[bytes, int], bytes]
) -> Callable[[bytes, int, int], bytes]:
    """libFuzzer's custom mutator: its own mutations (`mutate`, atheris.Mutate) for 40% of
    inputs; else one to three format-aware mutations, followed by libFuzzer's a quarter of
    the time."""

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        state.remember(data, rng)
        if not state.mutators or rng.random() < 0.4:
            return mutate(data[:max_size], max_size)
        out = data
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            out = rng.choice(state.mutators)(out, rng, state.pool)
        out = out[:max_size]
        if rng.random() < 0.25:
            out = mutate(out, max_size)
        return out

    return mutator


def custom_crossover(data1: bytes, data2: bytes, max_out_size: int, seed: int) -> bytes:
    """libFuzzer's crossover: the head of one input and the tail of the other."""
    rng = random.Random(seed)
    i = rng.randrange(len(data1) + 1)
    j = rng.randrange(len(data2) + 1)
    return (data1[:i] + data2[j:])[:max_out_size]


def dictionary_text(tokens: Sequence[bytes]) -> str:
    """`tokens` in libFuzzer's -dict file format."""
    lines = []
    for tok in tokens:
        body = "".join(
            chr(b) if 0x20 <= b < 0x7F and b not in (0x22, 0x5C) else f"\\x{b:02x}" for b in tok
        )
        lines.append(f'"{body}"')
    return "\n".join(lines) + "\n"

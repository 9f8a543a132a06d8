"""run the fuzz targets, each in its own process under atheris/libFuzzer, and report.

    python fuzz/run.py [--seconds N | --runs N] [--target NAME ...] [--jobs J]
    python fuzz/run.py --list
    python fuzz/run.py --target NAME --repro FILE...

For every target: its corpus is `fuzz/corpus/<target>/` (seeded at start), its findings go to
`fuzz/findings/<target>/`, libFuzzer's output to `fuzz/logs/<target>.log`. A worker that
crashes (or hits libFuzzer's per-input timeout or memory limit) is started again for what is
left of its budget. When all are done a table says, per target: inputs tried, coverage
(libFuzzer's `cov:` and `ft:`), executions per second, the slowest input (milliseconds per KiB,
inputs under 1 KiB counted as 1 KiB), the highest peak memory per input byte, and the findings
by kind. The exit status is 1 when there is a finding that is not a known one, 2 when a worker
failed without reporting, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FUZZ = Path(__file__).resolve().parent
WORKER = FUZZ / "worker.py"
#: the workers running now, and whether the run was interrupted (Ctrl-C): no target starts after
_LOCK = threading.Lock()
_RUNNING: set[subprocess.Popen[bytes]] = set()
_STOPPING = threading.Event()
_COV = re.compile(r"cov: (\d+) ft: (\d+)")
_UNITS = re.compile(r"stat::number_of_executed_units: (\d+)")
_EXECS = re.compile(r"stat::average_exec_per_sec:\s+(\d+)")
_PROGRESS = re.compile(r"^#(\d+)\s", re.MULTILINE)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
_NUMBERS = re.compile(r"\d+")
_CRASH_KINDS = (
    ("ALARM: working on the last Unit", "timeout"),
    ("ERROR: libFuzzer: timeout", "timeout"),
    ("out-of-memory", "oom"),
    ("ERROR: libFuzzer:", "crash"),
    ("Uncaught Python exception", "crash"),
)


@dataclass
class Result:
    target: str
    inputs: int = 0
    cov: int = 0
    ft: int = 0
    seconds: float = 0.0
    execs: list[tuple[int, float]] = field(default_factory=list)  # (inputs, exec/s) per run
    worst: dict[str, Any] = field(default_factory=dict)
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str = ""

    @property
    def exec_per_sec(self) -> float:
        total = sum(n for n, _ in self.execs)
        if not total:
            return self.inputs / self.seconds if self.seconds else 0.0
        return sum(n * r for n, r in self.execs) / total

    def new_findings(self) -> list[dict[str, Any]]:
        return [f for f in self.findings.values() if not f.get("known")]


def target_names(module: str | None) -> list[str]:
    """the target names, in run order (loads the registry in a child: importing pydstack here
    would make its modules uninstrumented for nothing)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from fuzz.worker import target_names; "
        "print('\\n'.join(target_names(sys.argv[2] or None)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(FUZZ.parent), module or ""],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.split()


def _limit_args(args: argparse.Namespace) -> list[str]:
    out = []
    for name in ("ms_per_kib", "fixed_ms", "mem_factor", "fixed_mem_mib"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def run_target(name: str, args: argparse.Namespace) -> Result:
    """fuzz one target for the budget, restarting its worker after a crash."""
    result = Result(name)
    corpus = args.corpus / name
    findings = args.findings / name
    args.logs.mkdir(parents=True, exist_ok=True)
    log_path = args.logs / f"{name}.log"
    log_path.write_text("")
    start = time.monotonic()
    runs_left = args.runs
    for attempt in range(args.max_restarts + 1):
        stats_path = args.logs / f"{name}.stats-{attempt}.json"
        stats_path.unlink(missing_ok=True)
        budget = (
            [f"-runs={runs_left}"]
            if args.runs is not None
            else [f"-max_total_time={max(1, int(args.seconds - (time.monotonic() - start)))}"]
        )
        cmd = [
            sys.executable,
            str(WORKER),
            "--target", name,
            "--corpus", str(corpus),
            "--findings", str(findings),
            "--stats", str(stats_path),
            "--parent", str(os.getpid()),
            *(["--module", args.module] if args.module else []),
            *_limit_args(args),
            *budget,
            "-print_final_stats=1",
            f"-timeout={args.timeout}",
            f"-rss_limit_mb={args.rss_limit_mb}",
        ]  # fmt: skip
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            with _LOCK:
                if _STOPPING.is_set():
                    proc.send_signal(signal.SIGINT)
                _RUNNING.add(proc)
            try:
                proc.wait()
            finally:
                with _LOCK:
                    _RUNNING.discard(proc)
        output = log_path.read_text(errors="replace").split("$ ")[-1]
        ran = _merge(result, output, stats_path)
        if proc.returncode == 0 or _STOPPING.is_set() or "run interrupted" in output:
            break
        kind = next((k for marker, k in _CRASH_KINDS if marker in output), None)
        if kind is None and proc.returncode < 0:  # killed by a signal libFuzzer did not see
            kind = "crash"
        if kind is None:
            tail = "\n".join(output.strip().splitlines()[-15:])
            result.error = f"worker exited with status {proc.returncode}:\n{tail}"
            break
        artifact = _ARTIFACT.search(output)
        line = next((ln for ln in output.splitlines() if "ERROR" in ln or "ALARM" in ln), kind)
        key = f"{kind}: {_NUMBERS.sub('N', line).strip()[:160]}"  # pids and sizes vary
        found = result.findings.setdefault(
            f"{kind}:{key}", {"kind": kind, "key": key, "hits": 0, "known": "", "file": ""}
        )
        found["hits"] += 1
        found["file"] = Path(artifact.group(1)).name if artifact else ""
        if runs_left is not None:
            runs_left -= max(ran, 1)
            if runs_left <= 0:
                break
        elif time.monotonic() - start >= args.seconds:
            break
    result.seconds = time.monotonic() - start
    return result


def _merge(result: Result, output: str, stats_path: Path) -> int:
    """fold one worker run's output and stats into `result`; returns the inputs it ran."""
    covs = _COV.findall(output)
    if covs:
        result.cov = max(result.cov, int(covs[-1][0]))
        result.ft = max(result.ft, int(covs[-1][1]))
    units = _UNITS.search(output)
    progress = _PROGRESS.findall(output)
    stats: dict[str, Any] = {}
    if stats_path.exists():
        stats = json.loads(stats_path.read_text())
    ran = (
        int(units.group(1)) if units else int(stats.get("inputs", progress[-1] if progress else 0))
    )
    result.inputs += ran
    execs = _EXECS.search(output)
    if execs and int(execs.group(1)) > 0:
        result.execs.append((ran, float(execs.group(1))))
    worst = stats.get("worst", {})
    for ratio, size_keys in (("ms_per_kib", ("ms_size",)), ("mem_ratio", ("mem_peak", "mem_size"))):
        if worst.get(ratio, 0) > result.worst.get(ratio, 0):
            result.worst[ratio] = worst[ratio]
            for k in size_keys:
                result.worst[k] = worst.get(k, 0)
    for ident, found in stats.get("findings", {}).items():
        mine = result.findings.setdefault(ident, {**found, "hits": 0})
        mine["hits"] += found["hits"]
    return ran


def _findings_text(result: Result) -> str:
    if result.error:
        return "ERROR (see log)"
    by_kind: dict[str, list[int]] = {}
    known = 0
    for f in result.findings.values():
        if f.get("known"):
            known += 1
            continue
        entry = by_kind.setdefault(f["kind"], [0, 0])
        entry[0] += 1
        entry[1] += f["hits"]
    parts = [f"{kind} {n} ({hits} inputs)" for kind, (n, hits) in sorted(by_kind.items())]
    if known:
        parts.append(f"known {known}")
    return ", ".join(parts) or "none"


HEADER = (
    f"{'target':<20} {'inputs':>9} {'cov':>6} {'ft':>7} {'exec/s':>8} "
    f"{'worst ms/KiB':>14} {'worst mem/B':>14}  findings"
)


def row(r: Result) -> str:
    w = r.worst
    slow = f"{w.get('ms_per_kib', 0):.2f} @{w.get('ms_size', 0)}B"
    mem = f"{w.get('mem_ratio', 0):.1f}x @{w.get('mem_size', 0)}B"
    return (
        f"{r.target:<20} {r.inputs:>9} {r.cov:>6} {r.ft:>7} {r.exec_per_sec:>8.0f} "
        f"{slow:>14} {mem:>14}  {_findings_text(r)}"
    )


def details(results: Sequence[Result], findings_dir: Path) -> list[str]:
    lines = []
    for r in results:
        for f in r.findings.values():
            tag = f" (known: {f['known']})" if f.get("known") else ""
            where = _shown(findings_dir / r.target / f["file"]) if f.get("file") else "(no input)"
            lines.append(f"  {r.target}: {f['kind']} x{f['hits']}: {f['key']}{tag}\n    {where}")
        if r.error:
            lines.append(f"  {r.target}: {r.error}")
    return lines


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=int, help="per target (default 60)")
    budget.add_argument("--runs", type=int, help="inputs per target")
    p.add_argument("--target", action="append", help="a target to run (repeat; default all)")
    p.add_argument("--from", dest="start", help="skip the targets before this one")
    p.add_argument("--jobs", type=int, default=1, help="targets run at once (default 1)")
    p.add_argument("--list", action="store_true", help="print the target names and exit")
    p.add_argument("--repro", type=Path, nargs="+", help="run these inputs once (one target)")
    p.add_argument("--module", help="a Python file whose TARGETS replace the built-in ones")
    p.add_argument("--corpus", type=Path, default=FUZZ / "corpus")
    p.add_argument("--findings", type=Path, default=FUZZ / "findings")
    p.add_argument("--logs", type=Path, default=FUZZ / "logs")
    p.add_argument("--timeout", type=int, default=30, help="libFuzzer's per-input timeout (s)")
    p.add_argument("--rss-limit-mb", type=int, default=2048)
    p.add_argument("--max-restarts", type=int, default=5)
    p.add_argument("--ms-per-kib", type=float)
    p.add_argument("--fixed-ms", type=float)
    p.add_argument("--mem-factor", type=float)
    p.add_argument("--fixed-mem-mib", type=int)
    return p


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    if args.runs is None and args.seconds is None:
        args.seconds = 60
    if args.module:
        args.module = str(Path(args.module).resolve())
    names = target_names(args.module)
    if args.list:
        print("\n".join(names))
        return 0
    chosen = args.target or names
    unknown = [t for t in chosen if t not in names]
    if unknown:
        print(f"unknown target(s): {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    if args.start:
        chosen = chosen[chosen.index(args.start) :]
    if args.repro:
        if len(chosen) != 1:
            print("--repro needs exactly one --target", file=sys.stderr)
            return 2
        cmd = [sys.executable, str(WORKER), "--target", chosen[0], *_limit_args(args)]
        cmd += [*(["--module", args.module] if args.module else []), "--repro"]
        return subprocess.run([*cmd, *map(str, args.repro)], check=False).returncode
    budget = f"{args.runs} runs" if args.runs is not None else f"{args.seconds} s"
    print(f"fuzzing {len(chosen)} target(s), {budget} each, {args.jobs} at a time", flush=True)
    print(HEADER, flush=True)
    results: dict[str, Result] = {}
    # SIGTERM stops a run as Ctrl-C does, and Ctrl-C works even where the run inherited SIGINT
    # ignored (a job a script started with `&`)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
    futures = {name: pool.submit(run_target, name, args) for name in chosen}
    try:
        for name in chosen:  # rows in target order, each as soon as it and those before are done
            results[name] = futures[name].result()
            print(row(results[name]), flush=True)
    except KeyboardInterrupt:
        # stop: no further target starts, running workers get SIGINT (libFuzzer writes its
        # final stats), and the targets that ran are reported as far as they got
        _STOPPING.set()
        with _LOCK:
            for proc in _RUNNING:
                proc.send_signal(signal.SIGINT)
        pool.shutdown(wait=True, cancel_futures=True)
        for name in chosen:
            fut = futures[name]
            if name not in results and fut.done() and not fut.cancelled():
                results[name] = fut.result()
                print(row(results[name]), flush=True)
        print("interrupted: the targets not shown did not run", file=sys.stderr, flush=True)
    pool.shutdown(wait=True)
    ordered = [results[n] for n in chosen if n in results]
    lines = details(ordered, args.findings)
    if lines:
        print("\nfindings:\n" + "\n".join(lines), flush=True)
    if _STOPPING.is_set():
        return 130
    if any(r.error for r in ordered):
        return 2
    return 1 if any(r.new_findings() for r in ordered) else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

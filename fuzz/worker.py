"""one target under atheris/libFuzzer, in its own process (`fuzz/run.py` starts it).

    python fuzz/worker.py --target NAME [--module FILE] --corpus DIR --findings DIR \
        --stats FILE [libFuzzer flags...]
    python fuzz/worker.py --target NAME [--module FILE] --repro FILE...

pydstack is imported under atheris' instrumentation (coverage of pydstack only); the target's
seeds are written into the corpus directory as `seed-<label>` before libFuzzer starts.
`--repro` runs the given inputs once each, outside libFuzzer, and prints what the guard makes
of them (exit status 1 when one of them is a finding).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import faulthandler
import importlib.util
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz.harness import Guard, Limits, MutatorState, Target, custom_crossover, custom_mutator
from fuzz.harness import dictionary_text as _dictionary_text
from fuzz.mutators import token_insert


def target_names(module: str | None) -> list[str]:
    """the names of the built-in targets, or of those in the module file `module`."""
    if module is None:
        from fuzz.targets import INDEX

        return list(INDEX)
    return [t.name for t in _module_targets(module)]


def load_target(name: str, module: str | None) -> Target:
    """the built-in target `name`, or the one of that name in the module file `module`."""
    if module is None:
        from fuzz.targets import INDEX, load

        if name not in INDEX:
            raise SystemExit(f"no target {name!r}")
        return load(name)
    found = {t.name: t for t in _module_targets(module)}
    if name not in found:
        raise SystemExit(f"no target {name!r} in {module}")
    return found[name]


def _module_targets(module: str) -> list[Target]:
    """the `TARGETS` of a Python file (toy targets for the guard's tests, for instance)."""
    spec = importlib.util.spec_from_file_location("fuzz_extra_targets", module)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load targets from {module}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.TARGETS)


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(
        ms_per_kib=args.ms_per_kib,
        fixed_ms=args.fixed_ms,
        mem_factor=args.mem_factor,
        fixed_mem=args.fixed_mem_mib * 1024 * 1024,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True)
    p.add_argument("--module", help="a Python file whose TARGETS replace the built-in ones")
    p.add_argument("--corpus", type=Path)
    p.add_argument("--findings", type=Path)
    p.add_argument("--stats", type=Path)
    p.add_argument("--repro", type=Path, nargs="+")
    p.add_argument("--parent", type=int, help="stop (as on Ctrl-C) when this process is gone")
    p.add_argument("--ms-per-kib", type=float, default=Limits.ms_per_kib)
    p.add_argument("--fixed-ms", type=float, default=Limits.fixed_ms)
    p.add_argument("--mem-factor", type=float, default=Limits.mem_factor)
    p.add_argument("--fixed-mem-mib", type=int, default=Limits.fixed_mem // (1024 * 1024))
    return p


def repro(target: Target, limits: Limits, files: list[Path]) -> int:
    """run each file once and print the guard's verdict; 1 when any is a finding."""
    guard = Guard(target, target.make(), limits=limits)
    bad = 0
    for path in files:
        data = path.read_bytes()
        o = guard.measure(data)
        o = guard._again(data, o)
        verdict = []
        if o.error is not None:
            guard.record_exception(data, o.error)
            verdict.append("exception")
        if o.seconds > limits.time_budget(len(data)):
            verdict.append("slow")
        if o.peak > limits.mem_budget(len(data)):
            verdict.append("memory")
        print(
            f"{path}: {len(data)} bytes, {o.seconds * 1000:.2f} ms per call "
            f"(bound {limits.time_budget(len(data)) * 1000:.1f}), peak {o.peak} bytes "
            f"(bound {limits.mem_budget(len(data))}): {', '.join(verdict) or 'ok'}"
        )
        if o.error is not None:
            import traceback

            traceback.print_exception(o.error)
        bad += bool(verdict)
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    args, libfuzzer_args = _parser().parse_known_args(argv)
    if args.repro:
        faulthandler.enable()  # a crash shows the python stack (under libFuzzer it would
        # take the signal from libFuzzer's handler, which saves the input)
        return repro(load_target(args.target, args.module), _limits(args), args.repro)

    if args.parent:
        _stop_with_parent(args.parent)
    import atheris

    logging.disable(logging.CRITICAL)  # the parsers' logs would only slow the fuzzer down
    # coverage of pydstack, less its generated protobuf modules
    with atheris.instrument_imports(include=["pydstack"], exclude=["pydstack.rpc.proto"]):
        target = load_target(args.target, args.module)
        call = target.make()
        seeds = list(target.seeds())
    corpus: Path = args.corpus
    corpus.mkdir(parents=True, exist_ok=True)
    for label, data in seeds:
        path = corpus / f"seed-{label}"
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data[: target.max_len])
    args.findings.mkdir(parents=True, exist_ok=True)
    guard = Guard(
        target, call, limits=_limits(args), findings_dir=args.findings, stats_path=args.stats
    )
    _flush_at_exit(guard)
    mutators = target.mutators + ((token_insert(target.tokens),) if target.tokens else ())
    state = MutatorState(mutators, [data for _, data in seeds])
    flags = [f"-max_len={target.max_len}", f"-artifact_prefix={args.findings}/"]
    if target.tokens:
        dict_path = (args.stats or corpus.parent / f".{target.name}.stats").with_suffix(".dict")
        dict_path.write_text(_dictionary_text(target.tokens))
        flags.append(f"-dict={dict_path}")
    atheris.Setup(
        [sys.argv[0], *flags, *libfuzzer_args, str(corpus)],
        guard,
        custom_mutator=custom_mutator(state, lambda d, n: atheris.Mutate(d, n)),  # late-bound
        custom_crossover=custom_crossover,
    )
    atheris.Fuzz()
    return 0  # not reached: libFuzzer exits the process


def _stop_with_parent(parent: int) -> None:
    """SIGINT (libFuzzer stops and writes its stats) when `parent` exits, even killed; gone
    already: exit now. Linux only; elsewhere the run's own Ctrl-C handling is all there is."""
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGINT)
    if os.getppid() != parent:
        raise SystemExit("the run that started this worker is gone")


_keep: list[Any] = []


def _flush_at_exit(guard: Guard) -> None:
    """write the guard's stats when libFuzzer exits the process (it calls exit(), which runs
    no Python atexit handlers; glibc's on_exit does run)."""
    callback = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p)(
        lambda status, arg: guard.flush()
    )
    _keep.append(callback)
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the periodic flush it is
        ctypes.CDLL("libc.so.6").on_exit(callback, None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

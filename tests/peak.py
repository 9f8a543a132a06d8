"""allocation peaks measured in a fresh interpreter.

`tracemalloc` counts every thread of the process, and a long test session has threads of its
own (servers, executors) that allocate at any moment; a peak taken in-process therefore says
little. `allocation_peak` runs a snippet in a child interpreter where only it allocates.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

_TEMPLATE = """
import tracemalloc
{setup}
tracemalloc.start()
try:
{body}
finally:
    print(tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
"""


def allocation_peak(setup: str, body: str) -> int:
    """peak bytes traced while `body` runs, after `setup` (imports, input) has run untraced.

    `body` must end by itself, normally by the refusal under test; the child's failure (for
    example the expected error not raised) fails the calling test.
    """
    code = _TEMPLATE.format(
        setup=textwrap.dedent(setup), body=textwrap.indent(textwrap.dedent(body), "    ")
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1])

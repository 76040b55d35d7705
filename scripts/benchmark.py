#!/usr/bin/env python
"""Release benchmark: a thin caller of ``sam3-exportable bench`` (full size unless told).

Writes ``bench/results.json`` and PNG plots; see docs/performance.md. Examples:
    python scripts/benchmark.py                       # full size, about 70 minutes on 2 cores
    python scripts/benchmark.py --all-shapes --force  # AOTInductor and bf16 at every shape too
    python scripts/benchmark.py --size tiny --quick   # a couple of minutes
"""

import sys

from sam3_exportable.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a == "--size" or a.startswith("--size=") for a in args):
        args = ["--size", "full", *args]
    sys.exit(main(["bench", *args]))

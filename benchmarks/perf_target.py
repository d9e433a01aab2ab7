"""The performance target: DeiT-S, batch 32, rho 0.5 at the input and EViT-style (efficiency, overhead).

    python benchmarks/perf_target.py [OPTIONS]     # = python -m patchslim benchmark --which target [OPTIONS]

A thin entry point: the logic lives in ``patchslim/benchmarks/target.py`` so that the installed command
runs it too. Options: ``python -m patchslim benchmark --help``. Writes under ``benchmarks/results/``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from patchslim.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["benchmark", "--which", "target", *sys.argv[1:]]))

"""Figure 1 analogue: FLOPs reduction vs keep ratio rho for every method (analytic).

    python benchmarks/flops_figure1.py [OPTIONS]     # = python -m patchslim benchmark --which figure1 [OPTIONS]

A thin entry point: the logic lives in ``patchslim/benchmarks/figure1.py`` so that the installed command
runs it too. Options: ``python -m patchslim benchmark --help``. Writes under ``benchmarks/results/``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from patchslim.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["benchmark", "--which", "figure1", *sys.argv[1:]]))

"""Table 2 analogue: FLOPs and memory reduction beside the accuracy table.

    python benchmarks/costs_table2.py [OPTIONS]     # = python -m patchslim benchmark --which table2 [OPTIONS]

A thin entry point: the logic lives in ``patchslim/benchmarks/table2.py`` so that the installed command
runs it too. Options: ``python -m patchslim benchmark --help``. Writes under ``benchmarks/results/``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from patchslim.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["benchmark", "--which", "table2", *sys.argv[1:]]))

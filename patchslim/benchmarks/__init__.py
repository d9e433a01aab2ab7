"""Cost benchmarks: the survey's Tables 1-3 and Figure 1, measured by us (``python -m patchslim benchmark``).

- ``table3``: latency with and without slimming, measured speed-up beside the ideal one (GMAC ratio);
- ``figure1``: FLOPs reduction against the keep ratio rho, per method (analytic);
- ``table1``: input dependence, selection overhead (ms, % of the slimmed forward), accuracy loss;
- ``table2``: FLOPs and memory reduction beside the accuracy table's top-1;
- ``target``: the issue's performance target (efficiency >= 0.9, selection < 5 %) on DeiT-S at batch 32.

Each is a ``run_*(config, tick) -> BenchmarkResult`` over a config dataclass whose ``jobs()`` lists the work
(for a progress bar); :func:`~patchslim.benchmarks.common.write_result` writes its CSV, markdown and figure.
The scripts in ``benchmarks/`` are thin entry points to the command.
"""

from patchslim.benchmarks.common import BenchmarkResult, write_result  # noqa: F401
from patchslim.benchmarks.figure1 import Figure1Config, run_figure1  # noqa: F401
from patchslim.benchmarks.table1 import Table1Config, run_table1  # noqa: F401
from patchslim.benchmarks.table2 import Table2Config, run_table2  # noqa: F401
from patchslim.benchmarks.table3 import Table3Config, run_table3  # noqa: F401
from patchslim.benchmarks.target import TargetConfig, run_target  # noqa: F401

# name -> (config class, run function), in the order ``--which all`` runs them (cheap ones first).
BENCHMARKS = {
    "figure1": (Figure1Config, run_figure1),
    "table2": (Table2Config, run_table2),
    "table1": (Table1Config, run_table1),
    "table3": (Table3Config, run_table3),
    "target": (TargetConfig, run_target),
}

"""Benchmarks: every committed table under ``benchmarks/results/``, measured by us (``python -m patchslim
benchmark --which NAME``; ``--which all`` writes every one of them).

- ``accuracy``: top-1 vs keep ratio rho for every method on the bundled model (the survey's Table 2, our model);
- ``budgets``: top-1 of every method at equal cost (budgets of 0.7 / 0.5 / 0.35 of the unslimmed GMACs), ranked;
- ``budget_target``: the equal-cost target investigated (training-free plan families at 0.5 of the GMACs, chosen on
  training canvases, the best run on the test set);
- ``audit_fashion``: the worked audit example (per-group and per-class accuracy drop, disparity flags);
- ``faithfulness``: deletion and insertion scores of every map kind, before and after slimming;
- ``figure1``: FLOPs reduction against the keep ratio rho, per method (analytic);
- ``table2``: FLOPs and memory reduction beside the accuracy table's top-1;
- ``table1``: input dependence, selection overhead (ms, % of the slimmed forward), accuracy loss;
- ``table3``: latency with and without slimming, measured speed-up beside the ideal one (GMAC ratio);
- ``target``: the issue's performance target (efficiency >= 0.9, selection < 5 %) on DeiT-S at batch 32;
- ``ray_scale``: the worked audit's job on Ray vs the local runner at equal cores (wall time, start-up);
- ``compression``: int8, slimming, both, and fine-tuned slimming on the bundled model (top-1, agreement, GMACs,
  weights MB, latency at batch 1 and 32), and the latency columns for DeiT-S;
- ``int8_backends``: each int8 backend's speed-up over fp32 and its largest logit change (the evidence for the
  order ``--precision int8`` tries them in).

Each is a ``run_*(config, tick) -> result`` over a config dataclass whose ``jobs()`` lists the work (for a
progress bar); ``result.write(out, command)`` writes its files, each naming the command (see
:mod:`~patchslim.benchmarks.common`). The top-level ``benchmarks/`` folder keeps only the app's harnesses
(AppTest and browser), which need the checkout's ``app/``.
"""

from patchslim.benchmarks.accuracy import AccuracyConfig, run_accuracy  # noqa: F401
from patchslim.benchmarks.audit_fashion import AuditFashionConfig, run_audit_fashion  # noqa: F401
from patchslim.benchmarks.budget_target import BudgetTargetConfig, run_budget_target  # noqa: F401
from patchslim.benchmarks.budgets import BudgetsConfig, run_budgets  # noqa: F401
from patchslim.benchmarks.common import BenchmarkResult, write_result  # noqa: F401
from patchslim.benchmarks.compression import CompressionConfig, run_compression  # noqa: F401
from patchslim.benchmarks.faithfulness import FaithfulnessConfig, run_faithfulness  # noqa: F401
from patchslim.benchmarks.figure1 import Figure1Config, run_figure1  # noqa: F401
from patchslim.benchmarks.int8_backends import Int8BackendsConfig, run_int8_backends  # noqa: F401
from patchslim.benchmarks.ray_scale import RayScaleConfig, run_ray_scale  # noqa: F401
from patchslim.benchmarks.table1 import Table1Config, run_table1  # noqa: F401
from patchslim.benchmarks.table2 import Table2Config, run_table2  # noqa: F401
from patchslim.benchmarks.table3 import Table3Config, run_table3  # noqa: F401
from patchslim.benchmarks.target import TargetConfig, run_target  # noqa: F401

# name -> (config class, run function), in the order ``--which all`` runs them: the accuracy table first
# (Tables 1 and 2 join it), then the cheap, analytic ones, the timed ones last.
BENCHMARKS = {
    "accuracy": (AccuracyConfig, run_accuracy),
    "budgets": (BudgetsConfig, run_budgets),
    "budget_target": (BudgetTargetConfig, run_budget_target),
    "audit_fashion": (AuditFashionConfig, run_audit_fashion),
    "faithfulness": (FaithfulnessConfig, run_faithfulness),
    "figure1": (Figure1Config, run_figure1),
    "table2": (Table2Config, run_table2),
    "table1": (Table1Config, run_table1),
    "table3": (Table3Config, run_table3),
    "target": (TargetConfig, run_target),
    "ray_scale": (RayScaleConfig, run_ray_scale),
    "compression": (CompressionConfig, run_compression),
    "int8_backends": (Int8BackendsConfig, run_int8_backends),
}
# ``--which`` shorthands.
GROUPS = {
    "all": tuple(BENCHMARKS),
    "costs": ("figure1", "table2", "table1", "table3", "target"),
}
# The benchmarks whose numbers are wall times: rerun them on an idle machine only.
TIMED = ("table1", "table3", "target", "ray_scale", "compression", "int8_backends")  # compression: unless --no-timing

#!/usr/bin/env bash
# Regenerates every committed file under benchmarks/results/, each of which then names the command that
# remakes it alone. About 2.5 hours on the 2-core CPU this project was measured on (estimates per step below;
# each results file's "Took" line or "seconds" field gives the real figure). Run it in the background on an
# idle machine: Tables 1 and 3, the target and the app harnesses are wall times.
#
#     nohup bash benchmarks/regenerate.sh > regenerate.log 2>&1 &
#
# PYTHON picks the interpreter (default: the checkout's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}

# accuracy (~20 min), budgets (~10 min: every method at 0.7 / 0.5 / 0.35 of the unslimmed GMACs), budget_target
# (~30 min), audit_fashion (~40 min), faithfulness (~45 min idle: 1.2 million forward rows of the bundled model,
# compute-bound; resumable with --resume), figure1 (~2 min), table2 (~5 min), table1 + target (~5 min), table3
# (~20 min), ray_scale (~10 min), compression (~20 min: int8, slimming and both on the full canvas test set, then
# timed with DeiT-S), int8_backends (~5 min: each int8 backend against fp32, the evidence for the order --precision
# int8 tries them in), in this order (Tables 1 and 2 join the fresh accuracy table). `--which budgets` alone remakes
# the equal-cost table (e.g. after new methods).
"$PYTHON" -m patchslim benchmark --which all --no-progress
# fashion-swin's accuracy vs rho, window-aware methods in its default stage (~10 min)
"$PYTHON" -m patchslim benchmark --which accuracy --model fashion-swin --tag _fashion_swin --no-progress
# Figure 1 for Swin-T (window-aware slimming in its default stages 2-3; ~1 min)
"$PYTHON" -m patchslim benchmark --which figure1 --model swin_tiny_patch4_window7_224 --tag _swin_tiny --no-progress

# The app's harnesses need the checkout's app/ (AppTest, and Chromium for the soak), so they stay scripts.
"$PYTHON" benchmarks/app_latency.py                     # ~5 min
"$PYTHON" benchmarks/app_memory.py                      # ~5 min (500 AppTest interactions)
"$PYTHON" benchmarks/soak.py --sessions 4 --minutes 4   # ~6 min (4 browser sessions)

# why the newer methods rank where they do (the 500 shipped canvases, and budget searches; not timed)
"$PYTHON" benchmarks/newer_methods.py --out benchmarks/results/newer_methods.md

# tome beside the reference ToMe (logits; ~2 min): needs a checkout of facebookresearch/ToMe outside this repo.
if [ -n "${PATCHSLIM_TOME_REFERENCE:-}" ]; then
    "$PYTHON" benchmarks/tome_reference.py --reference "$PATCHSLIM_TOME_REFERENCE" --out benchmarks/results/tome_reference.md
fi

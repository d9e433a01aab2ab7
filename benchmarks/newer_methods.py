"""Why the newer methods (ToFu, PiToMe, PPT, Zero-TPrune) rank where they do on the bundled model.

The budgets table (``python -m patchslim benchmark --which budgets``) ranks every method at equal cost; this
harness looks inside the four newer ones on the 500 canvases shipped with the package (``fashion-vit``, trained
weights), as the README did for entropy and lowrank:

- at rho 0.5, each method and a few of its options (ToFu's merge rule and where it switches from pruning to
  merging, PPT's threshold, Zero-TPrune's split between importance and similarity and its blocks): top-1,
  agreement with the unslimmed model, the share of garment and of background patches still represented after
  the last block (a patch is "garment" when any of its pixels is non-zero on the blank canvas; where some token
  stands for several patches, merged or fused, every patch is still inside a token and the columns read
  "(merged)"), the GMACs and the share of them spent on the selection itself;
- PPT's criterion: the variance of its significance scores per image at each of its blocks, against its paper's
  threshold tau (below it an image pools, above it prunes);
- what each method's default placement can reach: the budgets 0.7 / 0.5 / 0.35 solved with
  :func:`patchslim.budget.plan_for_budget`, or the reachable range when it cannot.

Accuracy on 500 images has a standard error of about 1.4 points: read differences below 2-3 points as noise;
the mechanisms (survival, variances, reachable ranges) are the evidence. Not timed: it may run on a busy machine.

Usage::

    python benchmarks/newer_methods.py [--limit 500] [--out benchmarks/results/newer_methods.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import patchslim  # noqa: E402
from patchslim import bundled  # noqa: E402
from patchslim.benchmarks.common import portable_text  # noqa: E402
from patchslim.budget import plan_for_budget  # noqa: E402
from patchslim.errors import BudgetError  # noqa: E402
from patchslim.metrics import count_macs  # noqa: E402
from patchslim.methods.ppt import DEFAULT_TAU  # noqa: E402
from patchslim.plan import SlimPlan  # noqa: E402

KEEP = 0.5
BUDGETS = (0.7, 0.5, 0.35)
# (label, method, blocks or None for the default placement, options)
VARIANTS = (
    ("attention (CLS, for reference)", "attention", None, {}),
    ("evit (for reference)", "evit", None, {}),
    ("tome (for reference)", "tome", None, {}),
    ("tofu", "tofu", None, {}),
    ("tofu, merge=average (no MLERP)", "tofu", None, {"merge": "average"}),
    ("tofu, prune in every block", "tofu", None, {"merge_from": 6}),
    ("tofu, merge in every block", "tofu", None, {"merge_from": 0}),
    ("pitome", "pitome", None, {}),
    ("ppt", "ppt", None, {}),
    ("ppt, tau=1 (pools always)", "ppt", None, {"tau": 1.0}),
    ("zerotprune", "zerotprune", None, {}),
    ("zerotprune, similarity_share=0 (importance alone)", "zerotprune", None, {"similarity_share": 0.0}),
    ("zerotprune, similarity_share=1 (similarity alone)", "zerotprune", None, {"similarity_share": 1.0}),
    ("zerotprune in blocks 1..5", "zerotprune", (1, 2, 3, 4, 5), {}),
)
NEWER = ("tome", "tofu", "pitome", "ppt", "zerotprune")


def garment_mask(canvases, grid: int) -> torch.Tensor:
    """``[n, grid*grid]`` bool: patches with any non-zero pixel on the blank canvas."""
    n, size, _ = canvases.shape
    step = size // grid
    pixels = torch.from_numpy(canvases).reshape(n, grid, step, grid, step)
    return (pixels.amax(dim=(2, 4)) > 0).reshape(n, grid * grid)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=500, help="the first N shipped canvases (at most 500)")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)

    model = patchslim.load_model("fashion-vit", device="cpu")
    canvases, labels = bundled.load_bundled_sample()
    canvases, labels = canvases[: args.limit], torch.from_numpy(labels[: args.limit])
    images = bundled.to_model_input(canvases)
    garment = garment_mask(canvases, model.spec.grid_size[0])
    base = patchslim.run(model, images)
    base_pred = base.logits.argmax(-1)
    base_top1 = 100 * (base_pred == labels).float().mean().item()
    base_gmacs = count_macs(base).gmacs

    lines = [f"Model `fashion-vit` (trained), the first {len(labels)} shipped canvases; unslimmed top-1 "
             f"{base_top1:.1f} %, {base_gmacs:.4f} GMACs per image; {garment.float().sum(1).mean():.1f} of "
             f"{garment.shape[1]} patches per image are garment.", "",
             f"## Each method at rho {KEEP:g} (default placement unless named)", "",
             "| variant | top-1 % | agrees % | garment kept | background kept | GMACs (of unslimmed) "
             "| selection % of GMACs |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, method, blocks, options in VARIANTS:
        trace = patchslim.run(model, images, SlimPlan.single(method, KEEP, blocks, **options))
        pred = trace.logits.argmax(-1)
        mask = trace.patch_mask()
        kept_garment = (mask & garment).sum().item() / garment.sum().item()
        kept_background = (mask & ~garment).sum().item() / (~garment).sum().item()
        macs = count_macs(trace)
        merges = trace.final_provenance.ids is None  # a source matrix: some token stands for several patches
        lines.append(f"| {label} | {100 * (pred == labels).float().mean():.1f} | "
                     f"{100 * (pred == base_pred).float().mean():.1f} | "
                     f"{'(merged)' if merges else f'{kept_garment:.3f}'} | "
                     f"{'(merged)' if merges else f'{kept_background:.3f}'} | "
                     f"{macs.gmacs / base_gmacs:.3f} | {100 * macs.selection / macs.total:.2f} |")

    ppt = patchslim.run(model, images, SlimPlan.single("ppt", KEEP))
    tau = DEFAULT_TAU
    lines += ["", f"## PPT: variance of the significance scores per image (pools below tau = {tau:g})", "",
              "| block | tokens scored | min | median | max | images that pool |", "|---:|---:|---:|---:|---:|---:|"]
    for stage in ppt.stages:
        variance = stage.scores.var(dim=1)
        lines.append(f"| {stage.block} | {stage.scores.shape[1]} | {variance.min():.2e} | {variance.median():.2e} | "
                     f"{variance.max():.2e} | {(variance < tau).float().mean():.3f} |")
    lines += ["", "(A uniform spread over M tokens has variance 0; the scores sum to 1, so for DeiT-S's M = 196 the "
              "same peakedness gives a smaller variance than for this model's M = 144 or fewer.)"]

    lines += ["", "## What each default placement reaches (fraction of the unslimmed GMACs)", "",
              "| method | " + " | ".join(f"budget {b:g}" for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]
    for method in NEWER:
        cells = []
        for budget in BUDGETS:
            try:
                solved = plan_for_budget(model, method, budget)
            except BudgetError as exc:
                cells.append(f"refused: {str(exc).split(': ', 1)[-1]}")
            else:
                cells.append(f"rho {solved.keep_ratio:.3g}, reaches {solved.reached:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")

    took = time.perf_counter() - started
    command = ("python benchmarks/newer_methods.py" + (f" --limit {args.limit}" if args.limit != 500 else "")
               + (f" --out {portable_text(args.out)}" if args.out else ""))
    header = ["# Why the newer methods rank where they do (fashion-vit)", "",
              f"Command: `{command}`", "",
              f"Machine: {platform.machine()} ({os.cpu_count()} cores; torch {torch.__version__}); written "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Took {took:.0f} s.", ""]
    text = "\n".join(header + lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

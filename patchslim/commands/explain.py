"""``explain``: attention, rollout and attribution maps of one image before and after slimming, as PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from patchslim.commands.common import add_model_arguments, add_plan_arguments
from patchslim.commands.faithfulness_options import add_faithfulness_arguments

NAME = "explain"
HELP = ("Explain one image before and after slimming: write overlay, attention, rollout, gradient-weighted "
        "rollout and attribution maps as PNG files, report how much of the model's evidence the slimming kept "
        "and, with --faithfulness, how faithful each map is (deletion / insertion scores).")


def add_arguments(parser) -> None:
    add_model_arguments(parser, "deit_small_patch16_224")
    add_plan_arguments(parser)
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--out", required=True, help="folder for the PNG files (created if missing)")
    parser.add_argument("--attribution", default="ig", choices=("ig", "occlusion", "none"),
                        help="Integrated Gradients, per-patch occlusion, or none (attention only; fast)")
    parser.add_argument("--steps", type=int, default=16, help="Integrated Gradients path steps")
    parser.add_argument("--share", type=float, default=0.1,
                        help="top share of patches by attribution that counts as the evidence")
    parser.add_argument("--block", type=int, default=-1, help="block of the attention maps (-1: the last)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_faithfulness_arguments(parser)


def main(args) -> int:
    from patchslim.commands.common import keep_from_args, load_model_from_args, plan_from_args
    from patchslim.commands.faithfulness_options import check_faithfulness_arguments
    from patchslim.errors import PatchslimError
    from patchslim.explain import explain
    from patchslim.images import open_image

    if not 0.0 < args.share <= 1.0:
        raise PatchslimError(f"--share must be in (0, 1], got {args.share}")
    if args.steps < 1:
        raise PatchslimError(f"--steps must be at least 1, got {args.steps}")
    plan = plan_from_args(args)
    image = open_image(args.image)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise PatchslimError(f"--out {out} is a file, not a folder")
    model = load_model_from_args(args)
    if not -model.spec.depth <= args.block < model.spec.depth:
        raise PatchslimError(f"--block must be in -{model.spec.depth}..{model.spec.depth - 1}, got {args.block}")
    check_faithfulness_arguments(args, model)
    attribution = None if args.attribution == "none" else args.attribution
    options = {"n_steps": args.steps} if attribution == "ig" else {}
    progress = None if args.json else _progress_bar()
    result = explain(model, image, plan, attribution=attribution, share=args.share, attention_block=args.block,
                     progress=progress, faithfulness=args.faithfulness, faithfulness_steps=args.faithfulness_steps,
                     **options)
    if progress is not None:
        progress(None, None)
    out.mkdir(parents=True, exist_ok=True)
    files = write_pictures(result, image, model, out, args.method, keep_from_args(args))
    ev = result.evidence
    summary = dict(
        model=model.name,
        weights=model.weights_name,
        method=args.method,
        plan=plan.to_dict(),
        keep_ratio=result.trace.keep_ratio,
        target=result.target,
        target_label=result.target_label,
        kept_evidence=ev.kept_evidence,
        spearman=_number(ev.spearman),
        evidence_share=ev.share,
        evidence_basis=args.attribution if attribution else ("rollout" if result.rollout_before is not None
                                                             else "window attention"),
        top_patches=ev.top_count,
        top_patches_kept=ev.top_kept,
        dropped_top_patch_ids=list(ev.dropped_top_patch_ids),
        top5_before=[dict(label=label, prob=prob) for label, prob in result.baseline_trace.top_k(5)],
        top5_after=[dict(label=label, prob=prob) for label, prob in result.trace.top_k(5)],
        attribution_seconds=None if result.attribution_before is None else dict(
            before=result.attribution_before.seconds, after=result.attribution_after.seconds),
        grad_rollout_refused=result.grad_rollout_refused or None,
        out=str(out),
        files=files,
    )
    if result.faithfulness is not None:
        summary["faithfulness"] = result.faithfulness.to_dict()
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{model.name} ({model.weights_source}); method {args.method}, rho {keep_from_args(args):g} "
          f"(reached {result.trace.keep_ratio:.3f}); explaining class {result.target_label!r}")
    basis = summary["evidence_basis"]
    print(f"kept evidence: {ev.top_kept} of the top {ev.top_count} patches by {basis} kept "
          f"({ev.kept_evidence:.0%}); rank agreement (Spearman) {ev.spearman:.3f}")
    if result.faithfulness is not None:
        print(faithfulness_text(result.faithfulness))
    print(f"wrote {len(files)} files to {out}: {', '.join(files)}")
    return 0


def faithfulness_text(faithfulness) -> str:
    """The scores as a small table per mode: deletion (lower is better) and insertion (higher is better)."""
    lines = [f"faithfulness ({faithfulness.steps} steps, class {faithfulness.target}; deletion: lower is better, "
             "insertion: higher is better; random: the mean of 5 random rankings):"]
    for mode, reason in faithfulness.refused.items():
        lines.append(f"  {mode} mode left out: {reason}")
    for mode in faithfulness.modes:
        lines.append(f"  {mode} mode        deletion before / after   insertion before / after")
        for row in (r for r in faithfulness.rows() if r["mode"] == mode):
            lines.append(f"    {row['map']:<14} {row['deletion_before']:>8.3f} / {row['deletion_after']:<8.3f}"
                         f"      {row['insertion_before']:>8.3f} / {row['insertion_after']:<8.3f}")
    return "\n".join(lines)


def write_pictures(result, image, model, out: Path, method: str, keep: float) -> list[str]:
    """Writes the PNGs of an :class:`~patchslim.explain.Explanation`; returns the file names."""
    import numpy as np

    from patchslim import vis

    view = vis.model_view(image, model)
    files: list[str] = []

    def save(picture, name: str) -> None:
        picture.save(out / name)
        files.append(name)

    what = f"{method} rho={keep:g}"
    windowed = model.spec.hierarchical  # Swin: each block on its own grid and windows; no CLS, no rollout
    if windowed:
        slimmed = sorted({record.block for record in result.trace.stages})
        block = slimmed[-1] if slimmed else None
        save(vis.window_overlay(image, model, result.trace, block,
                                title=f"{what}, {vis.window_status(result.trace, block).heading()}"), "overlay.png")
    else:
        save(vis.patch_overlay(image, model, result.trace, title=f"{what}, after the last block: "
                               f"{vis.patch_status(result.trace.final_provenance, model.spec.grid_size).summary()}"),
             "overlay.png")
    block = result.attention_block
    pairs = [
        ("attention", result.attention_before, result.attention_after, "inferno",
         f"attention received in the window, block {block}" if windowed else
         f"CLS attention, block {block} (mean of heads)", "attention"),
    ]
    if result.rollout_before is not None:
        pairs.append(("rollout", result.rollout_before, result.rollout_after, "inferno",
                      "attention rollout from CLS", "rollout"))
    if result.grad_rollout_before is not None:
        pairs.append(("grad_rollout", result.grad_rollout_before, result.grad_rollout_after, "inferno",
                      f"gradient-weighted rollout, class {result.target_label!r}", "relevance"))
    if result.attribution_before is not None:
        kind = "Integrated Gradients" if result.attribution_before.method == "integrated_gradients" else "occlusion"
        pairs.append(("attribution", result.attribution_before.grid, result.attribution_after.grid, "RdBu_r",
                      f"{kind} per patch, class {result.target_label!r}", "attribution (sum per patch)"))
    for stem, before, after, cmap, title, label in pairs:
        both = np.concatenate([np.ravel(before), np.ravel(after)])
        both = both[np.isfinite(both)]
        if cmap == "RdBu_r":  # signed: centre the scale on 0
            top = float(np.abs(both).max()) if both.size else 1.0
            vmin, vmax = -top, top
        else:
            vmin, vmax = 0.0, float(both.max()) if both.size else 1.0
        save(vis.heatmap_overlay(view, before, vmin, vmax, cmap, title=f"{title}: unslimmed", label=label),
             f"{stem}_before.png")
        save(vis.heatmap_overlay(view, after, vmin, vmax, cmap, title=f"{title}: {what}", label=label),
             f"{stem}_after.png")
    return files


def _number(value: float):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _progress_bar():
    """A tqdm bar on stderr driven by ``progress(done, total)``; ``progress(None, None)`` closes it."""
    from tqdm import tqdm

    bar = {}

    def progress(done, total):
        if done is None:
            if "bar" in bar:
                bar["bar"].close()
            return
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc="attributions", unit="eval", leave=False)
        b = bar["bar"]
        b.total = total
        b.n = done
        b.refresh()

    return progress

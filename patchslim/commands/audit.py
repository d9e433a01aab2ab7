"""``audit``: per-group and per-class accuracy of slimmed models, with disparity flags; resumable."""

from __future__ import annotations

import json
import shlex
import sys

from patchslim.commands.common import add_model_arguments
from patchslim.commands.faithfulness_options import add_faithfulness_arguments
from patchslim.data import LAYOUTS, LIMIT_HELP, SOURCES_HELP

NAME = "audit"
DEFAULT_KEEP = "0.7,0.5"
HELP = ("Audit methods x keep ratios on labelled, grouped images (ROOT/<group>/<class>/<image>, "
        "ROOT/<class>/<image>, a CSV manifest path,label[,group], or a .zip of either): per-group and per-class "
        "top-1 before/after with bootstrap intervals, flips, confidence, kept evidence, GMACs, and a flag when a "
        "group is hurt more than the others beyond the noise. Writes CSV, JSON and one HTML report; "
        "rerun the same command to resume a killed run.")


def add_arguments(parser) -> None:
    add_model_arguments(parser, "fashion-vit")
    parser.add_argument("--data", required=True, help=SOURCES_HELP)
    parser.add_argument("--layout", default="auto", choices=LAYOUTS,
                        help="folder layout (auto: detected from which folder level matches the classes)")
    parser.add_argument("--methods", required=True, help="comma-separated methods (METHOD@B places one)")
    parser.add_argument("--keep", default=None, help="comma-separated keep ratios rho (default 0.7,0.5)")
    parser.add_argument("--budget", default=None,
                        help="comma-separated compute budgets instead of --keep: fractions of the unslimmed GMACs in "
                             "(0, 1]; each method runs the plan that costs that much (within 2 %%)")
    parser.add_argument("--opt", action="append", metavar="KEY=VALUE",
                        help="method option, repeatable (METHOD.KEY=VALUE for one method); stages=2,3 sets the "
                             "stages a Swin slims (every method)")
    parser.add_argument("--groups", default=None,
                        help="groupings besides class: group (from the data), brightness (dark/bright by mean "
                             "non-black intensity), family (the bundled model's tops/footwear/others); default: "
                             "the data's groups, or brightness,family for the canvas data")
    parser.add_argument("--evidence", action="store_true",
                        help="also measure the share of kept evidence (top 10%% patches by attention rollout)")
    parser.add_argument("--limit", type=int, default=None, help=LIMIT_HELP)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="images per shard: the unit of resumption and of distribution")
    parser.add_argument("--workers", type=int, default=2, help="decoding worker processes for image files")
    parser.add_argument("--part", default="0/1", metavar="RANK/WORLD",
                        help="run only shards RANK, RANK+WORLD, ... (several processes or machines sharing --out; "
                             "'env' reads RANK and WORLD_SIZE as torchrun sets them); the report is written by the "
                             "part that finds every shard done")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per interval")
    parser.add_argument("--plotly", default="compressed", choices=("compressed", "inline"),
                        help="how plotly.js is embedded in the HTML (both work offline)")
    parser.add_argument("--out", required=True, help="output folder (parts, CSV, JSON, HTML)")
    parser.add_argument("--fresh", action="store_true", help="discard the parts of an earlier audit in --out")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object (the report)")
    add_faithfulness_arguments(parser, maps_default="auto")
    add_ray_arguments(parser)


def add_ray_arguments(parser) -> None:
    """``--engine`` and the Ray runner's options (patchslim.audit.ray_runner)."""
    parser.add_argument("--engine", default="local", choices=("local", "ray"),
                        help="local: shard tasks in this process (or --part of them); ray: on Ray, one actor per "
                             "worker holding the model (a local Ray on this machine, or --ray-address)")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="--engine ray: join a running cluster (auto, HOST:PORT or ray://HOST:PORT) instead of "
                             "starting a local Ray; the data and weights must be at the same paths on every node")
    parser.add_argument("--ray-workers", type=int, default=None, metavar="N",
                        help="--engine ray: actors (default: one per GPU of the cluster, else one per CPU)")
    parser.add_argument("--ray-retries", type=int, default=3, metavar="N",
                        help="--engine ray: runs of a task after its worker died, before it is reported failed")


def _part(text: str) -> tuple[int, int]:
    import os

    from patchslim.errors import PatchslimError

    if text == "env":
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise PatchslimError("--part env needs the RANK and WORLD_SIZE environment variables (torchrun sets them)")
        text = f"{os.environ['RANK']}/{os.environ['WORLD_SIZE']}"
    rank, sep, world = text.partition("/")
    try:
        return int(rank), int(world)
    except ValueError:
        raise PatchslimError(f"--part must be RANK/WORLD (e.g. 0/4), got {text!r}") from None


def main(args) -> int:
    from tqdm.auto import tqdm

    from patchslim.audit.report import build_report, markdown_summary, write_report
    from patchslim.audit.runner import AuditJob, audit_plans, budget_audit_plans, clear_parts
    from patchslim.audit.sources import parse_groupings
    from patchslim.cli import parse_opts
    from patchslim.commands.common import load_model_from_args
    from patchslim.commands.faithfulness_options import check_faithfulness_arguments, faithfulness_over
    from patchslim.data import load_labelled
    from patchslim.commands.evaluate import keep_or_budgets
    from patchslim.evaluate import parse_variants
    from patchslim.explain.faithfulness_report import write_faithfulness

    variants = parse_variants(args.methods, parse_opts(args.opt))
    ratios, budgets = keep_or_budgets(args, DEFAULT_KEEP)
    part = _part(args.part)
    model = load_model_from_args(args)
    data = load_labelled(args.data, model, layout=args.layout).subset(args.limit)
    groupings = parse_groupings(args.groups, data)
    check_faithfulness_arguments(args, model)
    if budgets is not None:
        plans, refused = budget_audit_plans(model, variants, budgets, args.seed)
        for what, why in refused.items():
            print(f"not audited: {what}: {why}", file=sys.stderr)
    else:
        plans = audit_plans(variants, ratios, args.seed)
    if args.fresh:
        clear_parts(args.out)
    job = AuditJob(model, data, plans, args.out, batch_size=args.batch_size,
                   shard_size=args.shard_size, workers=args.workers, seed=args.seed, evidence=args.evidence)
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="audit", unit="img", unit_scale=True, disable=args.no_progress,
                       file=sys.stderr)
        bar.update(done - bar.n)

    failed = None
    try:
        if args.engine == "ray":
            summary = _run_on_ray(args, job, part, progress)
            failed = summary.failed or None
        else:
            summary = job.run(part=part, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if failed:
        print(f"{len(failed)} shard(s) failed: " + "; ".join(f"shard {k}: {why}" for k, why in sorted(failed.items()))
              + ". The report leaves them out; run the same command again to retry them.", file=sys.stderr)
    if not summary.complete and not failed:
        print(f"part {args.part}: {summary.ran} shard(s) computed, {summary.reused} already there; other parts "
              f"are still missing, so no report yet (run the remaining parts, then any part again)", file=sys.stderr)
        return 0
    command = "python -m patchslim " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if sys.argv and sys.argv[0].endswith("__main__.py") else ""
    report = build_report(job, groupings, n_boot=args.bootstrap, command=command, failed=failed)
    if budgets is not None:
        report.notes += [f"Not audited: {what}: {why}" for what, why in refused.items()]
    written = write_report(report, args.out, plotly=args.plotly)
    faithfulness = None
    if args.faithfulness:  # over the same images and plans, written beside the report
        faithfulness = faithfulness_over(args, model, data, [(p.method, p.keep_ratio, p.plan) for p in job.plans],
                                         not args.no_progress)
        written.update({f"faithfulness_{k}": v for k, v in write_faithfulness(
            faithfulness, args.out, command=command or None, title="Faithfulness of the maps (audit)").items()})
    if args.json:
        record = report.to_dict()
        if faithfulness is not None:
            record["faithfulness"] = faithfulness.to_dict()
        record["written_files"] = {k: str(v) for k, v in written.items()}
        print(json.dumps(record))
        return 1 if failed else 0
    print(markdown_summary(report))
    if faithfulness is not None:
        print(faithfulness.markdown())
    if summary.reused:
        print(f"resumed: {summary.reused} of {summary.shards} shard(s) were already done")
    for kind, path in written.items():
        print(f"wrote {path}")
    return 1 if failed else 0


def _run_on_ray(args, job, part, progress):
    """``--engine ray``: the job's shard tasks on Ray; prints where they ran to stderr."""
    from patchslim.audit.ray_runner import ModelRecipe, RaySettings, run_on_ray
    from patchslim.errors import PatchslimError

    if part != (0, 1):
        raise PatchslimError("--part splits an audit by hand and --engine ray splits it itself: give one of them")
    recipe = ModelRecipe(args.model, args.weights, not args.no_pretrained, getattr(args, "precision", "fp32"))
    summary = run_on_ray(job, RaySettings(args.ray_address, args.ray_workers, args.ray_retries), recipe, progress)
    if summary.workers:
        print(f"ray: {len(summary.workers)} worker(s) ({', '.join(summary.workers)}); start-up "
              f"{summary.startup_seconds:.1f} s; {summary.ran} shard(s) computed, {summary.restarts} worker "
              "restart(s)", file=sys.stderr)
    return summary

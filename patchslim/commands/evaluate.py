"""``evaluate``: top-1 accuracy of slimming methods across keep ratios, as a table and a plot."""

from __future__ import annotations

import json
import shlex
import sys

from patchslim.commands.common import add_model_arguments
from patchslim.commands.faithfulness_options import add_faithfulness_arguments
from patchslim.data import LAYOUTS, LIMIT_HELP, SOURCES_HELP

NAME = "evaluate"
DEFAULT_KEEP = "1.0,0.9,0.7,0.5,0.3"
HELP = ("Top-1 accuracy and agreement with the unslimmed model for methods x keep ratios (or x compute budgets) on "
        "a labelled data set; writes CSV, markdown and a plot with --out.")


def add_arguments(parser) -> None:
    add_model_arguments(parser, "fashion-vit")
    parser.add_argument("--data", required=True, help=SOURCES_HELP)
    parser.add_argument("--layout", default="auto", choices=LAYOUTS,
                        help="folder layout (auto: detected from which folder level matches the classes)")
    parser.add_argument("--methods", required=True,
                        help="comma-separated methods; METHOD@B acts before block B (e.g. entropy@1, "
                             "attention@3+6+9)")
    parser.add_argument("--keep", default=None, help="comma-separated keep ratios rho (default 1.0,0.9,0.7,0.5,0.3)")
    parser.add_argument("--budget", default=None,
                        help="comma-separated compute budgets instead of --keep: fractions of the unslimmed GMACs in "
                             "(0, 1]; each method runs the plan that costs that much (within 2 %%); pairs a method "
                             "cannot reach are listed with what it can")
    parser.add_argument("--opt", action="append", metavar="KEY=VALUE",
                        help="method option, repeatable: KEY=VALUE for every method having it, "
                             "METHOD.KEY=VALUE for one; stages=2,3 sets the stages a Swin slims (every method)")
    parser.add_argument("--limit", type=int, default=None, help=LIMIT_HELP)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--workers", type=int, default=0, help="decoding worker processes for image files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the plans (random, sampled decisions)")
    parser.add_argument("--out", default=None, help="folder for accuracy.csv/.json/.md/.html/.png")
    parser.add_argument("--stem", default="accuracy", help="file name stem of the outputs")
    parser.add_argument("--no-png", action="store_true", help="skip the PNG plot")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_faithfulness_arguments(parser, maps_default="auto")


def keep_or_budgets(args, default_keep: str = DEFAULT_KEEP) -> tuple[list[float] | None, list[float] | None]:
    """``(keep ratios, None)`` or ``(None, budgets)`` from ``--keep`` / ``--budget`` (``default_keep`` when neither).

    Raises:
        BudgetError: both given, or a budget outside (0, 1].
        PlanError: a keep ratio outside (0, 1].
    """
    from patchslim.budget import parse_budgets
    from patchslim.errors import BudgetError
    from patchslim.evaluate import parse_keep_ratios

    if args.budget is not None:
        if args.keep is not None:
            raise BudgetError("--keep and --budget are two ways to say how much to slim: give one of them")
        return None, parse_budgets(args.budget, "--budget")
    return parse_keep_ratios(default_keep if args.keep is None else args.keep), None


def main(args) -> int:
    from patchslim.cli import parse_opts
    from patchslim.commands.common import load_model_from_args
    from patchslim.data import load_labelled
    from patchslim.commands.faithfulness_options import check_faithfulness_arguments, faithfulness_over
    from patchslim.evaluate import budget_plans, evaluate, parse_variants, write_outputs
    from patchslim.explain.faithfulness_report import write_faithfulness

    variants = parse_variants(args.methods, parse_opts(args.opt))
    ratios, budgets = keep_or_budgets(args)
    model = load_model_from_args(args)
    data = load_labelled(args.data, model, layout=args.layout).subset(args.limit)
    check_faithfulness_arguments(args, model)
    result = evaluate(model, data, variants, ratios, batch_size=args.batch_size, seed=args.seed,
                      progress=not args.no_progress, workers=args.workers, budgets=budgets)
    faithfulness = None
    if args.faithfulness:
        if budgets is None:
            plans = [(v.label, r, v.plan(r, args.seed)) for v in variants for r in ratios]
        else:  # the same (method, budget) pairs the evaluation ran; the ones it refused are left out here too
            solved, _ = budget_plans(model, variants, budgets, args.seed)
            plans = [(v.label, s.keep_ratio, s.plan) for v, _, s in solved]
        faithfulness = faithfulness_over(args, model, data, plans, not args.no_progress)
    written = {}
    if args.out:
        command = "python -m patchslim " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
            if sys.argv and sys.argv[0].endswith("__main__.py") else None
        written = write_outputs(result, args.out, stem=args.stem, png=not args.no_png, command=command)
        if faithfulness is not None:
            written.update({f"faithfulness_{k}": v for k, v in write_faithfulness(
                faithfulness, args.out, stem=f"{args.stem}_faithfulness", command=command).items()})
    if args.json:
        record = result.to_dict()
        if faithfulness is not None:
            record["faithfulness"] = faithfulness.to_dict()
        record["written"] = {k: str(v) for k, v in written.items()}
        print(json.dumps(record))
        return 0
    print(result.markdown())
    if faithfulness is not None:
        print(faithfulness.markdown())
    for kind, path in written.items():
        print(f"wrote {path}")
    return 0

"""``evaluate``: top-1 accuracy of slimming methods across keep ratios, as a table and a plot."""

from __future__ import annotations

import json
import shlex
import sys

from patchslim.commands.common import add_model_arguments
from patchslim.commands.faithfulness_options import add_faithfulness_arguments
from patchslim.data import LAYOUTS, LIMIT_HELP, SOURCES_HELP

NAME = "evaluate"
HELP = ("Top-1 accuracy and agreement with the unslimmed model for methods x keep ratios on a labelled "
        "data set; writes CSV, markdown and a plot with --out.")


def add_arguments(parser) -> None:
    add_model_arguments(parser, "fashion-vit")
    parser.add_argument("--data", required=True, help=SOURCES_HELP)
    parser.add_argument("--layout", default="auto", choices=LAYOUTS,
                        help="folder layout (auto: detected from which folder level matches the classes)")
    parser.add_argument("--methods", required=True,
                        help="comma-separated methods; METHOD@B acts before block B (e.g. entropy@1, "
                             "attention@3+6+9)")
    parser.add_argument("--keep", default="1.0,0.9,0.7,0.5,0.3", help="comma-separated keep ratios rho")
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


def main(args) -> int:
    from patchslim.cli import parse_opts
    from patchslim.commands.common import load_model_from_args
    from patchslim.data import load_labelled
    from patchslim.commands.faithfulness_options import check_faithfulness_arguments, faithfulness_over
    from patchslim.evaluate import evaluate, parse_keep_ratios, parse_variants, write_outputs
    from patchslim.explain.faithfulness_report import write_faithfulness

    variants = parse_variants(args.methods, parse_opts(args.opt))
    ratios = parse_keep_ratios(args.keep)
    model = load_model_from_args(args)
    data = load_labelled(args.data, model, layout=args.layout).subset(args.limit)
    check_faithfulness_arguments(args, model)
    result = evaluate(model, data, variants, ratios, batch_size=args.batch_size, seed=args.seed,
                      progress=not args.no_progress, workers=args.workers)
    faithfulness = faithfulness_over(args, model, data, [(v.label, r, v.plan(r, args.seed)) for v in variants
                                                         for r in ratios], not args.no_progress) \
        if args.faithfulness else None
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

"""``run``: slim one image and compare the prediction with the unslimmed model."""

from __future__ import annotations

import json

NAME = "run"
HELP = "Run one image through a model with and without slimming; print top-5 and tokens per block."


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="deit_small_patch16_224", help="model name (see `info`)")
    parser.add_argument("--weights", default=None, help="local .safetensors/.pth weights file")
    parser.add_argument("--no-pretrained", action="store_true", help="random weights (for timing)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--method", required=True, help="slimming method (see `info`)")
    parser.add_argument("--keep", type=float, default=0.5, help="keep ratio rho in (0, 1]")
    parser.add_argument("--opt", action="append", metavar="KEY=VALUE",
                        help="method option, repeatable; blocks=3,6,9 sets where it acts (0-based)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args) -> int:
    from patchslim.cli import parse_opts
    from patchslim.engine import run
    from patchslim.images import open_image
    from patchslim.models import load_model
    from patchslim.plan import SlimPlan

    plan = SlimPlan.from_options(args.method, args.keep, parse_opts(args.opt), seed=args.seed)
    image = open_image(args.image)
    model = load_model(args.model, device=args.device, weights=args.weights,
                       pretrained=not args.no_pretrained, precision=args.precision)
    batch = model.preprocess(image)
    baseline = run(model, batch)
    trace = run(model, batch, plan)
    result = dict(
        model=model.name,
        weights=model.weights_source,
        device=str(model.device),
        method=args.method,
        plan=plan.to_dict(),
        keep_ratio_requested=args.keep,
        keep_ratio=trace.keep_ratio,
        tokens_per_block=trace.tokens_per_block,
        baseline_tokens_per_block=baseline.tokens_per_block,
        top5=[dict(label=label, prob=prob) for label, prob in trace.top_k(5)],
        baseline_top5=[dict(label=label, prob=prob) for label, prob in baseline.top_k(5)],
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{model.name} ({model.weights_source}) on {model.device}; method {args.method}, "
          f"rho requested {args.keep:g}, reached {trace.keep_ratio:.3f}")
    print(f"{'unslimmed':<40} {'slimmed':<40}")
    for (bl, bp), (sl, sp) in zip(baseline.top_k(5), trace.top_k(5)):
        print(f"{bp:6.1%} {bl[:32]:<33} {sp:6.1%} {sl[:32]:<33}")
    print("tokens per block:", " ".join(str(n) for n in trace.tokens_per_block))
    return 0

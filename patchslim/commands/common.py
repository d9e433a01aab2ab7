"""Arguments several commands share: which model, which weights, where and in what precision it runs, and the
one-image plan (method, rho, options, seed)."""

from __future__ import annotations

PRECISIONS = ("fp32", "bf16", "fp16")


def add_model_arguments(parser, default_model: str, *, precision: bool = True,
                        weights_help: str = "local .safetensors/.pth weights file",
                        no_pretrained_help: str = "random weights (for timing and pipeline tests)") -> None:
    """``--model``, ``--weights``, ``--no-pretrained``, ``--device`` and (unless ``precision=False``)
    ``--precision``, read back by :func:`load_model_from_args`."""
    parser.add_argument("--model", default=default_model,
                        help="model name (see `info`), local-dir:FOLDER (a timm folder) or hf-hub:ORG/NAME")
    parser.add_argument("--weights", default=None, help=weights_help)
    parser.add_argument("--no-pretrained", action="store_true", help=no_pretrained_help)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    if precision:
        parser.add_argument("--precision", default="fp32", choices=PRECISIONS)


def load_model_from_args(args):
    """The model the arguments of :func:`add_model_arguments` describe (``patchslim.load_model``)."""
    from patchslim.models import load_model

    return load_model(args.model, device=args.device, weights=args.weights, pretrained=not args.no_pretrained,
                      precision=getattr(args, "precision", "fp32"))


def add_plan_arguments(parser) -> None:
    """``--method``, ``--keep``, ``--opt`` (repeatable) and ``--seed``, read back by :func:`plan_from_args`."""
    parser.add_argument("--method", required=True, help="slimming method (see `info`)")
    parser.add_argument("--keep", type=float, default=0.5, help="keep ratio rho in (0, 1]")
    parser.add_argument("--opt", action="append", metavar="KEY=VALUE",
                        help="method option, repeatable; blocks=3,6,9 sets where it acts (0-based); for a Swin, "
                             "stages=2,3 sets the stages it slims (every block of each, window by window; "
                             "default: the model's default stages)")
    parser.add_argument("--seed", type=int, default=0)


def plan_from_args(args):
    """The :class:`~patchslim.plan.SlimPlan` the arguments of :func:`add_plan_arguments` describe.

    Raises:
        PlanError: an unknown method, a bad option or keep ratio.
    """
    from patchslim.cli import parse_opts
    from patchslim.plan import SlimPlan

    return SlimPlan.from_options(args.method, args.keep, parse_opts(args.opt), seed=args.seed)

"""Arguments several commands share: which model, which weights, where and in what precision it runs, and the
one-image plan (method, rho, options, seed)."""

from __future__ import annotations

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
PRECISION_HELP = ("fp32; bf16 / fp16 autocast (fp16 on a GPU only); int8: the Linear layers made int8 (dynamic "
                  "quantization, patchslim/quantize.py: no gradients, so no Integrated Gradients or gradient rollout)")


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
        parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help=PRECISION_HELP)


def load_model_from_args(args):
    """The model the arguments of :func:`add_model_arguments` describe (``patchslim.load_model``)."""
    from patchslim.models import load_model

    return load_model(args.model, device=args.device, weights=args.weights, pretrained=not args.no_pretrained,
                      precision=getattr(args, "precision", "fp32"))


DEFAULT_KEEP = 0.5
BUDGET_HELP = ("compute budget instead of --keep: a fraction of the unslimmed GMACs in (0, 1]; the method's rho (or "
               "its own knob) is searched so that the plan costs that much, within 2 %%")


def add_plan_arguments(parser, budget: bool = False) -> None:
    """``--method``, ``--keep``, ``--opt`` (repeatable), ``--seed`` and, with ``budget``, ``--budget``, read back by
    :func:`plan_from_args` (and :func:`budget_from_args`)."""
    parser.add_argument("--method", required=True, help="slimming method (see `info`)")
    parser.add_argument("--keep", type=float, default=None, help=f"keep ratio rho in (0, 1] (default {DEFAULT_KEEP})")
    if budget:
        parser.add_argument("--budget", type=float, default=None, help=BUDGET_HELP)
    parser.add_argument("--opt", action="append", metavar="KEY=VALUE",
                        help="method option, repeatable; blocks=3,6,9 sets where it acts (0-based); for a Swin, "
                             "stages=2,3 sets the stages it slims (every block of each, window by window; "
                             "default: the model's default stages)")
    parser.add_argument("--seed", type=int, default=0)


def keep_from_args(args) -> float:
    """``--keep``, or its default."""
    return DEFAULT_KEEP if args.keep is None else args.keep


def plan_from_args(args):
    """The :class:`~patchslim.plan.SlimPlan` the arguments of :func:`add_plan_arguments` describe (for
    ``--budget``, the plan at rho 1: what the method and options are, checked before the model loads).

    Raises:
        PlanError: an unknown method, a bad option or keep ratio.
        BudgetError: ``--budget`` out of range or given together with ``--keep``.
    """
    from patchslim.cli import parse_opts
    from patchslim.plan import SlimPlan

    budget = getattr(args, "budget", None)
    if budget is not None:
        from patchslim.budget import check_budget
        from patchslim.errors import BudgetError

        if args.keep is not None:
            raise BudgetError("--keep and --budget are two ways to say how much to slim: give one of them")
        check_budget(budget, "--budget")
        return SlimPlan.from_options(args.method, 1.0, parse_opts(args.opt), seed=args.seed)
    return SlimPlan.from_options(args.method, keep_from_args(args), parse_opts(args.opt), seed=args.seed)


def budget_from_args(args, model):
    """The :class:`~patchslim.budget.BudgetSolution` for ``--budget`` on ``model`` (None without ``--budget``).

    Raises:
        BudgetError: a budget the method cannot reach (with what it can), or options that contradict it.
    """
    from patchslim.budget import plan_for_budget
    from patchslim.cli import parse_opts

    if getattr(args, "budget", None) is None:
        return None
    return plan_for_budget(model, args.method, args.budget, options=parse_opts(args.opt), seed=args.seed)

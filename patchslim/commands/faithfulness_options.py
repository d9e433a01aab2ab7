"""``--faithfulness`` and its options, shared by ``explain``, ``evaluate`` and ``audit``: deletion and insertion
scores of the maps (:mod:`patchslim.explain.faithfulness`), in token and / or pixel mode."""

from __future__ import annotations

from typing import Any, Sequence

MODES_HELP = ("also score the maps by deletion and insertion (area under the class probability as the map's top "
              "patches are removed / added, beside 5 random rankings); MODES: both (default: every mode the model "
              "allows), token (a patch is removed by dropping its token) or pixel (its pixels are blurred)")


def add_faithfulness_arguments(parser, maps_default: str | None = None) -> None:
    """``--faithfulness [MODES]``, ``--faithfulness-steps`` and (when ``maps_default`` is given)
    ``--faithfulness-maps``."""
    parser.add_argument("--faithfulness", nargs="?", const="both", default=None, metavar="MODES", help=MODES_HELP)
    parser.add_argument("--faithfulness-steps", type=int, default=20, metavar="S",
                        help="steps of the deletion and insertion curves (2 .. the number of patches)")
    if maps_default is not None:
        parser.add_argument("--faithfulness-maps", default=maps_default, metavar="KINDS",
                            help="map kinds to score, from attention, rollout, grad_rollout, window_attention (Swin), "
                                 "ig, occlusion; auto (default): the attention maps the model gives from one forward "
                                 "(ig and occlusion take dozens of forwards per image)")


def check_faithfulness_arguments(args, model) -> None:
    """Refuses bad modes, steps or map kinds before any long work (ExplanationError naming the option)."""
    from patchslim.errors import ExplanationError
    from patchslim.explain.faithfulness import check_steps, resolve_modes
    from patchslim.explain.maps import check_kinds

    if not args.faithfulness:
        return
    try:
        modes, refused = resolve_modes(model, args.faithfulness)
        if not modes:
            raise ExplanationError("no mode applies to this model: " + "; ".join(refused.values()))
    except ExplanationError as exc:
        raise ExplanationError(f"--faithfulness: {exc}") from None
    try:
        check_steps(args.faithfulness_steps, model.spec.num_patches)
    except ExplanationError as exc:
        raise ExplanationError(f"--faithfulness-steps: {exc}") from None
    if getattr(args, "faithfulness_maps", None) is not None:
        try:
            check_kinds(model, args.faithfulness_maps)
        except ExplanationError as exc:
            raise ExplanationError(f"--faithfulness-maps: {exc}") from None


def faithfulness_over(args, model, data, plans: Sequence[tuple[str, float, Any]], show_progress: bool = True):
    """The :class:`~patchslim.explain.faithfulness_report.FaithfulnessTable` the options ask for, over ``data``."""
    import sys

    from tqdm.auto import tqdm

    from patchslim.explain.faithfulness_report import faithfulness_table

    bar = tqdm(total=len(data) * (1 + len(plans)), desc="faithfulness", unit="img", disable=not show_progress,
               file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        return faithfulness_table(model, data, plans, kinds=args.faithfulness_maps, modes=args.faithfulness,
                                  steps=args.faithfulness_steps, seed=getattr(args, "seed", 0), progress=progress,
                                  workers=getattr(args, "workers", 0))
    finally:
        bar.close()

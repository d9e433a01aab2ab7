"""``run``: slim one image and compare the prediction with the unslimmed model."""

from __future__ import annotations

import json

from patchslim.commands.common import add_model_arguments, add_plan_arguments

NAME = "run"
HELP = "Run one image through a model with and without slimming; print top-5 and tokens per block."


def add_arguments(parser) -> None:
    add_model_arguments(parser, "deit_small_patch16_224")
    add_plan_arguments(parser, budget=True)
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs of each forward for the latency (after one warm-up; 0 skips timing)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args) -> int:
    from patchslim.commands.common import budget_from_args, keep_from_args, load_model_from_args, plan_from_args
    from patchslim.engine import run
    from patchslim.images import open_image
    from patchslim.metrics import compare_latency, compare_memory, count_macs, measure_memory, prediction_change

    plan = plan_from_args(args)
    image = open_image(args.image)
    model = load_model_from_args(args)
    solution = budget_from_args(args, model)
    if solution is not None:
        plan = solution.plan
    keep_requested = solution.keep_ratio if solution is not None else keep_from_args(args)
    batch = model.preprocess(image)
    baseline = run(model, batch)
    trace = run(model, batch, plan)
    macs, baseline_macs = count_macs(trace), count_macs(baseline)
    memory, _ = measure_memory(model, batch, plan, quiet=True)
    baseline_memory, _ = measure_memory(model, batch, None, quiet=True)
    memory_change = compare_memory(memory, baseline_memory)
    latency = compare_latency(model, batch, plan, warmup=1, repeats=args.repeats) if args.repeats > 0 else None
    change = prediction_change(baseline, trace)
    result = dict(
        model=model.name,
        weights=model.weights_source,
        device=str(model.device),
        precision=model.precision,
        int8_backend=model.int8_backend or None,
        method=args.method,
        plan=plan.to_dict(),
        keep_ratio_requested=keep_requested,
        budget=None if solution is None else solution.budget,
        budget_reached=None if solution is None else macs.total / baseline_macs.total,
        keep_ratio=trace.keep_ratio,
        tokens_per_block=trace.tokens_per_block,
        baseline_tokens_per_block=baseline.tokens_per_block,
        top5=[dict(label=label, prob=prob) for label, prob in trace.top_k(5)],
        baseline_top5=[dict(label=label, prob=prob) for label, prob in baseline.top_k(5)],
        gmacs=macs.gmacs,
        baseline_gmacs=baseline_macs.gmacs,
        gmacs_reduction=1.0 - macs.gmacs / baseline_macs.gmacs,
        selection_gmacs=macs.selection / 1e9,
        latency_ms=None if latency is None else latency.slimmed.median_ms,
        baseline_latency_ms=None if latency is None else latency.baseline.median_ms,
        latency_iqr_ms=None if latency is None else latency.slimmed.iqr_ms,
        baseline_latency_iqr_ms=None if latency is None else latency.baseline.iqr_ms,
        speedup=None if latency is None else latency.speedup,
        memory_mb=memory.activation_mb,
        baseline_memory_mb=baseline_memory.activation_mb,
        memory_reduction=memory_change.reduction,
        memory_measured=memory.is_measured and baseline_memory.is_measured,
        memory_how=memory.measured_how,
        estimated_memory_mb=memory.estimated_mb,
        baseline_estimated_memory_mb=baseline_memory.estimated_mb,
        weights_mb=memory.weights_mb,
        prediction=change.image(0),
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{model.name} ({model.weights_source}) on {model.device}, {model.precision_label}; method {args.method}, "
          f"rho requested {keep_requested:g}, reached {trace.keep_ratio:.3f}")
    if solution is not None:
        print(f"budget {solution.budget:g} of the unslimmed GMACs: {solution.knob} {solution.value:g} needed, "
              f"{result['budget_reached']:.4f} reached")
    print(f"{'unslimmed':<40} {'slimmed':<40}")
    for (bl, bp), (sl, sp) in zip(baseline.top_k(5), trace.top_k(5)):
        print(f"{bp:6.1%} {bl[:32]:<33} {sp:6.1%} {sl[:32]:<33}")
    print("tokens per block:", " ".join(str(n) for n in trace.tokens_per_block))
    print(f"label flipped: {'yes' if change.label_flipped[0] else 'no'}; confidence in the unslimmed top-1 "
          f"{change.confidence_before[0]:.1%} -> {change.confidence_after[0]:.1%}; "
          f"top-5 overlap {change.top5_overlap[0]:.0%}; KL {change.kl_divergence[0]:.4f} nats")
    print(f"GMACs: {macs.gmacs:.3f} vs {baseline_macs.gmacs:.3f} unslimmed "
          f"({result['gmacs_reduction']:.1%} fewer; ideal speed-up {baseline_macs.gmacs / macs.gmacs:.2f}x)")
    if latency is not None:
        print(f"latency (median of {latency.slimmed.repeats}, batch 1): {latency.slimmed.median_ms:.1f} ms vs "
              f"{latency.baseline.median_ms:.1f} ms unslimmed (speed-up {latency.speedup:.2f}x)")
    kind = "measured" if result["memory_measured"] else "estimated"
    print(f"activation memory ({kind}): {memory.activation_mb:.2f} MB vs {baseline_memory.activation_mb:.2f} MB "
          f"unslimmed ({memory_change.reduction:.1%} less); weights {memory.weights_mb:.1f} MB")
    return 0

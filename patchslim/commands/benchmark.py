"""``benchmark``: every committed table: the accuracy table, the worked audit, Tables 1-3, Figure 1, the target.

    python -m patchslim benchmark --which all                       # every one of them into benchmarks/results/
    python -m patchslim benchmark                                   # the cost tables (--which costs)
    python -m patchslim benchmark --which figure1,table2            # the cheap, analytic ones
    python -m patchslim benchmark --which table3 --models deit_small_patch16_224 --batch-sizes 32

Each file records the command that remakes it alone: ``--which NAME`` and the options given (run as part of
``--which all``, a file still names its own ``--which NAME``), without this machine's paths.
"""

from __future__ import annotations

import json
import shlex

NAME = "benchmark"
HELP = ("Write the committed tables: accuracy vs rho (accuracy), accuracy at equal cost (budgets) and the target at "
        "half the GMACs investigated (budget_target), the worked audit (audit_fashion), faithfulness of the maps "
        "before and after slimming (faithfulness), latency vs "
        "ideal speed-up (table3), FLOPs vs rho (figure1), selection overhead (table1), FLOPs and memory "
        "reduction (table2), the performance target (target), audits on Ray vs the local runner (ray_scale), "
        "int8 and slimming combined (compression), the int8 backends against fp32 (int8_backends).")


def add_arguments(parser) -> None:
    from patchslim.benchmarks import BENCHMARKS, GROUPS
    from patchslim.benchmarks.common import DEFAULT_OUT

    parser.add_argument("--which", default="costs",
                        help=f"comma-separated, from {', '.join(BENCHMARKS)}; or "
                             + "; ".join(f"{name} ({', '.join(names)})" for name, names in GROUPS.items())
                             + "; default: costs")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the CSV / markdown / plots")
    parser.add_argument("--models", default=None,
                        help="table3: comma-separated models (default: ViT-B/16, DeiT-S, DeiT-Ti); compression: the "
                             "timed models (default: --model and deit_small_patch16_224); int8_backends: the models "
                             "(default: deit_small_patch16_224, fashion-vit)")
    parser.add_argument("--model", default=None,
                        help="figure1, table1, target: the model (default: deit_small_patch16_224); accuracy, "
                             "budgets, budget_target, audit_fashion, faithfulness: the model (default: fashion-vit, "
                             "trained weights)")
    parser.add_argument("--memory-model", default=None,
                        help="table2: the model (default: the accuracy table's, else fashion-vit)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated method labels, METHOD@B to act at block B (default: every method; "
                             "table2: the accuracy table's; accuracy: every method and the placements it "
                             "compares; budgets: every method; audit_fashion: random,uniform,attention,evit,tome; "
                             "faithfulness: attention,tome)")
    parser.add_argument("--target-methods", default=None, help="target: method labels (default: input pruning "
                        "methods at block 0, evit@3+6+9, attention@3+6+9)")
    parser.add_argument("--keep", type=float, default=0.5, help="table3, table1, target: keep ratio rho")
    parser.add_argument("--ratios", default=None,
                        help="figure1, table2, accuracy, audit_fashion, faithfulness: comma-separated keep ratios "
                             "(default: 0.1..1.0 / the accuracy table's / 1.0,0.9,0.7,0.5,0.3 / 0.7,0.5,0.3 / 0.5)")
    parser.add_argument("--budgets", default=None,
                        help="budgets: comma-separated compute budgets, fractions of the unslimmed GMACs (default "
                             "0.7,0.5,0.35; ranked at 0.5 when listed)")
    parser.add_argument("--batch-sizes", default="1,32",
                        help="table3, table1, compression: comma-separated batch sizes (int8_backends: default 1,8,32)")
    parser.add_argument("--batch", type=int, default=32, help="target: batch size; table2: the larger memory batch")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed pairs / runs (default: by workload; target 9)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed pairs / runs first (default: by workload)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps (timed benchmarks)")
    parser.add_argument("--accuracy", default=None,
                        help="the accuracy table to join (default: OUT/accuracy.csv)")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="table2, accuracy, budgets, budget_target, audit_fashion: random weights even when a "
                             "checkpoint exists")
    parser.add_argument("--data", default="fashion-mnist",
                        help="accuracy, budgets, budget_target, audit_fashion, faithfulness: labelled images "
                             "(fashion-mnist: the 10,000 canvas test images; bundled: the 500 shipped; or a folder, "
                             "CSV manifest or zip)")
    parser.add_argument("--limit", type=int, default=None,
                        help="accuracy, budgets, budget_target, audit_fashion, faithfulness: at most N images (evenly "
                             "spaced; faithfulness default 500)")
    parser.add_argument("--selection-images", type=int, default=None,
                        help="budget_target: training canvases that rank the candidate plans (default 10000)")
    parser.add_argument("--steps", type=int, default=20, help="faithfulness: steps of the deletion / insertion curves")
    parser.add_argument("--maps", default=None,
                        help="faithfulness: comma-separated map kinds (default: attention,rollout,grad_rollout,ig,"
                             "occlusion)")
    parser.add_argument("--eval-batch-size", type=int, default=None,
                        help="accuracy, budgets, budget_target, audit_fashion, faithfulness: images per forward "
                             "(default 500 / 500 / 500 / 250 / 10)")
    parser.add_argument("--work", default=None,
                        help="audit_fashion, faithfulness: folder for the resumable parts (default: "
                             "runs/benchmark_audit_fashion, runs/benchmark_faithfulness)")
    parser.add_argument("--resume", action="store_true",
                        help="audit_fashion, faithfulness: keep the parts an interrupted run left in --work (default: "
                             "start over, so that parts made by older code are never mixed in)")
    parser.add_argument("--partial", action="store_true",
                        help="faithfulness: write the table of the parts already in --work (a run going on or "
                             "stopped) without scoring more images")
    parser.add_argument("--tag", default="", help="appended to every output file name (e.g. _deit_small)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); ray_scale: the cores both runners get (0: all)")
    parser.add_argument("--finetuned", default=None,
                        help="compression: fine-tuned checkpoints as LABEL=PATH,... (each with its card JSON beside "
                             "it; default: those under patchslim/assets/finetuned/, if any)")
    parser.add_argument("--no-timing", action="store_true",
                        help="compression: accuracy, GMACs and weights only (no latency: for a busy machine)")
    parser.add_argument("--int8-backend", default=None, choices=("eager", "torchao"),
                        help="compression: the int8 backend (default: the first that runs here, "
                             "patchslim.quantize.int8_backends)")
    parser.add_argument("--no-png", action="store_true", help="HTML plots only")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object (files written, rows)")
    parser.set_defaults(_benchmark_parser=parser)


def selected(which: str) -> list[str]:
    """The benchmark names ``--which`` names (groups expanded), in the order ``--which all`` runs them."""
    from patchslim.benchmarks import BENCHMARKS, GROUPS
    from patchslim.benchmarks.common import parse_list
    from patchslim.errors import PatchslimError

    names: list[str] = []
    for name in parse_list(which):
        names += GROUPS.get(name, (name,))
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        raise PatchslimError(f"--which: unknown benchmark {unknown[0] if unknown else '(none)'!r}; "
                             f"choose from {', '.join(BENCHMARKS)} or {', '.join(GROUPS)}")
    return [name for name in BENCHMARKS if name in names]


def configs(args) -> dict:
    """name -> config of every benchmark ``--which`` selects, filled from the arguments."""
    from pathlib import Path

    from patchslim.benchmarks import (AccuracyConfig, AuditFashionConfig, BudgetsConfig, BudgetTargetConfig,
                                      CompressionConfig, FaithfulnessConfig, Figure1Config, Int8BackendsConfig,
                                      Table1Config, Table2Config, Table3Config, TargetConfig)
    from patchslim.benchmarks.compression import parse_finetuned
    from patchslim.budget import parse_budgets
    from patchslim.benchmarks.common import parse_list
    from patchslim.errors import PatchslimError

    which = selected(args.which)
    if args.keep is not None and not 0.0 < args.keep <= 1.0:
        raise PatchslimError(f"--keep must be in (0, 1], got {args.keep}")
    methods = tuple(parse_list(args.methods)) if args.methods else None
    ratios = tuple(parse_list(args.ratios, float)) if args.ratios else None
    for ratio in ratios or ():
        if not 0.0 < ratio <= 1.0:
            raise PatchslimError(f"--ratios must lie in (0, 1], got {ratio}")
    budgets = tuple(parse_budgets(args.budgets, "--budgets")) if args.budgets else None
    batches = tuple(parse_list(args.batch_sizes, int))
    if not batches or min(batches) < 1 or args.batch < 1 or (args.eval_batch_size or 1) < 1:
        raise PatchslimError("batch sizes must be positive integers")
    if (args.repeats is not None and args.repeats < 1) or (args.warmup is not None and args.warmup < 0):
        raise PatchslimError("--repeats must be >= 1 and --warmup >= 0")
    if args.selection_images is not None and args.selection_images < 1:
        raise PatchslimError(f"--selection-images must be at least 1, got {args.selection_images}")
    if args.limit is not None and args.limit < 1:
        raise PatchslimError(f"--limit must be at least 1, got {args.limit}")
    if any(sep in args.tag for sep in "/\\") or args.tag in (".", ".."):
        raise PatchslimError(f"--tag is part of a file name and cannot hold a path, got {args.tag!r}")
    accuracy = Path(args.accuracy) if args.accuracy else Path(args.out) / "accuracy.csv"
    model = args.model or "deit_small_patch16_224"
    labelled = dict(model=args.model or "fashion-vit", pretrained=not args.no_pretrained, data=args.data,
                    limit=args.limit, progress=not args.no_progress,
                    **({"methods": methods} if methods else {}), **({"keep_ratios": ratios} if ratios else {}),
                    **({"batch_size": args.eval_batch_size} if args.eval_batch_size else {}))
    built = {
        "accuracy": lambda: AccuracyConfig(**labelled),
        "budgets": lambda: BudgetsConfig(**{k: v for k, v in labelled.items() if k != "keep_ratios"},
                                         **({"budgets": budgets} if budgets else {})),
        "budget_target": lambda: BudgetTargetConfig(
            **{k: v for k, v in labelled.items() if k in ("model", "pretrained", "data", "limit", "batch_size")},
            **({"selection_images": args.selection_images} if args.selection_images else {})),
        "audit_fashion": lambda: AuditFashionConfig(**labelled, resume=args.resume,
                                                    **({"work": args.work} if args.work else {})),
        "faithfulness": lambda: FaithfulnessConfig(**dict(labelled, limit=args.limit or FaithfulnessConfig.limit),
                                                   steps=args.steps, **({"kinds": tuple(parse_list(args.maps))}
                                                                        if args.maps else {}),
                                                   resume=args.resume or args.partial, score=not args.partial,
                                                   out=args.out, command=command_line(args, "faithfulness"),
                                                   **({"work": args.work} if args.work else {})),
        "figure1": lambda: Figure1Config(model=model, methods=methods,
                                         **({"keep_ratios": ratios} if ratios else {})),
        "table2": lambda: Table2Config(model=args.memory_model, methods=methods, keep_ratios=ratios,
                                       batch=args.batch, pretrained=not args.no_pretrained, accuracy=accuracy),
        "table1": lambda: Table1Config(model=model, batch_sizes=batches, methods=methods, keep_ratio=args.keep,
                                       repeats=args.repeats, warmup=args.warmup, device=args.device,
                                       accuracy=accuracy),
        "table3": lambda: Table3Config(models=tuple(parse_list(args.models)) if args.models else
                                       Table3Config.models, batch_sizes=batches, methods=methods,
                                       keep_ratio=args.keep, repeats=args.repeats, warmup=args.warmup,
                                       device=args.device),
        "target": lambda: TargetConfig(model=model, batch=args.batch, keep_ratio=args.keep, device=args.device,
                                       **({"methods": tuple(parse_list(args.target_methods))}
                                          if args.target_methods else {}),
                                       **({"repeats": args.repeats, "overhead_repeats": args.repeats}
                                          if args.repeats else {}),
                                       **({"warmup": args.warmup} if args.warmup is not None else {})),
    }
    built["ray_scale"] = lambda: _ray_scale_config(args, methods, ratios)
    built["compression"] = lambda: CompressionConfig(
        **{k: v for k, v in labelled.items() if k in ("model", "pretrained", "data", "limit", "batch_size", "progress")},
        finetuned=parse_finetuned(args.finetuned) if args.finetuned is not None else None,
        timing=not args.no_timing, timed_models=tuple(parse_list(args.models)) if args.models else None,
        batch_sizes=batches, repeats=args.repeats, warmup=args.warmup, device=args.device,
        int8_backend=args.int8_backend)
    built["int8_backends"] = lambda: Int8BackendsConfig(
        models=tuple(parse_list(args.models)) if args.models else Int8BackendsConfig.models,
        batch_sizes=batches if args.batch_sizes != "1,32" else Int8BackendsConfig.batch_sizes,
        repeats=args.repeats, warmup=args.warmup, device=args.device)
    chosen = {name: built[name]() for name in which}
    for config in chosen.values():
        config.stem += args.tag
    return chosen


def _ray_scale_config(args, methods, ratios):
    """``ray_scale``: the worked audit's job (``--model``, ``--data``, ``--limit``, ``--methods``, ``--ratios``,
    ``--eval-batch-size``) with ``--threads`` cores (default: all) and ``--repeats`` pairs."""
    import os

    from patchslim.benchmarks import RayScaleConfig

    return RayScaleConfig(model=args.model or "fashion-vit", pretrained=not args.no_pretrained, data=args.data,
                          limit=args.limit, cores=args.threads or os.cpu_count() or 1, repeats=args.repeats or 1,
                          **({"methods": methods} if methods else {}), **({"keep_ratios": ratios} if ratios else {}),
                          **({"batch_size": args.eval_batch_size} if args.eval_batch_size else {}),
                          **({"work": args.work} if args.work else {}))


def command_line(args, which: str | None = None) -> str:
    """The command that reproduces ``args`` (with ``--which`` set to ``which`` when given):
    ``python -m patchslim benchmark`` and every non-default option, without this machine's paths."""
    from patchslim.benchmarks.common import portable_text

    parser = getattr(args, "_benchmark_parser", None)
    parts = ["python", "-m", "patchslim", NAME]
    if parser is None:
        return " ".join(parts + (["--which", which] if which else []))
    for action in parser._actions:
        # where the resumable parts go and whether they are kept do not change what is measured
        if not action.option_strings or action.dest in ("help", "work", "resume", "partial"):
            continue
        value = which if action.dest == "which" and which else getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        parts += [flag] if value is True else [flag, shlex.quote(str(value))]
    return portable_text(" ".join(parts))


def main(args) -> int:
    import time

    import torch
    from tqdm.auto import tqdm

    from patchslim.benchmarks import BENCHMARKS

    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = configs(args)
    total = sum(len(config.jobs()) for config in chosen.values())
    bar = tqdm(total=total, desc="benchmark", unit="job", disable=args.no_progress, dynamic_ncols=True)

    def tick(description: str) -> None:
        bar.set_postfix_str(description, refresh=False)
        bar.update(1)

    results = {}
    try:
        for name, config in chosen.items():
            start = time.perf_counter()
            result = BENCHMARKS[name][1](config, tick)
            result.seconds = time.perf_counter() - start
            result.write(args.out, command_line(args, name), png=not args.no_png)
            results[name] = result
    finally:
        bar.close()
    if args.json:
        print(json.dumps({name: dict(files={k: str(v) for k, v in r.files.items()}, rows=getattr(r, "rows", None),
                                     seconds=r.seconds)
                          for name, r in results.items()}, default=str))
        return 0
    for name, result in results.items():
        print(result.summary())
        print("wrote " + ", ".join(str(p) for p in result.files.values()) + "\n")
    return 0

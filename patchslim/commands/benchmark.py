"""``benchmark``: the cost tables and figure (Tables 1-3, Figure 1 analogues, the performance target).

    python -m patchslim benchmark                                   # all of them into benchmarks/results/
    python -m patchslim benchmark --which figure1,table2            # the cheap, analytic ones
    python -m patchslim benchmark --which table3 --models deit_small_patch16_224 --batch-sizes 32
"""

from __future__ import annotations

import json
import shlex

NAME = "benchmark"
HELP = ("Measure the cost tables: latency vs ideal speed-up (table3), FLOPs vs rho (figure1), selection "
        "overhead (table1), FLOPs and memory reduction (table2), the performance target (target).")


def add_arguments(parser) -> None:
    from patchslim.benchmarks import BENCHMARKS
    from patchslim.benchmarks.common import DEFAULT_OUT

    parser.add_argument("--which", default="all",
                        help=f"comma-separated, from {', '.join(BENCHMARKS)}; or all (default)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the CSV / markdown / plots")
    parser.add_argument("--models", default=None,
                        help="table3: comma-separated models (default: ViT-B/16, DeiT-S, DeiT-Ti)")
    parser.add_argument("--model", default=None,
                        help="figure1, table1, target: the model (default: deit_small_patch16_224)")
    parser.add_argument("--memory-model", default=None,
                        help="table2: the model (default: the accuracy table's, else fashion-vit)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated method labels, METHOD@B to act at block B (default: every method; "
                             "table2: the accuracy table's)")
    parser.add_argument("--target-methods", default=None, help="target: method labels (default: input pruning "
                        "methods at block 0, evit@3+6+9, attention@3+6+9)")
    parser.add_argument("--keep", type=float, default=0.5, help="table3, table1, target: keep ratio rho")
    parser.add_argument("--ratios", default=None,
                        help="figure1, table2: comma-separated keep ratios (default: 0.1..1.0 / the accuracy table's)")
    parser.add_argument("--batch-sizes", default="1,32", help="table3, table1: comma-separated batch sizes")
    parser.add_argument("--batch", type=int, default=32, help="target: batch size; table2: the larger memory batch")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed pairs / runs (default: by workload; target 9)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed pairs / runs first (default: by workload)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps (timed benchmarks)")
    parser.add_argument("--accuracy", default=None,
                        help="the accuracy table to join (default: OUT/accuracy.csv)")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="table2: random weights even when a checkpoint exists")
    parser.add_argument("--tag", default="", help="appended to every output file name (e.g. _deit_small)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-png", action="store_true", help="HTML plots only")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object (files written, rows)")
    parser.set_defaults(_benchmark_parser=parser)


def configs(args) -> dict:
    """name -> config of every benchmark ``--which`` selects, filled from the arguments."""
    from pathlib import Path

    from patchslim.benchmarks import (BENCHMARKS, Figure1Config, Table1Config, Table2Config, Table3Config,
                                      TargetConfig)
    from patchslim.benchmarks.common import parse_list
    from patchslim.errors import PatchslimError

    which = list(BENCHMARKS) if args.which.strip() == "all" else parse_list(args.which)
    unknown = [name for name in which if name not in BENCHMARKS]
    if unknown or not which:
        raise PatchslimError(f"--which: unknown benchmark {unknown[0] if unknown else '(none)'!r}; "
                             f"choose from {', '.join(BENCHMARKS)} or all")
    if args.keep is not None and not 0.0 < args.keep <= 1.0:
        raise PatchslimError(f"--keep must be in (0, 1], got {args.keep}")
    methods = tuple(parse_list(args.methods)) if args.methods else None
    ratios = tuple(parse_list(args.ratios, float)) if args.ratios else None
    for ratio in ratios or ():
        if not 0.0 < ratio <= 1.0:
            raise PatchslimError(f"--ratios must lie in (0, 1], got {ratio}")
    batches = tuple(parse_list(args.batch_sizes, int))
    if not batches or min(batches) < 1 or args.batch < 1:
        raise PatchslimError("batch sizes must be positive integers")
    if (args.repeats is not None and args.repeats < 1) or (args.warmup is not None and args.warmup < 0):
        raise PatchslimError("--repeats must be >= 1 and --warmup >= 0")
    if any(sep in args.tag for sep in "/\\") or args.tag in (".", ".."):
        raise PatchslimError(f"--tag is part of a file name and cannot hold a path, got {args.tag!r}")
    accuracy = Path(args.accuracy) if args.accuracy else Path(args.out) / "accuracy.csv"
    model = args.model or "deit_small_patch16_224"
    built = {
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
    chosen = {name: built[name]() for name in BENCHMARKS if name in which}
    for config in chosen.values():
        config.stem += args.tag
    return chosen


def command_line(args) -> str:
    """The command that reproduces ``args``: ``python -m patchslim benchmark`` and every non-default option."""
    parser = getattr(args, "_benchmark_parser", None)
    parts = ["python", "-m", "patchslim", NAME]
    if parser is None:
        return " ".join(parts)
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        parts += [flag] if value is True else [flag, shlex.quote(str(value))]
    return " ".join(parts)


def main(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from patchslim.benchmarks import BENCHMARKS, write_result

    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = configs(args)
    total = sum(len(config.jobs()) for config in chosen.values())
    command = command_line(args)
    bar = tqdm(total=total, desc="benchmark", unit="job", disable=args.no_progress, dynamic_ncols=True)

    def tick(description: str) -> None:
        bar.set_postfix_str(description, refresh=False)
        bar.update(1)

    results = {}
    try:
        for name, config in chosen.items():
            result = BENCHMARKS[name][1](config, tick)
            write_result(result, args.out, command, png=not args.no_png)
            results[name] = result
    finally:
        bar.close()
    if args.json:
        print(json.dumps({name: dict(files={k: str(v) for k, v in r.files.items()}, rows=r.rows)
                          for name, r in results.items()}, default=str))
        return 0
    for name, result in results.items():
        print(result.files["md"].read_text())
        print("wrote " + ", ".join(str(p) for p in result.files.values()) + "\n")
    return 0

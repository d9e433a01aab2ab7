"""Accuracy vs keep ratio for every slimming method on the bundled model (the survey's Table 2, our model).

    python benchmarks/accuracy.py                       # full 10,000-image canvas test set
    python benchmarks/accuracy.py --data bundled        # the 500 shipped sample images (no Debian package)

Writes ``benchmarks/results/accuracy.{csv,json,md,html,png}``. Every registered method runs at its default
placement. Where a method works *at the input* by default, a variant acting before block 1 (``METHOD@1``) is
added, and content-based methods that default to a later block also run at the input (``entropy@0``), so
the table shows that where a method acts matters as much as how it scores. ``random@1`` / ``random@2`` are
the controls at the places ``rl`` / ``attention`` act.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def default_variants(depth: int) -> list[str]:
    from patchslim.methods import get_method, method_names

    labels: list[str] = []
    for name in method_names():
        method = get_method(name)
        labels.append(name)
        blocks = method.default_blocks(depth)
        if blocks == (0,) and depth > 1:
            labels.append(f"{name}@1")
        elif (method.point == "pre" and method.input_dependent and not method.needs_attention
              and not method.learned and 0 not in blocks):
            labels.append(f"{name}@0")
    for control in ("random@1", "random@2"):
        if control not in labels and depth > 2:
            labels.append(control)
    return labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fashion-vit")
    parser.add_argument("--weights", default=None, help="ViT weights (default: the bundled checkpoint)")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--methods", default=None, help="comma-separated variants (default: all, see above)")
    parser.add_argument("--keep", default="1.0,0.9,0.7,0.5,0.3")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--stem", default="accuracy")
    parser.add_argument("--merge", default=None,
                        help="comma-separated accuracy JSON files of earlier runs on the same data: no evaluation, "
                             "one combined table (rows of later files win)")
    args = parser.parse_args(argv)

    import torch

    from patchslim.data import load_labelled
    from patchslim.evaluate import evaluate, parse_keep_ratios, parse_variants, write_outputs
    from patchslim.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        import json

        from patchslim.evaluate import EvaluationResult, merge_results

        results = [EvaluationResult.from_dict(json.loads(Path(p).read_text())) for p in args.merge.split(",")]
        commands = [json.loads(Path(p).read_text()).get("command", "") for p in args.merge.split(",")]
        order = args.methods.split(",") if args.methods else None
        merged = merge_results(results, order)
        paths = write_outputs(merged, args.out, stem=args.stem, command=" ; ".join(c for c in commands if c))
        print(merged.markdown())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    model = load_model(args.model, device="cpu", weights=args.weights)
    labels = args.methods.split(",") if args.methods else default_variants(model.spec.depth)
    variants = parse_variants(labels)
    data = load_labelled(args.data, model).subset(args.limit)
    print(f"{model.name} ({model.weights_source}); {data.name}; variants: {', '.join(labels)}", flush=True)
    t0 = time.time()
    result = evaluate(model, data, variants, parse_keep_ratios(args.keep), batch_size=args.batch_size)
    command = "python benchmarks/accuracy.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    paths = write_outputs(result, args.out, stem=args.stem, command=command.strip())
    print(result.markdown())
    print(f"{time.time() - t0:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``finetune``: train a model with a slimming plan active (optionally distilled from the unslimmed model)."""

from __future__ import annotations

import shlex
import sys

from patchslim.commands.common import add_model_arguments, add_plan_arguments
from patchslim.commands.training_data import add_data_arguments
from patchslim.finetune import DEFAULT_DISTILL_WEIGHT, DEFAULT_TEMPERATURE

NAME = "finetune"
HELP = ("Fine-tune a model with a slimming plan active (cross-entropy, plus with --distill the KL divergence to the "
        "unslimmed model, DynamicViT's defaults); writes a safetensors checkpoint and its card. Resumable: rerun the "
        "same command after an interruption to continue.")


def add_arguments(parser) -> None:
    add_model_arguments(parser, "fashion-vit")
    add_data_arguments(parser)
    add_plan_arguments(parser)
    parser.add_argument("--distill", action="store_true",
                        help="add the KL divergence to the unslimmed model's soft predictions")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help=f"distillation temperature (default {DEFAULT_TEMPERATURE:g}, DynamicViT)")
    parser.add_argument("--distill-weight", type=float, default=DEFAULT_DISTILL_WEIGHT,
                        help=f"weight of the KL term (default {DEFAULT_DISTILL_WEIGHT:g}, DynamicViT's lambda_KL)")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training images (may be 0.5)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (AdamW, warm-up then cosine)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=0.05, help="share of the steps of linear warm-up")
    parser.add_argument("--test", default=None,
                        help="labelled data measured at the end, whose top-1 goes on the card (default: the full "
                             "canvas test set when training on canvas Fashion-MNIST, else the held-out images; "
                             "'none' for none)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", required=True, help="folder of the checkpoint, its card and the training record")
    parser.add_argument("--stem", default=None, help="file name stem (default MODEL_METHOD_KEEP[_distill])")
    parser.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    import torch

    from patchslim.commands.common import keep_from_args, load_model_from_args, plan_from_args
    from patchslim.commands.training_data import training_data
    from patchslim.data import CANVAS_SETS, load_labelled
    from patchslim.finetune import FinetuneConfig, check_trainable, finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = plan_from_args(args)
    model = load_model_from_args(args)
    check_trainable(model)
    data = training_data(args, model, refuse_unknown_classes=True)
    test = None
    test_source = args.test or ("fashion-mnist" if args.data in CANVAS_SETS else None)
    if test_source and test_source != "none":
        labelled = load_labelled(test_source, model)

        def test_batches():
            for batch in labelled.batches(model, 500):
                yield batch.images, batch.labels(labelled)

        test = (labelled.name, test_batches)
    config = FinetuneConfig(
        model=model.name, base_weights=model.weights_name, plan=plan.to_dict(), method=args.method,
        keep_ratio=keep_from_args(args), epochs=args.epochs, steps_per_epoch=data.steps_per_epoch,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
        distill=args.distill, temperature=args.temperature, distill_weight=args.distill_weight, seed=args.seed,
        data=data.name,
    )
    command = "python -m patchslim " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if sys.argv and sys.argv[0].endswith("__main__.py") else None
    print(f"fine-tuning {model.name} ({model.weights_name}) under {args.method} rho {config.keep_ratio:g}"
          f"{' with distillation' if args.distill else ''}: {config.steps} steps of {args.batch_size} images "
          f"({data.n_train} training, {data.n_val} held out)", file=sys.stderr, flush=True)
    result = finetune(model, plan, config, data.batch_fn, args.out, validation=data.validation, test=test,
                      restart=args.restart, progress=not args.no_progress, command=command, stem=args.stem,
                      log=lambda line: print(line, file=sys.stderr, flush=True))
    top1 = result.card_data.get("top1") or {}
    if top1:
        print(f"{top1['data']} (n={top1['n']}): top-1 {100 * top1['value']:.2f} % under the plan, "
              f"{100 * top1['unslimmed']:.2f} % unslimmed")
    for path in (result.weights, result.card, result.record):
        print(f"wrote {path}")
    return 0

"""``train-policy``: train the ``rl`` method's patch-selection policy with REINFORCE on a frozen ViT."""

from __future__ import annotations

import sys
from pathlib import Path

from patchslim.commands.common import add_model_arguments
from patchslim.commands.training_data import add_data_arguments
from patchslim.data import CANVAS_SETS

NAME = "train-policy"
HELP = ("Train the rl method's policy (REINFORCE, eq. 14-15) for a model; resumable: rerun the same command "
        "after an interruption to continue.")


def add_arguments(parser) -> None:
    add_model_arguments(parser, "fashion-vit", precision=False,
                        weights_help="local .safetensors/.pth weights file of the ViT",
                        no_pretrained_help="random ViT weights (pipeline tests only)")
    add_data_arguments(parser)
    parser.add_argument("--keep", default="0.5",
                        help="keep ratio rho to train for; several (0.3,0.5,0.7) train one policy for all")
    parser.add_argument("--lambda", dest="lam", type=float, default=0.9,
                        help="lambda of eq. 14: weight of accuracy against cost (kept share)")
    parser.add_argument("--blocks", type=int, default=1,
                        help="the policy acts before this block, reading the tokens entering it (0 = input)")
    parser.add_argument("--sampler", default="topk", choices=("topk", "bernoulli"),
                        help="topk: k=rho*N drawn without replacement (Plackett-Luce); bernoulli: each patch "
                             "kept with prob sigmoid(logit), cost term active")
    parser.add_argument("--accuracy-signal", default="prob", choices=("prob", "correct"),
                        help="accuracy term: probability of the true class (default, lower variance) or 0/1")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--steps", type=int, default=None, help="optimizer steps (default 600)")
    group.add_argument("--epochs", type=float, default=None, help="passes over the training images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4, help="draws per image (leave-one-out baseline)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden", type=int, default=64, help="hidden width of the policy MLP")
    parser.add_argument("--no-cls", action="store_true", help="do not feed the CLS token's features")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="policy file (default patchslim/assets/policies/<model>.safetensors)")
    parser.add_argument("--checkpoint", default=None, help="resumable checkpoint (default OUT.ckpt.pt)")
    parser.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    import torch

    from patchslim import bundled
    from patchslim.commands.common import load_model_from_args
    from patchslim.commands.training_data import training_data
    from patchslim.errors import DataError
    from patchslim.policy import default_policy_path
    from patchslim.policy_training import TrainConfig, train_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    keep = tuple(float(k) for k in str(args.keep).split(",") if k.strip())
    model = load_model_from_args(args)
    out = Path(args.out) if args.out else default_policy_path(model.name)

    if args.data in CANVAS_SETS and model.name != bundled.BUNDLED_NAME:  # a policy is for a ViT
        raise DataError(f"--data {args.data} holds canvas Fashion-MNIST images labelled for "
                        f"{bundled.BUNDLED_NAME!r}; model {model.name!r} needs a folder, a CSV manifest or a "
                        "zip labelled with its own classes")
    data = training_data(args, model)
    steps_per_epoch, data_name = data.steps_per_epoch, data.name
    steps = args.steps if args.steps is not None else (
        max(1, round(args.epochs * steps_per_epoch)) if args.epochs is not None else 600)
    config = TrainConfig(
        model=model.name, block=args.blocks, keep_ratios=keep, lam=args.lam, sampler=args.sampler,
        accuracy_signal=args.accuracy_signal, steps=steps, batch_size=args.batch_size, samples=args.samples,
        lr=args.lr, hidden=args.hidden, use_cls=not args.no_cls, seed=args.seed, data=data_name,
    )
    print(f"training a policy for {model.name} ({model.weights_source}) acting before block {args.blocks}: "
          f"{steps} steps of {args.batch_size} images x {args.samples} draws, keep {keep}, "
          f"lambda {args.lam}, sampler {args.sampler}", file=sys.stderr, flush=True)
    net, meta = train_policy(
        model, config, data.batch_fn, out, checkpoint=args.checkpoint, restart=args.restart,
        validation=data.validation, progress=not args.no_progress,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if meta.validation:
        v = meta.validation
        print(f"held-out training images (n={v['n']}), unslimmed top-1 {100 * v['unslimmed']:.2f} %")
        for r in v["policy"]:
            print(f"  rho {r}: policy {100 * v['policy'][r]:.2f} %   random {100 * v['random'][r]:.2f} %")
    print(f"wrote {out}")
    return 0

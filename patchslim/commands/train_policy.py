"""``train-policy``: train the ``rl`` method's patch-selection policy with REINFORCE on a frozen ViT."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from patchslim.commands.common import add_model_arguments
from patchslim.data import CANVAS_SETS, LAYOUTS, LIMIT_HELP

NAME = "train-policy"
HELP = ("Train the rl method's policy (REINFORCE, eq. 14-15) for a model; resumable: rerun the same command "
        "after an interruption to continue.")


def add_arguments(parser) -> None:
    add_model_arguments(parser, "fashion-vit", precision=False,
                        weights_help="local .safetensors/.pth weights file of the ViT",
                        no_pretrained_help="random ViT weights (pipeline tests only)")
    parser.add_argument("--data", default="fashion-mnist",
                        help="fashion-mnist or bundled: here both mean the canvas Fashion-MNIST TRAINING set (fresh "
                             "random positions every epoch; never the test images that evaluate and audit use); "
                             "or a folder ROOT/<class>/<image> or ROOT/<group>/<class>/<image>, a CSV manifest "
                             "path,label[,group], or a .zip of any of these (read as evaluate and audit read them)")
    parser.add_argument("--layout", default="auto", choices=LAYOUTS,
                        help="folder layout (auto: detected from which folder level matches the classes)")
    parser.add_argument("--limit", type=int, default=None,
                        help=LIMIT_HELP + "; taken before the validation images are held out")
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
    parser.add_argument("--val", type=int, default=2000,
                        help="training images held out for validation and calibration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="policy file (default patchslim/assets/policies/<model>.safetensors)")
    parser.add_argument("--checkpoint", default=None, help="resumable checkpoint (default OUT.ckpt.pt)")
    parser.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    import numpy as np
    import torch

    from patchslim import bundled
    from patchslim.commands.common import load_model_from_args
    from patchslim.data import decode, limit_indices, load_labelled
    from patchslim.errors import DataError, PatchslimError
    from patchslim.policy import default_policy_path
    from patchslim.policy_training import TrainConfig, train_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    keep = tuple(float(k) for k in str(args.keep).split(",") if k.strip())
    model = load_model_from_args(args)
    out = Path(args.out) if args.out else default_policy_path(model.name)

    if args.data in CANVAS_SETS:
        if model.name != bundled.BUNDLED_NAME:
            raise DataError(f"--data {args.data} holds canvas Fashion-MNIST images labelled for "
                            f"{bundled.BUNDLED_NAME!r}; model {model.name!r} needs a folder, a CSV manifest or a "
                            "zip labelled with its own classes")
        items, labels = bundled.load_fashion_mnist("train")
        n_all = len(items)
        chosen = limit_indices(n_all, args.limit)
        items, labels = items[chosen], labels[chosen]
        n_val = max(0, min(args.val, len(items) // 5))
        train_items, train_labels = items[: len(items) - n_val], labels[: len(items) - n_val]
        val_items, val_labels = items[len(items) - n_val:], labels[len(items) - n_val:]
        val_canvases = bundled.place_on_canvas(
            val_items, bundled.random_positions(n_val, np.random.default_rng([args.seed, 99991])))
        n_train = len(train_items)

        def batch_fn(step: int):
            epoch, j = divmod(step, steps_per_epoch)
            order = np.random.default_rng([args.seed, epoch]).permutation(n_train)
            idx = order[j * args.batch_size:(j + 1) * args.batch_size]
            rng = np.random.default_rng([args.seed, epoch, j])
            batch = train_items[idx]
            flips = rng.random(len(idx)) < 0.5  # the bundled model was trained with horizontal flips
            batch = np.where(flips[:, None, None], batch[:, :, ::-1], batch)
            canvases = bundled.place_on_canvas(batch, bundled.random_positions(len(idx), rng))
            return bundled.to_model_input(canvases), torch.from_numpy(train_labels[idx])

        def val_batches():
            for a in range(0, n_val, 500):
                yield (bundled.to_model_input(val_canvases[a:a + 500]),
                       torch.from_numpy(val_labels[a:a + 500]))
        data_name = "canvas Fashion-MNIST train split (fresh random positions)" + (
            f" ({len(items)} of {n_all}, evenly spaced)" if len(items) < n_all else "")
    else:
        data = load_labelled(args.data, model, layout=args.layout).subset(args.limit)
        n_all = len(data)
        perm = np.random.default_rng([args.seed, 7]).permutation(n_all)
        n_val = min(args.val, n_all // 5)
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        n_train = len(train_idx)
        if n_train < 1:
            raise PatchslimError(f"no training images left in {args.data}")

        failed: set[int] = set()

        def load(indices):
            batch = decode(data, model, indices)
            for i, message in batch.errors.items():  # left out of every batch; said once
                if i not in failed:
                    failed.add(i)
                    print(f"left out {data.items[i]}: could not be decoded: {message}", file=sys.stderr, flush=True)
            if not batch.ok.any():
                raise DataError(f"none of the {len(indices)} images of a batch could be decoded "
                                f"(e.g. {data.items[int(indices[0])]})")
            return batch.images, batch.labels(data)

        def batch_fn(step: int):
            epoch, j = divmod(step, steps_per_epoch)
            order = np.random.default_rng([args.seed, epoch]).permutation(train_idx)
            return load(order[j * args.batch_size:(j + 1) * args.batch_size])

        def val_batches():
            for a in range(0, n_val, 100):
                yield load(val_idx[a:a + 100])
        data_name = data.name

    steps_per_epoch = max(1, math.ceil(n_train / args.batch_size))
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
        model, config, batch_fn, out, checkpoint=args.checkpoint, restart=args.restart,
        validation=val_batches if n_val else None, progress=not args.no_progress,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if meta.validation:
        v = meta.validation
        print(f"held-out training images (n={v['n']}), unslimmed top-1 {100 * v['unslimmed']:.2f} %")
        for r in v["policy"]:
            print(f"  rho {r}: policy {100 * v['policy'][r]:.2f} %   random {100 * v['random'][r]:.2f} %")
    print(f"wrote {out}")
    return 0

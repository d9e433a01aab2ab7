"""The training data of the commands that train (``train-policy``, ``finetune``): ``--data``, ``--limit``, ``--val``.

Canvas Fashion-MNIST (``fashion-mnist`` / ``bundled``) means its *training* split here, with fresh random positions
and horizontal flips every epoch (as the bundled models were trained); the last ``--val`` images are held out on
fixed positions. Any other source is read as ``evaluate`` reads it and split at random (seeded) into training and
held-out images. Batches are a function of the step, so a resumed run sees the data an uninterrupted one sees.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from patchslim.data import CANVAS_SETS, LAYOUTS, LIMIT_HELP

DATA_HELP = ("fashion-mnist or bundled: here both mean the canvas Fashion-MNIST TRAINING set (fresh random positions "
             "every epoch; never the test images that evaluate and audit use); or a folder ROOT/<class>/<image> or "
             "ROOT/<group>/<class>/<image>, a CSV manifest path,label[,group], or a .zip of any of these (read as "
             "evaluate and audit read them)")


def add_data_arguments(parser, val_default: int = 2000) -> None:
    """``--data``, ``--layout``, ``--limit`` and ``--val`` (a command adds its own ``--batch-size`` and ``--seed``)."""
    parser.add_argument("--data", default="fashion-mnist", help=DATA_HELP)
    parser.add_argument("--layout", default="auto", choices=LAYOUTS,
                        help="folder layout (auto: detected from which folder level matches the classes)")
    parser.add_argument("--limit", type=int, default=None,
                        help=LIMIT_HELP + "; taken before the validation images are held out")
    parser.add_argument("--val", type=int, default=val_default,
                        help="training images held out for validation (at most a fifth of them)")


@dataclass
class TrainingData:
    """Batches for a training run.

    Attributes:
        name: the data in words (recorded by the run).
        n_train, n_val: training and held-out images.
        batch_fn: ``step -> (images, labels)``, deterministic in the step.
        validation: yields the held-out ``(images, labels)`` batches (None when there are none).
        steps_per_epoch: ``ceil(n_train / batch_size)``.
    """

    name: str
    n_train: int
    n_val: int
    batch_fn: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    validation: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None
    steps_per_epoch: int


def training_data(args, model: Any, *, refuse_unknown_classes: bool = False) -> TrainingData:
    """The :class:`TrainingData` that ``--data``, ``--layout``, ``--limit``, ``--val``, ``--batch-size`` and ``--seed``
    describe for ``model``.

    Args:
        refuse_unknown_classes: refuse a source with images labelled with classes the model does not have (a
            fine-tune keeps the model's head), instead of leaving them out.

    Raises:
        DataError: a canvas set for a model it is not labelled for, classes the model does not have (with
            ``refuse_unknown_classes``), nothing to train on.
    """
    from patchslim import bundled
    from patchslim.data import decode, limit_indices, load_labelled
    from patchslim.errors import DataError

    batch_size, seed = args.batch_size, args.seed
    if args.data in CANVAS_SETS:
        if not bundled.is_bundled(model.name):
            raise DataError(f"--data {args.data} holds canvas Fashion-MNIST images labelled for "
                            f"{' and '.join(repr(n) for n in bundled.BUNDLED_MODELS)}; model {model.name!r} needs a "
                            "folder, a CSV manifest or a zip labelled with its own classes")
        try:
            items, labels = bundled.load_fashion_mnist("train")
        except FileNotFoundError as exc:
            from patchslim.errors import DataNotFoundError

            raise DataNotFoundError(str(exc)) from None
        n_all = len(items)
        chosen = limit_indices(n_all, args.limit)
        items, labels = items[chosen], labels[chosen]
        n_val = max(0, min(args.val, len(items) // 5))
        train_items, train_labels = items[: len(items) - n_val], labels[: len(items) - n_val]
        val_items, val_labels = items[len(items) - n_val:], labels[len(items) - n_val:]
        val_canvases = bundled.place_on_canvas(
            val_items, bundled.random_positions(n_val, np.random.default_rng([seed, 99991])))
        n_train = len(train_items)
        steps_per_epoch = max(1, math.ceil(n_train / batch_size))

        def batch_fn(step: int):
            epoch, j = divmod(step, steps_per_epoch)
            order = np.random.default_rng([seed, epoch]).permutation(n_train)
            idx = order[j * batch_size:(j + 1) * batch_size]
            rng = np.random.default_rng([seed, epoch, j])
            batch = train_items[idx]
            flips = rng.random(len(idx)) < 0.5  # the bundled models were trained with horizontal flips
            batch = np.where(flips[:, None, None], batch[:, :, ::-1], batch)
            canvases = bundled.place_on_canvas(batch, bundled.random_positions(len(idx), rng))
            return bundled.to_model_input(canvases), torch.from_numpy(train_labels[idx])

        def val_batches():
            for a in range(0, n_val, 500):
                yield (bundled.to_model_input(val_canvases[a:a + 500]), torch.from_numpy(val_labels[a:a + 500]))

        name = "canvas Fashion-MNIST train split (fresh random positions)" + (
            f" ({len(items)} of {n_all}, evenly spaced)" if len(items) < n_all else "")
        return TrainingData(name, n_train, n_val, batch_fn, val_batches if n_val else None, steps_per_epoch)

    data = load_labelled(args.data, model, layout=args.layout).subset(args.limit)
    if refuse_unknown_classes:
        unknown = [s for s in data.skipped if s.kind == "label"]
        if unknown:
            listed = ", ".join(f"{s.item} ({s.count} images)" for s in unknown[:4])
            more = f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""
            raise DataError(
                f"{data.name} has images of classes {model.name} does not have: {listed}{more}. Fine-tuning keeps "
                f"the model's classes ({', '.join(model.class_names[:4])}{', ...' if len(model.class_names) > 4 else ''}"
                "): remove those folders or rows, or rename them to the model's classes"
            )
    n_all = len(data)
    perm = np.random.default_rng([seed, 7]).permutation(n_all)
    n_val = min(args.val, n_all // 5)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    n_train = len(train_idx)
    if n_train < 1:
        raise DataError(f"no training images left in {data.name}")
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
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
        order = np.random.default_rng([seed, epoch]).permutation(train_idx)
        return load(order[j * batch_size:(j + 1) * batch_size])

    def val_batches():
        for a in range(0, n_val, 100):
            yield load(val_idx[a:a + 100])

    return TrainingData(data.name, n_train, n_val, batch_fn, val_batches if n_val else None, steps_per_epoch)

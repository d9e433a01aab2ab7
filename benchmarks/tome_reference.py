"""Side by side: patchslim's ``tome`` against the reference ToMe (facebookresearch/ToMe), same model, same r.

For each model and r, the harness builds the same timm model twice (random weights from one seed, fp32, eval
mode; the second a deep copy of the first), patches one with the reference's ``tome.patch.timm`` and sets its
``r``, runs the other through ``patchslim.run`` with ``SlimPlan.single("tome", r=r)``, and reports on one batch
of random images:

- the largest absolute logit difference (the target is 1e-4), beside the largest logit, so it can be read as a
  relative figure;
- whether both keep the same number of tokens, and whether our provenance equals the reference's source
  matrix (``trace_source=True``) row for row, i.e. whether the tokens come out in the same order and stand for
  the same patches;
- two sanity rows per model: the reference patch at r = 0, and our keep-all plan, each against timm's own
  ``model(x)`` (both should be exact; if the reference's row is not, its patch does not fit this timm model).

``--time`` instead measures both forwards (and timm's unpatched one) at batch 1 and 32 for r = 8 / 13 / 16:
the three are run in turn (interleaved, so drifting machine load hits them alike) after a warm-up, and the
medians are reported with the ratio ours / reference. The floor (timm's own blocks on the token counts
each block saw in our run, ``patchslim.metrics.floor_forward``) runs in the same rotation: floor / ours is the
share of our time that the model's own blocks on those tokens take (1.0: no cost above them). The reference runs as its authors time it (no source
tracking); ours always tracks provenance and builds a Trace. Run it on an idle machine only.

The reference is a checkout of https://github.com/facebookresearch/ToMe (the folder that holds ``tome/``),
kept outside this repository: its code is under CC BY-NC 4.0 and never enters the project; this script imports
it at run time from ``--reference PATH``. Compared against commit af95e4b1 (2023-03-30) with timm 1.0.31 and
torch 2.14: its timm patch needed no change for the models compared here (ViT / DeiT blocks whose layer scale,
q/k normalization, attention output normalization and gate are identities; the reference's blocks skip those
modules, which the r = 0 sanity row would reveal for a model that has them).

Model names are timm names; ``NAME:avg`` builds ``NAME`` with ``class_token=False, global_pool="avg"`` (no
class token, average pooling). ``--img-size`` builds them for smaller images (fewer patches: quick checks).

Usage::

    python benchmarks/tome_reference.py --reference PATH
    python benchmarks/tome_reference.py --reference PATH --models deit_small_patch16_224 --r 8,13 --batch 4
    python benchmarks/tome_reference.py --reference PATH --time --models deit_small_patch16_224

Writes a Markdown table to stdout, and to ``--out`` when given (the file names the command, without paths).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

DEFAULT_MODELS = ("deit_small_patch16_224", "vit_small_patch16_224:avg", "deit_small_distilled_patch16_224")
DEFAULT_R = (8, 13)
TIME_R = (8, 13, 16)
TIME_BATCHES = (1, 32)
REFERENCE_FILES = ("tome/merge.py", "tome/patch/timm.py", "tome/utils.py")


class HarnessError(Exception):
    """Bad arguments or an unusable reference checkout; the message says which."""


@dataclass(frozen=True)
class Comparison:
    """One (model, r) side by side.

    Attributes:
        model: the model spec as given (``NAME`` or ``NAME:avg``).
        r: tokens merged per block (``"ref r=0"`` / ``"ours keep-all"`` rows compare with timm instead).
        max_abs_diff: largest |logit difference| over the batch.
        max_abs_logit: largest |logit| of the reference side, for scale.
        tokens_ours, tokens_reference: tokens (prefix included) after the last block.
        same_provenance: our provenance equals the reference's source matrix (None on sanity rows).
        same_top1: both give every image the same top-1 class.
    """

    model: str
    r: str
    max_abs_diff: float
    max_abs_logit: float
    tokens_ours: int
    tokens_reference: int
    same_provenance: bool | None
    same_top1: bool


def parse_ints(text: str, name: str) -> tuple[int, ...]:
    """``"8,13"`` -> ``(8, 13)``; every value a non-negative integer.

    Raises:
        HarnessError: naming the argument.
    """
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise HarnessError(f"{name} must be comma-separated non-negative integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise HarnessError(f"{name} must be comma-separated non-negative integers, got {text!r}")
    return values


def parse_model(spec: str, img_size: int | None = None) -> tuple[str, dict]:
    """``NAME`` or ``NAME:avg`` -> (timm name, create_model keyword arguments), with ``img_size`` if given.

    Raises:
        HarnessError: an unknown suffix.
    """
    name, _, variant = spec.partition(":")
    kwargs = {} if img_size is None else dict(img_size=img_size)
    if variant == "avg":
        kwargs.update(class_token=False, global_pool="avg")
    elif variant != "":
        raise HarnessError(f"model {spec!r}: the only variant is NAME:avg (no class token, average pooling)")
    return name, kwargs


def load_reference(path: str | Path) -> ModuleType:
    """Imports the reference ``tome`` package from a checkout.

    Raises:
        HarnessError: the folder does not exist or holds no ``tome/`` package with the timm patch.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise HarnessError(f"--reference {path}: no such folder; give a checkout of "
                           "https://github.com/facebookresearch/ToMe (the folder that holds tome/)")
    missing = [f for f in REFERENCE_FILES if not (root / f).is_file()]
    if missing:
        raise HarnessError(f"--reference {path} is not a ToMe checkout: {', '.join(missing)} missing")
    sys.path.insert(0, str(root.resolve()))
    try:
        module = importlib.import_module("tome")
    finally:
        sys.path.pop(0)
    if Path(module.__file__).resolve().parent != (root / "tome").resolve():
        raise HarnessError(f"another 'tome' package was imported ({module.__file__}); run in a fresh process")
    return module


def reference_digest(path: str | Path) -> str:
    """A short hash of the reference files the harness runs (names the version without a machine path)."""
    digest = hashlib.sha256()
    for name in REFERENCE_FILES:
        digest.update((Path(path) / name).read_bytes())
    return digest.hexdigest()[:12]


def build_pair(spec: str, seed: int, reference: ModuleType, img_size: int | None = None,
               trace_source: bool = True):
    """The same random-weight timm model twice: (wrapped for patchslim, patched by the reference, which
    records its source matrix when ``trace_source``)."""
    import timm

    import patchslim

    name, kwargs = parse_model(spec, img_size)
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    theirs = copy.deepcopy(model)  # the same weights, bit for bit
    ours = patchslim.wrap_model(model, name=spec)
    reference.patch.timm(theirs, trace_source=trace_source, prop_attn=True)
    return ours, theirs


def run_reference(model, images: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference's logits and source matrix ``[B, T, T0]`` (None when nothing merged)."""
    model.r = r
    with torch.inference_mode():
        logits = model(images)
    return logits.float(), model._tome_info["source"]


def compare(reference_path: str | Path, models=DEFAULT_MODELS, rs=DEFAULT_R, batch: int = 4,
            seed: int = 0, img_size: int | None = None) -> list[Comparison]:
    """Every (model, r) side by side, plus the two sanity rows per model (see the module docstring)."""
    import patchslim

    reference = load_reference(reference_path)
    rows = []
    for spec in models:
        ours, theirs = build_pair(spec, seed, reference, img_size)
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(batch, *ours.input_size, generator=generator)
        with torch.inference_mode():
            plain = ours.model(images).float()
        p = ours.spec.num_prefix_tokens
        full = p + ours.spec.num_patches

        logits, _ = run_reference(theirs, images, 0)
        rows.append(_row(spec, "ref r=0", plain, logits, full, full, None))
        trace = patchslim.run(ours, images)
        rows.append(_row(spec, "ours keep-all", plain, trace.logits, trace.final_tokens, full, None))

        for r in rs:
            logits, source = run_reference(theirs, images, r)
            trace = patchslim.run(ours, images, patchslim.SlimPlan.single("tome", r=r))
            tokens_ref = full if source is None else int(source.shape[1])
            same = None
            if source is not None and tokens_ref == trace.final_tokens:
                same = bool(torch.equal(source[:, p:, p:].float(), trace.final_provenance.dense().float()))
            rows.append(_row(spec, str(r), logits, trace.logits, trace.final_tokens, tokens_ref, same))
    return rows


def _row(spec, r, reference_logits, our_logits, tokens_ours, tokens_reference, same) -> Comparison:
    return Comparison(
        model=spec, r=r,
        max_abs_diff=float((our_logits - reference_logits).abs().max()),
        max_abs_logit=float(reference_logits.abs().max()),
        tokens_ours=int(tokens_ours), tokens_reference=int(tokens_reference), same_provenance=same,
        same_top1=bool(torch.equal(our_logits.argmax(-1), reference_logits.argmax(-1))),
    )


def comparison_table(rows: list[Comparison]) -> str:
    lines = ["| model | r | max abs logit diff | max abs logit | tokens ours / ref | same provenance | same top-1 |",
             "|---|---|---:|---:|---|---|---|"]
    for row in rows:
        prov = "-" if row.same_provenance is None else ("yes" if row.same_provenance else "no")
        lines.append(f"| {row.model} | {row.r} | {row.max_abs_diff:.2e} | {row.max_abs_logit:.3f} | "
                     f"{row.tokens_ours} / {row.tokens_reference} | {prov} | {'yes' if row.same_top1 else 'no'} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Timing:
    """Median milliseconds per forward of one (model, batch, r)."""

    model: str
    batch: int
    r: int
    timm_ms: float
    reference_ms: float
    ours_ms: float
    floor_ms: float  # timm's own blocks on the token counts of our run (patchslim.metrics.floor_forward)


def time_both(reference_path: str | Path, models=DEFAULT_MODELS[:1], rs=TIME_R, batches=TIME_BATCHES,
              repeats: int = 20, warmup: int = 3, seed: int = 0, img_size: int | None = None) -> list[Timing]:
    """Interleaved medians: timm unpatched, the reference and ours, in turn, ``repeats`` times each.

    Only meaningful on an idle machine; see the module docstring.
    """
    import patchslim
    from patchslim.metrics import floor_forward

    reference = load_reference(reference_path)
    out = []
    for spec in models:
        ours, theirs = build_pair(spec, seed, reference, img_size, trace_source=False)
        plain = copy.deepcopy(ours.model)
        for batch in batches:
            images = torch.randn(batch, *ours.input_size, generator=torch.Generator().manual_seed(seed))
            for r in rs:
                plan = patchslim.SlimPlan.single("tome", r=r)
                theirs.r = r
                runners = {
                    "timm": lambda: plain(images),
                    "reference": lambda: theirs(images),
                    "ours": lambda: patchslim.run(ours, images, plan),
                    "floor": floor_forward(ours, images, patchslim.run(ours, images, plan)),
                }
                samples: dict[str, list[float]] = {key: [] for key in runners}
                with torch.inference_mode():
                    for i in range(warmup + repeats):
                        for key, fn in runners.items():
                            started = time.perf_counter()
                            fn()
                            if i >= warmup:
                                samples[key].append(time.perf_counter() - started)
                out.append(Timing(spec, batch, r, *(1000 * statistics.median(samples[k])
                                                     for k in ("timm", "reference", "ours", "floor"))))
    return out


def timing_table(rows: list[Timing]) -> str:
    lines = ["| model | batch | r | timm unpatched ms | reference ms | ours ms | floor ms | ours / reference | "
             "floor / ours |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.model} | {row.batch} | {row.r} | {row.timm_ms:.1f} | {row.reference_ms:.1f} | "
                     f"{row.ours_ms:.1f} | {row.floor_ms:.1f} | {row.ours_ms / row.reference_ms:.3f} | "
                     f"{row.floor_ms / row.ours_ms:.3f} |")
    return "\n".join(lines)


def command_line(args: argparse.Namespace) -> str:
    """The command that remakes the output, with the reference's path written as PATH."""
    parts = ["python benchmarks/tome_reference.py --reference PATH", f"--models {','.join(args.models)}",
             f"--batch {args.batch}" if not args.time else f"--batches {','.join(map(str, args.batches))}",
             f"--r {','.join(map(str, args.r))}", f"--seed {args.seed}"]
    if args.img_size is not None:
        parts.append(f"--img-size {args.img_size}")
    if args.time:
        parts += ["--time", f"--repeats {args.repeats}"]
    if args.out:
        parts.append(f"--out {Path(args.out).resolve().relative_to(REPO) if _inside_repo(args.out) else 'FILE'}")
    return " ".join(parts)


def _inside_repo(path: str) -> bool:
    try:
        Path(path).resolve().relative_to(REPO)
        return True
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and checks the arguments.

    Raises:
        HarnessError: a malformed list, a batch below 1, or --reference missing.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", default=None,
                        help="checkout of facebookresearch/ToMe (the folder holding tome/), outside this repo")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated timm names; NAME:avg = class_token=False, global_pool='avg'")
    parser.add_argument("--r", default=None, help="tokens merged per block, comma-separated "
                        f"(default {','.join(map(str, DEFAULT_R))}; with --time {','.join(map(str, TIME_R))})")
    parser.add_argument("--batch", type=int, default=4, help="images per forward in the comparison")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the images")
    parser.add_argument("--img-size", type=int, default=None,
                        help="build the models for this image size (default: their own; smaller is faster)")
    parser.add_argument("--time", action="store_true", help="measure speed instead (idle machine only)")
    parser.add_argument("--batches", default=",".join(map(str, TIME_BATCHES)), help="batch sizes with --time")
    parser.add_argument("--repeats", type=int, default=20, help="timed forwards of each side with --time")
    parser.add_argument("--out", default=None, help="also write the table (and its command) to this file")
    args = parser.parse_args(argv)
    if not args.reference:
        raise HarnessError("--reference PATH is required: a checkout of https://github.com/facebookresearch/ToMe")
    args.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if not args.models:
        raise HarnessError("--models must name at least one model")
    for spec in args.models:
        parse_model(spec)
    args.r = parse_ints(args.r, "--r") if args.r is not None else (TIME_R if args.time else DEFAULT_R)
    args.batches = parse_ints(args.batches, "--batches")
    if args.batch < 1 or 0 in args.batches:
        raise HarnessError("batch sizes must be at least 1")
    if args.img_size is not None and args.img_size < 1:
        raise HarnessError("--img-size must be at least 1")
    if args.repeats < 1:
        raise HarnessError("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.time:
            table = timing_table(time_both(args.reference, args.models, args.r, args.batches, args.repeats,
                                           seed=args.seed, img_size=args.img_size))
        else:
            table = comparison_table(compare(args.reference, args.models, args.r, args.batch, args.seed,
                                             args.img_size))
        digest = reference_digest(args.reference)
    except HarnessError as exc:
        print(f"tome_reference: {exc}", file=sys.stderr)
        return 2
    import timm

    header = [
        "# tome vs the reference ToMe" + (" (speed)" if args.time else " (logits)"), "",
        f"Command: `{command_line(args)}`", "",
        f"Reference: facebookresearch/ToMe, files {', '.join(REFERENCE_FILES)} with sha256 prefix {digest}; "
        f"timm {timm.__version__}, torch {torch.__version__}, {platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads; fp32, random weights (seed {args.seed}).", "", "",
    ]
    text = "\n".join(header) + table + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The int8 backends side by side: the speed-up each buys over fp32 and how far it moves the logits (issue 15's rule:
int8 must buy a real speed-up here and keep the logits close; among backends that do, prefer the maintained one).

    python -m patchslim benchmark --which int8_backends                       # DeiT-S and fashion-vit, batch 1 and 8, 32
    python -m patchslim benchmark --which int8_backends --batch-sizes 8 --models deit_small_patch16_224

For each model (random weights for timm models, the trained ones for the bundled model), batch size and backend usable
here (:func:`patchslim.quantize.int8_backends`): the int8 model and the fp32 one run alternately on the same batch
(:func:`patchslim.metrics.compare_latency`), the speed-up is the median of the pair ratios; the logits of the two
are compared on that batch (largest absolute change, and the share of images whose top-1 stays). The order
:data:`patchslim.quantize.BACKEND_ORDER` is what ``--precision int8`` tries; this table is the evidence for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from patchslim.benchmarks import common

DEFAULT_MODELS = ("deit_small_patch16_224", "fashion-vit")


@dataclass
class Int8BackendsConfig:
    """What the backend comparison measures.

    Attributes:
        models: model names (timm ones with random weights, the bundled ones with their trained weights).
        batch_sizes: images per forward.
        repeats, warmup: timed and untimed pairs (None: by workload, as Table 3).
        device: where to run.
        stem: file name stem of the outputs.
    """

    models: tuple[str, ...] = DEFAULT_MODELS
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    repeats: int | None = None
    warmup: int | None = None
    device: str = "cpu"
    stem: str = "int8_backends"

    def jobs(self) -> list[tuple[str, int]]:
        return [(m, b) for m in self.models for b in self.batch_sizes]


def run_int8_backends(config: Int8BackendsConfig, tick: common.Tick | None = None) -> common.BenchmarkResult:
    """Measures every usable backend against fp32 (see the module docstring)."""
    import torch

    from patchslim import bundled, metrics
    from patchslim.benchmarks.table3 import repeats_for
    from patchslim.engine import run
    from patchslim.models import load_model
    from patchslim.quantize import BACKEND_ORDER, BACKENDS, int8_backends

    load_before = common.load_average()
    usable = int8_backends(config.device)
    skipped = {name: BACKENDS[name].refusal(torch.device(config.device)) for name in BACKEND_ORDER if name not in usable}
    rows = []
    for name in config.models:
        pretrained = bundled.is_bundled(name)
        fp32 = load_model(name, device=config.device, pretrained=pretrained)
        int8 = {b: load_model(name, device=config.device, pretrained=pretrained, precision="int8", int8_backend=b)
                for b in usable}
        for batch in config.batch_sizes:
            images = common.random_images(fp32, batch) if not pretrained else _canvas(fp32, batch)
            reference = run(fp32, images)
            warmup, repeats = repeats_for(metrics.count_macs(reference).gmacs * batch, config.repeats, config.warmup)
            for backend, model in int8.items():
                logits = run(model, images).logits
                timing = metrics.compare_latency(model, images, None, warmup=warmup, repeats=repeats,
                                                 baseline_model=fp32)
                rows.append(dict(
                    model=name, batch=batch, backend=backend, maintained=backend != "eager",
                    fp32_ms=timing.baseline.median_ms, int8_ms=timing.slimmed.median_ms,
                    int8_iqr_ms=timing.slimmed.iqr_ms, speedup=timing.speedup,
                    max_logit_change=float((logits - reference.logits).abs().max()),
                    logit_range=float(reference.logits.abs().max()),
                    top1_kept=float((logits.argmax(-1) == reference.logits.argmax(-1)).float().mean()),
                    weights_mb_fp32=fp32.weights_mb, weights_mb_int8=model.weights_mb, repeats=repeats,
                ))
            if tick:
                tick(f"int8_backends {name} b{batch}")
    columns = [("model", "model"), ("batch", "batch"), ("backend", "backend"), ("fp32_ms", "fp32 ms"),
               ("int8_ms", "int8 ms"), ("speedup", "speed-up"), ("max_logit_change", "max |logit change|"),
               ("logit_range", "max |logit|"), ("top1_kept", "top-1 kept"), ("weights_mb_int8", "weights MB"),
               ("repeats", "pairs")]
    body = [f"Backends tried by `--precision int8`, in this order: {', '.join(BACKEND_ORDER)} (usable here: "
            f"{', '.join(usable) or 'none'}). Speed-up: median over interleaved (fp32, int8) pairs of the time "
            "ratio, whole model, same batch; logits compared on that batch (random input for timm models with random "
            "weights, canvas test images for the bundled model).", "", common.markdown_table(rows, columns)]
    notes = [f"{name} not measured: {reason}" for name, reason in skipped.items()]
    return common.BenchmarkResult(name="int8_backends", stem=config.stem, title="int8 backends: speed-up and logit "
                                  "change against fp32", rows=rows, body="\n".join(body), notes=notes,
                                  load=(load_before, common.load_average()))


def _canvas(model, batch: int):
    """The first ``batch`` shipped canvas test images (repeated if fewer), as the bundled model's input."""
    import numpy as np

    from patchslim import bundled

    images, _ = bundled.load_bundled_sample()
    picked = [images[i % len(images)] for i in range(batch)]
    return bundled.to_model_input(np.stack(picked)).to(model.device)

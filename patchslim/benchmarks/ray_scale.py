"""What Ray costs an audit: the local runner and Ray at equal cores, on the same job (README "Audits on Ray").

    python -m patchslim benchmark --which ray_scale

The worked audit's job (the bundled ``fashion-vit`` on all 10,000 canvas test images; random, uniform, CLS
attention, EViT and ToMe at rho 0.7 / 0.5 / 0.3; shards of 1,000 images) run from scratch twice per repeat,
alternating: by the local runner in this process with ``cores`` torch threads, then on a local Ray started for it
with ``cores`` CPUs and one single-threaded actor per CPU. Ray's wall time includes its start-up (``ray.init``
and every actor loading its model), which is also given apart. Both runs' parts are compared value by value
(everything but the timings): the same predictions, probabilities within 1e-6 (the local runner's 2 threads
and the actors' 1 thread each sum in another order).

The target (issue 16): Ray costs at most 15 % over the local runner at equal cores. A timed benchmark: run it
on an idle machine.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from patchslim.benchmarks import common

DEFAULT_METHODS = ("random", "uniform", "attention", "evit", "tome")
DEFAULT_RATIOS = (0.7, 0.5, 0.3)
TARGET_OVERHEAD = 0.15


@dataclass
class RayScaleConfig:
    """What the comparison runs.

    Attributes:
        model, pretrained: the model (trained weights; random ones in tests).
        data: labelled images (``fashion-mnist``: all 10,000 canvas test images).
        methods, keep_ratios: the plans.
        limit: audit at most this many images (evenly spaced).
        batch_size, shard_size: as in ``python -m patchslim audit``.
        cores: torch threads of the local runner, and CPUs (one actor each) of the local Ray.
        repeats: (local, Ray) pairs, alternating; medians are reported.
        work: folder for the two runs' parts (emptied before each run).
        stem: file name stem of the outputs.
    """

    model: str = "fashion-vit"
    pretrained: bool = True
    data: str = "fashion-mnist"
    methods: tuple[str, ...] = DEFAULT_METHODS
    keep_ratios: tuple[float, ...] = DEFAULT_RATIOS
    limit: int | None = None
    batch_size: int = 250
    shard_size: int = 1000
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    repeats: int = 1
    work: str | Path = Path("runs") / "benchmark_ray_scale"
    stem: str = "ray_scale"

    def jobs(self) -> list[str]:
        return [f"{runner} {k + 1}" for k in range(self.repeats) for runner in ("local", "ray")]


def _parts(parts_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for path in sorted(parts_dir.glob("*.npz")):
        with np.load(path) as part:
            out[path.name] = {k: part[k] for k in part.files if "seconds" not in k}
    return out


def _same(x: np.ndarray, y: np.ndarray, atol: float) -> bool:
    if x.shape != y.shape:
        return False
    if np.issubdtype(x.dtype, np.floating):
        return bool(np.allclose(x, y, rtol=0.0, atol=atol, equal_nan=True))
    return bool(np.array_equal(x, y))


def same_parts(a: Path, b: Path, atol: float = 1e-6) -> bool:
    """Whether two audits' part files agree (timings aside): the same images, predictions and outcomes exactly,
    probabilities within ``atol`` (2 torch threads in one process and 1 in each of 2 processes sum in another
    order)."""
    pa, pb = _parts(a), _parts(b)
    return pa.keys() == pb.keys() and bool(pa) and all(
        pa[name].keys() == pb[name].keys() and all(_same(pa[name][k], pb[name][k], atol) for k in pa[name])
        for name in pa)


def run_ray_scale(config: RayScaleConfig, tick: common.Tick | None = None) -> common.BenchmarkResult:
    """Times both runners (see the module docstring); ``tick(description)`` after every run."""
    import torch

    from patchslim.audit.ray_runner import ModelRecipe, RaySettings, run_on_ray
    from patchslim.audit.runner import AuditJob, audit_plans
    from patchslim.data import load_labelled
    from patchslim.evaluate import parse_variants
    from patchslim.models import load_model

    model = common.portable_model(load_model(config.model, device="cpu", pretrained=config.pretrained))
    data = load_labelled(config.data, model).subset(config.limit)
    plans = audit_plans(parse_variants(list(config.methods)), list(config.keep_ratios))
    work = Path(config.work)
    recipe = ModelRecipe(config.model, pretrained=config.pretrained)
    threads = torch.get_num_threads()
    load_before = common.load_average()

    def job(folder: str) -> AuditJob:
        shutil.rmtree(work / folder, ignore_errors=True)
        return AuditJob(model, data, plans, work / folder, batch_size=config.batch_size,
                        shard_size=config.shard_size, workers=0)

    local_s, ray_s, startup_s, identical = [], [], [], []
    shards = 0
    for k in range(config.repeats):
        local = job("local")
        torch.set_num_threads(config.cores)
        try:
            start = time.perf_counter()
            local.run()
            local_s.append(time.perf_counter() - start)
        finally:
            torch.set_num_threads(threads)
        if tick:
            tick(f"local {k + 1}: {local_s[-1]:.1f} s")
        on_ray = job("ray")
        summary = run_on_ray(on_ray, RaySettings(workers=config.cores, cpus=config.cores, retries=0), recipe)
        ray_s.append(summary.seconds)
        startup_s.append(summary.startup_seconds)
        shards = summary.shards
        identical.append(summary.complete and same_parts(local.parts_dir, on_ray.parts_dir))
        if tick:
            tick(f"ray {k + 1}: {ray_s[-1]:.1f} s")
    load_after = common.load_average()
    n, forwards = len(data), len(data) * (1 + len(plans))
    local_med, ray_med, startup_med = (statistics.median(v) for v in (local_s, ray_s, startup_s))
    rows = [
        dict(runner="local", workers=1, threads_each=config.cores, images=n, shards=shards,
             wall_seconds=round(local_med, 3), startup_seconds=0.0, images_per_second=round(n / local_med, 2),
             forwards_per_second=round(forwards / local_med, 2), overhead_vs_local=0.0, identical=True),
        dict(runner="ray", workers=config.cores, threads_each=1, images=n, shards=shards,
             wall_seconds=round(ray_med, 3), startup_seconds=round(startup_med, 3),
             images_per_second=round(n / ray_med, 2), forwards_per_second=round(forwards / ray_med, 2),
             overhead_vs_local=round(ray_med / local_med - 1, 4), identical=all(identical)),
    ]
    overhead = ray_med / local_med - 1
    steady = (ray_med - startup_med) / local_med - 1
    body = "\n".join([
        "| runner | workers x threads | images | shards | wall (s) | start-up (s) | images/s | forwards/s | "
        "vs local | same parts |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *(f"| {r['runner']} | {r['workers']} x {r['threads_each']} | {r['images']} | {r['shards']} | "
          f"{r['wall_seconds']:.1f} | {r['startup_seconds']:.1f} | {r['images_per_second']:.0f} | "
          f"{r['forwards_per_second']:.0f} | {100 * r['overhead_vs_local']:+.1f} % | "
          f"{'yes' if r['identical'] else 'NO'} |" for r in rows),
        "",
        f"Ray costs {100 * overhead:+.1f} % over the local runner at {config.cores} cores, start-up included "
        f"({100 * steady:+.1f} % without its {startup_med:.1f} s start-up); the target is at most "
        f"+{100 * TARGET_OVERHEAD:.0f} %: {'met' if overhead <= TARGET_OVERHEAD else 'NOT met'}.",
        "",
    ])
    notes = [
        f"{config.repeats} (local, Ray) pair(s), alternating; medians. Each audit: {len(plans)} plans "
        f"({', '.join(config.methods)} at rho {', '.join(f'{r:g}' for r in config.keep_ratios)}) plus the unslimmed "
        f"forward, {forwards} single-image forwards in batches of {config.batch_size}. Same parts: the same predictions "
        "and outcomes per image, probabilities within 1e-6.",
        "Start-up: from the call to every actor holding its model (ray.init of a local Ray, the actors' processes "
        "importing torch and loading the model).",
        f"Over N GPUs: one actor per GPU takes the next shard as soon as it returns one, so the {shards} shard "
        "tasks run N at a time and the wall time is about the start-up plus ceil(shards / N) shard times; the "
        "driver only writes each shard's part files. Shards smaller than --shard-size spread a small audit wider, "
        "at the cost of more, smaller files.",
    ]
    return common.BenchmarkResult(name="ray_scale", stem=config.stem, title="Audits on Ray vs the local runner",
                                  rows=rows, body=body, notes=notes, load=(load_before, load_after))


"""Slimming combined with other compression: what int8 buys, what slimming buys, what both buy (issue 15).

    python -m patchslim benchmark --which compression                # accuracy on the full canvas test set + timing
    python -m patchslim benchmark --which compression --no-timing    # accuracy only (a busy machine)

On the bundled model (``fashion-vit``, its 10,000 canvas test images) one row per way of making it cheaper:

- ``fp32`` (the reference) and ``int8`` (:mod:`patchslim.quantize`: the Linear layers int8, dynamic quantization);
- training-free slimming at rho 0.5 and 0.3: ``uniform`` (input), ``attention`` (CLS attention, its default
  block), ``tome`` (every block);
- int8 + slimming: ``attention`` and ``tome`` at rho 0.5 on the int8 model;
- fine-tuned slimming: checkpoints given with ``--finetuned LABEL=PATH,...`` (default: every ``*.safetensors``
  under ``patchslim/assets/finetuned/`` with its card ``*.json`` beside it), each run with the plan its card
  names (the plan it was fine-tuned with).

Columns: top-1, agreement with the unslimmed fp32 model, GMACs per image (analytic: int8 changes the cost of a
multiply-add, not their number), weights MB as stored, and, unless ``--no-timing``, the latency at batch 1 and 32
with the speed-up over fp32 unslimmed (each row timed interleaved with the fp32 unslimmed forward on the same batch,
:func:`patchslim.metrics.compare_latency`, medians of the pair ratios as in Table 3). The same latency columns for
DeiT-S with random weights (no accuracy). Targets: int8 alone on fashion-vit loses at most 0.5 point of top-1;
on DeiT-S at batch 32, int8 + slimming at rho 0.5 reaches at least 0.9 x (int8's speed-up x slimming's speed-up).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from patchslim.benchmarks import common

FINETUNED_DIR = Path(__file__).resolve().parents[1] / "assets" / "finetuned"
SLIM_METHODS = ("uniform", "attention", "tome")
SLIM_RATIOS = (0.5, 0.3)
INT8_SLIM = (("attention", 0.5), ("tome", 0.5))
TIMED_MODEL = "deit_small_patch16_224"
MAX_INT8_LOSS = 0.005  # top-1, as a fraction: int8 alone may lose 0.5 point
MIN_COMPOSITION = 0.9  # int8 + slim speed-up >= 0.9 x (int8 speed-up x slim speed-up)


@dataclass(frozen=True)
class Row:
    """One way of making the model cheaper.

    Attributes:
        label: what the table calls it (``int8 + tome 0.5``).
        precision: ``"fp32"`` or ``"int8"``.
        method: the slimming method (``""``: unslimmed).
        keep_ratio: rho (1.0 unslimmed).
        weights: a fine-tuned checkpoint (None: the model's own weights).
        plan_dict: the fine-tuned checkpoint's plan as its card records it (None: ``method`` at ``keep_ratio``).
    """

    label: str
    precision: str = "fp32"
    method: str = ""
    keep_ratio: float = 1.0
    weights: str | None = None
    plan_dict: dict | None = None

    @property
    def kind(self) -> str:
        if self.weights is not None:
            return "fine-tuned slim"
        if self.method and self.precision == "int8":
            return "int8 + slim"
        if self.method:
            return "slim"
        return self.precision

    def plan(self):
        """The row's :class:`~patchslim.plan.SlimPlan` (None: unslimmed)."""
        from patchslim.plan import SlimPlan

        if self.plan_dict is not None:
            return SlimPlan.from_dict(self.plan_dict)
        return SlimPlan.single(self.method, self.keep_ratio) if self.method else None


@dataclass
class CompressionConfig:
    """What the compression table measures.

    Attributes:
        model: the model whose accuracy is measured (trained weights).
        pretrained: load its trained weights (False: random, for tests).
        data: its labelled test images (``fashion-mnist``: the 10,000 canvas test images).
        limit: at most this many images (evenly spaced).
        batch_size: images per forward of the accuracy part.
        finetuned: ``(label, checkpoint path)`` pairs; None: the checkpoints found in :data:`FINETUNED_DIR`.
        timing: measure the latency columns (False: accuracy, GMACs and weights only).
        timed_models: the models timed (the accuracy model and DeiT-S with random weights by default).
        batch_sizes: the timed batch sizes.
        repeats, warmup: timed and untimed pairs per row (None: by workload, as Table 3).
        device: where to run.
        int8_backend: the int8 backend (None: the first that runs here, :func:`patchslim.quantize.int8_backends`).
        progress: show the evaluation's progress bar.
        stem: file name stem of the outputs.
    """

    model: str = "fashion-vit"
    pretrained: bool = True
    data: str = "fashion-mnist"
    limit: int | None = None
    batch_size: int = 500
    finetuned: tuple[tuple[str, str], ...] | None = None
    timing: bool = True
    timed_models: tuple[str, ...] | None = None
    batch_sizes: tuple[int, ...] = (1, 32)
    repeats: int | None = None
    warmup: int | None = None
    device: str = "cpu"
    int8_backend: str | None = None
    progress: bool = True
    stem: str = "compression"

    def models_timed(self) -> tuple[str, ...]:
        return self.timed_models if self.timed_models is not None else (self.model, TIMED_MODEL)

    def jobs(self) -> list[str]:
        timed = [f"time {m} b{b}" for m in self.models_timed() for b in self.batch_sizes] if self.timing else []
        return ["accuracy"] + timed


def parse_finetuned(text: str) -> tuple[tuple[str, str], ...]:
    """``"uniform 0.3 distill=runs/a.safetensors,uniform 0.3=runs/b.safetensors"`` -> (label, path) pairs.

    Raises:
        PatchslimError: an item without ``=`` or with an empty label or path.
    """
    from patchslim.errors import PatchslimError

    pairs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        label, sep, path = item.rpartition("=")
        if not sep or not label.strip() or not path.strip():
            raise PatchslimError(f"--finetuned expects LABEL=PATH items separated by commas, got {item!r}")
        pairs.append((label.strip(), path.strip()))
    return tuple(pairs)


def found_checkpoints(folder: Path = FINETUNED_DIR) -> tuple[tuple[str, str], ...]:
    """``(label, path)`` of every ``*.safetensors`` in ``folder`` with a card ``*.json`` beside it (none when the
    folder does not exist); the label is the card's ``label`` when it has one, else the file's stem."""
    folder = Path(folder)
    if not folder.is_dir():
        return ()
    pairs = []
    for path in sorted(folder.glob("*.safetensors")):
        card = read_card(path)
        if card is not None:
            pairs.append((str(card.get("label") or path.stem), str(path)))
    return tuple(pairs)


def read_card(path: str | Path) -> dict | None:
    """The card JSON beside a checkpoint (``NAME.json`` or ``NAME.card.json``), or None when there is none."""
    path = Path(path)
    for candidate in (path.with_suffix(".json"), path.with_suffix(".card.json")):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def card_plan(card: dict) -> dict | None:
    """The plan a card records, as :meth:`SlimPlan.to_dict` writes it: its ``plan``, else its ``method`` and
    ``keep_ratio`` (or ``keep``); None when it names none."""
    plan = card.get("plan")
    if isinstance(plan, dict) and plan.get("stages"):
        return plan
    method = card.get("method")
    keep = card.get("keep_ratio", card.get("keep"))
    if method and keep is not None:
        return dict(stages=[dict(method=method, keep_ratio=float(keep))], seed=int(card.get("seed", 0)))
    return None


def default_rows() -> list[Row]:
    """fp32, int8, the training-free slim rows and the int8 + slim rows."""
    rows = [Row("fp32"), Row("int8", "int8")]
    rows += [Row(f"{m} {r:g}", "fp32", m, r) for m in SLIM_METHODS for r in SLIM_RATIOS]
    rows += [Row(f"int8 + {m} {r:g}", "int8", m, r) for m, r in INT8_SLIM]
    return rows


def finetuned_rows(config: CompressionConfig) -> tuple[list[Row], dict[str, str]]:
    """The fine-tuned rows of the config, and why a checkpoint was left out (no card, another base model, no
    plan)."""
    pairs = config.finetuned if config.finetuned is not None else found_checkpoints()
    rows, skipped = [], {}
    for label, path in pairs:
        where = common.portable_path(path)
        if not Path(path).is_file():
            skipped[f"fine-tuned {label}"] = f"no checkpoint at {where}"
            continue
        card = read_card(path)
        if card is None:
            skipped[f"fine-tuned {label}"] = f"no card JSON beside {where} (it names the plan it was fine-tuned with)"
            continue
        base = card.get("base_model", card.get("model"))
        if base is not None and base != config.model:
            skipped[f"fine-tuned {label}"] = f"its card names base model {base!r}, not {config.model!r}"
            continue
        plan = card_plan(card)
        if plan is None:
            skipped[f"fine-tuned {label}"] = f"its card ({where}) names no plan"
            continue
        rows.append(Row(f"fine-tuned {label}", "fp32", plan["stages"][0]["method"],
                        float(plan["stages"][0]["keep_ratio"]), str(path), plan))
    return rows, skipped


def _load(config: CompressionConfig, name: str, precision: str, weights: str | None = None, pretrained: bool = True):
    from patchslim.models import load_model

    return common.portable_model(load_model(name, device=config.device, weights=weights, pretrained=pretrained,
                                            precision=precision,
                                            int8_backend=config.int8_backend if precision == "int8" else None))


def run_compression(config: CompressionConfig, tick: common.Tick | None = None) -> common.BenchmarkResult:
    """Measures the compression table (see the module docstring)."""
    from tqdm.auto import tqdm

    from patchslim.data import load_labelled
    from patchslim.engine import check_plan, run
    from patchslim.metrics.flops import count_macs

    load_before = common.load_average()
    extra, skipped = finetuned_rows(config)
    rows = default_rows() + extra
    models = {}  # (precision, weights) -> LoadedModel
    for row in rows:
        key = (row.precision, row.weights)
        if key not in models:
            models[key] = _load(config, config.model, row.precision, row.weights, config.pretrained)
        if row.plan() is not None:
            check_plan(models[key], row.plan())  # fail before any image runs
    reference = models[("fp32", None)]
    data = load_labelled(config.data, reference).subset(config.limit)
    stats = {row.label: dict(correct=0, agree=0, gmacs=0.0) for row in rows}
    n = 0
    bar = tqdm(total=len(data), disable=not config.progress, desc="compression", unit="img", unit_scale=True)
    for batch in data.batches(reference, config.batch_size, 0):
        b = int(batch.ok.sum())
        bar.update(len(batch.errors) + b)
        if not b:
            continue
        n += b
        images, labels = batch.images, batch.labels(data)
        base_pred = run(reference, images).logits.argmax(-1)
        for row in rows:
            trace = run(models[(row.precision, row.weights)], images, row.plan())
            pred = trace.logits.argmax(-1)
            s = stats[row.label]
            s["correct"] += int((pred == labels).sum())
            s["agree"] += int((pred == base_pred).sum())
            s["gmacs"] += count_macs(trace).gmacs * b
    bar.close()
    if tick:
        tick(f"compression accuracy on {n} images")
    base_gmacs = stats["fp32"]["gmacs"] / max(n, 1)
    table = []
    for row in rows:
        s, model = stats[row.label], models[(row.precision, row.weights)]
        table.append(dict(
            model=config.model, row=row.label, kind=row.kind, precision=model.precision_label, method=row.method or "none",
            keep_ratio=row.keep_ratio, top1=s["correct"] / max(n, 1), agreement=s["agree"] / max(n, 1),
            gmacs=s["gmacs"] / max(n, 1), gmacs_share=s["gmacs"] / max(n, 1) / base_gmacs if base_gmacs else None,
            weights_mb=model.weights_mb, n=n,
            checkpoint=common.portable_path(row.weights) if row.weights else "",
        ))
    timed: list[dict] = []
    if config.timing:
        timed = time_rows(config, rows, models, tick)
        for entry in table:
            for t in timed:
                if t["model"] == config.model and t["row"] == entry["row"]:
                    entry[f"ms_b{t['batch']}"] = t["ms"]
                    entry[f"speedup_b{t['batch']}"] = t["speedup"]
    return _result(config, table, timed, skipped, load_before, data.name, reference.spec.depth)


def time_rows(config: CompressionConfig, rows: list[Row], models: dict, tick: common.Tick | None) -> list[dict]:
    """The latency of every row at every batch size, each interleaved with fp32 unslimmed on the same batch, for
    every timed model (the accuracy model with its own weights, the others with random weights; fine-tuned rows
    time as their plan does, on the accuracy model only)."""
    from patchslim import metrics
    from patchslim.benchmarks.table3 import repeats_for
    from patchslim.engine import run

    out = []
    for name in config.models_timed():
        if name == config.model:
            own = models
        else:
            own = {}
            for row in rows:
                if row.weights is None and (row.precision, None) not in own:
                    own[(row.precision, None)] = _load(config, name, row.precision, pretrained=False)
        reference = own[("fp32", None)]
        for batch in config.batch_sizes:
            images = common.random_images(reference, batch)
            base_gmacs = metrics.count_macs(run(reference, images)).gmacs  # also a warm-up
            warmup, repeats = repeats_for(base_gmacs * batch, config.repeats, config.warmup)
            for row in rows:
                key = (row.precision, row.weights)
                if key not in own:
                    continue
                model = own[key]
                plan = row.plan()
                if plan is None and model is reference:
                    timing = None
                else:
                    timing = metrics.compare_latency(model, images, plan or _empty(), warmup=warmup, repeats=repeats,
                                                     baseline_model=reference)
                out.append(dict(
                    model=name, row=row.label, kind=row.kind, precision=model.precision_label, batch=batch,
                    gmacs=metrics.count_macs(run(model, images[:1], plan)).gmacs,
                    baseline_ms=None if timing is None else timing.baseline.median_ms,
                    ms=None if timing is None else timing.slimmed.median_ms,
                    iqr_ms=None if timing is None else timing.slimmed.iqr_ms,
                    speedup=1.0 if timing is None else timing.speedup,
                    repeats=0 if timing is None else repeats,
                ))
            here = [t for t in out if t["model"] == name and t["batch"] == batch]
            medians = sorted(t["baseline_ms"] for t in here if t["baseline_ms"] is not None)
            for t in here:  # the reference row: the median of its own medians in the pairs with the others
                if t["row"] == "fp32" and medians:
                    t["ms"] = t["baseline_ms"] = medians[len(medians) // 2]
            if tick:
                tick(f"compression {name} b{batch}")
    return out


def _empty():
    from patchslim.plan import SlimPlan

    return SlimPlan()


def targets(table: list[dict], timed: list[dict], model: str) -> list[str]:
    """The two target lines: int8's top-1 loss on the accuracy model, and the composition of the speed-ups on
    DeiT-S at batch 32 (when timed)."""
    lines = []
    by_row = {r["row"]: r for r in table}
    if "fp32" in by_row and "int8" in by_row:
        loss = by_row["fp32"]["top1"] - by_row["int8"]["top1"]
        met = "met" if loss <= MAX_INT8_LOSS else "not met"
        lines.append(f"int8 alone on {model}: top-1 {100 * by_row['int8']['top1']:.2f} % against "
                     f"{100 * by_row['fp32']['top1']:.2f} % in fp32, a loss of {100 * loss:.2f} point(s) "
                     f"(target <= {100 * MAX_INT8_LOSS:.1f}): **{met}**.")
    speed = {(t["model"], t["batch"], t["row"]): t["speedup"] for t in timed}
    batch = 32 if any(k[1] == 32 for k in speed) else max((k[1] for k in speed), default=None)
    timed_model = TIMED_MODEL if any(k[0] == TIMED_MODEL for k in speed) else None
    if batch is None or timed_model is None:
        lines.append(f"int8 + slimming on {TIMED_MODEL} at batch 32: not timed in this run (run without --no-timing "
                     "on an idle machine).")
        return lines
    int8 = speed.get((timed_model, batch, "int8"))
    for method, ratio in INT8_SLIM:
        both = speed.get((timed_model, batch, f"int8 + {method} {ratio:g}"))
        slim = speed.get((timed_model, batch, f"{method} {ratio:g}"))
        if None in (both, slim, int8):
            continue
        bound = MIN_COMPOSITION * int8 * slim
        met = "met" if both >= bound else "not met"
        lines.append(f"int8 + {method} {ratio:g} on {timed_model}, batch {batch}: speed-up {both:.2f} against "
                     f"{MIN_COMPOSITION} x ({int8:.2f} x {slim:.2f}) = {bound:.2f} (int8 alone x {method} alone): "
                     f"**{met}** ({both / (int8 * slim):.2f} of the product).")
    return lines


def _result(config: CompressionConfig, table: list[dict], timed: list[dict], skipped: dict[str, str],
            load_before, data_name: str, depth: int) -> common.BenchmarkResult:
    from patchslim.methods import get_method

    backend = next((r["precision"] for r in table if r["precision"].startswith("int8")), "int8")
    columns = [("row", "row"), ("precision", "precision"), ("top1", "top-1"), ("agreement", "agreement"),
               ("gmacs", "GMACs"), ("gmacs_share", "of fp32 GMACs"), ("weights_mb", "weights MB")]
    shown = [dict(r, top1=100 * r["top1"], agreement=100 * r["agreement"]) for r in table]
    if config.timing:
        for b in config.batch_sizes:
            columns += [(f"ms_b{b}", f"ms b{b}"), (f"speedup_b{b}", f"speed-up b{b}")]
    n = table[0]["n"] if table else 0
    body = [f"{config.model}, {n} images of {common.portable_text(data_name)}: top-1 and agreement with the "
            "unslimmed fp32 model in %, GMACs per image (analytic: int8 changes what a multiply-add costs, not how "
            f"many there are), weights as stored (int8 layers at one byte per weight; {backend}). Slimming rows act "
            "at each method's default place (uniform: input; attention: before block "
            f"{'+'.join(map(str, get_method('attention').default_blocks(depth)))}; tome: every block).", "",
            common.markdown_table(shown, columns, digits=2)]
    if config.timing:
        timed_columns = [("row", "row"), ("precision", "precision"), ("gmacs", "GMACs"), ("ms", "ms"),
                         ("iqr_ms", "IQR ms"), ("speedup", "speed-up vs fp32"), ("repeats", "pairs")]
        for name in config.models_timed():
            if name == config.model:
                continue  # its latency columns are in the table above
            for b in config.batch_sizes:
                part = [t for t in timed if t["model"] == name and t["batch"] == b]
                if part:
                    weights = "its trained weights" if name == config.model else "random weights"
                    body += [f"## Latency: {name} ({weights}), batch {b}", "",
                             common.markdown_table(part, timed_columns, digits=2)]
    else:
        body += ["Latency: not measured in this run (`--no-timing`); the lead's idle-machine run fills it: "
                 "`python -m patchslim benchmark --which compression`.", ""]
    body += ["## Targets", ""] + [f"- {line}" for line in targets(table, timed, config.model)] + [""]
    notes = [f"skipped {what}: {reason}" for what, reason in skipped.items()]
    if not any(r["kind"] == "fine-tuned slim" for r in table):
        notes.append("no fine-tuned checkpoint was given or found under patchslim/assets/finetuned/: the fine-tuned "
                     "rows are missing (`--finetuned LABEL=PATH,...`)")
    notes.append("speed-up = median over interleaved (fp32 unslimmed, row) pairs of the time ratio, on the same "
                 "batch; the fp32 row's ms is the median of its runs in those pairs")
    notes.append("int8: dynamic quantization of every Linear layer (patchslim/quantize.py); the eager backend "
                 "quantizes a layer's input with one scale for the whole batch, so an image's int8 logits move "
                 "slightly with its batchmates (torchao's scale is per token)")
    others: dict[tuple[str, str], dict] = {}  # the other timed models: one CSV row per (model, row), as the table's
    for t in timed:
        if t["model"] != config.model:
            entry = others.setdefault((t["model"], t["row"]), dict(model=t["model"], row=t["row"], kind=t["kind"],
                                                                 precision=t["precision"], gmacs=t["gmacs"]))
            entry[f"ms_b{t['batch']}"], entry[f"speedup_b{t['batch']}"] = t["ms"], t["speedup"]
    result = common.BenchmarkResult(
        name="compression", stem=config.stem,
        title="Slimming with int8 and fine-tuning: what each buys, and both", rows=table + list(others.values()),
        body="\n".join(body), notes=notes, load=(load_before, common.load_average()))
    result.figure = _figure(table, timed, config)
    result.figure_fallback = lambda path: _matplotlib(table, timed, config, path)
    return result


def _figure(table: list[dict], timed: list[dict], config: CompressionConfig):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = 2 if timed else 1
    titles = [f"{config.model}: top-1 vs GMACs"] + ([f"speed-up over fp32, batch {max(config.batch_sizes)}"]
                                                    if timed else [])
    fig = make_subplots(rows=1, cols=panels, subplot_titles=titles)
    symbols = {"fp32": "circle", "int8": "diamond", "slim": "circle-open", "int8 + slim": "diamond-open",
               "fine-tuned slim": "star"}
    for kind, symbol in symbols.items():
        part = [r for r in table if r["kind"] == kind]
        if part:
            fig.add_trace(go.Scatter(x=[r["gmacs"] for r in part], y=[100 * r["top1"] for r in part],
                                     mode="markers+text", text=[r["row"] for r in part], textposition="top center",
                                     marker=dict(symbol=symbol, size=12), name=kind), row=1, col=1)
    if timed:
        b = max(config.batch_sizes)
        for name in config.models_timed():
            part = [t for t in timed if t["model"] == name and t["batch"] == b]
            fig.add_trace(go.Bar(x=[t["row"] for t in part], y=[t["speedup"] for t in part], name=name), row=1, col=2)
        fig.update_yaxes(title_text="speed-up (x)", row=1, col=2)
    fig.update_xaxes(title_text="GMACs per image", row=1, col=1)
    fig.update_yaxes(title_text="top-1 (%)", row=1, col=1)
    fig.update_layout(width=700 * panels, height=550, template="plotly_white")
    return fig


def _matplotlib(table: list[dict], timed: list[dict], config: CompressionConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if timed else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 5.5), squeeze=False)
    ax = axes[0][0]
    markers = {"fp32": "o", "int8": "D", "slim": "s", "int8 + slim": "d", "fine-tuned slim": "*"}
    for kind, marker in markers.items():
        part = [r for r in table if r["kind"] == kind]
        if part:
            ax.scatter([r["gmacs"] for r in part], [100 * r["top1"] for r in part], marker=marker, label=kind, s=60)
            for r in part:
                ax.annotate(r["row"], (r["gmacs"], 100 * r["top1"]), fontsize=8, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{config.model}: top-1 vs GMACs")
    ax.legend()
    if timed:
        ax = axes[0][1]
        b = max(config.batch_sizes)
        names = list(config.models_timed())
        labels = [t["row"] for t in timed if t["model"] == names[0] and t["batch"] == b]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = {t["row"]: t["speedup"] for t in timed if t["model"] == name and t["batch"] == b}
            ax.bar([j + i * width for j in range(len(labels))], [values.get(label, 0) for label in labels], width,
                   label=name)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("speed-up over fp32 (x)")
        ax.set_title(f"batch {b}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

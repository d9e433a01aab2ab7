"""What the benchmarks share: variants and placements, results as tables (CSV + markdown), figures,
the machine's facts and load, and text without this machine's paths.

Not a benchmark itself; the modules beside it are. Results files are committed, so nothing written here holds
an absolute path (:func:`portable_text`), and each names the command that made it: the markdown and JSON carry
it inside; a CSV or a figure carries it in the markdown / JSON written with it (the same stem, or the stem's
first word: ``figure1_flops.csv`` -> ``figure1_flops.md``, ``audit_groups.csv`` -> ``audit.json``), so that the
CSVs stay plain tables that ``pandas.read_csv`` and ``csv.DictReader`` read without options.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from patchslim.figures import write_png

DEFAULT_OUT = Path("benchmarks") / "results"
# The checkout (or site-packages) the package sits in: paths below it are written relative to it.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]

# An absolute path: POSIX with at least two parts (``/work/x.safetensors``; not ``rho 0.7/0.5`` nor a URL's
# ``//host/``), or a Windows drive path. Ends at white space, quotes, brackets and separators of prose.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~\\-])(?:/[^\s/`'\"()<>|,;]+(?:/[^\s/`'\"()<>|,;]*)+"
                            r"|[A-Za-z]:\\[^\s`'\"()<>|,;]+)")

# The survey's Table 1 "Computational Overhead" (asserted, not measured), printed beside what we measure.
SURVEY_OVERHEAD = {"uniform": "None", "grid": "None", "lowrank": "Low", "entropy": "Moderate", "rl": "High",
                   "attention": "Moderate"}

Tick = Callable[[str], None]  # called once per finished job with a short description


@dataclass
class BenchmarkResult:
    """One benchmark's rows and its markdown, before and after writing.

    Attributes:
        name: the benchmark (``table3``, ``figure1``...).
        stem: file name stem of its outputs.
        title: the markdown heading.
        rows: one dict per row (the CSV).
        body: the markdown body (tables), without the heading and facts.
        notes: bullet points after the body (skipped rows, definitions).
        load: the 1-minute load average before and after the measurement.
        figure: a plotly figure to save beside the tables, if any.
        figure_fallback: draws the figure's PNG with matplotlib when kaleido cannot.
        seconds: how long the benchmark ran (set by the command; written when known).
        files: what was written, kind -> path (filled by :func:`write_result`).
    """

    name: str
    stem: str
    title: str
    rows: list[dict]
    body: str
    notes: list[str] = field(default_factory=list)
    load: tuple[float | None, float | None] = (None, None)
    figure: Any = None
    figure_fallback: Callable[[Path], None] | None = None
    seconds: float | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def markdown(self, command: str | None = None) -> str:
        """The whole markdown file: heading, command, machine and load, body, notes; no absolute path."""
        facts = machine()
        before, after = self.load
        took = f" Took {duration(self.seconds)}." if self.seconds is not None else ""
        lines = [f"# {self.title}", ""]
        if command:
            lines += [f"Command: `{command}`", ""]
        lines += [f"Machine: {facts['cpu']} ({facts['cores']} cores; torch {facts['torch']}, "
                  f"{facts['torch_threads']} threads{'; GPU ' + facts['gpu'] if facts['gpu'] else ''}); "
                  f"written {facts['date']}. Load average (1 min) before / after: {fmt(before, 2)} / "
                  f"{fmt(after, 2)}.{took}", ""]
        text = "\n".join(lines) + "\n" + self.body
        if self.notes:
            text += "\n" + "\n".join(f"- {note}" for note in self.notes) + "\n"
        return portable_text(text)

    def write(self, out: str | Path, command: str | None = None, png: bool = True) -> dict[str, Path]:
        """Writes the CSV, markdown and figure (:func:`write_result`)."""
        return write_result(self, out, command, png)

    def summary(self) -> str:
        """What the command prints: the markdown as written."""
        return self.files["md"].read_text() if "md" in self.files else self.markdown()


def duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``2.5 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def load_average() -> float | None:
    """The 1-minute load average (None where the OS does not say)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def machine() -> dict:
    """Facts that make a timing table readable later."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(cpu=cpu or "unknown CPU", cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, gpu=gpu, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M %Z"))


def portable_path(path: str | Path) -> str:
    """``path`` as it can be written in a committed file: relative to the checkout when inside it
    (``assets/fashion_vit.safetensors``), else its file name only; a relative path as it is."""
    text = str(path)
    windows = re.match(r"[A-Za-z]:\\", text)
    if not (text.startswith("/") or windows):
        return text
    if windows:
        return text.rstrip("\\").rsplit("\\", 1)[-1]
    resolved = Path(text)
    for root in (PACKAGE_ROOT, Path.cwd().resolve()):
        try:
            return resolved.relative_to(root).as_posix() or "."
        except ValueError:
            continue
    return resolved.name or text


def portable_text(text: str) -> str:
    """``text`` with every absolute path replaced by :func:`portable_path` (a sentence's final dot stays)."""

    def replace(match: re.Match) -> str:
        found = match.group(0)
        tail = found[len(found.rstrip(".:")):]
        return portable_path(found[: len(found) - len(tail)]) + tail

    return _ABSOLUTE_PATH.sub(replace, text)


def portable_model(model):
    """``model`` with a ``weights_source`` fit for a committed file (``file assets/fashion_vit.safetensors``
    instead of this machine's absolute path); the same network, transform and classes."""
    import dataclasses

    source = portable_text(model.weights_source)
    return model if source == model.weights_source else dataclasses.replace(model, weights_source=source)


# --------------------------------------------------------------------------- what runs where

def variants(labels: Sequence[str] | str):
    """Method labels (``evit``, ``random@0``, ``attention@3+6+9``) as :class:`patchslim.evaluate.Variant`."""
    from patchslim.evaluate import parse_variants

    return parse_variants(labels)


def variant_plan(model, variant, keep_ratio: float):
    """``(plan, None)`` for a variant at ``keep_ratio``, or ``(None, reason)`` when it cannot run on ``model``
    (e.g. ``rl`` without a trained policy), so that a table can say why a row is missing."""
    from patchslim.engine import check_plan
    from patchslim.errors import PatchslimError

    try:
        plan = variant.plan(keep_ratio)
        check_plan(model, plan)
    except PatchslimError as exc:
        return None, str(exc).split(". ")[0].split(";")[0]
    return plan, None


def placement(model, variant) -> str:
    """Where a variant acts, in words: ``input``, ``before 3``, ``in 3+6+9``, ``in every block``."""
    from patchslim.methods import get_method

    slim = get_method(variant.method)
    spec = model.spec
    if spec.hierarchical:
        blocks = variant.plan(1.0).resolve(spec.depth, spec)
        stages = sorted({spec.blocks[a.block].stage for a in blocks})
        return "windows of stages " + "+".join(map(str, stages))
    blocks = variant.blocks if variant.blocks is not None else slim.default_blocks(model.spec.depth)
    if slim.point == "mid":
        return "in every block" if len(blocks) == model.spec.depth else "in " + "+".join(map(str, blocks))
    return "input" if tuple(blocks) == (0,) else "before " + "+".join(map(str, blocks))


def parse_list(text: str | Sequence, kind: Callable = str) -> list:
    """``"1, 32"`` -> ``[1, 32]`` with ``kind``; a sequence is converted item by item."""
    parts = str(text).split(",") if isinstance(text, str) else list(text)
    return [kind(str(part).strip()) for part in parts if str(part).strip()]


def random_images(model, batch: int, seed: int = 0):
    """``[batch, C, H, W]`` standard-normal input of the model's size (timing does not depend on content)."""
    import torch

    return torch.randn(batch, *model.input_size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- tables and figures

def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats rounded, None/NaN as ``n/a``, booleans as yes/no."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:.0f}"
        if 0 < abs(value) < 0.01:
            return f"{value:.2g}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]], digits: int = 3) -> str:
    """A markdown table of ``rows``; ``columns`` are (key, header) pairs."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k), digits) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict]) -> str:
    """Rows as CSV, the union of their keys as columns (in first-seen order), floats to 6 digits, text
    without absolute paths (:func:`portable_text`)."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else portable_text(v) if isinstance(v, str) else v)
                         for k, v in row.items()})
    return out.getvalue()


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_result(result: BenchmarkResult, out: str | Path, command: str | None = None,
                 png: bool = True) -> dict[str, Path]:
    """Writes ``<stem>.csv`` and ``<stem>.md`` (and ``.html`` / ``.png`` when the result has a figure); the
    markdown names ``command``, which the CSV and the figure go by."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / f"{result.stem}.csv", "md": out / f"{result.stem}.md"}
    files["csv"].write_text(csv_text(result.rows))
    if result.figure is not None:
        files.update(save_figure(result.figure, out / result.stem, result.figure_fallback, png))
        how = files.pop("png_writer", None)
        if how == "matplotlib":
            result.notes.append("the PNG was drawn with matplotlib: kaleido could not export it here")
    files["md"].write_text(result.markdown(command))
    result.files = files
    return files


def save_figure(fig, path_stem: Path, fallback: Callable[[Path], None] | None, png: bool = True) -> dict:
    """``<stem>.html`` (plotly, plotly.js from its CDN) and ``<stem>.png``: kaleido with the system's
    Chromium when it works, else ``fallback(png_path)`` (matplotlib). ``png_writer`` says which."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    html, image = path_stem.with_suffix(".html"), path_stem.with_suffix(".png")
    fig.write_html(str(html), include_plotlyjs="cdn")
    written: dict[str, Any] = {"html": html}
    if not png:
        return written
    writer, error = write_png(fig, image, fallback)
    if writer == "kaleido":
        written.update(png=image, png_writer="kaleido")
    elif writer is None:
        print(f"kaleido could not export {image.name} ({type(error).__name__}); HTML only", file=sys.stderr)
    else:
        print(f"kaleido could not export {image.name} ({type(error).__name__}); drawn with matplotlib",
              file=sys.stderr)
        written.update(png=image, png_writer="matplotlib")
    return written

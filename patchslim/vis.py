"""Pictures of slimming: kept / dropped / merged overlays and per-patch heatmaps, as PIL images or plotly.

Everything here draws on *the image as the model sees it*: :func:`model_view` runs the model's own
transform (resize, centre crop, grayscale for ``fashion-vit``) and undoes its normalization with
``model.mean`` / ``model.std``, so patch cells line up exactly with the tokens. Functions that take an
``image`` accept a PIL image (it is put through the transform) or the model's input tensor
(``[C, H, W]`` or ``[1, C, H, W]``, normalized), whichever the caller already has.

Pictures are made to be projected on a wall: small inputs are enlarged (nearest neighbour, so 4-pixel
patches stay crisp) to at least :data:`DISPLAY_SIDE` pixels, labels use a large font, every colour map
has a colour bar, and the patch overlay carries its own legend.

No matplotlib: the colour maps are small tables sampled from the perceptually uniform maps of
matplotlib / d3 (inferno, magma, viridis) and ColorBrewer's RdBu (for signed attributions), so the
engine's dependencies stay as they are. Plotly figures (:func:`heatmap_figure`, :func:`patch_figure`)
use plotly's own scales of the same names.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

DISPLAY_SIDE = 448  # the shorter side of a picture's image area, in pixels, at least
FONT_SIZE = 18

# Colour map anchors, evenly spaced from 0 to 1 (hex), interpolated linearly in RGB.
_CMAPS: dict[str, tuple[str, ...]] = {
    "inferno": ("#000004", "#1b0c41", "#4a0c6b", "#781c6d", "#a52c60", "#cf4446", "#ed6925", "#fb9b06",
                "#f7d13d", "#fcffa4"),
    "magma": ("#000004", "#180f3d", "#440f76", "#721f81", "#9e2f7f", "#cd4071", "#f1605d", "#fd9668",
              "#feca8d", "#fcfdbf"),
    "viridis": ("#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58",
                "#b5de2b", "#fde725"),
    # Diverging, blue (low / negative) to red (high / positive): for signed attributions.
    "RdBu_r": ("#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582",
               "#d6604d", "#b2182b", "#67001f"),
}
_PLOTLY_SCALES = {"inferno": "Inferno", "magma": "Magma", "viridis": "Viridis", "RdBu_r": "RdBu_r"}

# Distinct colours for merged groups (Okabe-Ito and Tableau hues, bright enough on dark images).
GROUP_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (213, 94, 0), (204, 121, 167),
    (0, 114, 178), (255, 99, 132), (140, 86, 255), (120, 220, 120), (255, 160, 220), (80, 230, 230),
)
DROPPED_DIM = 0.22  # dropped patches keep this share of their brightness
HATCH_COLOUR = (150, 150, 150)
WINDOW_COLOUR = (255, 196, 0)  # window borders of a windowed model (Swin): amber, visible on dark and grey
KEPT, MERGED, DROPPED, LOWRANK = 0, 1, 2, 3
STATUS_NAMES = {KEPT: "kept", MERGED: "merged", DROPPED: "dropped", LOWRANK: "low-rank"}


# --------------------------------------------------------------------------- colour maps

def colormap_names() -> list[str]:
    return list(_CMAPS)


def apply_colormap(values: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """Maps values in [0, 1] (any shape) to ``[..., 3]`` uint8 RGB; NaN maps to black.

    Raises:
        ValueError: an unknown colour map name.
    """
    anchors = _anchors(cmap)
    v = np.nan_to_num(np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0), nan=0.0)
    pos = v * (len(anchors) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(anchors) - 2)
    frac = (pos - lo)[..., None]
    rgb = anchors[lo] * (1 - frac) + anchors[lo + 1] * frac
    return rgb.round().astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _anchors(cmap: str) -> np.ndarray:
    if cmap not in _CMAPS:
        raise ValueError(f"unknown colour map {cmap!r}; available: {', '.join(_CMAPS)}")
    anchors = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in _CMAPS[cmap]], dtype=np.float64)
    anchors.flags.writeable = False
    return anchors


def _cells_to_pixels(grid: np.ndarray, cell: int) -> np.ndarray:
    """Repeats each entry of a ``[rows, cols, ...]`` grid over a ``cell x cell`` block of pixels."""
    grid = np.asarray(grid)
    rows, cols, rest = grid.shape[0], grid.shape[1], grid.shape[2:]
    spread = np.broadcast_to(grid[:, None, :, None], (rows, cell, cols, cell, *rest))  # one copy, in the reshape
    return spread.reshape(rows * cell, cols * cell, *rest)


# --------------------------------------------------------------------------- the model's view

def model_view(image: Any, model: Any) -> Image.Image:
    """The image as the model sees it: its transform applied, normalization undone, as RGB.

    Args:
        image: a PIL image, or the model's input tensor ``[C, H, W]`` / ``[1, C, H, W]`` (normalized).
        model: a :class:`~patchslim.models.LoadedModel` (its ``transform``, ``mean``, ``std``).

    Returns:
        An RGB image of the model's input size (e.g. 224x224, or 48x48 for ``fashion-vit``).
    """
    if isinstance(image, Image.Image):
        x = model.transform(image)
    elif isinstance(image, torch.Tensor):
        x = image[0] if image.dim() == 4 else image
    else:
        raise TypeError(f"image must be a PIL image or the model's input tensor, got {type(image).__name__}")
    x = x.detach().float().cpu()
    mean = torch.tensor(model.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(model.std, dtype=torch.float32).view(-1, 1, 1)
    pixels = (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return Image.fromarray(array[:, :, :3], "RGB")


def _display(image: Image.Image, rows: int, cols: int, min_side: int = DISPLAY_SIDE) -> tuple[Image.Image, int]:
    """Enlarges ``image`` so each of its ``rows x cols`` cells is a whole number of pixels.

    Returns:
        the enlarged RGB image (``cols * cell`` wide, ``rows * cell`` high) and the cell size.
    """
    image = image.convert("RGB")
    natural = max(1, min(image.width // cols, image.height // rows))
    factor = max(1, math.ceil(min_side / (natural * min(rows, cols))))
    cell = natural * factor
    size = (cols * cell, rows * cell)
    if image.size == size:
        return image.copy(), cell
    if image.size == (cols * natural, rows * natural):
        resample = Image.NEAREST if factor >= 3 else Image.BICUBIC
    else:  # an image not from model_view: stretch it over the grid
        resample = Image.BICUBIC
    return image.resize(size, resample), cell


def display_view(image: Any, model: Any, min_side: int = DISPLAY_SIDE) -> Image.Image:
    """The image as the model sees it (:func:`model_view`), enlarged for display over the model's patch grid: what
    every picture of this image starts from. A caller drawing many pictures of one image (the app, on every slider
    change) makes it once and passes it as ``view`` to :func:`patch_overlay` or as the ``image`` of
    :func:`heatmap_overlay`, which then skip the transform and the enlargement.

    Returns:
        An RGB image ``cols * cell`` by ``rows * cell`` pixels (``cell`` a whole number of pixels per patch).
    """
    rows, cols = model.spec.grid_size
    return _display(model_view(image, model), rows, cols, min_side)[0]


@functools.lru_cache(maxsize=16)
def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    """Pillow's default font at ``size`` (loaded once per size: reading the font file took ~1 ms a picture)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


@functools.lru_cache(maxsize=32)
def _hatch_pixels(shape: tuple[int, int], step: int, width: int) -> np.ndarray:
    """``[h, w]`` bool: diagonal stripes (like ``/``) ``width`` pixels thick every ``step`` pixels (read-only,
    cached: a picture's size repeats on every redraw)."""
    ys, xs = np.indices(shape)
    stripes = (xs + ys) % max(3, step) < max(1, width)
    stripes.flags.writeable = False
    return stripes


def _hatch(picture: Image.Image, box: tuple[int, int, int, int], step: int, colour=HATCH_COLOUR,
           width: int = 1) -> None:
    """Diagonal stripes inside ``box`` of a picture (legend swatches): ``colour`` pasted through the cached stripe
    mask (drawing them point by point took 0.5 ms a swatch)."""
    x0, y0, x1, y1 = box
    picture.paste(colour, (x0, y0), mask=_hatch_mask((y1 - y0, x1 - x0), step, width))


_DIMMED = (np.arange(256, dtype=np.float32) * np.float32(DROPPED_DIM)).astype(np.uint8)  # value -> dimmed value
_DIMMED.flags.writeable = False
_DIM_TABLE = [int(v) for v in _DIMMED] * 3  # the same, as a Pillow point table for R, G and B


@functools.lru_cache(maxsize=16)
def _hatch_mask(shape: tuple[int, int], step: int, width: int) -> Image.Image:
    """:func:`_hatch_pixels` as a Pillow ``L`` mask (255 on the stripes; cached: read it, never draw on it)."""
    return Image.fromarray(_hatch_pixels(shape, step, width).astype(np.uint8) * 255, "L")


# the dimmed and hatched look of a picture, per (picture, cell size): the pictures of one image on screen all start
# from its display view, so every redraw (a slider move) reuses it; a few entries, dropped with their picture
_DROPPED_LOOKS: "OrderedDict[tuple[int, int], tuple[weakref.ref, Image.Image]]" = OrderedDict()
_DROPPED_LOOKS_KEPT = 8


def _dropped_look(source: Image.Image, cell: int) -> Image.Image:
    """``source`` dimmed and hatched all over, as a dropped patch is drawn: darkened by a point table, striped through
    the cached stripe mask (read it, never draw on it). Made once per picture object and cell size, and kept while
    that picture lives."""
    key = (id(source), cell)
    entry = _DROPPED_LOOKS.get(key)
    if entry is not None and entry[0]() is source:
        _DROPPED_LOOKS.move_to_end(key)
        return entry[1]
    look = source.convert("RGB").point(_DIM_TABLE)
    look.paste(HATCH_COLOUR, mask=_hatch_mask((source.height, source.width), max(6, cell // 3), max(1, cell // 14)))
    _DROPPED_LOOKS[key] = (weakref.ref(source), look)
    while len(_DROPPED_LOOKS) > _DROPPED_LOOKS_KEPT:
        _DROPPED_LOOKS.popitem(last=False)
    return look


def _with_dropped(picture: Image.Image, source: Image.Image, cells: np.ndarray, cell: int) -> Image.Image:
    """``picture`` with its cells marked in ``cells`` (``[rows, cols]`` bool) shown as dropped: ``source`` (the
    same size, the picture before any colour went on it) dimmed and hatched there. One composite in Pillow through
    the cell mask spread to pixels (every overlay and heatmap draws its dropped cells so).
    """
    if not cells.any():
        return picture
    where = Image.fromarray(np.asarray(cells, dtype=np.uint8) * 255, "L").resize(picture.size, Image.NEAREST)
    return Image.composite(_dropped_look(source, cell), picture, where)


def _cell_mask(cells: np.ndarray, cell: int) -> np.ndarray:
    return _cells_to_pixels(np.asarray(cells, dtype=bool), cell)


@functools.lru_cache(maxsize=8)
def _over(colour: tuple[int, int, int], opacity: int) -> np.ndarray:
    """``[256, 3]`` uint8: each channel value under ``colour`` laid over it at ``opacity`` / 255 (read-only)."""
    under = np.arange(256, dtype=np.uint32)[:, None]
    table = ((under * (255 - opacity) + np.asarray(colour, dtype=np.uint32) * opacity + 127) // 255).astype(np.uint8)
    table.flags.writeable = False
    return table


def _grid_lines(array: np.ndarray, rows: int, cols: int, cell: int, colour=(255, 255, 255), opacity: int = 40) -> None:
    """Thin lines between the cells of an ``[H, W, 3]`` uint8 picture, in place: ``colour`` laid over the pixel
    rows and columns where cells meet at ``opacity`` / 255 (as an RGBA line composited over the picture), each
    pixel once where lines cross."""
    table, channel = _over(tuple(colour), opacity), np.arange(3)
    across, down = slice(cell, rows * cell, cell), slice(cell, cols * cell, cell)  # views: no copy of the picture
    crossings = table[array[across, down], channel]
    array[across, :] = table[array[across, :], channel]
    array[:, down] = table[array[:, down], channel]
    array[across, down] = crossings


def _stack(parts: list[Image.Image], background=(255, 255, 255)) -> Image.Image:
    width = max(p.width for p in parts)
    out = Image.new("RGB", (width, sum(p.height for p in parts)), background)
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height
    return out


@functools.lru_cache(maxsize=64)
def _title_bar(text: str, width: int, font_size: int = FONT_SIZE + 2) -> Image.Image:
    """A title line (wrapped to ``width``); cached: read it, never draw on it."""
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(probe, text, font, width - 16)
    line_h = _text_size(probe, "Ag", font)[1] + 6
    bar = Image.new("RGB", (width, 10 + line_h * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(bar)
    for i, line in enumerate(lines):
        draw.text((8, 5 + i * line_h), line, fill=(20, 20, 20), font=font)
    return bar


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split(" "):
            trial = f"{current} {word}".strip()
            if current and _text_size(draw, trial, font)[0] > width:
                lines.append(current)
                current = word
            else:
                current = trial
        lines.append(current)
    return lines


# --------------------------------------------------------------------------- patch status

@dataclass(frozen=True)
class PatchStatus:
    """What became of every original patch at one point of the forward, for one image.

    Attributes:
        status: ``[rows, cols]`` int: 0 kept (its own token), 1 merged (shares a token with other
            patches), 2 dropped (no token stands for it), 3 low-rank (tokens are projections).
        group: ``[rows, cols]`` int, the token a kept or merged patch belongs to (-1 if dropped; for
            low-rank the token with the largest loading).
        loading: ``[rows, cols]`` float in [0, 1]: how much the tokens stand for the patch (1 for kept
            and merged patches, 0 for dropped, the summed absolute loading scaled to its max for low-rank).
        group_sizes: patches per token (index = token).
        num_tokens: non-prefix tokens at this point.
    """

    status: np.ndarray
    group: np.ndarray
    loading: np.ndarray
    group_sizes: np.ndarray
    num_tokens: int

    @property
    def counts(self) -> dict[str, int]:
        return {name: int((self.status == code).sum()) for code, name in STATUS_NAMES.items()}

    @property
    def merged_tokens(self) -> int:
        """Tokens standing for more than one patch (merged groups)."""
        return int((self.group_sizes > 1).sum()) if not (self.status == LOWRANK).any() else 0

    @property
    def is_lowrank(self) -> bool:
        return bool((self.status == LOWRANK).any())

    def summary(self) -> str:
        c = self.counts
        n = self.status.size
        if self.is_lowrank:
            return f"{self.num_tokens} low-rank tokens stand for {n - c['dropped']} of {n} patches"
        parts = [f"{c['kept']} kept"]
        if c["merged"]:
            parts.append(f"{c['merged']} merged into {self.merged_tokens} tokens")
        parts.append(f"{c['dropped']} dropped")
        return f"{self.num_tokens} tokens for {n} patches: " + ", ".join(parts)


def patch_status(provenance: Any, grid_size: tuple[int, int], index: int = 0) -> PatchStatus:
    """Classifies every original patch from a :class:`~patchslim.tokens.Provenance`.

    Tokens form a partition (pruning, merging: each patch in at most one token) or not (low-rank
    projections: each token mixes many patches). In a partition, a token with one patch is *kept*, a
    token with several is a *merged* group; a patch in no token is *dropped*.
    """
    rows, cols = grid_size
    n = rows * cols
    if provenance.is_plain:
        ids = provenance.ids[index].detach().cpu().numpy()
        status = np.full(n, DROPPED, dtype=np.int64)
        group = np.full(n, -1, dtype=np.int64)
        status[ids] = KEPT
        group[ids] = np.arange(len(ids))
        loading = (status == KEPT).astype(np.float64)
        sizes = np.ones(len(ids), dtype=np.int64)
        return PatchStatus(status.reshape(rows, cols), group.reshape(rows, cols), loading.reshape(rows, cols),
                           sizes, len(ids))
    weights = provenance.dense()[index].detach().float().cpu().numpy()  # [M, N]
    magnitude = np.abs(weights)
    nonzero = magnitude > 1e-8
    per_patch = nonzero.sum(0)
    sizes = nonzero.sum(1)
    group = np.where(per_patch > 0, magnitude.argmax(0), -1)
    if per_patch.max(initial=0) <= 1:  # a partition: pruning and merging
        status = np.where(per_patch == 0, DROPPED, np.where(sizes[group.clip(0)] > 1, MERGED, KEPT))
        loading = (per_patch > 0).astype(np.float64)
    else:  # projections: loadings
        total = magnitude.sum(0)
        loading = total / total.max() if total.max() > 0 else total
        status = np.where(per_patch == 0, DROPPED, LOWRANK)
    return PatchStatus(status.reshape(rows, cols), group.reshape(rows, cols), loading.reshape(rows, cols),
                       sizes, weights.shape[0])


def _group_colours(group: np.ndarray, merged: np.ndarray) -> dict[int, tuple[int, int, int]]:
    """Assigns each merged group a colour, different from its neighbours' where the palette allows."""
    rows, cols = group.shape
    neighbours: dict[int, set[int]] = {}
    for r in range(rows):
        for c in range(cols):
            if not merged[r, c]:
                continue
            g = int(group[r, c])
            neighbours.setdefault(g, set())
            for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                rr, cc = r + dr, c + dc
                if 0 <= rr < rows and 0 <= cc < cols and merged[rr, cc] and group[rr, cc] != g:
                    neighbours[g].add(int(group[rr, cc]))
    colours: dict[int, int] = {}
    for g in sorted(neighbours, key=lambda k: (-len(neighbours[k]), k)):
        used = {colours[n] for n in neighbours[g] if n in colours}
        free = [i for i in range(len(GROUP_COLOURS)) if i not in used]
        colours[g] = free[g % len(free)] if free else g % len(GROUP_COLOURS)
    return {g: GROUP_COLOURS[i] for g, i in colours.items()}


# --------------------------------------------------------------------------- the patch overlay

def patch_overlay(image: Any, model: Any, trace: Any, block: int | None = None, index: int = 0, *,
                  legend: bool = True, title: str | None = None, min_side: int = DISPLAY_SIDE,
                  view: Image.Image | None = None) -> Image.Image:
    """The image with kept patches clear, dropped ones darkened and hatched, merged groups tinted.

    Merged groups (a token standing for several patches: ToMe, EViT's fused token) get distinct colours
    (neighbouring groups differ) and an outline. Low-rank tokens (projections) are shown as loading
    intensity: how much the tokens stand for each patch, with a colour bar. A hierarchical model (Swin) is drawn
    by :func:`window_overlay`: the block's own token grid and its windows.

    Args:
        image: a PIL image (put through the model's transform) or the model's input tensor
            ``[C, H, W]`` / ``[B, C, H, W]`` (image ``index`` is drawn); see :func:`model_view`.
        model: the :class:`~patchslim.models.LoadedModel` the trace came from.
        trace: a :class:`~patchslim.trace.Trace`.
        block: None for the tokens after the last block, ``i`` for the tokens entering block ``i``.
        index: which image of the trace's batch.
        legend: add a title line with counts and a legend strip below the image.
        title: replaces the default title line.
        min_side: the image area's shorter side is enlarged to at least this many pixels.
        view: :func:`display_view` of ``image`` (same ``min_side``), when the caller has it: ``image`` is then
            not transformed again.

    Returns:
        An RGB image. Without ``legend`` it is exactly the enlarged image area
        (``grid_cols * cell`` by ``grid_rows * cell`` pixels, ``cell`` a whole number of pixels per patch).
    """
    if getattr(model.spec, "hierarchical", False):  # Swin: tokens are cells of the block's own grid, in windows
        return window_overlay(image, model, trace, block, index, legend=legend, title=title, min_side=min_side,
                              view=view)
    rows, cols = model.spec.grid_size
    if isinstance(image, torch.Tensor) and image.dim() == 4:
        image = image[index]
    status = patch_status(trace.provenance_at(block), (rows, cols), index)
    where = "after the last block" if block is None else f"entering block {block}"
    heading = title if title is not None else f"{where}: {status.summary()}"
    if view is None:
        view = display_view(image, model, min_side)
    if status.is_lowrank:
        return heatmap_overlay(view, np.where(status.status == DROPPED, np.nan, status.loading),
                               vmin=0.0, vmax=1.0, cmap="viridis", alpha=0.65, legend=legend,
                               title=heading if legend else None, label="loading (|U_r| summed over tokens)",
                               min_side=min_side)
    base, cell = _display(view, rows, cols, min_side)
    source = view if view.size == base.size else base  # the dimmed look is kept per picture: the caller's view
    dropped = status.status == DROPPED
    merged = status.status == MERGED
    if merged.any():  # each merged cell half its group's colour (one colour per cell, spread and blended by Pillow)
        colours = _group_colours(status.group, merged)
        table = np.zeros((int(status.group.max()) + 1, 3), dtype=np.uint8)
        for group, colour in colours.items():
            table[group] = colour
        tint = Image.fromarray(table[status.group.clip(0)], "RGB").resize(base.size, Image.NEAREST)
        where = Image.fromarray(merged.astype(np.uint8) * 255, "L").resize(base.size, Image.NEAREST)
        base = Image.composite(Image.blend(base, tint, 0.5), base, where)
    array = np.array(_with_dropped(base, source, dropped, cell))  # a dropped cell is never merged: source's pixels
    _grid_lines(array, rows, cols, cell)
    if merged.any():  # group outlines: the cell edges that border a different group or status, drawn inside
        np.copyto(array, np.uint8(255), where=_group_edges(status.group, merged, cell, max(2, cell // 8))[..., None])
    out = Image.fromarray(array, "RGB")
    if not legend:
        return out
    kinds = ("kept", "dropped") + (("merged",) if merged.any() else ())
    return _stack([_title_bar(heading, out.width), out, _overlay_legend(kinds, out.width, FONT_SIZE)])


def _group_edges(group: np.ndarray, merged: np.ndarray, cell: int, line: int) -> np.ndarray:
    """``[H, W]`` bool: the pixels of a merged cell's edges that border another group, another status or the image
    border, ``line`` pixels thick inside the cell."""
    padded = np.pad(np.where(merged, group, -1), 1, constant_values=-1)
    inner = padded[1:-1, 1:-1]
    within = np.arange(cell)
    first, last = within < line, within >= cell - line  # the pixel rows (or columns) of a cell's edge bands
    full = np.ones(cell, dtype=bool)
    # per side: the neighbouring cell, and the band as [rows in the cell, columns in the cell]
    sides = ((padded[:-2, 1:-1], first[:, None] & full), (padded[2:, 1:-1], last[:, None] & full),
             (padded[1:-1, :-2], full[:, None] & first), (padded[1:-1, 2:], full[:, None] & last))
    rows, cols = group.shape
    edges = np.zeros((rows, cell, cols, cell), dtype=bool)  # [cell row, pixel row, cell column, pixel column]
    for neighbour, band in sides:
        cells = merged & (neighbour != inner)
        if cells.any():
            edges |= cells[:, None, :, None] & band[None, :, None, :]
    return edges.reshape(rows * cell, cols * cell)


def overlay_legend(kinds: tuple[str, ...] = ("kept", "dropped", "merged"), width: int = DISPLAY_SIDE,
                   font_size: int = FONT_SIZE) -> Image.Image:
    """A legend strip for :func:`patch_overlay`: a swatch and a word per kind of patch."""
    return _overlay_legend(tuple(kinds), width, font_size).copy()


@functools.lru_cache(maxsize=32)
def _overlay_legend(kinds: tuple[str, ...], width: int, font_size: int) -> Image.Image:
    """:func:`overlay_legend`, drawn once per arguments (read it, never draw on it)."""
    font = _font(font_size)
    sw = font_size + 10
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = {"kept": "kept (own token)", "dropped": "dropped",
              "merged": "merged (one colour per token)", "low-rank": "low-rank loading",
              "ran": "ran the block", "sat out": "sat it out (carried through)", "window": "window border"}
    entries = [(k, labels.get(k, k)) for k in kinds]
    # lay entries out left to right, wrapping to new lines
    positions, x, y = [], 8, 8
    for kind, text in entries:
        extra = 2 * (sw // 2 + 2) if kind == "merged" else 0
        w = sw + extra + 8 + _text_size(probe, text, font)[0] + 24
        if x + w > width and x > 8:
            x, y = 8, y + sw + 10
        positions.append((kind, text, x, y))
        x += w
    strip = Image.new("RGB", (width, y + sw + 10), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    grey = (170, 170, 170)
    for kind, text, x, y in positions:
        box = (x, y, x + sw, y + sw)
        if kind in ("kept", "ran"):
            draw.rectangle(box, fill=(235, 235, 235), outline=(60, 60, 60), width=2)
        elif kind == "window":
            draw.rectangle(box, fill=(235, 235, 235), outline=WINDOW_COLOUR, width=4)
        elif kind in ("dropped", "sat out"):
            draw.rectangle(box, fill=(45, 45, 45))
            _hatch(strip, box, step=max(4, sw // 3), width=2)
            draw.rectangle(box, outline=(60, 60, 60), width=2)
        elif kind == "merged":
            small = sw // 2 + 2
            for k in range(3):
                bx = x + k * small
                draw.rectangle((bx, y, bx + sw - 1 if k == 2 else bx + small, y + sw),
                               fill=GROUP_COLOURS[k], outline=(255, 255, 255), width=2)
            box = (x, y, x + 2 * small + sw, y + sw)
            draw.rectangle(box, outline=(60, 60, 60), width=1)
        else:
            draw.rectangle(box, fill=grey)
        draw.text((box[2] + 8, y + (sw - _text_size(draw, "Ag", font)[1]) // 2 - 2), text, fill=(20, 20, 20),
                  font=font)
    return strip


# --------------------------------------------------------------------------- windows (Swin)

def window_ids(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """``[rows, cols]`` int: the window each token of a block's grid attends in.

    Windows are numbered as timm partitions them: the grid is rolled by ``-shift`` (a shifted block), then cut
    into ``window`` tiles in raster order. In a shifted partition the windows on the last row and column of
    tiles wrap around the grid's edges, so one window appears in up to four pieces.

    Raises:
        ValueError: a window that does not tile the grid.
    """
    rows, cols = grid
    wr, wc = window
    if wr <= 0 or wc <= 0 or rows % wr or cols % wc:
        raise ValueError(f"window {wr}x{wc} does not tile the token grid {rows}x{cols}")
    r = (np.arange(rows) - shift[0]) % rows // wr
    c = (np.arange(cols) - shift[1]) % cols // wc
    return r[:, None] * (cols // wc) + c[None, :]


def window_edges(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where window borders run between neighbouring tokens of a ``[rows, cols]`` window-id grid.

    Returns:
        ``horizontal`` ``[rows - 1, cols]`` bool, True where token ``(r, c)`` and ``(r + 1, c)`` are in different
        windows; ``vertical`` ``[rows, cols - 1]`` bool, the same between ``(r, c)`` and ``(r, c + 1)``.
    """
    ids = np.asarray(ids)
    return ids[1:, :] != ids[:-1, :], ids[:, 1:] != ids[:, :-1]


@dataclass(frozen=True)
class WindowStatus:
    """What became of every token of one block of a windowed model (Swin), on that block's own grid.

    Attributes:
        block: the block (None: after the last block, on the last block's grid).
        stage: its stage.
        grid: (rows, cols) of its tokens; each token stands for ``cell x cell`` patches.
        cell: patches per token side (1, then 2, 4, ... after each patch merging).
        window, shift: its window size and the shift of its partition.
        status: ``[rows, cols]`` int: 0 (``KEPT``) the token ran the block, 1 (``MERGED``) it shared a token with
            others, 2 (``DROPPED``) it sat the block out (its value was carried through unchanged).
        windows: ``[rows, cols]`` the window of each token (:func:`window_ids`).
    """

    block: int | None
    stage: int
    grid: tuple[int, int]
    cell: int
    window: tuple[int, int]
    shift: tuple[int, int]
    status: np.ndarray
    windows: np.ndarray

    @property
    def num_windows(self) -> int:
        return int(self.windows.max()) + 1

    @property
    def window_tokens(self) -> int:
        return self.window[0] * self.window[1]

    @property
    def ran_per_window(self) -> np.ndarray:
        """``[W]`` tokens of each window that ran the block (kept or merged)."""
        ran = (self.status != DROPPED).ravel()
        return np.bincount(self.windows.ravel(), weights=ran, minlength=self.num_windows).astype(np.int64)

    def summary(self) -> str:
        ran = self.ran_per_window
        n = self.window_tokens
        lo, hi = int(ran.min()), int(ran.max())
        per = f"{lo} of {n}" if lo == hi else f"{lo}-{hi} of {n}"
        merged = int((self.status == MERGED).sum())
        where = "" if self.num_windows == 1 else (" in every window" if lo == hi else " in each window")
        text = f"{per} tokens ran the block{where}"
        return text + (f" ({merged} merged)" if merged else "")

    def heading(self) -> str:
        """A title line: where, the grid, the windows, and what ran."""
        rows, cols = self.grid
        where = "after the last block" if self.block is None else f"block {self.block}"
        shifted = f", shifted by {self.shift[0]}" if any(self.shift) else ""
        return (f"{where} (stage {self.stage}): {rows}x{cols} tokens of {self.cell}x{self.cell} patches, "
                f"{self.num_windows} window{'s' if self.num_windows > 1 else ''} of {self.window[0]}x{self.window[1]}"
                f"{shifted}; {self.summary()}")


def window_status(trace: Any, block: int | None = None, index: int = 0) -> WindowStatus:
    """Which tokens of block ``block``'s own grid ran it, for image ``index`` of a Trace of a windowed model.

    Reads the provenance of the tokens that ran the block (``trace.blocks[block].provenance``: ids of the block's
    coarse grid, or merge weights over patches); None reads the tokens after the last block on its grid.

    Raises:
        ValueError: the Trace is not of a hierarchical model.
    """
    spec = trace.spec
    if not getattr(spec, "hierarchical", False):
        raise ValueError(f"{spec.name} is not a windowed model; use patch_status")
    shape = spec.blocks[-1 if block is None else block]
    rows, cols = shape.grid
    prov = trace.provenance_at(block)
    status = np.full(rows * cols, DROPPED, dtype=np.int64)
    if prov.ids is not None and prov.cell == shape.cell:
        status[prov.ids[index].detach().cpu().numpy()] = KEPT
    else:  # merge weights over patches (or ids at another cell size): sum them over each token's cell of patches
        weights = prov.dense()[index].detach().abs().double().cpu().numpy()  # [M, N]
        prow, pcol = spec.grid_size
        c = shape.cell
        per_cell = weights.reshape(-1, rows, c, cols, c).sum(axis=(2, 4)).reshape(weights.shape[0], -1) > 1e-8
        covered = per_cell.sum(0)
        size = per_cell.sum(1)
        group = per_cell.argmax(0)
        status = np.where(covered == 0, DROPPED, np.where(size[group] > 1, MERGED, KEPT))
    return WindowStatus(block, shape.stage, (rows, cols), shape.cell, shape.window, shape.shift,
                        status.reshape(rows, cols), window_ids((rows, cols), shape.window, shape.shift))


def window_overlay(image: Any, model: Any, trace: Any, block: int | None = None, index: int = 0, *,
                   legend: bool = True, title: str | None = None, min_side: int = DISPLAY_SIDE,
                   view: Image.Image | None = None) -> Image.Image:
    """A windowed model's block (Swin): its own token grid over the image, window borders, and which tokens ran it.

    Each token of the block's grid is one cell (``cell x cell`` patches: the grid shrinks at every patch merging);
    tokens that sat the block out are darkened and hatched, merged ones tinted; thin lines separate the tokens,
    thick amber lines the windows (a shifted partition's windows wrap around the edges: each piece carries its
    window's number when there is room).

    Args:
        image, model, trace, index, legend, title, min_side, view: as in :func:`patch_overlay`.
        block: the block to draw (None: the tokens after the last block, on its grid).

    Returns:
        An RGB image; without ``legend`` exactly the enlarged image area (``cols * px`` by ``rows * px`` pixels,
        ``px`` a whole number of pixels per token of the block's grid).
    """
    if isinstance(image, torch.Tensor) and image.dim() == 4:
        image = image[index]
    status = window_status(trace, block, index)
    rows, cols = status.grid
    view = display_view(image, model, min_side) if view is None else view
    base, px = _display(view, rows, cols, min_side)
    sat_out = status.status == DROPPED
    merged = status.status == MERGED
    # the dimmed look is kept per picture: the caller's view when it is already the block's display size
    array = np.array(_with_dropped(base, view if view.size == base.size else base, sat_out, px))
    if merged.any():
        m = _cell_mask(merged, px)
        array[m] = (array[m].astype(np.float32) * 0.5 + np.float32(GROUP_COLOURS[0]) * 0.5).astype(np.uint8)
    _grid_lines(array, rows, cols, px, opacity=70)
    out = Image.fromarray(array, "RGB")
    _draw_window_borders(out, status.windows, px)
    _label_windows(out, status.windows, px)
    if not legend:
        return out
    kinds = ("ran", "sat out", "window") + (("merged",) if merged.any() else ())
    return _stack([_title_bar(title if title is not None else status.heading(), out.width), out,
                   _overlay_legend(kinds, out.width, FONT_SIZE)])


def _draw_window_borders(picture: Image.Image, ids: np.ndarray, px: int) -> None:
    """Thick lines between tokens of different windows, and around the grid."""
    draw = ImageDraw.Draw(picture)
    rows, cols = ids.shape
    width = max(2, px // 10)
    half = width // 2
    horizontal, vertical = window_edges(ids)
    for r, c in zip(*np.nonzero(horizontal)):
        y = (r + 1) * px
        draw.rectangle((c * px, y - half, (c + 1) * px - 1, y - half + width - 1), fill=WINDOW_COLOUR)
    for r, c in zip(*np.nonzero(vertical)):
        x = (c + 1) * px
        draw.rectangle((x - half, r * px, x - half + width - 1, (r + 1) * px - 1), fill=WINDOW_COLOUR)
    draw.rectangle((0, 0, cols * px - 1, rows * px - 1), outline=WINDOW_COLOUR, width=width)


def _label_windows(picture: Image.Image, ids: np.ndarray, px: int) -> None:
    """The window's number in the top-left token of each of its pieces, when a token is large enough to hold it."""
    if px < 14 or ids.max() >= 100 or ids.max() == 0:  # too small to read, too many, or one window
        return
    draw = ImageDraw.Draw(picture)
    font = _font(max(10, min(FONT_SIZE, px // 2)))
    rows, cols = ids.shape
    for r in range(rows):
        for c in range(cols):
            top = r == 0 or ids[r - 1, c] != ids[r, c]
            left = c == 0 or ids[r, c - 1] != ids[r, c]
            if top and left:
                draw.text((c * px + max(3, px // 10) + 1, r * px + max(3, px // 10)), str(int(ids[r, c])),
                          fill=WINDOW_COLOUR, font=font, stroke_width=2, stroke_fill=(0, 0, 0))


# --------------------------------------------------------------------------- heatmaps

def heatmap_overlay(image: Any, values_grid: np.ndarray, vmin: float | None = None, vmax: float | None = None,
                    cmap: str = "inferno", alpha: float = 0.5, legend: bool = True, title: str | None = None,
                    *, label: str | None = None, model: Any = None, min_side: int = DISPLAY_SIDE) -> Image.Image:
    """Per-patch values over the image, with a colour bar; NaN cells are drawn as dropped patches.

    Args:
        image: the picture under the map, ideally :func:`model_view` of the input (it is stretched over
            the grid otherwise). With ``model`` given, a PIL image or input tensor goes through
            :func:`model_view` first.
        values_grid: ``[rows, cols]`` one value per patch; NaN marks a dropped patch.
        vmin, vmax: the colour scale's ends. Fix them to compare two maps (e.g. before / after slimming);
            None takes the map's own finite min / max.
        cmap: ``"inferno"``, ``"magma"``, ``"viridis"`` or ``"RdBu_r"`` (signed values; centre it with
            ``vmin=-vmax``).
        alpha: opacity of the colour over the image (1 = colour only).
        legend: draw the colour bar (and a "dropped" swatch when some cells are NaN).
        title: a line above the picture.
        label: the colour bar's caption.
        model: optional, to turn a raw image or tensor into the model's view.
        min_side: the image area's shorter side is enlarged to at least this many pixels.

    Returns:
        An RGB image; without legend and title exactly the enlarged image area.
    """
    values = np.asarray(values_grid, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values_grid must be [rows, cols], got shape {values.shape}")
    if model is not None:
        image = model_view(image, model)
    elif isinstance(image, torch.Tensor):
        raise TypeError("pass model=... to draw on an input tensor, or a PIL image")
    rows, cols = values.shape
    lo, hi = _limits(values, vmin, vmax)
    base, cell = _display(image, rows, cols, min_side)
    missing = ~np.isfinite(values)
    scaled = (values - lo) / (hi - lo)
    # one colour per patch, spread over its pixels and blended with the picture in Pillow (uint8, in C)
    colours = Image.fromarray(apply_colormap(np.nan_to_num(scaled), cmap), "RGB").resize(base.size, Image.NEAREST)
    out = Image.blend(base, colours, alpha)
    # dropped patches: the picture itself, dimmed and hatched (its dimmed look kept per picture: the caller's image)
    out = _with_dropped(out, image if image.size == base.size else base, missing, cell)
    if legend:
        out = _beside(out, _colorbar(lo, hi, cmap, out.height, label, bool(missing.any()), FONT_SIZE))
    if title:
        out = _stack([_title_bar(title, out.width), out])
    return out


def _limits(values: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if not hi > lo:
        pad = max(abs(lo), 1.0) * 1e-6 if lo == hi else 0.0
        lo, hi = (lo - pad, hi + pad) if pad else (hi, lo)
        if not hi > lo:
            lo, hi = lo - 0.5, lo + 0.5
    return lo, hi


def _beside(left: Image.Image, right: Image.Image) -> Image.Image:
    out = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), (255, 255, 255))
    out.paste(left, (0, 0))
    out.paste(right, (left.width, 0))
    return out


def _format(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.2e}"
    return f"{value:.3g}"


def colorbar(vmin: float, vmax: float, cmap: str = "inferno", height: int = DISPLAY_SIDE, label: str | None = None,
             dropped: bool = False, font_size: int = FONT_SIZE) -> Image.Image:
    """A vertical colour bar with its ends and middle labelled (and a "dropped" swatch if asked)."""
    return _colorbar(float(vmin), float(vmax), cmap, height, label, dropped, font_size).copy()


@functools.lru_cache(maxsize=32)
def _colorbar(vmin: float, vmax: float, cmap: str, height: int, label: str | None, dropped: bool,
              font_size: int) -> Image.Image:
    """:func:`colorbar`, drawn once per arguments (read it, never draw on it)."""
    font = _font(font_size)
    small = _font(font_size - 2)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    ticks = [vmax, (vmin + vmax) / 2, vmin]
    tick_w = max(_text_size(probe, _format(t), font)[0] for t in ticks)
    bar_w = 26
    text_h = _text_size(probe, "Ag", font)[1]
    top = text_h // 2 + 6
    bottom_pad = (2 * text_h + 20) if dropped else text_h // 2 + 6
    bar_h = max(60, height - top - bottom_pad)
    label_w = text_h + 12 if label else 0
    if dropped:
        tick_w = max(tick_w, _text_size(probe, "dropped", small)[0])
    width = 12 + bar_w + 8 + tick_w + 10 + label_w
    strip = Image.new("RGB", (width, max(height, top + bar_h + bottom_pad)), (255, 255, 255))
    gradient = apply_colormap(np.linspace(1, 0, bar_h)[:, None], cmap).repeat(bar_w, axis=1)  # one colour a row
    strip.paste(Image.fromarray(gradient, "RGB"), (12, top))
    draw = ImageDraw.Draw(strip)
    draw.rectangle((12, top, 12 + bar_w - 1, top + bar_h - 1), outline=(40, 40, 40), width=1)
    for k, t in enumerate(ticks):
        y = top + round(k * (bar_h - 1) / 2)
        draw.line([(12 + bar_w, y), (12 + bar_w + 5, y)], fill=(40, 40, 40), width=2)
        draw.text((12 + bar_w + 8, y - text_h // 2 - 3), _format(t), fill=(20, 20, 20), font=font)
    if dropped:
        y = top + bar_h + 10
        box = (12, y, 12 + bar_w, y + text_h + 6)
        draw.rectangle(box, fill=(45, 45, 45))
        _hatch(strip, box, step=6, width=2)
        draw.text((12 + bar_w + 8, y), "dropped", fill=(20, 20, 20), font=small)
    if label:
        text_w, _ = _text_size(probe, label, small)
        caption = Image.new("RGB", (text_w + 8, text_h + 8), (255, 255, 255))
        ImageDraw.Draw(caption).text((4, 0), label, fill=(20, 20, 20), font=small)
        caption = caption.rotate(90, expand=True)
        if caption.height > strip.height:
            caption = caption.resize((caption.width, strip.height))
        strip.paste(caption, (width - label_w, max(0, top + (bar_h - caption.height) // 2)))
    return strip


def side_by_side(images: list[Image.Image], gap: int = 12) -> Image.Image:
    """Pictures in a row (e.g. before | after with one colour scale), tops aligned, white gaps."""
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, max(im.height for im in images)), (255, 255, 255))
    x = 0
    for im in images:
        out.paste(im.convert("RGB"), (x, 0))
        x += im.width + gap
    return out


# --------------------------------------------------------------------------- plotly

def heatmap_figure(image: Any, values_grid: np.ndarray, vmin: float | None = None, vmax: float | None = None,
                   cmap: str = "inferno", alpha: float = 0.5, title: str | None = None, label: str | None = None,
                   model: Any = None):
    """A plotly figure of :func:`heatmap_overlay`: hover shows each patch's row, column and value.

    NaN cells (dropped patches) are drawn dark and say "dropped" on hover.
    """
    import plotly.graph_objects as go

    values = np.asarray(values_grid, dtype=np.float64)
    if model is not None:
        image = model_view(image, model)
    rows, cols = values.shape
    base, cell = _display(image, rows, cols)
    lo, hi = _limits(values, vmin, vmax)
    fig = go.Figure()
    fig.add_trace(go.Image(z=np.asarray(base), hoverinfo="skip"))
    centres_x = (np.arange(cols) + 0.5) * cell
    centres_y = (np.arange(rows) + 0.5) * cell
    patch_ids = np.arange(rows * cols).reshape(rows, cols)
    fig.add_trace(go.Heatmap(
        z=values, x=centres_x, y=centres_y, zmin=lo, zmax=hi, colorscale=_PLOTLY_SCALES.get(cmap, cmap),
        opacity=alpha, customdata=patch_ids, colorbar=dict(title=dict(text=label or "", side="right")),
        hovertemplate="patch %{customdata} (row %{y:.0f}, col %{x:.0f})<br>value %{z:.4g}<extra></extra>",
        hoverongaps=False,
    ))
    missing = ~np.isfinite(values)
    if missing.any():
        fig.add_trace(go.Heatmap(
            z=np.where(missing, 1.0, np.nan), x=centres_x, y=centres_y, colorscale=[[0, "#222"], [1, "#222"]],
            showscale=False, opacity=0.8, hovertemplate="dropped<extra></extra>", hoverongaps=False,
        ))
    _plotly_layout(fig, base, title)
    return fig


def patch_figure(image: Any, model: Any, trace: Any, block: int | None = None, index: int = 0,
                 title: str | None = None):
    """A plotly figure of :func:`patch_overlay`; hover says what became of each patch."""
    import plotly.graph_objects as go

    rows, cols = model.spec.grid_size
    status = patch_status(trace.provenance_at(block), (rows, cols), index)
    picture = patch_overlay(image, model, trace, block, index, legend=False)
    cell = picture.width // cols
    text = np.empty((rows, cols), dtype=object)
    for r in range(rows):
        for c in range(cols):
            s = int(status.status[r, c])
            g = int(status.group[r, c])
            words = STATUS_NAMES[s]
            if s == MERGED:
                words += f" into token {g} ({int(status.group_sizes[g])} patches)"
            elif s == LOWRANK:
                words += f" loading {status.loading[r, c]:.2f}"
            text[r, c] = f"patch {r * cols + c} (row {r}, col {c}): {words}"
    fig = go.Figure()
    fig.add_trace(go.Image(z=np.asarray(picture), hoverinfo="skip"))
    fig.add_trace(go.Heatmap(
        z=np.zeros((rows, cols)), x=(np.arange(cols) + 0.5) * cell, y=(np.arange(rows) + 0.5) * cell,
        opacity=0.0, showscale=False, text=text, hovertemplate="%{text}<extra></extra>",
    ))
    where = "after the last block" if block is None else f"entering block {block}"
    _plotly_layout(fig, picture, title if title is not None else f"{where}: {status.summary()}")
    return fig


def _plotly_layout(fig, base: Image.Image, title: str | None) -> None:
    fig.update_xaxes(visible=False, range=[0, base.width])
    fig.update_yaxes(visible=False, range=[base.height, 0], scaleanchor="x")
    fig.update_layout(title=dict(text=title or ""), margin=dict(l=10, r=10, t=50 if title else 10, b=10),
                      plot_bgcolor="white")

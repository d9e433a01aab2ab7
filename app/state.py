"""Session defaults and every Streamlit cache of the app, in one place.

Nothing else in ``app/`` decorates a function with ``st.cache_resource`` or ``st.cache_data``. Every cache
is bounded (``max_entries``, and a ``ttl`` where an idle server should give memory back) so that a long
classroom demo with many uploads cannot grow the server's memory without limit:

- models: one per (name, device, precision, weights) and process, shared by every session (at most 3);
- decoded uploads: at most 4, each at most ``MAX_UPLOAD_PIXELS`` (25 MP, 75 MB as RGB);
- the model's input tensor of an image (16), its picture as the model sees it enlarged for display (16), and its
  unslimmed forward (with attention in every block): computed once per model and image;
- slimmed forwards: one per (model, image, plan), so moving rho back and forth is instant;
- per session, long results (attributions, benchmarks, audits) in a :class:`BoundedLRU` of 8.

Uploads are refused above ``MAX_UPLOAD_MB`` by the code path too (:func:`decoded_upload`), not only by
Streamlit's ``server.maxUploadSize`` in ``.streamlit/config.toml`` (a test checks the two agree).

Traces are kept with ``st.cache_resource`` (no copy on every hit); the app never mutates them.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import streamlit as st
import torch
from PIL import Image

import patchslim
from patchslim import bundled
from patchslim.cards import ShippedCheckpoint, shipped_cards
from patchslim.errors import WeightsError
from patchslim.models import DEFAULT_MODEL, SUPPORTED_MODELS, WEIGHTS_DIR_ENV, weights_status

from app import compute, model_sources, server_paths
from app.panels import log

REPO_ROOT = Path(__file__).resolve().parent.parent
ACCURACY_CSV = REPO_ROOT / "benchmarks" / "results" / "accuracy.csv"
BUDGETS_CSV = REPO_ROOT / "benchmarks" / "results" / "budgets.csv"  # accuracy at equal cost (benchmark --which budgets)

MAX_UPLOAD_MB = 20  # per uploaded image; must equal server.maxUploadSize in .streamlit/config.toml
MAX_UPLOAD_PIXELS = 25_000_000  # a 24 MP camera photo fits; decoded as RGB at most 75 MB per cached upload
FORWARD_TTL = 3600  # seconds a cached forward or upload lives (then it is recomputed on demand)

DEFAULT_METHOD = "random"
DEFAULT_KEEP_RATIO = 0.5
PRETRAINED = "pretrained"
RANDOM_WEIGHTS = "random weights (for timing only)"
FINETUNED_PREFIX = "fine-tuned:"  # + the checkpoint's file stem in patchslim/assets/finetuned/

SESSION_DEFAULTS = {
    "weights_mode": PRETRAINED,
    "device": "auto",
    "precision": "fp32",
    "keep_ratio": DEFAULT_KEEP_RATIO,
    "image_source": "Gallery",
}


# Page widgets whose choice should survive a visit to another page. Streamlit gives each page its own widget
# ids and forgets a widget's value after a run that did not draw it; re-setting the key at the start of every
# run makes it a session value that is kept (and the widget with that key on any page picks it up).
KEPT_WIDGET_KEYS = ("image_source",)
KEPT_WIDGET_PREFIXES = ("gallery_pick::", "explore_block::", "explore_attention_kind", "explore_attention_block::")


def init_session() -> None:
    """Fills in session defaults once per session (widgets keyed by these names pick them up), and keeps the
    image choice and the Explore page's view choices across page switches.

    A session opens on :func:`first_model`: the default model, or the bundled one when the default's weights are
    not on this machine (the sidebar says how to get them, :func:`default_weights_missing`).
    """
    if "model_name" not in st.session_state:
        st.session_state["model_name"] = first_model()
    for key, value in SESSION_DEFAULTS.items():
        st.session_state.setdefault(key, value)
    for key in list(st.session_state.keys()):
        if key in KEPT_WIDGET_KEYS or key.startswith(KEPT_WIDGET_PREFIXES):
            st.session_state[key] = st.session_state[key]
    if "method" not in st.session_state:
        names = patchslim.method_names()
        st.session_state["method"] = DEFAULT_METHOD if DEFAULT_METHOD in names else names[0]


# --------------------------------------------------------------------------- models

@dataclass(frozen=True)
class ModelChoice:
    """What the sidebar asked for and what the app actually runs.

    Attributes:
        key: a string naming the loaded model uniquely (cache key of everything computed with it).
        model: the loaded model.
        requested: the model name the person chose.
        notice: one sentence when the app runs something other than what was asked (else "").
        random_weights: True when the weights are a random initialization.
    """

    key: str
    model: patchslim.LoadedModel
    requested: str
    notice: str
    random_weights: bool
    weights_label: str = ""  # a fine-tuned checkpoint's label (patchslim.cards.ShippedCheckpoint.label), else ""


@st.cache_data(max_entries=32, ttl=600, show_spinner=False)
def int8_available(device: str) -> bool:
    """Whether an int8 backend runs on ``device`` (``"auto"``: the device auto picks) here, so the precision
    picker offers int8 (:func:`patchslim.quantize.int8_backends`)."""
    from patchslim.device import resolve_device
    from patchslim.quantize import int8_backends

    try:
        return bool(int8_backends(resolve_device(device)))
    except patchslim.PatchslimError:
        return False


@st.cache_data(max_entries=32, ttl=600, show_spinner=False)
def weights_available(name: str) -> tuple[bool, str]:
    """Whether pretrained weights for ``name`` can be had now, without waiting on the network."""
    status = weights_status(name)
    return status.startswith(("ready", "downloadable")), status


@st.cache_resource(max_entries=3, show_spinner="Loading the model (once per server)…")
def _load(name: str, device: str, precision: str, random_weights: bool,
          stamp: tuple = (), weights: str | None = None) -> patchslim.LoadedModel:
    """``stamp``: a ``local-dir:`` folder's or a weights file's ``(file, mtime_ns, size)`` (only a cache key: files
    replaced on disk are loaded again, not served from the cache until a restart); ``weights``: a shipped
    fine-tuned checkpoint."""
    return compute.load_model(name, device=device, precision=precision, pretrained=not random_weights,
                              weights=weights)


def finetuned_checkpoints(name: str) -> dict[str, ShippedCheckpoint]:
    """The fine-tuned checkpoints shipped for model ``name`` (``patchslim/assets/finetuned/``, read by their cards),
    keyed by the weights choice that names them (``fine-tuned:STEM``)."""
    return {f"{FINETUNED_PREFIX}{c.path.stem}": c for c in shipped_cards(name)}


def weights_choices(name: str) -> list[str]:
    """The sidebar's weights choices for a listed model: its own weights (the bundled checkpoint, or pretrained),
    random weights for a timm model, and every fine-tuned checkpoint shipped for it."""
    own = [PRETRAINED] if bundled.is_bundled(name) else [PRETRAINED, RANDOM_WEIGHTS]
    return own + list(finetuned_checkpoints(name))


def weights_label(name: str, choice: str) -> str:
    """How the sidebar shows a weights choice."""
    if choice == PRETRAINED and bundled.is_bundled(name):
        return "bundled checkpoint"
    shipped = finetuned_checkpoints(name).get(choice)
    return shipped.label if shipped is not None else choice


def choose_model(name: str, weights_mode: str, device: str, precision: str) -> ModelChoice:
    """Loads the model the sidebar asks for, falling back to the bundled model when weights are missing (a bundled
    model whose checkpoint is missing runs with random weights and a notice).

    Never waits on the network: :func:`patchslim.models.weights_status` answers from the local cache and a
    one-second reachability check that is remembered for the process. A ``local-dir:`` or ``hf-hub:`` name is
    loaded only if the operator's policy allows it (:mod:`app.model_sources`), with its own weights and no
    fallback: the person asked for that model.

    Raises:
        ModelSourceRefused: a name the app does not load for a web visitor, with one sentence saying why.
        PatchslimError: device, precision or weights problems, with a message for the person.
    """
    policy = model_sources.SourcePolicy.from_environment()
    source = model_sources.check(name, policy, model_names())
    if model_sources.source_of(source) is not None:
        return _source_model(name, source, policy, device, precision)
    if weights_mode.startswith(FINETUNED_PREFIX):
        shipped = finetuned_checkpoints(name).get(weights_mode)
        if shipped is None:
            raise WeightsError(f"{weights_mode[len(FINETUNED_PREFIX):]} is not a fine-tuned checkpoint shipped for "
                               f"{name}: choose another in Weights")
        info = shipped.path.stat()
        model = _load(name, device, precision, False, (shipped.path.name, info.st_mtime_ns, info.st_size),
                      str(shipped.path))
        key = f"{name}|{model.device}|{precision}|{weights_mode}|{info.st_mtime_ns}"
        return ModelChoice(key, model, name, "", False, shipped.label)
    random_weights = weights_mode == RANDOM_WEIGHTS and not bundled.is_bundled(name)
    notice = ""
    if bundled.is_bundled(name):
        checkpoint = bundled.checkpoint_path(name)
        if not checkpoint.exists():
            random_weights = True
            notice = (f"The checkpoint of {name} is missing from {checkpoint.parent.name}/ "
                      f"(`python -m patchslim.train_bundled --model {name}` recreates it): running random weights, "
                      "so predictions mean nothing.")
    elif not random_weights:
        ok, _ = weights_available(name)
        if not ok:
            notice = (f"Pretrained weights for {name} are not available on this machine (not cached, and the "
                      f"model hub cannot be reached), so the app shows the bundled model "
                      f"{bundled.BUNDLED_NAME} instead.")
            return _bundled_fallback(name, device, precision, notice)
    model = _load(name, device, precision, random_weights)
    key = f"{name}|{model.device}|{precision}|{'random' if random_weights else 'pretrained'}"
    return ModelChoice(key, model, name, notice, random_weights)


def default_weights_missing() -> bool:
    """Whether the default model's pretrained weights cannot be had now (not cached, hub unreachable)."""
    return not weights_available(DEFAULT_MODEL)[0]


def first_model() -> str:
    """The model a new session opens on: the default model when its pretrained weights can be had, else the
    bundled model, which ships with its checkpoint (a first screen of real predictions, not a fallback notice)."""
    return bundled.BUNDLED_NAME if default_weights_missing() else DEFAULT_MODEL


def _source_model(requested: str, source: str, policy: model_sources.SourcePolicy, device: str,
                  precision: str) -> ModelChoice:
    """A ``local-dir:`` or ``hf-hub:`` model the policy allowed (``source``: what :func:`model_sources.check`
    returned), named as the visitor named it.

    The cached model is shared; the session gets a copy of its :class:`~patchslim.LoadedModel` record (the same
    timm module, never mutated) whose ``name`` is ``local-dir:NAME`` relative to the models folder, so every
    caption, download and audit report shows that instead of the folder's path on the server. A loading error
    is told with the same name.
    """
    shown = model_sources.shown_name(requested, policy)
    stamp = ()
    paths: dict[str, str] = {}
    if model_sources.source_of(source) == model_sources.LOCAL_DIR:
        folder = Path(source.partition(":")[2])
        stamp = model_sources.folder_stamp(folder)
        paths = {source: shown, str(folder): shown, str(policy.models_dir): "the models folder"}
    try:
        loaded = _load(source, device, precision, False, stamp)
    except patchslim.PatchslimError as exc:
        raise type(exc)(server_paths.scrub(str(exc), paths)) from None
    except (OSError, ValueError, RuntimeError) as exc:  # a broken folder: logged in full, told without paths
        if not paths:
            raise
        log.error("loading %s failed", source, exc_info=True)
        raise WeightsError(f"{shown} could not be loaded: {type(exc).__name__}: "
                           f"{server_paths.scrub(str(exc), paths)}") from None
    model = replace(loaded, name=shown) if loaded.name != shown else loaded
    key = f"{source}|{hashlib.sha1(repr(stamp).encode()).hexdigest()[:12]}|{model.device}|{precision}|pretrained"
    return ModelChoice(key, model, shown, "", False)


def _bundled_fallback(requested: str, device: str, precision: str, notice: str) -> ModelChoice:
    random_weights = not bundled.CHECKPOINT_PATH.exists()
    model = _load(bundled.BUNDLED_NAME, device, precision, random_weights)
    key = f"{bundled.BUNDLED_NAME}|{model.device}|{precision}|{'random' if random_weights else 'pretrained'}"
    return ModelChoice(key, model, requested, notice, random_weights)


def weights_help(name: str) -> str:
    """How to provide pretrained weights, as Markdown."""
    return (
        f"- put the weights file at `${WEIGHTS_DIR_ENV}/{name}.safetensors` (or `.pth`) and restart the app, "
        f"e.g. `{WEIGHTS_DIR_ENV}=/path/to/weights streamlit run app/main.py`;\n"
        f"- or download them once on a machine with internet into the Hugging Face cache "
        f"(`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`) and copy "
        f"`~/.cache/huggingface/hub` here;\n"
        f"- or choose **{RANDOM_WEIGHTS}** in the sidebar to measure speed with an untrained model."
    )


def model_names() -> list[str]:
    """Models offered in the sidebar, the default first."""
    names = [DEFAULT_MODEL] + [n for n in SUPPORTED_MODELS if n != DEFAULT_MODEL]
    return names


def local_model_choices() -> list[str]:
    """``local-dir:NAME`` for each timm folder in the operator's models folder (none when not configured)."""
    return model_sources.local_choices(model_sources.SourcePolicy.from_environment())


# --------------------------------------------------------------------------- images

@st.cache_resource(max_entries=2, show_spinner=False)
def gallery(bundled_model: bool) -> list[compute.GalleryItem]:
    """The gallery for the bundled models (canvas samples) or for ImageNet models (CC0 photos)."""
    return compute.bundled_gallery() if bundled_model else compute.photo_gallery()


def decoded_upload(key: str, data: bytes) -> Image.Image:
    """An uploaded file decoded once (``patchslim.images.open_image``: EXIF rotation, first GIF frame).

    Files over ``MAX_UPLOAD_MB`` or ``MAX_UPLOAD_PIXELS`` are refused here, before anything is decoded or
    cached, whatever the Streamlit server was configured to accept.

    Raises:
        ImageError: the file is too large or not a readable image (the message says why).
    """
    from patchslim.errors import ImageError

    if len(data) > MAX_UPLOAD_MB * 1024 * 1024:
        raise ImageError(f"the file is {len(data) / 2**20:.1f} MB; uploads up to {MAX_UPLOAD_MB} MB are accepted")
    return _decoded_upload(key, data)


@st.cache_resource(max_entries=4, ttl=FORWARD_TTL, show_spinner=False)
def _decoded_upload(key: str, _data: bytes) -> Image.Image:
    from patchslim.images import open_image

    return open_image(_data, max_pixels=MAX_UPLOAD_PIXELS, max_bytes=MAX_UPLOAD_MB * 1024 * 1024)


def image_key(image_bytes: bytes) -> str:
    """A short content hash naming an image in cache keys."""
    return hashlib.sha1(image_bytes).hexdigest()[:16]


def image_bytes(image: Image.Image) -> bytes:
    """PNG bytes of an image (for hashing gallery images and for downloads)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- forwards

@st.cache_resource(max_entries=16, ttl=FORWARD_TTL, show_spinner=False)
def model_input(model_key: str, image_key: str, _model: patchslim.LoadedModel, _image: Image.Image) -> torch.Tensor:
    """The image through the model's transform, ``[1, C, H, W]`` on its device, once per model and image.

    The forwards and the drawings (overlay, heatmaps) start from it, so a slider change does not resize
    the upload again (a bicubic resize of a photo costs a few ms each time). Never mutated.
    """
    return compute.model_input(_model, _image)


@st.cache_resource(max_entries=16, ttl=FORWARD_TTL, show_spinner=False)
def display_view(model_key: str, image_key: str, _model: patchslim.LoadedModel, _image: Image.Image) -> Image.Image:
    """The image as the model sees it, enlarged for display: what the overlay and the heatmaps of every rerun are
    drawn on (drawings copy it, never draw on it)."""
    return compute.display_view(_model, model_input(model_key, image_key, _model, _image))


@st.cache_resource(max_entries=16, ttl=FORWARD_TTL, show_spinner=False)
def baseline(model_key: str, image_key: str, _model: patchslim.LoadedModel, _image: Image.Image) -> compute.Timed:
    """The unslimmed forward of an image, with attention kept in every block (maps and rollout)."""
    return compute.baseline(_model, model_input(model_key, image_key, _model, _image))


@st.cache_resource(max_entries=48, ttl=FORWARD_TTL, show_spinner=False)
def slimmed(model_key: str, image_key: str, method: str, keep_ratio: float, options: tuple,
            _model: patchslim.LoadedModel, _image: Image.Image) -> compute.Timed:
    """The slimmed forward of an image under one plan (options as sorted ``(name, value)`` pairs)."""
    return compute.slimmed(_model, model_input(model_key, image_key, _model, _image), method, keep_ratio,
                           dict(options))


@st.cache_resource(max_entries=48, ttl=FORWARD_TTL, show_spinner=False)
def slimmed_at_budget(model_key: str, image_key: str, method: str, budget: float,
                      _model: patchslim.LoadedModel, _image: Image.Image) -> compute.Timed:
    """The forward of an image under the method's plan at a compute budget (default options and placement)."""
    return compute.slimmed_at_budget(_model, model_input(model_key, image_key, _model, _image), method, budget)


@st.cache_data(max_entries=8, show_spinner=False)
def accuracy_table(mtime: float, path: str = str(ACCURACY_CSV)):
    """A results CSV (``benchmarks/results/accuracy.csv`` by default) as a DataFrame, keyed by its modification
    time."""
    import pandas as pd

    return pd.read_csv(path)


def load_accuracy_table():
    """The accuracy-vs-rho table if the benchmark has written it, else None."""
    if not ACCURACY_CSV.exists():
        return None
    return accuracy_table(ACCURACY_CSV.stat().st_mtime)


def load_budgets_table():
    """The accuracy-at-equal-cost table (``benchmark --which budgets``) if it has been written, else None."""
    if not BUDGETS_CSV.exists():
        return None
    return accuracy_table(BUDGETS_CSV.stat().st_mtime, str(BUDGETS_CSV))


@st.cache_data(max_entries=128, ttl=FORWARD_TTL, show_spinner=False)
def flops_curve(model_key: str, image_key: str, method: str, _model: patchslim.LoadedModel,
                _image: Image.Image) -> list[dict]:
    """GMACs across keep ratios for one method on one image (see :func:`compute.flops_curve`)."""
    return compute.flops_curve(_model, _image, method)


def accuracy_source(csv_path: Path = ACCURACY_CSV) -> str | None:
    """The model a results CSV (``accuracy.csv`` by default) was measured on, from the JSON written next to it
    (None: unknown)."""
    return results_facts(csv_path).get("model")


def results_facts(csv_path: Path = ACCURACY_CSV) -> dict:
    """The JSON written next to a results CSV (model, unslimmed top-1 and GMACs, command...) without its rows,
    or {}."""
    meta = csv_path.with_suffix(".json")
    if not meta.exists():
        return {}
    return _results_facts(str(meta), meta.stat().st_mtime)


@st.cache_data(max_entries=8, show_spinner=False)
def _results_facts(path: str, mtime: float) -> dict:
    import json

    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    return {k: v for k, v in record.items() if k not in ("rows", "settings", "unreadable")}


# --------------------------------------------------------------------------- long runs kept per session

_RESULTS_KEY = "_results"
_RESULTS_MAX = 8


class BoundedLRU:
    """A mapping that keeps at most ``max_entries`` items, dropping the least recently used first.

    Reading an item (``get``) counts as a use. Safe to share between threads.

    Args:
        max_entries: how many items to keep (at least 1).
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, default=None):
        """The item under ``key`` (now the most recently used), or ``default``."""
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key, value) -> None:
        """Stores ``value`` under ``key``, dropping the least recently used items beyond the bound."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def keys(self) -> list:
        """The keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items


def _results() -> BoundedLRU:
    results = st.session_state.get(_RESULTS_KEY)
    if not isinstance(results, BoundedLRU):  # absent, or left by an older version of this module
        results = st.session_state[_RESULTS_KEY] = BoundedLRU(_RESULTS_MAX)
    return results


def remembered(key: tuple):
    """A long computation's result this session already has (attributions, benchmarks), or None."""
    return _results().get(key)


def remember(key: tuple, value) -> None:
    """Keeps a long computation's result for this session (the eight most recently used)."""
    _results().put(key, value)

"""The shared sidebar: model, device, precision, method, rho and the method's options.

Option widgets are drawn generically from each method's ``OptionSpec`` list (kind, bounds, choices),
never by method name, so a method added to the registry shows up here with its options and no app change.
The choices are stored in ``st.session_state["settings"]`` for the pages to read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import streamlit as st

import patchslim
from patchslim import bundled
from patchslim.device import available_devices
from patchslim.errors import PatchslimError
from patchslim.methods import OptionSpec
from patchslim.models import DEFAULT_MODEL, WEIGHTS_DIR_ENV

from app import compute, model_sources, state
from app.panels import panel

FRIENDLY = {
    "deit_small_patch16_224": "DeiT-S (ImageNet)",
    "deit_tiny_patch16_224": "DeiT-Ti (ImageNet)",
    "deit_base_patch16_224": "DeiT-B (ImageNet)",
    "vit_base_patch16_224": "ViT-B/16 (ImageNet)",
    "deit_small_distilled_patch16_224": "DeiT-S distilled (ImageNet)",
    "swin_tiny_patch4_window7_224": "Swin-T (ImageNet)",
    bundled.BUNDLED_NAME: "fashion-vit (bundled, Fashion-MNIST)",
    bundled.SWIN_NAME: "fashion-swin (bundled Swin, Fashion-MNIST)",
}
TYPED_SOURCE = "Another model: type its source…"


@dataclass
class Settings:
    """What the sidebar chose, for the pages.

    Attributes:
        choice: the loaded model (None when loading failed; ``error`` says why).
        method: slimming method name.
        keep_ratio: rho.
        options: the method's options as the plan takes them (unset options left out).
        error: a message to show instead of results.
        keep_ratio_slot: the sidebar's place for the rho slider, when a page draws it there itself
            (:func:`keep_ratio_slider`, from a fragment: a rho change then reruns that fragment only); None when
            the sidebar drew it.
    """

    choice: state.ModelChoice | None
    method: str
    keep_ratio: float
    options: dict = field(default_factory=dict)
    error: str = ""
    keep_ratio_slot: Any = field(default=None, compare=False, repr=False)

    @property
    def options_key(self) -> tuple:
        """The options as a hashable, sorted tuple (a cache key)."""
        return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in self.options.items()))


def keep_ratio_slider(slot) -> float:
    """The rho slider, drawn in ``slot`` (its place in the sidebar; None: the end of the sidebar); returns its
    value."""
    with slot if slot is not None else st.sidebar:
        return float(st.slider("Keep ratio ρ = N′/N", min_value=0.05, max_value=1.0, step=0.05, key="keep_ratio",
                               help="The share of patch tokens each slimming step keeps."))


def draw(page_draws_keep_ratio: bool = False) -> Settings:
    """Draws the sidebar and stores the result in ``st.session_state["settings"]``.

    With ``page_draws_keep_ratio`` the rho slider's place is left to the page (``Settings.keep_ratio_slot``): the
    Explore page draws it inside the fragment that depends on rho, so that moving it reruns that fragment and not
    the sidebar, the image picker and the unslimmed forward. ``keep_ratio`` is then the slider's current value.
    """
    with st.sidebar:
        st.header("Model")
        names = state.model_names() + state.local_model_choices() + [TYPED_SOURCE]
        name = st.selectbox("Model", names, key="model_name", format_func=lambda n: FRIENDLY.get(n, n))
        if name == TYPED_SOURCE:
            name = st.text_input(
                "Model source", key="model_source", placeholder="local-dir:NAME or hf-hub:org/name",
                help="A timm model folder inside the models folder the server's operator configured "
                     f"({model_sources.MODELS_DIR_ENV}), or a Hugging Face Hub model if the operator allows "
                     f"downloads ({model_sources.ALLOW_HUB_ENV}=1).")
        if name in state.model_names():  # sources bring their own weights
            weights = state.weights_choices(name)
            if st.session_state.get("weights_mode") not in weights:
                st.session_state["weights_mode"] = state.PRETRAINED
            if len(weights) > 1:
                st.radio("Weights", weights, key="weights_mode",
                         format_func=lambda w, n=name: state.weights_label(n, w),
                         help="Random weights give meaningless predictions but true timings and GMACs. A fine-tuned "
                              "checkpoint was trained with the slimming its name says (`python -m patchslim "
                              "finetune`): choose that method and rho to see what fine-tuning won back.")
        if state.default_weights_missing():
            default_weights_note()
        devices = ["auto"] + [d for d in available_devices()]
        col_device, col_precision = st.columns(2)
        device = col_device.selectbox("Device", devices, key="device",
                                      format_func=lambda d: {"cuda": "GPU (CUDA)", "mps": "GPU (MPS)"}.get(d, d.upper() if d == "cpu" else d))
        precisions = (["fp32", "bf16"] + (["fp16"] if any(d in devices for d in ("cuda", "mps")) else [])
                      + (["int8"] if state.int8_available(device) else []))
        if st.session_state.get("precision") not in precisions:
            st.session_state["precision"] = "fp32"
        precision = col_precision.selectbox(
            "Precision", precisions, key="precision",
            help="fp32; bf16 / fp16 autocast; int8: the Linear layers made int8 (dynamic quantization: smaller "
                 "weights, faster matrix products on the CPU; no gradients, so no Integrated Gradients or "
                 "gradient-weighted rollout).")

        choice, error = None, ""
        with panel("Loading the model") as loading:
            try:
                choice = state.choose_model(name, st.session_state.get("weights_mode", state.PRETRAINED),
                                            device, precision)
            except PatchslimError as exc:  # a refused source, missing weights, a bad device: one sentence
                error = str(exc)
        if loading.failed:
            error = "No model is loaded: the sidebar says why."
        if choice is not None:
            # model.name: a local-dir: model as the person named it, not by its path on the server (state)
            st.caption(f"Running **{choice.model.name}** on {choice.model.device.type.upper()}"
                       f" · {choice.model.precision_label} · {choice.model.weights_mb:.1f} MB of weights"
                       f"{' · random weights' if choice.random_weights else ''}"
                       f"{f' · {choice.weights_label}' if choice.weights_label else ''}")

        st.header("Slimming")
        methods, refused = (compute.applicable_methods(choice.model) if choice is not None
                            else (patchslim.method_names(), {}))
        previous = st.session_state.get("method")
        if previous not in methods:
            st.session_state["method"] = state.DEFAULT_METHOD if state.DEFAULT_METHOD in methods else methods[0]
        method = st.selectbox("Method", methods, key="method")
        if previous in refused:
            st.caption(f"**{previous}** does not apply to {choice.model.name}: {refused[previous]}. "
                       f"Showing **{method}**.")
        slim = patchslim.get_method(method)
        st.caption(slim.summary)
        if refused:
            with st.expander(f"{len(refused)} methods do not apply to {choice.model.spec.kind}"):
                for name, reason in refused.items():
                    st.markdown(f"- **{name}**: {reason}")
        slot = st.container()
        if page_draws_keep_ratio:
            keep_ratio = float(st.session_state.get("keep_ratio", state.DEFAULT_KEEP_RATIO))
        else:
            keep_ratio, slot = keep_ratio_slider(slot), None
        options = {}
        if choice is not None:
            options = _option_widgets(slim, choice.model.spec)

    settings = Settings(choice, method, float(keep_ratio), options, error, keep_ratio_slot=slot)
    st.session_state["settings"] = settings
    return settings


def default_weights_note() -> None:
    """One line under the model picker while the default model's pretrained weights are not on this machine (the
    session then opens on the bundled model): where to put them; the tooltip has every way."""
    name = FRIENDLY.get(DEFAULT_MODEL, DEFAULT_MODEL)
    st.caption(f":material/info: {name.split(' (')[0]} needs weights in `${WEIGHTS_DIR_ENV}`",
               help=state.weights_help(DEFAULT_MODEL))


def _option_widgets(slim: patchslim.methods.SlimMethod, model_spec) -> dict:
    """One widget per option of the method, plus where it acts (blocks of a ViT, stages of a windowed model);
    returns the options that are set."""
    options: dict = {}
    depth = model_spec.depth
    with st.expander("Method options", expanded=bool(slim.options) or model_spec.hierarchical):
        if model_spec.hierarchical:
            options["stages"] = _stage_picker(model_spec)
        else:
            default_blocks = list(slim.default_blocks(depth))
            blocks = st.multiselect(
                "Acts at blocks", list(range(depth)), default=default_blocks, key=f"blocks::{slim.name}::{depth}",
                help=f"0 is the input; the model has blocks 0..{depth - 1}. Default: {default_blocks}.",
            )
            if blocks and sorted(blocks) != default_blocks:
                options["blocks"] = tuple(sorted(blocks))
        for spec in slim.options:
            value = _option_widget(spec, slim.name, depth)
            if value is not None:
                options[spec.name] = value
    return options


def _stage_picker(spec) -> tuple[int, ...]:
    """Which stages of a windowed model (Swin) to slim: the method acts in every block of each, window by window.
    Nothing chosen means the model's default stages (said below the picker)."""
    stages = sorted({b.stage for b in spec.blocks})
    default = list(spec.default_stages)
    chosen = st.multiselect(
        "Slims stages", stages, default=default, key=f"stages::{spec.name}::{len(stages)}",
        format_func=lambda s: f"stage {s} ({'x'.join(map(str, spec.blocks[spec.stage_blocks(s)[0]].grid))})",
        help="The method keeps the same share of tokens in every window of every block of these stages; the "
             "others sit the block out and come back for the next. "
             + "; ".join(compute.stage_label(spec, s) for s in stages) + f". Default: {default}.",
    )
    if not chosen:
        st.caption(f"No stage chosen: slimming the default stages {default}.")
        return tuple(default)
    return tuple(sorted(chosen))


def _option_widget(spec: OptionSpec, method: str, depth: int):
    """Draws one option by its kind and bounds; returns its value (None: leave it to the method)."""
    key = f"opt::{method}::{spec.name}::{depth}"
    label = spec.name.replace("_", " ")
    help_text = f"{spec.help} ({spec.describe()})".strip()
    if spec.kind == "bool":
        return st.checkbox(label, value=bool(spec.default), key=key, help=help_text)
    if spec.kind == "str":
        if spec.choices:
            if spec.default is None:  # the method picks by the model (attention: cls, or received without a CLS)
                return st.selectbox(label, (None, *spec.choices), key=key, help=help_text,
                                    format_func=lambda c: "method decides" if c is None else c)
            index = spec.choices.index(spec.default) if spec.default in spec.choices else 0
            return st.selectbox(label, spec.choices, index=index, key=key, help=help_text)
        value = st.text_input(label, value=spec.default or "", key=key, help=help_text)
        return value or None
    if spec.kind == "blocks":
        default = list(spec.default) if spec.default is not None else []
        chosen = st.multiselect(label, list(range(depth)), default=[b for b in default if b < depth], key=key,
                                help=help_text)
        return tuple(chosen) or None
    if spec.kind in ("int", "float"):
        is_int = spec.kind == "int"
        cast = int if is_int else float
        bounded = spec.minimum is not None and spec.maximum is not None
        if bounded and spec.default is not None:
            lo, hi = cast(spec.minimum), cast(spec.maximum)
            step = 1 if is_int else (hi - lo) / 100 or 0.01
            return st.slider(label, lo, hi, cast(spec.default), step=cast(step), key=key, help=help_text)
        value = st.number_input(
            label, min_value=None if spec.minimum is None else cast(spec.minimum),
            max_value=None if spec.maximum is None else cast(spec.maximum),
            value=None if spec.default is None else cast(spec.default),
            step=1 if is_int else None, key=key, help=help_text, placeholder="method decides",
        )
        return None if value is None else cast(value)
    return None  # an unknown kind: leave the option at the method's default


def current() -> Settings:
    """The sidebar's settings for a page; stops the page with the reason when no model could be loaded."""
    settings: Settings = st.session_state["settings"]
    if settings.choice is None:
        if settings.keep_ratio_slot is not None:  # the slider keeps its place (and its value) in the sidebar
            keep_ratio_slider(settings.keep_ratio_slot)
        st.error(settings.error or "No model is loaded.")
        st.stop()
    return settings


def notices(settings: Settings) -> None:
    """Above every page: what the app runs when it is not what was asked (one clear sentence each)."""
    choice = settings.choice
    if choice is None:
        return
    if choice.notice:
        st.warning(choice.notice, icon=":material/warning:")
        if choice.model.name != choice.requested:
            with st.expander(f"How to provide weights for {choice.requested}"):
                st.markdown(state.weights_help(choice.requested))
    elif choice.random_weights:
        st.info(f"{choice.model.name} runs with **random weights (for timing only)**: GMACs and latency are "
                "real, predictions are meaningless.", icon=":material/timer:")

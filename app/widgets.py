"""Drawing helpers the pages share: the image picker, predictions, the method card."""

from __future__ import annotations

import html
from dataclasses import dataclass

import streamlit as st
from PIL import Image

import patchslim
from patchslim import bundled
from patchslim.errors import ImageError

from app import state

UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]


@dataclass(frozen=True)
class PickedImage:
    """The image a page works on.

    Attributes:
        name: what to call it.
        image: upright RGB or L image, any size.
        key: content hash (cache key).
        label: the true label when known (gallery images of the bundled models), else None.
        credit: where it comes from.
    """

    name: str
    image: Image.Image
    key: str
    label: str | None
    credit: str


def _remember_upload() -> None:
    """Keeps the uploaded file in the session, so it survives switching pages; forgets it when removed."""
    uploaded = st.session_state.get("uploader")
    if uploaded is None:
        st.session_state["upload"] = st.session_state["upload_id"] = None
    else:
        _take_upload(uploaded)


def _take_upload(uploaded) -> None:
    st.session_state["upload"] = (uploaded.name, uploaded.getvalue())
    st.session_state["upload_id"] = uploaded.file_id


def image_picker(model: patchslim.LoadedModel) -> PickedImage | None:
    """Gallery or upload, in one row; returns the chosen image or None (after showing why)."""
    is_bundled = bundled.is_bundled(model.name)
    items = state.gallery(is_bundled)
    source_col, pick_col = st.columns([1, 3], vertical_alignment="bottom")
    source = source_col.radio("Image", ["Gallery", "Upload"], key="image_source", horizontal=True)
    if source == "Upload":
        uploaded = pick_col.file_uploader(
            "Upload an image (JPEG, PNG, WebP, BMP, GIF; first frame of an animation)", type=UPLOAD_TYPES,
            key="uploader", on_change=_remember_upload,
        )
        # The file this page's uploader holds wins even if no change event reached the callback (each page
        # has its own uploader widget); an empty uploader keeps the upload made on another page.
        if uploaded is not None and st.session_state.get("upload_id") != uploaded.file_id:
            _take_upload(uploaded)
        upload = st.session_state.get("upload")
        if upload is None:
            st.info("Upload an image to start, or switch to the gallery.")
            return None
        filename, data = upload
        if uploaded is None:
            st.caption(f"Showing **{filename}**, uploaded earlier. Upload a file here to replace it.")
        key = state.image_key(data)
        try:
            image = state.decoded_upload(key, data)
        except ImageError as exc:
            st.error(f"This file cannot be used: {exc}")
            return None
        return PickedImage(filename, image, key, None, "your upload")
    gallery_key = f"gallery_pick::{'bundled' if is_bundled else 'photos'}"
    names = [item.name for item in items]
    index = pick_col.selectbox("Gallery image", range(len(items)), format_func=lambda i: names[i], key=gallery_key)
    item = items[index]
    return PickedImage(item.name, item.image, f"{gallery_key}:{index}", item.label, item.credit)


def method_card(slim: patchslim.methods.SlimMethod) -> None:
    """The method's equation and one paragraph on how it works, for teaching."""
    st.subheader(f"How `{slim.name}` works")
    if slim.equation:
        st.latex(slim.equation)
    if slim.explanation:
        st.markdown(slim.explanation)
    facts = []
    if slim.reference:
        facts.append(f"reference: {slim.reference}")
    facts.append("merges tokens" if slim.merges else "prunes tokens")
    if slim.needs_attention:
        facts.append("reads attention")
    if slim.learned:
        facts.append("learned")
    if slim.adaptive_count:
        facts.append("adaptive count per image")
    st.caption(" · ".join(facts))


def predictions_table(top5: list[tuple[str, float]], highlight: str | None = None) -> None:
    """Top-5 as a table with probability bars; ``highlight`` marks one label (the unslimmed top-1). Plain HTML
    (styled by :data:`app.views.PAGE_STYLE`): a ``st.dataframe`` of five rows cost 2 ms to serialize on every
    rho change, twice, for a table nobody sorts or scrolls."""
    rows = "".join(
        f"<tr><td>{'➜ ' if label == highlight else ''}{html.escape(label)}</td>"
        f'<td class="bar"><span style="width: {100 * max(0.0, min(1.0, p)):.1f}%"></span></td>'
        f'<td class="p">{p:.2%}</td></tr>'
        for label, p in top5)
    st.html(f'<table class="top5"><thead><tr><th>Class</th><th colspan="2">Probability</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>")

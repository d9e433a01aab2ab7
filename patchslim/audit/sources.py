"""Audit groupings: which subgroups of labelled images an audit compares (besides ``class``, always reported).

The images themselves, their labels and their own ``group`` column (from ``ROOT/<group>/<class>/<image>`` or
a CSV manifest's ``group``) come from :mod:`patchslim.data`, the data path every command shares. Built in
here: ``brightness`` (dark / bright, split at the median of :func:`patchslim.data.brightness`, which is
measured while the images are decoded) and ``family`` (the bundled model's class families).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from patchslim.data import LabelledImages
from patchslim.errors import PatchslimError

# Built-in groupings of the bundled model's classes (class families).
FAMILIES = {
    "tops": ("T-shirt/top", "Pullover", "Coat", "Shirt"),
    "footwear": ("Sandal", "Sneaker", "Ankle boot"),
    "others": ("Trouser", "Dress", "Bag"),
}
BUILTIN_GROUPINGS = ("brightness", "family")


def builtin_grouping(name: str, labels: np.ndarray, brightness_values: np.ndarray,
                     class_names: Sequence[str]) -> np.ndarray:
    """Group names per image for a built-in grouping.

    - ``brightness``: ``dark`` / ``bright``, split at the median of :func:`patchslim.data.brightness` over the audited
      images (NaN, an image that could not be read, gives ``unknown``);
    - ``family``: class families of the bundled model (``tops``, ``footwear``, ``others``).

    Raises:
        PatchslimError: an unknown grouping, or ``family`` for a model with other classes.
    """
    if name == "brightness":
        values = np.asarray(brightness_values, dtype=np.float64)
        finite = np.isfinite(values)
        median = float(np.median(values[finite])) if finite.any() else 0.0
        out = np.where(values > median, "bright", "dark").astype(object)
        out[~finite] = "unknown"
        return out
    if name == "family":
        family_of = {c: fam for fam, classes in FAMILIES.items() for c in classes}
        if not all(c in family_of for c in class_names):
            raise PatchslimError("--groups family groups the bundled model's Fashion-MNIST classes "
                                 "(tops, footwear, others); this model has other classes")
        return np.asarray([family_of[class_names[int(i)]] for i in labels], dtype=object)
    raise PatchslimError(f"unknown grouping {name!r}: use group (from the data), "
                         f"{', '.join(BUILTIN_GROUPINGS)} or class")


def parse_groupings(text: str | Sequence[str] | None, data: LabelledImages) -> list[str]:
    """``"group,brightness"`` -> the groupings to report (besides ``class``, always reported).

    Default: the data's own groups when it has them, else ``brightness`` and ``family`` for the bundled
    model's canvases, else none (one group, ``all``).

    Raises:
        PatchslimError: an unknown grouping, or ``group`` for data without groups.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        if data.groupings:
            return list(data.groupings)
        if data.canvases is not None:
            return list(BUILTIN_GROUPINGS)
        return []
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    for n in names:
        if n == "class":
            continue
        if n == "group" and "group" not in data.groupings:
            raise PatchslimError("--groups group needs data with groups: ROOT/<group>/<class>/<image> or a "
                                 "CSV manifest with a group column")
        if n != "group" and n not in BUILTIN_GROUPINGS:
            raise PatchslimError(f"unknown grouping {n!r}: use group, {', '.join(BUILTIN_GROUPINGS)} or class")
        if n == "family":
            builtin_grouping("family", np.zeros(0, dtype=np.int64), np.zeros(0), data.class_names)
    return [n for n in dict.fromkeys(names) if n != "class"]

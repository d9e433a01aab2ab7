"""Labelled images: the one data path of ``evaluate``, ``audit``, ``train-policy``, the app and the benchmarks.

Sources (:func:`load_labelled`; ``ROOT`` may be a folder or a ``.zip``, and a zip that wraps everything in one
top folder is read from inside it):

- ``ROOT/<class>/<image>``: class folders named like the model's classes (one group, ``all``);
- ``ROOT/<group>/<class>/<image>``: subgroups, each with class folders (detected when more second-level than
  first-level folders match a class, or chosen with ``layout=``);
- a CSV manifest (a ``.csv`` path, or one ``.csv`` at the top of a zip) with columns ``path,label`` and
  optionally ``group``; paths are relative to the manifest's folder (inside a zip: to the zip's top);
- zip bytes (an upload), read like a zip file;
- ``"bundled"`` / ``"fashion-mnist"``: the bundled model's canvas test images (the shipped first 500, or all
  10,000; in memory).

Labels are matched by :func:`class_lookup` (the exact name, the name ignoring case and punctuation, the class
index, an ImageNet synset id); a label that matches none is reported, never guessed.

**Order.** Items come in a fixed order: folders in sorted walk order (a folder's files by name, then its
sub-folders by name), a manifest in its row order, a zip in its member order, canvas sets in their own order.

**Limit.** ``subset(limit)`` (``--limit`` in every command and the app) keeps exactly ``limit`` items: item
``i * n // limit`` for ``i = 0 .. limit - 1``, i.e. evenly spaced over that order starting with the first. It
needs no seed, is the same on every machine and in every command, and keeps every class and group of a
folder in (a folder sorted by class would lose all but the first classes to a plain "first N").

**Bad input** never stops loading: every file, folder, label or zip member left out becomes a :class:`Skipped`
entry with its reason (not an image, hidden file, unknown label, empty class folder or group, duplicate
content, a zip member with an absolute path, ``..`` or a symbolic link, an encrypted member, or beyond the zip
bomb caps on total uncompressed size, file count and compression ratio). Zips are never extracted: members
are read into memory one at a time, each capped at its declared size, so nothing is written anywhere.
Images are decoded lazily, batch by batch (:func:`iter_batches`, a torch ``DataLoader`` with worker processes,
or :func:`decode` for chosen items), so memory stays bounded; a file that fails to decode there is reported
in the batch (``Batch.errors``), never fatal. What cannot be used at all raises
:class:`~patchslim.errors.DataError` (or :class:`~patchslim.errors.DataNotFoundError`) with one message.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import stat
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from patchslim.errors import DataError, DataNotFoundError, ImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CANVAS_SETS = ("bundled", "fashion-mnist")
ALL_GROUP = "all"
LAYOUTS = ("auto", "class", "group")
MAX_ZIP_FILES = 200_000
MAX_ZIP_BYTES = 8 * 1024**3  # 8 GiB uncompressed in total
MAX_MEMBER_BYTES = 50 * 1024**2  # one image, as patchslim.images accepts
MAX_RATIO = 200  # uncompressed / compressed, checked for members above RATIO_FLOOR bytes
RATIO_FLOOR = 1024**2

SOURCES_HELP = ("bundled (the shipped canvas test sample), fashion-mnist (the full canvas test set), a folder "
                "ROOT/<class>/<image> or ROOT/<group>/<class>/<image>, a CSV manifest path,label[,group], or a "
                ".zip of any of these")
LIMIT_HELP = "use N images, evenly spaced over the data's fixed order (the same N images in every command)"


@dataclass(frozen=True)
class Skipped:
    """Something left out of the data, and why.

    Attributes:
        item: the file, folder, label, group or zip member.
        reason: a sentence a person can act on.
        kind: ``"file"``, ``"label"``, ``"class"``, ``"group"``, ``"archive"`` or ``"duplicate"``.
        count: how many files it stands for (a folder of unknown label counts its images).
    """

    item: str
    reason: str
    kind: str = "file"
    count: int = 1


def limit_indices(n: int, limit: int | None) -> np.ndarray:
    """The items ``--limit`` keeps of ``n``: ``i * n // limit`` for ``i < limit`` (all when None or >= n).

    Raises:
        DataError: a limit below 1.
    """
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}")
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    return np.arange(limit, dtype=np.int64) * n // limit


@dataclass
class LabelledImages:
    """Labelled images, with optional groups; decoded only when batched.

    Attributes:
        name: where they came from, in words.
        labels: ``[n]`` class indices of the model's classes.
        items: ``[n]`` display names (relative paths, or ``test image 17``).
        groupings: grouping name -> ``[n]`` group names (``"group"`` from the folder layout or the CSV).
        skipped: everything left out, with reasons.
        class_names: the model's class names.
        reader: ``reader(position) -> PIL image`` (None for in-memory canvases).
        canvases: ``[m, 48, 48]`` uint8 canvases for the bundled model (None for files).
        positions: ``[n]`` which entries of ``reader`` / ``canvases`` the items are (after :meth:`subset`).
        fingerprint: a hash of the items, labels and groups (a resumed audit must see the same data).
    """

    name: str
    labels: np.ndarray
    items: list[str]
    groupings: dict[str, np.ndarray]
    skipped: list[Skipped]
    class_names: tuple[str, ...]
    reader: Any = None
    canvases: np.ndarray | None = None
    positions: np.ndarray | None = None
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.positions is None:
            self.positions = np.arange(len(self.labels), dtype=np.int64)
        if not self.fingerprint:
            digest = hashlib.sha1()
            digest.update(self.name.encode())
            digest.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
            digest.update("\n".join(self.items).encode("utf-8", "surrogateescape"))
            for key in sorted(self.groupings):
                digest.update(key.encode() + b"\0" + "\n".join(map(str, self.groupings[key])).encode())
            if self.canvases is not None:
                digest.update(np.ascontiguousarray(self.canvases[self.positions]).tobytes())
            self.fingerprint = digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: Sequence[int] | np.ndarray, name: str) -> "LabelledImages":
        """The items at ``indices`` (in that order), described as ``name``."""
        keep = np.asarray(indices, dtype=np.int64)
        return replace(self, name=name, labels=self.labels[keep], items=[self.items[i] for i in keep],
                       groupings={k: v[keep] for k, v in self.groupings.items()}, positions=self.positions[keep],
                       fingerprint="")

    def subset(self, limit: int | None) -> "LabelledImages":
        """Exactly ``limit`` items evenly spaced over the order, starting with the first (all when None).

        Raises:
            DataError: a limit below 1.
        """
        keep = limit_indices(len(self), limit)
        if len(keep) == len(self):
            return self
        return self.select(keep, f"{self.name} ({len(keep)} of {len(self)}, evenly spaced)")

    def batches(self, model: Any, batch_size: int, workers: int = 0) -> Iterator["Batch"]:
        """All items decoded in order, at most ``batch_size`` per :class:`Batch` (see :func:`iter_batches`)."""
        return iter_batches(self, model, 0, len(self), batch_size, workers)


def canvas_images(canvases: np.ndarray, labels: np.ndarray, name: str,
                  class_names: Sequence[str] | None = None) -> LabelledImages:
    """Canvas Fashion-MNIST arrays (``[n, 48, 48]`` uint8) as labelled images of the bundled model."""
    from patchslim import bundled

    labels = np.asarray(labels, dtype=np.int64)
    return LabelledImages(name, labels, [f"test image {i}" for i in range(len(labels))], {}, [],
                          tuple(class_names or bundled.CLASS_NAMES), canvases=np.asarray(canvases))


# --------------------------------------------------------------------------- labels

def _normalize(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", name.lower())


def class_lookup(class_names: Sequence[str]) -> Callable[[str], int | None]:
    """A function from a folder name or label to a class index (None: no class matches).

    Matches, in order: the exact class name; for 1000-class ImageNet models the synset id (``n01440764``); the
    class index (``3``); the name ignoring case and punctuation (``t_shirt_top`` for ``T-shirt/top``), or its
    first comma-separated synonym.
    """
    exact = {name: i for i, name in enumerate(class_names)}
    loose: dict[str, int] = {}
    for i, name in enumerate(class_names):
        loose.setdefault(_normalize(name), i)
        loose.setdefault(_normalize(name.split(",")[0]), i)
    synsets: dict[str, int] = {}
    if len(class_names) == 1000:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            synsets = {info.index_to_label_name(i): i for i in range(1000)}
        except Exception:  # pragma: no cover - timm without ImageNet info
            synsets = {}

    def lookup(folder: str) -> int | None:
        if folder in exact:
            return exact[folder]
        if folder in synsets:
            return synsets[folder]
        if folder.isdigit() and int(folder) < len(class_names):
            return int(folder)
        return loose.get(_normalize(folder)) if _normalize(folder) else None

    return lookup


# --------------------------------------------------------------------------- readers

@dataclass(frozen=True)
class _Entry:
    """A file of a folder or zip: its path parts relative to the data root and its size in bytes."""

    parts: tuple[str, ...]
    size: int
    key: str  # what the tree's reader needs (absolute path or member name)

    @property
    def display(self) -> str:
        return "/".join(self.parts)


class FileReader:
    """Reads images from files on disk (picklable, for DataLoader workers)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __call__(self, position: int):
        from patchslim.images import open_image

        return open_image(self.paths[position])


class ZipReader:
    """Reads images from zip members in memory, each capped at its declared size (picklable).

    Each process opens the archive once on first use (DataLoader workers get their own handle).
    """

    def __init__(self, source: str | bytes, members: Sequence[str] = (), sizes: Sequence[int] = ()):
        self.source = source
        self.members = list(members)
        self.sizes = list(sizes)
        self._archive: zipfile.ZipFile | None = None
        self._pid = -1

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_archive"], state["_pid"] = None, -1
        return state

    def archive(self) -> zipfile.ZipFile:
        if self._archive is None or self._pid != os.getpid():
            source = io.BytesIO(self.source) if isinstance(self.source, (bytes, bytearray)) else self.source
            self._archive = zipfile.ZipFile(source)
            self._pid = os.getpid()
        return self._archive

    def read_bytes(self, member: str, declared: int | None = None) -> bytes:
        """The member's bytes, refusing more than it declared (a lying header is a zip bomb)."""
        info = self.archive().getinfo(member)
        limit = min(info.file_size if declared is None else declared, MAX_MEMBER_BYTES)
        with self.archive().open(info) as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise ImageError(f"{member} unpacks to more than its declared {limit} bytes (zip bomb guard)")
        return data

    def __call__(self, position: int):
        from patchslim.images import open_image

        return open_image(self.read_bytes(self.members[position], self.sizes[position] if self.sizes else None))


# --------------------------------------------------------------------------- trees of files

def _hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _folder_tree(root: Path) -> tuple[list[_Entry], set[tuple[str, ...]], list[Skipped]]:
    """Every file under ``root`` (sorted walk, links not followed), the folders, and hidden entries as skipped."""
    entries: list[_Entry] = []
    folders: set[tuple[str, ...]] = set()
    skipped: list[Skipped] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel = Path(dirpath).relative_to(root).parts
        dirnames.sort()
        for d in list(dirnames):
            if _hidden((d,)):
                dirnames.remove(d)
                skipped.append(Skipped("/".join(rel + (d,)), "hidden or system folder", "file"))
            else:
                folders.add(rel + (d,))
        for name in sorted(filenames):
            parts = rel + (name,)
            path = Path(dirpath) / name
            if _hidden((name,)):
                skipped.append(Skipped("/".join(parts), "hidden or system file", "file"))
                continue
            try:
                size = path.stat().st_size
            except OSError as exc:
                skipped.append(Skipped("/".join(parts), f"cannot be read: {exc.strerror or exc}", "file"))
                continue
            entries.append(_Entry(parts, size, str(path)))
    return entries, folders, skipped


def _zip_tree(reader: ZipReader, max_files: int, max_bytes: int) -> tuple[list[_Entry], set[tuple[str, ...]],
                                                                         list[Skipped]]:
    """The safe members of a zip; every unsafe one (and everything past the caps) as skipped."""
    try:
        archive = reader.archive()
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"the data is not a readable zip file ({exc})") from None
    entries: list[_Entry] = []
    folders: set[tuple[str, ...]] = set()
    skipped: list[Skipped] = []
    total = 0
    over_count = over_bytes = 0
    for info in archive.infolist():
        name = info.filename
        unified = name.replace("\\", "/")
        parts = tuple(p for p in PurePosixPath(unified).parts if p not in ("", "."))
        if unified.startswith("/") or re.match(r"^[A-Za-z]:", unified):
            skipped.append(Skipped(name, "absolute path in the zip (never extracted or read)", "archive"))
            continue
        if ".." in parts:
            skipped.append(Skipped(name, "path traversal ('..') in the zip (never extracted or read)", "archive"))
            continue
        mode = (info.external_attr >> 16) & 0o170000
        if mode == stat.S_IFLNK:
            skipped.append(Skipped(name, "symbolic link in the zip (not followed)", "archive"))
            continue
        if info.is_dir():
            if parts and not _hidden(parts):
                folders.add(parts)
            continue
        if _hidden(parts):
            skipped.append(Skipped(name, "hidden or system file", "file"))
            continue
        if info.flag_bits & 0x1:
            skipped.append(Skipped(name, "encrypted zip member", "archive"))
            continue
        if info.file_size > MAX_MEMBER_BYTES:
            skipped.append(Skipped(name, f"unpacks to {info.file_size / 1e6:.0f} MB; at most "
                                         f"{MAX_MEMBER_BYTES / 1e6:.0f} MB per file (zip bomb guard)", "archive"))
            continue
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            ratio = info.file_size / max(info.compress_size, 1)
            skipped.append(Skipped(name, f"compression ratio {ratio:.0f}:1 is beyond {MAX_RATIO}:1 "
                                         "(zip bomb guard)", "archive"))
            continue
        if len(entries) >= max_files:
            over_count += 1
            continue
        if total + info.file_size > max_bytes:
            over_bytes += 1
            continue
        total += info.file_size
        for k in range(1, len(parts)):
            folders.add(parts[:k])
        entries.append(_Entry(parts, info.file_size, name))
    if over_count:
        skipped.append(Skipped(f"{over_count} members", f"beyond the cap of {max_files} files per zip "
                                                        "(zip bomb guard)", "archive", over_count))
    if over_bytes:
        skipped.append(Skipped(f"{over_bytes} members", f"the zip would unpack to more than "
                                                        f"{max_bytes / 1e6:.0f} MB (zip bomb guard)",
                               "archive", over_bytes))
    return entries, folders, skipped


def _strip_wrapper(entries: list[_Entry], folders: set[tuple[str, ...]]) -> tuple[list[_Entry], set]:
    """Drops one top folder that wraps everything (as zips of a folder have)."""
    tops = {e.parts[0] for e in entries if len(e.parts) > 1} | {f[0] for f in folders}
    if entries and all(len(e.parts) > 1 for e in entries) and len(tops) == 1:
        return [_Entry(e.parts[1:], e.size, e.key) for e in entries], {f[1:] for f in folders if len(f) > 1}
    return entries, folders


# --------------------------------------------------------------------------- layouts and manifests

def _choose_layout(images: list[_Entry], folders: set[tuple[str, ...]], lookup, layout: str) -> str:
    if layout not in LAYOUTS:
        raise DataError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout != "auto":
        return layout
    first = {f[0] for f in folders if len(f) >= 1} | {e.parts[0] for e in images if len(e.parts) > 1}
    second = {f[:2] for f in folders if len(f) >= 2} | {e.parts[:2] for e in images if len(e.parts) > 2}
    first_matches = sum(lookup(name) is not None for name in first)
    second_matches = sum(lookup(pair[1]) is not None for pair in second)
    return "group" if second_matches > first_matches else "class"


def _unknown_label(class_names: Sequence[str]) -> str:
    return f"matches none of the model's classes (e.g. {', '.join(list(class_names)[:3])}, or a class index)"


def _from_tree(entries: list[_Entry], folders: set[tuple[str, ...]], class_names: Sequence[str], layout: str,
               skipped: list[Skipped]) -> tuple[list[_Entry], list[int], list[str], str]:
    """Images with their class index and group from a folder layout; the rest to ``skipped``."""
    lookup = class_lookup(class_names)
    images = []
    for entry in entries:
        if _is_image_name(entry.parts[-1]):
            images.append(entry)
        else:
            suffix = Path(entry.parts[-1]).suffix or "no suffix"
            skipped.append(Skipped(entry.display, f"not an image file ({suffix})", "file"))
    layout = _choose_layout(images, folders, lookup, layout)
    depth = 2 if layout == "class" else 3  # parts of <class>/<image> or <group>/<class>/<image>
    kept, labels, groups = [], [], []
    unknown: Counter = Counter()
    per_class_folder: Counter = Counter()
    for entry in images:
        if len(entry.parts) < depth:
            where = "the top folder" if len(entry.parts) == 1 else f"group folder {entry.parts[0]!r}"
            skipped.append(Skipped(entry.display, f"image lies in {where}, not in a class folder", "file"))
            continue
        group = entry.parts[0] if layout == "group" else ALL_GROUP
        index = lookup(entry.parts[depth - 2])
        folder_key = "/".join(entry.parts[:depth - 1])
        if index is None:
            unknown[folder_key] += 1
            continue
        per_class_folder[folder_key] += 1
        kept.append(entry)
        labels.append(index)
        groups.append(group)
    for folder_key, count in sorted(unknown.items()):
        name = folder_key.split("/")[-1]
        skipped.append(Skipped(folder_key, f"folder name {name!r} {_unknown_label(class_names)}", "label", count))
    for folder in sorted(folders):  # class-level folders that hold no image at all
        if len(folder) != depth - 1:
            continue
        key = "/".join(folder)
        if key not in per_class_folder and key not in unknown:
            what = "class folder" if lookup(folder[-1]) is not None else "folder"
            skipped.append(Skipped(key, f"{what} holds no images", "class", 0))
    if layout == "group":
        with_images = set(groups)
        for folder in sorted(f for f in folders if len(f) == 1):
            if folder[0] not in with_images:
                skipped.append(Skipped(folder[0], "group holds no usable images", "group", 0))
    return kept, labels, groups, layout


def _read_manifest(text: str, manifest_name: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    if "path" not in fields or "label" not in fields:
        raise DataError(f"{manifest_name} needs a header with columns path,label[,group]; found "
                        f"{', '.join(fields) or 'no header'}")
    return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]


def _from_manifest(rows: list[dict[str, str]], resolve: Callable[[str], _Entry | str], class_names: Sequence[str],
                   skipped: list[Skipped]) -> tuple[list[_Entry], list[int], list[str], bool]:
    """Manifest rows with a readable path and a known label; ``resolve`` gives an entry or a reason."""
    lookup = class_lookup(class_names)
    has_group = any("group" in row for row in rows)
    kept, labels, groups = [], [], []
    unknown: Counter = Counter()
    for number, row in enumerate(rows, start=2):
        path, label = row.get("path", ""), row.get("label", "")
        if not path:
            skipped.append(Skipped(f"line {number}", "no path", "file"))
            continue
        if not _is_image_name(path):
            skipped.append(Skipped(path, f"not an image file ({Path(path).suffix or 'no suffix'})", "file"))
            continue
        index = lookup(label) if label else None
        if index is None:
            unknown[label] += 1
            continue
        entry = resolve(path)
        if isinstance(entry, str):
            skipped.append(Skipped(path, entry, "file"))
            continue
        kept.append(entry)
        labels.append(index)
        groups.append(row.get("group") or ALL_GROUP if has_group else ALL_GROUP)
    for label, count in sorted(unknown.items()):
        shown = repr(label) if label else "(empty)"
        skipped.append(Skipped(f"label {shown}", _unknown_label(class_names), "label", count))
    return kept, labels, groups, has_group


def _drop_duplicates(entries: list[_Entry], read: Callable[[_Entry], bytes], skipped: list[Skipped]) -> list[int]:
    """Indices of the entries to keep: the first of each set of files with identical content.

    Only files sharing a size are hashed, so a folder without duplicates costs one ``stat`` per file.
    """
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, entry in enumerate(entries):
        by_size[entry.size].append(i)
    drop: set[int] = set()
    seen_keys: dict[str, int] = {}
    for i, entry in enumerate(entries):  # the same file listed twice (a manifest can do that)
        if entry.key in seen_keys:
            drop.add(i)
            skipped.append(Skipped(entry.display, f"listed twice (first as {entries[seen_keys[entry.key]].display})",
                                   "duplicate"))
        else:
            seen_keys[entry.key] = i
    for same in by_size.values():
        same = [i for i in same if i not in drop]
        if len(same) < 2:
            continue
        first_of: dict[str, int] = {}
        for i in same:
            try:
                digest = hashlib.sha1(read(entries[i])).hexdigest()
            except (OSError, ImageError, zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError) as exc:
                drop.add(i)
                skipped.append(Skipped(entries[i].display, f"cannot be read: {exc}", "file"))
                continue
            if digest in first_of:
                drop.add(i)
                skipped.append(Skipped(entries[i].display, f"same content as {entries[first_of[digest]].display}",
                                       "duplicate"))
            else:
                first_of[digest] = i
    return [i for i in range(len(entries)) if i not in drop]


# --------------------------------------------------------------------------- the loader

def load_labelled(source: str | Path | bytes, model: Any, layout: str = "auto", max_files: int = MAX_ZIP_FILES,
                  max_bytes: int = MAX_ZIP_BYTES, name: str | None = None) -> LabelledImages:
    """Labelled images from ``"bundled"``, ``"fashion-mnist"``, a folder, a CSV manifest, a zip path or zip bytes.

    Args:
        source: where the images are (bytes: an uploaded zip).
        model: a :class:`~patchslim.models.LoadedModel` (its class names label the data).
        layout: ``"auto"``, ``"class"`` (``ROOT/<class>/<image>``) or ``"group"`` (``ROOT/<group>/<class>/<image>``).
        max_files, max_bytes: zip bomb caps (members past them are skipped and reported).
        name: how to describe the data (default: from the source).

    Raises:
        DataNotFoundError: the path (or the Fashion-MNIST files) do not exist.
        DataError: a canvas set for another model, an unreadable zip, a manifest without ``path,label``
            columns, a path of another kind, or no usable labelled image at all (the message lists what was
            left out).
    """
    if isinstance(source, str) and source in CANVAS_SETS:
        return _canvas_data(source, model)
    class_names = tuple(model.class_names)
    if isinstance(source, (bytes, bytearray)):
        data = _zip_data(ZipReader(bytes(source)), class_names, layout, max_files, max_bytes, name or "uploaded zip")
    else:
        path = Path(source)
        if not path.exists():
            raise DataNotFoundError(f"no such data folder, manifest or zip: {path} (or use "
                                    f"{' or '.join(CANVAS_SETS)} for the bundled model)")
        if path.is_dir():
            data = _folder_data(path, class_names, layout, name or f"folder {path}")
        elif path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
            data = _zip_data(ZipReader(str(path)), class_names, layout, max_files, max_bytes, name or f"zip {path}")
        elif path.suffix.lower() == ".csv":
            data = _manifest_data(path, class_names, name or f"manifest {path}")
        else:
            raise DataError(f"--data {path} is neither a folder, a .csv manifest nor a .zip")
    if not len(data):
        reasons = Counter(s.reason.split(" (")[0] for s in data.skipped)
        found = "; ".join(f"{reason} ({count})" for reason, count in reasons.most_common(4))
        raise DataError(
            f"no usable labelled images in {data.name}: expected ROOT/<class>/<image>, "
            f"ROOT/<group>/<class>/<image> or a CSV manifest path,label[,group], with classes named like "
            f"{getattr(model, 'name', 'the model')}'s (e.g. {', '.join(class_names[:3])}, or a class index)"
            + (f"; left out: {found}" if found else "")
        )
    return data


def _finish(name: str, entries: list[_Entry], labels: list[int], groups: list[str], grouped: bool,
            read: Callable[[_Entry], bytes], skipped: list[Skipped], class_names: tuple[str, ...],
            make_reader: Callable[[list[_Entry]], Any]) -> LabelledImages:
    keep = _drop_duplicates(entries, read, skipped)
    entries = [entries[i] for i in keep]
    labels_arr = np.asarray([labels[i] for i in keep], dtype=np.int64)
    groupings = {"group": np.asarray([groups[i] for i in keep], dtype=object)} if grouped else {}
    if grouped:
        for group in sorted(set(groups) - set(groupings["group"])):
            skipped.append(Skipped(group, "group holds no usable images", "group", 0))
    return LabelledImages(name, labels_arr, [e.display for e in entries], groupings, skipped, class_names,
                          reader=make_reader(entries))


def _file_reader(entries: list[_Entry]) -> FileReader:
    return FileReader([e.key for e in entries])


def _read_file(entry: _Entry) -> bytes:
    return Path(entry.key).read_bytes()


def _folder_data(root: Path, class_names: tuple[str, ...], layout: str, name: str) -> LabelledImages:
    entries, folders, skipped = _folder_tree(root)
    kept, labels, groups, chosen = _from_tree(entries, folders, class_names, layout, skipped)
    return _finish(name, kept, labels, groups, chosen == "group", _read_file, skipped, class_names, _file_reader)


def _manifest_data(path: Path, class_names: tuple[str, ...], name: str) -> LabelledImages:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 CSV file") from None
    rows = _read_manifest(text, path.name)
    base = path.parent

    def resolve(item: str) -> _Entry | str:
        target = Path(item) if Path(item).is_absolute() else base / item
        if not target.is_file():
            return "listed in the manifest but not found"
        return _Entry(tuple(PurePosixPath(item).parts), target.stat().st_size, str(target.resolve()))

    skipped: list[Skipped] = []
    kept, labels, groups, grouped = _from_manifest(rows, resolve, class_names, skipped)
    return _finish(name, kept, labels, groups, grouped, _read_file, skipped, class_names, _file_reader)


def _zip_data(reader: ZipReader, class_names: tuple[str, ...], layout: str, max_files: int, max_bytes: int,
              name: str) -> LabelledImages:
    entries, folders, skipped = _zip_tree(reader, max_files, max_bytes)
    entries, folders = _strip_wrapper(entries, folders)

    def read(entry: _Entry) -> bytes:
        return reader.read_bytes(entry.key, entry.size)

    def make_reader(kept: list[_Entry]) -> ZipReader:
        return ZipReader(reader.source, [e.key for e in kept], [e.size for e in kept])

    manifests = [e for e in entries if len(e.parts) == 1 and e.parts[0].lower().endswith(".csv")]
    if len(manifests) == 1:
        manifest = manifests[0]
        try:
            text = read(manifest).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DataError(f"{manifest.display} in the zip is not a UTF-8 CSV file") from None
        rows = _read_manifest(text, manifest.display)
        by_parts = {e.parts: e for e in entries}

        def resolve(item: str) -> _Entry | str:
            unified = item.replace("\\", "/")
            parts = tuple(p for p in PurePosixPath(unified).parts if p not in ("", "."))
            if unified.startswith("/") or re.match(r"^[A-Za-z]:", unified) or ".." in parts:
                return "path leaves the zip (absolute or '..'); not read"
            return by_parts.get(parts, "listed in the manifest but not in the zip (or left out above)")

        kept, labels, groups, grouped = _from_manifest(rows, resolve, class_names, skipped)
        listed = {e.parts for e in kept}
        for entry in entries:
            if entry is not manifest and entry.parts not in listed and _is_image_name(entry.parts[-1]):
                if not any(s.item == entry.display for s in skipped):
                    skipped.append(Skipped(entry.display, "in the zip but not listed in the manifest", "file"))
    else:
        kept, labels, groups, chosen = _from_tree(entries, folders, class_names, layout, skipped)
        grouped = chosen == "group"
    return _finish(name, kept, labels, groups, grouped, read, skipped, class_names, make_reader)


def _canvas_data(source: str, model: Any) -> LabelledImages:
    """The bundled model's canvas test images (``"bundled"``: the shipped sample; ``"fashion-mnist"``: all 10,000)."""
    from patchslim import bundled

    if not bundled.is_bundled(getattr(model, "name", None)):
        raise DataError(f"--data {source} holds canvas Fashion-MNIST images labelled for "
                        f"{' and '.join(repr(n) for n in bundled.BUNDLED_MODELS)}; "
                        f"model {getattr(model, 'name', model)!r} needs a folder, a CSV manifest or a zip labelled "
                        "with its own classes")
    try:
        if source == "bundled":
            canvases, labels = bundled.load_bundled_sample()
            name = f"bundled canvas test sample ({len(labels)} images)"
        else:
            canvases, labels = bundled.canvas_test_set()
            name = f"canvas Fashion-MNIST test set ({len(labels)} images)"
    except FileNotFoundError as exc:
        raise DataNotFoundError(str(exc)) from None
    return canvas_images(canvases, labels, name, model.class_names)


# --------------------------------------------------------------------------- decoding

def brightness(image) -> float:
    """Mean intensity in [0, 1] of the pixels that are not pure black (the garment on a canvas).

    For photographs (hardly any pure-black pixel) this is the mean luminance.
    """
    gray = np.asarray(image.convert("L") if hasattr(image, "convert") else image, dtype=np.float64)
    lit = gray[gray > 0]
    return float(lit.mean() / 255.0) if lit.size else 0.0


@dataclass
class Batch:
    """Decoded images of some items.

    Attributes:
        index: ``[b]`` item indices (into the :class:`LabelledImages`).
        images: ``[k, C, H, W]`` model input of the items that decoded (``ok``).
        ok: ``[b]`` bool, which items decoded.
        brightness: ``[b]`` :func:`brightness` (NaN where not decoded).
        errors: item index -> why it could not be decoded.
    """

    index: np.ndarray
    images: torch.Tensor
    ok: np.ndarray
    brightness: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)

    def labels(self, data: LabelledImages) -> torch.Tensor:
        """``[k]`` the labels of the decoded items (those of :attr:`images`)."""
        return torch.from_numpy(data.labels[self.index[self.ok]])


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, data: LabelledImages, transform: Callable, indices: np.ndarray, shape: tuple[int, ...]):
        self.reader, self.positions, self.transform = data.reader, data.positions, transform
        self.indices, self.shape = indices, shape

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        try:
            image = self.reader(int(self.positions[i]))
            x = self.transform(image).float()
            if tuple(x.shape) != self.shape:
                raise ImageError(f"preprocessing gave shape {list(x.shape)}, expected {list(self.shape)}")
            return i, x, True, brightness(image), ""
        except Exception as exc:  # any file that cannot become model input is reported, never fatal
            return i, torch.zeros(self.shape), False, float("nan"), str(exc) or type(exc).__name__


def _collate(rows):
    index = np.asarray([r[0] for r in rows], dtype=np.int64)
    ok = np.asarray([r[2] for r in rows], dtype=bool)
    images = torch.stack([r[1] for r in rows if r[2]]) if ok.any() else torch.zeros((0,) + tuple(rows[0][1].shape))
    return Batch(index, images, ok, np.asarray([r[3] for r in rows], dtype=np.float64),
                 {r[0]: r[4] for r in rows if not r[2]})


def _canvas_batch(data: LabelledImages, indices: np.ndarray) -> Batch:
    from patchslim import bundled

    canvases = data.canvases[data.positions[indices]]
    lit = canvases > 0
    counts = lit.sum((1, 2))
    values = np.where(counts > 0, (canvases * lit).sum((1, 2)) / np.maximum(counts, 1) / 255.0, 0.0)
    return Batch(np.asarray(indices, dtype=np.int64), bundled.to_model_input(canvases),
                 np.ones(len(indices), dtype=bool), values.astype(np.float64))


def decode(data: LabelledImages, model: Any, indices: Sequence[int] | np.ndarray) -> Batch:
    """The items at ``indices`` decoded in this process, in that order (files that fail are in ``errors``)."""
    indices = np.asarray(indices, dtype=np.int64)
    if data.canvases is not None:
        return _canvas_batch(data, indices)
    dataset = _Decoded(data, model.transform, indices, tuple(model.input_size))
    return _collate([dataset[k] for k in range(len(indices))])


def iter_batches(data: LabelledImages, model: Any, start: int, stop: int, batch_size: int,
                 workers: int = 0) -> Iterator[Batch]:
    """Decoded batches of items ``start .. stop - 1`` in order, at most ``batch_size`` each.

    File images are decoded by a torch ``DataLoader`` with ``workers`` worker processes (0: in this
    process), holding at most ``2 * workers`` batches ahead; canvases are sliced from memory.
    """
    if data.canvases is not None:
        for a in range(start, stop, batch_size):
            yield _canvas_batch(data, np.arange(a, min(a + batch_size, stop)))
        return
    dataset = _Decoded(data, model.transform, np.arange(start, stop), tuple(model.input_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=max(0, workers),
                                         collate_fn=_collate, prefetch_factor=2 if workers > 0 else None,
                                         persistent_workers=False)
    yield from loader

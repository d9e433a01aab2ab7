"""Audit data: labelled (and grouped) images from a folder, a CSV manifest, a zip of either, or the canvas set.

Layouts (``ROOT`` may be a folder or a ``.zip``; a zip that wraps everything in one top folder is read from
inside it):

- ``ROOT/<class>/<image>``: one group (``all``), class folders named like the model's classes;
- ``ROOT/<group>/<class>/<image>``: subgroups, each with class folders (detected when more second-level
  than first-level folders match a class, or chosen with ``layout=``);
- a CSV manifest (``--data list.csv``, or one ``.csv`` at the top of a zip) with columns ``path,label`` and
  optionally ``group``; paths are relative to the manifest's folder;
- ``"bundled"`` / ``"fashion-mnist"``: the canvas test images of the bundled model (in memory).

Labels are matched with :func:`patchslim.evaluate.class_lookup` (the exact name, the name ignoring case and
punctuation, the class index, an ImageNet synset id); a label that matches none is reported, not guessed.

Nothing here stops on bad input: every file, folder, label or zip member left out becomes a
:class:`Skipped` entry with the reason (not an image, unknown label, empty class folder, empty group,
duplicate content, a zip member with an absolute path or ``..``, a symbolic link, or beyond the zip bomb
caps on total uncompressed size, file count and compression ratio). Zips are never extracted: members are
read into memory one at a time, each capped at its declared size, so nothing is written anywhere.
Images are decoded lazily, batch by batch (:func:`iter_batches`, a torch ``DataLoader`` with worker
processes), so memory stays bounded however many images there are; a file that fails to decode there is
reported by the runner in the same way.
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

from patchslim.errors import ImageError, PatchslimError
from patchslim.evaluate import IMAGE_SUFFIXES, class_lookup

ALL_GROUP = "all"
MAX_ZIP_FILES = 200_000
MAX_ZIP_BYTES = 8 * 1024**3  # 8 GiB uncompressed in total
MAX_MEMBER_BYTES = 50 * 1024**2  # one image, as patchslim.images accepts
MAX_RATIO = 200  # uncompressed / compressed, checked for members above RATIO_FLOOR bytes
RATIO_FLOOR = 1024**2
LAYOUTS = ("auto", "class", "group")

# Built-in groupings of the bundled model's classes (class families).
FAMILIES = {
    "tops": ("T-shirt/top", "Pullover", "Coat", "Shirt"),
    "footwear": ("Sandal", "Sneaker", "Ankle boot"),
    "others": ("Trouser", "Dress", "Bag"),
}
BUILTIN_GROUPINGS = ("brightness", "family")


@dataclass(frozen=True)
class Skipped:
    """Something the audit left out, and why.

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


@dataclass
class AuditData:
    """Labelled images to audit, with their groups; decoded only when batched.

    Attributes:
        name: where they came from, in words.
        labels: ``[n]`` class indices of the model's classes.
        items: ``[n]`` display names (relative paths, or ``test image 17``).
        groupings: grouping name -> ``[n]`` group names (``"group"`` from the folder layout or the CSV).
        skipped: everything left out, with reasons.
        class_names: the model's class names.
        reader: ``reader(item_index) -> PIL image`` (None for in-memory canvases).
        canvases: ``[n, 48, 48]`` uint8 canvases for the bundled model (None for files).
        positions: which entries of ``reader`` / ``canvases`` the items are (after :meth:`subset`).
        fingerprint: a hash of the items, labels and groups (a resumed run must see the same data).
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

    def subset(self, limit: int | None) -> "AuditData":
        """At most ``limit`` images, evenly spaced over the items (so every group and class stays in).

        Raises:
            PatchslimError: a limit below 1.
        """
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise PatchslimError(f"--limit must be at least 1, got {limit}")
        keep = np.unique(np.linspace(0, len(self) - 1, int(limit)).round().astype(np.int64))
        return replace(
            self, name=f"{self.name} ({len(keep)} of {len(self)}, evenly spaced)", labels=self.labels[keep],
            items=[self.items[i] for i in keep], groupings={k: v[keep] for k, v in self.groupings.items()},
            positions=self.positions[keep], fingerprint="",
        )


# --------------------------------------------------------------------------- trees of files

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

    def read_bytes(self, key: str) -> bytes:
        return Path(key).read_bytes()

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


def _hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _folder_tree(root: Path) -> tuple[list[_Entry], set[tuple[str, ...]], list[Skipped]]:
    """Every file under ``root`` (sorted), the folders, and hidden entries as skipped."""
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
        raise PatchslimError(f"the data is not a readable zip file ({exc})") from None
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


def _strip_wrapper(entries: list[_Entry], folders: set[tuple[str, ...]]) -> tuple[list[_Entry], set, str]:
    """Drops one top folder that wraps everything (as zips of a folder have)."""
    tops = {e.parts[0] for e in entries if len(e.parts) > 1} | {f[0] for f in folders}
    if entries and all(len(e.parts) > 1 for e in entries) and len(tops) == 1:
        top = next(iter(tops))
        return ([_Entry(e.parts[1:], e.size, e.key) for e in entries],
                {f[1:] for f in folders if len(f) > 1}, top)
    return entries, folders, ""


# --------------------------------------------------------------------------- layouts

def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _choose_layout(images: list[_Entry], folders: set[tuple[str, ...]], lookup, layout: str) -> str:
    if layout not in LAYOUTS:
        raise PatchslimError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout != "auto":
        return layout
    first = {f[0] for f in folders if len(f) >= 1} | {e.parts[0] for e in images if len(e.parts) > 1}
    second = {f[:2] for f in folders if len(f) >= 2} | {e.parts[:2] for e in images if len(e.parts) > 2}
    first_matches = sum(lookup(name) is not None for name in first)
    second_matches = sum(lookup(pair[1]) is not None for pair in second)
    return "group" if second_matches > first_matches else "class"


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
        class_folder = entry.parts[depth - 2]
        index = lookup(class_folder)
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
        skipped.append(Skipped(folder_key, f"folder name {name!r} matches none of the model's classes "
                                           f"(e.g. {', '.join(list(class_names)[:3])}, or a class index)",
                               "label", count))
    # Class folders (at the class level of the layout) that hold no image at all.
    for folder in sorted(folders):
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
        raise PatchslimError(f"{manifest_name} needs a header with columns path,label[,group]; found "
                             f"{', '.join(fields) or 'no header'}")
    rows = []
    for row in reader:
        rows.append({(k or "").strip().lower(): (v or "").strip() for k, v in row.items()})
    return rows


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
        skipped.append(Skipped(f"label {shown}", f"matches none of the model's classes "
                                                 f"(e.g. {', '.join(list(class_names)[:3])}, or a class index)",
                               "label", count))
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
    for size, same in by_size.items():
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


# --------------------------------------------------------------------------- entry points

def load_audit_data(source: str | Path | bytes, model: Any, layout: str = "auto", max_files: int = MAX_ZIP_FILES,
                    max_bytes: int = MAX_ZIP_BYTES, name: str | None = None) -> AuditData:
    """Audit data from ``"bundled"``, ``"fashion-mnist"``, a folder, a CSV manifest, a zip path or zip bytes.

    Args:
        source: where the images are (bytes: an uploaded zip).
        model: a :class:`~patchslim.models.LoadedModel` (its class names label the data).
        layout: ``"auto"``, ``"class"`` (``ROOT/<class>/<image>``) or ``"group"`` (``ROOT/<group>/<class>/<image>``).
        max_files, max_bytes: zip bomb caps (members past them are skipped and reported).
        name: how to describe the data (default: from the source).

    Raises:
        FileNotFoundError: the path does not exist.
        PatchslimError: a canvas data set for another model, an unreadable zip, a manifest without
            ``path,label`` columns, or no usable image at all (the message lists what was skipped).
    """
    if isinstance(source, str) and source in ("bundled", "fashion-mnist"):
        return canvas_audit_data(source, model)
    class_names = tuple(model.class_names)
    if isinstance(source, (bytes, bytearray)):
        reader = ZipReader(bytes(source))
        data = _zip_data(reader, class_names, layout, max_files, max_bytes, name or "uploaded zip")
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(2, "No such data folder, manifest or zip (or use bundled, fashion-mnist)",
                                    str(path))
        if path.is_dir():
            data = _folder_data(path, class_names, layout, name or f"folder {path}")
        elif path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
            data = _zip_data(ZipReader(str(path)), class_names, layout, max_files, max_bytes, name or f"zip {path}")
        elif path.suffix.lower() == ".csv":
            data = _manifest_data(path, class_names, name or f"manifest {path}")
        else:
            raise PatchslimError(f"--data {path} is neither a folder, a .csv manifest nor a .zip")
    if not len(data):
        reasons = Counter(s.reason.split(" (")[0] for s in data.skipped)
        found = "; ".join(f"{reason} ({count})" for reason, count in reasons.most_common(4))
        raise PatchslimError(
            f"no usable labelled images in {data.name}: expected ROOT/<class>/<image>, "
            f"ROOT/<group>/<class>/<image> or a CSV manifest path,label[,group], with classes named like "
            f"{getattr(model, 'name', 'the model')}'s (e.g. {', '.join(class_names[:3])})"
            + (f"; left out: {found}" if found else "")
        )
    return data


def _finish(name: str, entries: list[_Entry], labels: list[int], groups: list[str], grouped: bool,
            read: Callable[[_Entry], bytes], skipped: list[Skipped], class_names: tuple[str, ...],
            make_reader: Callable[[list[_Entry]], Any]) -> AuditData:
    keep = _drop_duplicates(entries, read, skipped)
    entries = [entries[i] for i in keep]
    labels_arr = np.asarray([labels[i] for i in keep], dtype=np.int64)
    groupings = {"group": np.asarray([groups[i] for i in keep], dtype=object)} if grouped else {}
    if grouped:
        for group in sorted(set(groups) - set(groupings["group"])):
            skipped.append(Skipped(group, "group holds no usable images", "group", 0))
    return AuditData(name, labels_arr, [e.display for e in entries], groupings, skipped, class_names,
                     reader=make_reader(entries))


def _folder_data(root: Path, class_names: tuple[str, ...], layout: str, name: str) -> AuditData:
    entries, folders, skipped = _folder_tree(root)
    kept, labels, groups, chosen = _from_tree(entries, folders, class_names, layout, skipped)
    return _finish(name, kept, labels, groups, chosen == "group", lambda e: Path(e.key).read_bytes(), skipped,
                   class_names, lambda es: FileReader([e.key for e in es]))


def _manifest_data(path: Path, class_names: tuple[str, ...], name: str) -> AuditData:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise PatchslimError(f"{path} is not a UTF-8 CSV file") from None
    rows = _read_manifest(text, path.name)
    base = path.parent

    def resolve(item: str) -> _Entry | str:
        target = Path(item) if Path(item).is_absolute() else base / item
        if not target.is_file():
            return "listed in the manifest but not found"
        return _Entry(tuple(PurePosixPath(item).parts), target.stat().st_size, str(target.resolve()))

    skipped: list[Skipped] = []
    kept, labels, groups, grouped = _from_manifest(rows, resolve, class_names, skipped)
    return _finish(name, kept, labels, groups, grouped, lambda e: Path(e.key).read_bytes(), skipped, class_names,
                   lambda es: FileReader([e.key for e in es]))


def _zip_data(reader: ZipReader, class_names: tuple[str, ...], layout: str, max_files: int, max_bytes: int,
              name: str) -> AuditData:
    entries, folders, skipped = _zip_tree(reader, max_files, max_bytes)
    entries, folders, _ = _strip_wrapper(entries, folders)

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
            raise PatchslimError(f"{manifest.display} in the zip is not a UTF-8 CSV file") from None
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


def canvas_audit_data(source: str, model: Any) -> AuditData:
    """The bundled model's canvas test images (``"bundled"``: the shipped sample; ``"fashion-mnist"``: all 10,000).

    Raises:
        PatchslimError: another model than the bundled one.
    """
    from patchslim import bundled

    if getattr(model, "name", None) != bundled.BUNDLED_NAME:
        raise PatchslimError(f"--data {source} holds canvas Fashion-MNIST images labelled for "
                             f"{bundled.BUNDLED_NAME!r}; model {getattr(model, 'name', model)!r} needs a folder, "
                             "a CSV manifest or a zip labelled with its own classes")
    if source == "bundled":
        canvases, labels = bundled.load_bundled_sample()
        name = f"bundled canvas test sample ({len(labels)} images)"
    else:
        canvases, labels = bundled.canvas_test_set()
        name = f"canvas Fashion-MNIST test set ({len(labels)} images)"
    return AuditData(name, np.asarray(labels, dtype=np.int64), [f"test image {i}" for i in range(len(labels))],
                     {}, [], tuple(model.class_names), canvases=canvases)


# --------------------------------------------------------------------------- groupings

def brightness(image) -> float:
    """Mean intensity in [0, 1] of the pixels that are not pure black (the garment on a canvas).

    For photographs (hardly any pure-black pixel) this is the mean luminance.
    """
    gray = np.asarray(image.convert("L") if hasattr(image, "convert") else image, dtype=np.float64)
    lit = gray[gray > 0]
    return float(lit.mean() / 255.0) if lit.size else 0.0


def builtin_grouping(name: str, labels: np.ndarray, brightness_values: np.ndarray,
                     class_names: Sequence[str]) -> np.ndarray:
    """Group names per image for a built-in grouping.

    - ``brightness``: ``dark`` / ``bright``, split at the median of :func:`brightness` over the audited
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


def parse_groupings(text: str | Sequence[str] | None, data: AuditData) -> list[str]:
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


# --------------------------------------------------------------------------- streaming

@dataclass
class Batch:
    """Decoded images of a run of items.

    Attributes:
        index: ``[b]`` item indices (into the :class:`AuditData`).
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


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, data: AuditData, transform: Callable, indices: np.ndarray, shape: tuple[int, ...]):
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


def iter_batches(data: AuditData, model: Any, start: int, stop: int, batch_size: int,
                 workers: int = 0) -> Iterator[Batch]:
    """Decoded batches of items ``start .. stop - 1`` in order, at most ``batch_size`` each.

    File images are decoded by a torch ``DataLoader`` with ``workers`` worker processes (0: in this
    process), holding at most ``2 * workers`` batches ahead; canvases are sliced from memory.
    """
    from patchslim import bundled

    if data.canvases is not None:
        for a in range(start, stop, batch_size):
            b = min(a + batch_size, stop)
            canvases = data.canvases[data.positions[a:b]]
            lit = canvases > 0
            counts = lit.sum((1, 2))
            values = np.where(counts > 0, (canvases * lit).sum((1, 2)) / np.maximum(counts, 1) / 255.0, 0.0)
            yield Batch(np.arange(a, b), bundled.to_model_input(canvases), np.ones(b - a, dtype=bool),
                        values.astype(np.float64))
        return
    dataset = _Decoded(data, model.transform, np.arange(start, stop), tuple(model.input_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=max(0, workers),
                                         collate_fn=_collate, prefetch_factor=2 if workers > 0 else None,
                                         persistent_workers=False)
    yield from loader

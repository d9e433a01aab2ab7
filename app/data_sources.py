"""Which labelled data on the server a web visitor may audit (the CLI and Python read any path).

The Audit page can read a folder of class folders, a CSV manifest or a zip that already sits on the server. A
visitor must not make the server read arbitrary paths, so this is off unless the operator names a data folder
(``PATCHSLIM_APP_DATA_DIR``, none by default), and then only a folder or a ``.csv`` / ``.zip`` file strictly
inside it once symlinks are followed is read (:func:`app.server_paths.resolve_inside`, the check the models folder
uses too). Anything else is refused with one sentence (:class:`DataSourceRefused`) that never names a path of the
server, not even the one typed. An uploaded zip is the visitor's own data and needs no permission.

Pure functions of a typed name and a :class:`DataPolicy`: no Streamlit here, so the rules are unit-tested alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from patchslim.errors import PatchslimError

from app import server_paths

DATA_DIR_ENV = "PATCHSLIM_APP_DATA_DIR"
FILE_KINDS = {".csv": "manifest", ".zip": "zip"}  # files the Audit page reads, besides folders
MAX_CHOICES = 200  # entries offered in the picker


class DataSourceRefused(PatchslimError):
    """Server data the app will not read for a web visitor; the message is one sentence for them."""


@dataclass(frozen=True)
class DataPolicy:
    """Where the operator lets the app's visitors audit data on the server.

    Attributes:
        data_dir: the folder audited paths must be inside (resolved), or None: no server data at all.
    """

    data_dir: Path | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "DataPolicy":
        """The policy from ``PATCHSLIM_APP_DATA_DIR`` (a folder; unset or empty: none)."""
        environ = os.environ if environ is None else environ
        folder = environ.get(DATA_DIR_ENV, "").strip()
        return cls(Path(folder).expanduser().resolve() if folder else None)

    @property
    def enabled(self) -> bool:
        return self.data_dir is not None


@dataclass(frozen=True)
class ServerData:
    """An allowed path: what to read, and how to name it to the visitor.

    Attributes:
        path: the resolved folder, manifest or zip (strictly inside the data folder).
        shown: its name for the visitor, e.g. ``folder photos`` or ``manifest sets/test.csv`` (relative to the
            data folder).
    """

    path: Path
    shown: str


def check(typed: str, policy: DataPolicy) -> ServerData:
    """The folder, manifest or zip ``typed`` names, if the visitor may audit it.

    Args:
        typed: a path relative to the data folder (what the picker offers), or an absolute path inside it.
        policy: what the operator allows.

    Raises:
        DataSourceRefused: with one sentence saying why (no path in it).
    """
    if policy.data_dir is None:
        raise DataSourceRefused("This server audits no data of its own: its operator has not configured a data "
                                f"folder ({DATA_DIR_ENV}); upload a zip instead.")
    try:
        path = server_paths.resolve_inside(policy.data_dir, typed)
    except server_paths.PathRefused as refused:
        raise DataSourceRefused({
            server_paths.EMPTY: "Pick or type the name of a folder, CSV manifest or zip in the app's data folder.",
            server_paths.DOT_DOT: "That path is refused: a name with '..' could leave the app's data folder.",
            server_paths.MISSING: "There is no such folder, CSV manifest or zip in the app's data folder.",
            server_paths.OUTSIDE: "That path is refused: it is outside the app's data folder.",
        }[refused.reason]) from None
    if path.is_dir():
        kind = "folder"
    elif path.is_file() and path.suffix.lower() in FILE_KINDS:
        kind = FILE_KINDS[path.suffix.lower()]
    else:
        raise DataSourceRefused("That path is neither a folder, a .csv manifest nor a .zip in the app's data folder.")
    return ServerData(path, f"{kind} {server_paths.shown_name(policy.data_dir, typed, path)}")


def choices(policy: DataPolicy) -> list[str]:
    """The data folder's immediate entries the page may offer: folders, ``.csv`` and ``.zip`` files that resolve
    inside it (hidden ones left out), sorted by name, at most ``MAX_CHOICES``; empty when not configured."""
    if policy.data_dir is None or not policy.data_dir.is_dir():
        return []
    found = []
    for child in sorted(policy.data_dir.iterdir(), key=lambda p: p.name):
        if child.name.startswith("."):
            continue
        try:
            check(child.name, policy)
        except DataSourceRefused:
            continue
        found.append(child.name)
        if len(found) >= MAX_CHOICES:
            break
    return found


def load(typed: str, model: Any, policy: DataPolicy, limit: int | None = None):
    """The labelled images (:func:`patchslim.data.load_labelled`, as every command reads them) of an allowed
    path, named relative to the data folder, and ``limit`` of them evenly spaced; a loading error is told with
    that name, never with the server's paths.

    Raises:
        DataSourceRefused: a path the visitor may not audit.
        DataError: nothing usable in it (the message says why).
    """
    from patchslim.data import load_labelled
    from patchslim.errors import DataError

    data = check(typed, policy)
    try:
        labelled = load_labelled(data.path, model, name=data.shown)
    except (PatchslimError, OSError) as exc:
        raise DataError(scrub(str(exc), data, policy)) from None
    return labelled.subset(limit)


def scrub(message: str, data: ServerData, policy: DataPolicy) -> str:
    """A loading error about allowed data without the server's paths (the data folder reads as ``DATA``)."""
    replacements = {str(data.path): data.shown}
    if policy.data_dir is not None:
        replacements[str(policy.data_dir)] = "DATA"
    return server_paths.scrub(message, replacements)

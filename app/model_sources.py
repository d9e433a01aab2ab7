"""Which model sources a web visitor may ask the app to load (the CLI and Python accept any).

timm names a model three ways: a registry name (``deit_small_patch16_224``), ``local-dir:/path/to/folder`` (a
folder with timm's ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``, as
``timm.models.save_for_hf`` writes it) and ``hf-hub:org/name`` (downloaded from the Hugging Face Hub). A visitor
of the app must not make the server read arbitrary paths or download from anywhere, so the app takes:

- the registry names it lists in the model picker;
- ``local-dir:NAME`` only when the operator configured a models folder (``PATCHSLIM_APP_MODELS_DIR``), and only
  for a folder strictly inside it once symlinks are followed (``Path.resolve``). ``NAME`` is a folder name
  relative to the models folder (what the picker offers), or an absolute path inside it. A name with ``..``
  is refused before anything is looked up (the check is :func:`app.server_paths.resolve_inside`, shared with
  the Audit page's server data). The app names such a model ``local-dir:NAME`` (:func:`shown_name`), never by
  its path on the server;
- ``hf-hub:org/name`` only when the operator allows downloads (``PATCHSLIM_APP_ALLOW_HUB=1``).

Anything else is refused with one sentence (:class:`ModelSourceRefused`), which never names a path of the server.
Pure functions of a name and a :class:`SourcePolicy`: no Streamlit here, so the rules are unit-tested alone.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Mapping

from patchslim.errors import PatchslimError

from app import server_paths

MODELS_DIR_ENV = "PATCHSLIM_APP_MODELS_DIR"
ALLOW_HUB_ENV = "PATCHSLIM_APP_ALLOW_HUB"

LOCAL_DIR = "local-dir"
HF_HUB = "hf-hub"
SOURCE_ALIASES = {"hf_hub": HF_HUB}  # timm's deprecated spelling, refused or allowed like hf-hub
HUB_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")  # org/name
CONFIG_FILE = "config.json"
STAMPED_FILES = (CONFIG_FILE, "model.safetensors", "pytorch_model.bin")  # what timm reads from a local-dir: folder
MAX_CHOICES = 200  # folders offered in the picker


class ModelSourceRefused(PatchslimError):
    """A model name the app will not load for a web visitor; the message is one sentence for them."""


@dataclass(frozen=True)
class SourcePolicy:
    """What the operator allows the app's visitors to load.

    Attributes:
        models_dir: the folder ``local-dir:`` names must be inside (resolved), or None: no ``local-dir:`` at all.
        allow_hub: whether ``hf-hub:`` names may be downloaded.
    """

    models_dir: Path | None = None
    allow_hub: bool = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "SourcePolicy":
        """The policy from ``PATCHSLIM_APP_MODELS_DIR`` (a folder; unset or empty: none) and
        ``PATCHSLIM_APP_ALLOW_HUB`` (``1``, ``true`` or ``yes``: allowed; anything else: not)."""
        environ = os.environ if environ is None else environ
        folder = environ.get(MODELS_DIR_ENV, "").strip()
        allow_hub = environ.get(ALLOW_HUB_ENV, "").strip().lower() in {"1", "true", "yes"}
        return cls(Path(folder).expanduser().resolve() if folder else None, allow_hub)


def source_of(name: str) -> str | None:
    """``"local-dir"``, ``"hf-hub"``, another prefix as written (lower case), or None for a plain registry name."""
    prefix, colon, _ = name.partition(":")
    if not colon:
        return None
    prefix = prefix.strip().lower()
    return SOURCE_ALIASES.get(prefix, prefix)


def check(name: str, policy: SourcePolicy, listed: Collection[str] = ()) -> str:
    """The name to hand to ``patchslim.load_model``, if the app may load ``name`` for a visitor.

    Args:
        name: what the visitor chose or typed.
        policy: what the operator allows.
        listed: the registry names the picker offers (always allowed).

    Returns:
        ``name`` itself for a listed name; ``local-dir:<resolved absolute folder>`` for an allowed local folder;
        ``hf-hub:org/name`` for an allowed Hub name.

    Raises:
        ModelSourceRefused: with one sentence saying why.
    """
    name = name.strip()
    if not name:
        raise ModelSourceRefused("Type a model source, such as local-dir:NAME or hf-hub:org/name.")
    if name in listed:
        return name
    source = source_of(name)
    rest = name.partition(":")[2].strip()
    if source == LOCAL_DIR:
        return f"{LOCAL_DIR}:{local_folder(rest, policy)}"
    if source == HF_HUB:
        return f"{HF_HUB}:{hub_repo(rest, policy)}"
    if source is not None:
        raise ModelSourceRefused(f"The app loads models named local-dir:NAME or hf-hub:org/name, not "
                                 f"{source!r} sources.")
    raise ModelSourceRefused(f"{name!r} is not one of the app's models: pick one from the list, or a "
                             "local-dir: or hf-hub: source this server allows.")


def local_folder(rest: str, policy: SourcePolicy) -> Path:
    """The resolved folder a ``local-dir:`` name points to, if it is strictly inside the models folder
    (:func:`app.server_paths.resolve_inside`) and holds a timm ``config.json``.

    Raises:
        ModelSourceRefused: no models folder configured, ``..`` in the name, a folder outside the models folder
            (directly, or through a symlink), no such folder, or a folder without ``config.json``.
    """
    if policy.models_dir is None:
        raise ModelSourceRefused("This server loads no local-dir: models: its operator has not configured a "
                                 f"models folder ({MODELS_DIR_ENV}).")
    try:
        folder = server_paths.resolve_inside(policy.models_dir, rest)
    except server_paths.PathRefused as refused:
        raise ModelSourceRefused({
            server_paths.EMPTY: "A local-dir: name needs the name of a folder in the app's models folder.",
            server_paths.DOT_DOT: f"local-dir:{rest} is refused: a name with '..' could leave the models folder.",
            server_paths.MISSING: f"local-dir:{rest} is not a folder in the app's models folder.",
            server_paths.OUTSIDE: f"local-dir:{rest} is refused: it is outside the app's models folder.",
        }[refused.reason]) from None
    if not folder.is_dir():
        raise ModelSourceRefused(f"local-dir:{rest} is not a folder in the app's models folder.")
    if not (folder / CONFIG_FILE).is_file():
        raise ModelSourceRefused(f"local-dir:{rest} is not a timm model folder: it has no {CONFIG_FILE}.")
    return folder


def shown_name(name: str, policy: SourcePolicy) -> str:
    """What the visitor sees for an allowed model name: ``local-dir:NAME`` relative to the models folder (never
    the folder's path on the server); any other name as it is.

    Raises:
        ModelSourceRefused: a ``local-dir:`` name the policy refuses (see :func:`local_folder`).
    """
    name = name.strip()
    if source_of(name) != LOCAL_DIR:
        return name
    rest = name.partition(":")[2].strip()
    folder = local_folder(rest, policy)
    return f"{LOCAL_DIR}:{server_paths.shown_name(policy.models_dir, rest, folder)}"


def folder_stamp(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """``(file, modification time in ns, size)`` of a model folder's config and weights files: part of the
    loaded model's cache key, so files replaced on disk are loaded again instead of served stale."""
    stamp = []
    for file in STAMPED_FILES:
        try:
            info = (folder / file).stat()
        except OSError:  # absent (a folder has one weights format, not both)
            continue
        stamp.append((file, info.st_mtime_ns, info.st_size))
    return tuple(stamp)


def hub_repo(rest: str, policy: SourcePolicy) -> str:
    """The ``org/name`` of an ``hf-hub:`` name, if the operator allows Hub downloads.

    Raises:
        ModelSourceRefused: Hub downloads not allowed, or a name that is not ``org/name``.
    """
    if not policy.allow_hub:
        raise ModelSourceRefused("This server does not download models from the Hugging Face Hub: its operator "
                                 f"has not allowed it ({ALLOW_HUB_ENV}=1).")
    if not HUB_REPO.fullmatch(rest) or ".." in rest:
        raise ModelSourceRefused(f"hf-hub:{rest} is not a Hub model name: write hf-hub:org/name.")
    return rest


def local_choices(policy: SourcePolicy) -> list[str]:
    """``local-dir:NAME`` for each folder of the models folder that holds a timm ``config.json`` and resolves
    inside it (sorted by name, at most ``MAX_CHOICES``); empty when no models folder is configured or it is
    missing."""
    if policy.models_dir is None or not policy.models_dir.is_dir():
        return []
    choices = []
    for child in sorted(policy.models_dir.iterdir(), key=lambda p: p.name):
        name = f"{LOCAL_DIR}:{child.name}"
        try:
            local_folder(child.name, policy)  # inside, once resolved, with a config.json
        except ModelSourceRefused:
            continue
        choices.append(name)
        if len(choices) >= MAX_CHOICES:
            break
    return choices

"""The one check behind every path a web visitor may name on the server: strictly inside a folder the operator chose.

The app lets a visitor name two kinds of things on the server: a model folder (``local-dir:NAME`` inside
``PATCHSLIM_APP_MODELS_DIR``, :mod:`app.model_sources`) and labelled data for an audit (inside
``PATCHSLIM_APP_DATA_DIR``, :mod:`app.data_sources`). Both go through :func:`resolve_inside`, so the rules are
written once: no ``..``, symlinks followed (``Path.resolve``) before the containment test, the folder itself
refused (strictly inside), a missing path or a symlink loop refused. Each caller turns the
:class:`PathRefused` reason into its own sentence, which never names a path of the server.
"""

from __future__ import annotations

from pathlib import Path, PurePath

EMPTY = "empty"  # nothing typed, or a NUL byte
DOT_DOT = "dot-dot"  # a '..' part, refused before anything is looked up
MISSING = "missing"  # no such path, a symlink loop, or unreadable
OUTSIDE = "outside"  # resolves to the folder itself or outside it


class PathRefused(Exception):
    """A typed path that is not strictly inside the configured folder; ``reason`` is one of the constants above."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def resolve_inside(root: Path, typed: str) -> Path:
    """The resolved path ``typed`` names, if it is strictly inside ``root`` once symlinks are followed.

    Args:
        root: the operator's folder.
        typed: a path relative to ``root``, or an absolute path (which must then lie inside ``root``).

    Returns:
        The resolved absolute path (a folder or a file; the caller checks which it wants).

    Raises:
        PathRefused: with the reason (:data:`EMPTY`, :data:`DOT_DOT`, :data:`MISSING`, :data:`OUTSIDE`).
    """
    typed = typed.strip()
    if not typed or "\x00" in typed:
        raise PathRefused(EMPTY)
    if ".." in PurePath(typed).parts:
        raise PathRefused(DOT_DOT)
    root = root.resolve()
    candidate = Path(typed) if Path(typed).is_absolute() else root / typed
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a symlink loop, or unreadable
        raise PathRefused(MISSING) from None
    if root not in resolved.parents:
        raise PathRefused(OUTSIDE)
    return resolved


def shown_name(root: Path, typed: str, resolved: Path) -> str:
    """How to name an allowed path to the visitor: as typed when relative (``a/b``), else relative to ``root``;
    never the server's absolute path."""
    typed_path = PurePath(typed.strip())
    if not typed_path.is_absolute():
        return typed_path.as_posix()
    return resolved.relative_to(root.resolve()).as_posix()


def scrub(message: str, replacements: dict[str, str]) -> str:
    """``message`` with each server path in ``replacements`` replaced by what the visitor may see (longest path
    first, so a folder inside another is replaced as a whole)."""
    for path in sorted(replacements, key=len, reverse=True):
        if path:
            message = message.replace(path, replacements[path])
    return message

"""Cards of fine-tuned checkpoints: what base model, plan and data a weights file was trained from.

``python -m patchslim finetune`` writes a checkpoint ``STEM.safetensors`` and its card ``STEM.card.json`` side by
side; the same card is stored in the safetensors metadata (key ``patchslim_card``), so a renamed or moved file
still carries it. :func:`patchslim.load_model` reads the card of any weights file that has one and refuses the
file for another base model, with a message naming the model it belongs to. Fine-tuned checkpoints shipped with
patchslim live in ``patchslim/assets/finetuned/`` and are listed per base model by :func:`shipped_cards` (the
app's weights choice reads that list).

A card is plain JSON::

    {"format": "patchslim-finetuned/1", "base_model": "fashion-vit", "base_weights": "file fashion_vit.safetensors",
     "plan": {...SlimPlan.to_dict()...}, "method": "uniform", "keep_ratio": 0.3, "distill": {...} or null,
     "data": "...", "epochs": 2, "top1": {"value": 0.84, "data": "...", "n": 10000}, "command": "..."}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from patchslim.errors import WeightsError

FORMAT = "patchslim-finetuned/1"
METADATA_KEY = "patchslim_card"
CARD_SUFFIX = ".card.json"
FINETUNED_DIR = Path(__file__).resolve().parent / "assets" / "finetuned"


@dataclass(frozen=True)
class ShippedCheckpoint:
    """A fine-tuned checkpoint with its card.

    Attributes:
        path: the ``.safetensors`` file.
        card: its card (a dict, see the module docstring).
    """

    path: Path
    card: dict

    @property
    def label(self) -> str:
        """A short name for pickers: ``fine-tuned: uniform rho 0.3 + distillation (84.1 %)``."""
        card = self.card
        distill = " + distillation" if card.get("distill") else ""
        top1 = (card.get("top1") or {}).get("value")
        score = f" ({100 * top1:.1f} %)" if isinstance(top1, (int, float)) else ""
        return f"fine-tuned: {card.get('method')} rho {card.get('keep_ratio'):g}{distill}{score}"


def card_path(weights: str | Path) -> Path:
    """The sidecar card of a weights file: ``STEM.card.json`` beside ``STEM.safetensors``."""
    weights = Path(weights)
    return weights.with_name(weights.stem + CARD_SUFFIX)


def read_card(weights: str | Path) -> dict | None:
    """The card of a weights file (from its safetensors metadata, else its sidecar file), or None.

    Raises:
        WeightsError: a card that is there but is not valid JSON or not a patchslim card.
    """
    weights = Path(weights)
    raw = None
    if weights.suffix == ".safetensors" and weights.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt", device="cpu") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
        except Exception:  # an unreadable file is reported by the loader itself
            raw = None
    sidecar = card_path(weights)
    if raw is None and sidecar.is_file():
        raw = sidecar.read_text(encoding="utf-8")
    if raw is None:
        return None
    try:
        card = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise WeightsError(f"the card of {weights.name} is not valid JSON ({exc.msg})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT or not isinstance(card.get("base_model"), str):
        raise WeightsError(f"the card of {weights.name} is not a patchslim fine-tuning card (format {FORMAT})")
    return card


def check_card(weights: str | Path, model_name: str) -> dict | None:
    """The card of ``weights`` when it is meant for ``model_name`` (None when the file has no card).

    Raises:
        WeightsError: the card names another base model.
    """
    card = read_card(weights)
    if card is not None and card["base_model"] != model_name:
        raise WeightsError(
            f"weights file {Path(weights).name} was fine-tuned from {card['base_model']!r} (its card says so), "
            f"not {model_name!r}: load it as load_model({card['base_model']!r}, weights=...) "
            f"(--model {card['base_model']} --weights ...)"
        )
    return card


def shipped_cards(model_name: str, folder: Path = FINETUNED_DIR) -> list[ShippedCheckpoint]:
    """The fine-tuned checkpoints in ``folder`` whose card names ``model_name`` as base model, sorted by file name.

    Cards that cannot be read, or whose weights file is missing, are left out.
    """
    found = []
    if not folder.is_dir():
        return found
    for card_file in sorted(folder.glob("*" + CARD_SUFFIX)):
        weights = card_file.with_name(card_file.name[: -len(CARD_SUFFIX)] + ".safetensors")
        if not weights.is_file():
            continue
        try:
            card = json.loads(card_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(card, dict) and card.get("format") == FORMAT and card.get("base_model") == model_name:
            found.append(ShippedCheckpoint(weights, card))
    return found

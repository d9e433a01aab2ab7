"""The learned patch-selection policy of the ``rl`` method (survey section 3.2.2, eq. 14-15): the network,
its files and what inference needs.

A small network reads the tokens entering block ``b`` of a frozen ViT and gives one keep logit per patch
token; :mod:`patchslim.policy_training` trains it with REINFORCE through the engine's forward.

Policy files are one ``.safetensors`` file: the network's tensors plus a JSON metadata record (model name and
shape, where the policy acts, how it was trained, a calibration table for the Bernoulli mode). They are read
with safetensors only, so loading never runs code.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from patchslim.errors import PlanError
from patchslim.tokens import target_count

POLICY_DIR = Path(__file__).resolve().parent / "assets" / "policies"
FORMAT = "patchslim-policy/1"
METADATA_KEY = "patchslim_policy"
CALIBRATION_RATIOS = tuple(round(0.05 * i, 2) for i in range(1, 21))


# --------------------------------------------------------------------------- the network

class PolicyNet(nn.Module):
    """Patch features -> one keep logit per patch token.

    A 2-layer MLP applied to every patch token, on ``[LayerNorm(patch), LayerNorm(CLS)]``: the token's own
    features and (optionally) the image summary the first prefix token holds at that depth.

    Args:
        embed_dim: C, the ViT's width.
        hidden: width of the hidden layer.
        use_cls: concatenate the first prefix token's features to every patch token's.
    """

    def __init__(self, embed_dim: int, hidden: int = 64, use_cls: bool = True) -> None:
        super().__init__()
        self.embed_dim, self.hidden, self.use_cls = embed_dim, hidden, use_cls
        self.norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim * (2 if use_cls else 1), hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, patches: torch.Tensor, cls: torch.Tensor | None = None) -> torch.Tensor:
        """Keep logits.

        Args:
            patches: ``[B, M, C]`` patch tokens entering the block.
            cls: ``[B, C]`` the first prefix token there (needed when ``use_cls``).

        Returns:
            ``[B, M]`` logits (higher = keep first).
        """
        h = self.norm(patches.float())
        if self.use_cls:
            if cls is None:
                raise ValueError("this policy reads the CLS token; pass cls")
            c = self.norm(cls.float()).unsqueeze(1).expand(-1, h.shape[1], -1)
            h = torch.cat([h, c], dim=-1)
        return self.fc2(F.gelu(self.fc1(h))).squeeze(-1)

    def macs_per_token(self) -> int:
        """Multiply-adds the policy spends per patch token."""
        return self.fc1.in_features * self.hidden + self.hidden


# --------------------------------------------------------------------------- files

@dataclass
class PolicyMeta:
    """What a policy file records besides its tensors.

    Attributes:
        model: name of the model it was trained for.
        arch: that model's shape facts (embed_dim, depth, num_patches, num_prefix_tokens, grid_size).
        block: it acts before this block, reading the tokens entering it (0 = the input).
        hidden, use_cls: the network's shape.
        training: how it was trained (keep ratios, lambda, sampler, steps, seed, data, ...).
        calibration: ``{"keep_ratios": [...], "offsets": [...]}``: the logit threshold that keeps, on
            average over calibration images, that share of patches (used by the Bernoulli mode).
        validation: measurements on held-out training images (accuracy vs random per keep ratio).
    """

    model: str
    arch: dict
    block: int
    hidden: int = 64
    use_cls: bool = True
    training: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    format: str = FORMAT

    def offset(self, keep_ratio: float) -> float:
        """The calibrated logit threshold for an average kept share of ``keep_ratio`` (0 if uncalibrated)."""
        ratios, offsets = self.calibration.get("keep_ratios"), self.calibration.get("offsets")
        if not ratios or not offsets:
            return 0.0
        return float(np.interp(keep_ratio, ratios, offsets))


def arch_of(model: Any) -> dict:
    """The shape facts of a :class:`~patchslim.models.LoadedModel` a policy depends on."""
    spec = model.spec
    return dict(embed_dim=spec.embed_dim, depth=spec.depth, num_patches=spec.num_patches,
                num_prefix_tokens=spec.num_prefix_tokens, grid_size=list(spec.grid_size))


def default_policy_path(model_name: str) -> Path:
    """``patchslim/assets/policies/<model>.safetensors`` (package data)."""
    safe = model_name.replace("/", "_")
    return POLICY_DIR / f"{safe}.safetensors"


def train_command(model_name: str, block: int = 1) -> str:
    """The command line that trains a policy for ``model_name``."""
    data = "fashion-mnist" if model_name == "fashion-vit" else "FOLDER"
    return (f"python -m patchslim train-policy --model {model_name} --data {data} --keep 0.3,0.5,0.7 "
            f"--blocks {block} --out {default_policy_path(model_name).relative_to(POLICY_DIR.parents[2])}")


def save_policy(path: str | Path, net: PolicyNet, meta: PolicyMeta) -> Path:
    """Writes a policy file (tensors + JSON metadata) atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(asdict(meta))})
    tmp.replace(path)
    return path


def read_policy(path: str | Path) -> tuple[PolicyNet, PolicyMeta]:
    """Reads a policy file with safetensors (no code runs).

    Raises:
        PlanError: missing, unreadable, or not a patchslim policy.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise PlanError(f"policy file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise PlanError(f"policy file {path} cannot be read: {str(exc).splitlines()[0]}") from None
    if raw is None:
        raise PlanError(f"{path} is not a patchslim policy file (no {METADATA_KEY!r} metadata)")
    try:
        record = json.loads(raw)
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}, expected {FORMAT!r}")
        meta = PolicyMeta(**record)
        net = PolicyNet(int(meta.arch["embed_dim"]), int(meta.hidden), bool(meta.use_cls))
        net.load_state_dict(tensors, strict=True)
    except Exception as exc:
        raise PlanError(f"policy file {path} is not a valid patchslim policy: {str(exc).splitlines()[0]}") from None
    net.eval().requires_grad_(False)
    return net, meta


_CACHE: dict[tuple, tuple[PolicyNet, PolicyMeta]] = {}
_CACHE_LOCK = threading.Lock()


def load_policy(path: str | Path, device: torch.device | str = "cpu") -> tuple[PolicyNet, PolicyMeta]:
    """:func:`read_policy`, cached per file version and device (policies are read only after loading)."""
    path = Path(path).resolve()
    stat = path.stat() if path.exists() else None
    key = (str(path), None if stat is None else (stat.st_mtime_ns, stat.st_size), str(device))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    net, meta = read_policy(path)
    net = net.to(device)
    with _CACHE_LOCK:
        if len(_CACHE) > 16:
            _CACHE.clear()
        _CACHE[key] = (net, meta)
    return net, meta


def resolve_policy(model: Any, policy: str | None) -> tuple[PolicyNet, PolicyMeta, Path]:
    """The policy for ``model``: the file ``policy`` or the default path; checked against the model.

    Raises:
        PlanError: no policy (with the command that trains one), or one trained for another model.
    """
    path = Path(policy) if policy else default_policy_path(model.name)
    if not path.exists():
        if policy:
            raise PlanError(f"option 'policy' of method 'rl': file {path} does not exist")
        raise PlanError(
            f"method 'rl' needs a policy trained for model {model.name!r} and there is none at {path}. "
            f"Train one with: {train_command(model.name)}  (or pass --opt policy=PATH)"
        )
    net, meta = load_policy(path, model.device)
    if meta.model != model.name or meta.arch != arch_of(model):
        raise PlanError(
            f"policy {path} was trained for model {meta.model!r} ({_arch_words(meta.arch)}), not for "
            f"{model.name!r} ({_arch_words(arch_of(model))}); train one with: {train_command(model.name)}"
        )
    return net, meta, path


def _arch_words(arch: dict) -> str:
    return (f"width {arch.get('embed_dim')}, depth {arch.get('depth')}, {arch.get('num_patches')} patches, "
            f"{arch.get('num_prefix_tokens')} prefix tokens")


def split_tokens(tokens: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch tokens ``[B, M, C]``, first prefix token ``[B, C]``)."""
    return tokens[:, num_prefix:], tokens[:, 0]


# --------------------------------------------------------------------------- inference helpers

def policy_logits(net: PolicyNet, tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``[B, M]`` keep logits for the tokens ``[B, P + M, C]`` entering the block the policy acts at."""
    patches, cls = split_tokens(tokens, num_prefix)
    return net(patches, cls if net.use_cls else None)


@torch.no_grad()
def calibrate(net: PolicyNet, features: list[tuple[torch.Tensor, int]]) -> dict:
    """The Bernoulli-mode thresholds: for each keep ratio, the mean logit halfway between the k-th and
    (k+1)-th largest logit of an image, over calibration images.

    Args:
        features: batches of (tokens entering the block ``[B, P + M, C]``, P).
    """
    all_logits = torch.cat([policy_logits(net, t, p).float().cpu() for t, p in features])
    sorted_logits = all_logits.sort(dim=1, descending=True).values
    m = sorted_logits.shape[1]
    offsets = []
    for ratio in CALIBRATION_RATIOS:
        k = target_count(ratio, m)
        if k >= m:
            offsets.append(float(sorted_logits[:, -1].mean() - 1.0))
        else:
            offsets.append(float(((sorted_logits[:, k - 1] + sorted_logits[:, k]) / 2).mean()))
    # A threshold must not grow as the keep ratio grows.
    offsets = np.minimum.accumulate(np.asarray(offsets)).tolist()
    return dict(keep_ratios=list(CALIBRATION_RATIOS), offsets=offsets)

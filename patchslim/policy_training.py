"""Training the ``rl`` policy with REINFORCE (Williams 1992; survey eq. 14-15), through the engine's forward.

The policy (:class:`patchslim.policy.PolicyNet`) reads the tokens entering block ``b`` of a frozen ViT and
gives one keep logit per patch token. It is trained with REINFORCE (Williams 1992; survey eq. 15)::

    grad J = E_pi [ (R - baseline) * grad log pi(P' | I) ],   R = lambda * Accuracy - (1 - lambda) * Cost  (eq. 14)

where Cost is the kept share of the patches. Two ways of drawing a selection P' are offered:

- ``topk`` (default): k = round(rho * N) patches drawn *without replacement* from the softmax of the logits
  (Plackett-Luce; drawn with the Gumbel-top-k trick). ``log pi`` is the log-probability of the ordered draw,
  a valid REINFORCE estimator for a reward that only depends on the set. It trains exactly what inference
  uses (top-k of the logits for a fixed rho). The cost term is the same for every draw of one step, so with a
  baseline it cancels: lambda then only scales the step size. Several keep ratios can be trained at once
  (one drawn per step), so one policy ranks patches well at every rho.
- ``bernoulli``: every patch is kept with probability sigmoid(logit); the kept share varies per draw and the
  cost term of eq. 14 is what keeps the policy from keeping everything (lambda sets the trade-off). Dropped
  tokens are masked out of attention as keys, which for a CLS-token model gives exactly the logits of
  dropping them.

Variance reduction: several draws per image and a leave-one-out baseline (the mean reward of the image's
other draws). The accuracy term is by default the probability the slimmed model gives the true class (a
smooth surrogate of top-1 with far less variance than 0/1 correctness); ``accuracy_signal="correct"`` uses
0/1 top-1 as printed in eq. 14.

One training step is one forward of the engine (:func:`patchslim.run` with a
:class:`~patchslim.plan.KeepSet`): the policy scores the tokens entering its block inside the forward, S keep
sets per image are drawn, and the rest of the frozen ViT runs once on the S x B slimmed token sets. So the
policy is trained through exactly the walk it is deployed in.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from patchslim.engine import run, tokens_before
from patchslim.errors import PatchslimError
from patchslim.plan import KeepSet, SlimPlan
from patchslim.policy import PolicyMeta, PolicyNet, arch_of, calibrate, policy_logits, save_policy
from patchslim.tokens import target_count, top_k_index


# --------------------------------------------------------------------------- the one forward, with a keep set

def keep_set_forward(model: Any, images: torch.Tensor, block: int, keep: Any, grad: bool = False):
    """The engine's forward with a given keep set before ``block``: how the policy is trained and validated.

    The same walk as :func:`patchslim.run` with the ``rl`` method, so a policy is trained through the forward
    it is deployed in. Given the keep set that ``rl`` picks in top-k mode, the logits are those of ``run``.

    Args:
        keep: what :class:`patchslim.plan.KeepSet` takes (positions, a mask, or a callable of the tokens).

    Returns:
        The :class:`~patchslim.trace.Trace`.
    """
    return run(model, images, SlimPlan((KeepSet(block, keep),)), grad=grad)


# --------------------------------------------------------------------------- sampling and log-probabilities

def gumbel_topk(logits: torch.Tensor, k: int, samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Plackett-Luce draws of ``k`` of the M items without replacement (Gumbel-top-k).

    Args:
        logits: ``[B, M]``.
    Returns:
        ``[S, B, k]`` item indices in draw order.
    """
    u = torch.rand((samples, *logits.shape), generator=generator, device="cpu").to(logits.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-10)))
    return torch.topk(logits.detach().unsqueeze(0) + gumbel, k, dim=-1).indices


def plackett_luce_log_prob(logits: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """log-probability of drawing ``order`` (``[S, B, k]``) without replacement from softmax(``logits`` ``[B, M]``).

    ``sum_j [ s_{o_j} - logsumexp(s over items not drawn before step j) ]``. Returns ``[S, B]``.
    """
    s, b, k = order.shape
    m = logits.shape[1]
    expanded = logits.unsqueeze(0).expand(s, -1, -1)
    picked = expanded.gather(2, order)  # [S, B, k]
    rank = torch.full((s, b, m), k, dtype=torch.long, device=logits.device)
    rank.scatter_(2, order, torch.arange(k, device=logits.device).expand(s, b, -1))
    steps = torch.arange(k, device=logits.device).view(1, 1, k, 1)
    available = rank.unsqueeze(2) >= steps  # [S, B, k, M]
    masked = expanded.unsqueeze(2).masked_fill(~available, float("-inf"))
    return (picked - torch.logsumexp(masked, dim=-1)).sum(-1)


def bernoulli_sample(logits: torch.Tensor, samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[S, B, M]`` bool keep decisions drawn with probability sigmoid(logits); at least one kept per draw."""
    u = torch.rand((samples, *logits.shape), generator=generator, device="cpu").to(logits.device)
    keep = u < torch.sigmoid(logits.detach()).unsqueeze(0)
    none = ~keep.any(-1)
    if none.any():
        best = logits.detach().argmax(-1).unsqueeze(0).expand(samples, -1)
        keep[none] = F.one_hot(best[none], logits.shape[1]).bool()
    return keep


def bernoulli_log_prob(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log-probability of the decisions ``keep`` (``[S, B, M]``) under Bernoulli(sigmoid(logits)): ``[S, B]``."""
    lp = torch.where(keep, F.logsigmoid(logits).unsqueeze(0), F.logsigmoid(-logits).unsqueeze(0))
    return lp.sum(-1)


def reinforce_loss(log_prob: torch.Tensor, reward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The REINFORCE surrogate loss of eq. 15 with a leave-one-out baseline.

    Args:
        log_prob: ``[S, B]`` log pi of each draw (with gradient).
        reward: ``[S, B]`` rewards (no gradient); S >= 2 draws per image.

    Returns:
        (loss whose gradient is ``-mean((R - baseline) grad log pi)``, advantages ``[S, B]``)
    """
    s = reward.shape[0]
    if s < 2:
        baseline = reward.mean(dim=1, keepdim=True).expand_as(reward)  # batch mean
    else:
        baseline = (reward.sum(0, keepdim=True) - reward) / (s - 1)
    advantage = (reward - baseline).detach()
    return -(advantage * log_prob).mean(), advantage


# --------------------------------------------------------------------------- training

@dataclass
class TrainConfig:
    """Settings of one policy training run (everything that must match to resume a checkpoint)."""

    model: str
    block: int = 1
    keep_ratios: tuple[float, ...] = (0.5,)
    lam: float = 0.9
    sampler: str = "topk"
    accuracy_signal: str = "prob"
    steps: int = 1000
    batch_size: int = 64
    samples: int = 4
    lr: float = 2e-3
    hidden: int = 64
    use_cls: bool = True
    seed: int = 0
    data: str = "fashion-mnist"

    def __post_init__(self) -> None:
        self.keep_ratios = tuple(float(r) for r in self.keep_ratios)
        for r in self.keep_ratios:
            if not 0.0 < r <= 1.0:
                raise PatchslimError(f"--keep must be in (0, 1], got {r}")
        if not 0.0 <= self.lam <= 1.0:
            raise PatchslimError(f"--lambda must be in [0, 1], got {self.lam}")
        if self.sampler not in ("topk", "bernoulli"):
            raise PatchslimError(f"--sampler must be topk or bernoulli, got {self.sampler!r}")
        if self.accuracy_signal not in ("prob", "correct"):
            raise PatchslimError(f"--accuracy-signal must be prob or correct, got {self.accuracy_signal!r}")
        if self.samples < 2:
            raise PatchslimError(f"--samples must be at least 2 (the baseline needs other draws), got {self.samples}")
        if self.steps < 1 or self.batch_size < 1:
            raise PatchslimError("--steps and --batch-size must be at least 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep_ratios"] = list(self.keep_ratios)
        return d


BatchFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainState:
    """What a checkpoint holds: the network, the optimizer and the step reached."""

    net: PolicyNet
    optimizer: torch.optim.Optimizer
    step: int = 0
    history: list[dict] = field(default_factory=list)


def new_train_state(config: TrainConfig, model: Any) -> TrainState:
    net = PolicyNet(model.spec.embed_dim, config.hidden, config.use_cls)
    init_policy(net, torch.Generator().manual_seed(config.seed))
    net = net.to(model.device)
    if config.sampler == "bernoulli":  # start near the mean keep ratio asked for
        rho = min(max(float(np.mean(config.keep_ratios)), 0.02), 0.98)
        with torch.no_grad():
            net.fc2.bias.fill_(math.log(rho / (1 - rho)))
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    return TrainState(net, optimizer)


@torch.no_grad()
def init_policy(net: PolicyNet, generator: torch.Generator) -> None:
    """PyTorch's default ``nn.Linear`` initialization (uniform in +-1/sqrt(fan_in)) drawn from ``generator``,
    so training is reproducible without touching the global random state."""
    for layer in (net.fc1, net.fc2):
        bound = 1.0 / math.sqrt(layer.in_features)
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
        layer.bias.copy_(torch.rand(layer.bias.shape, generator=generator) * 2 * bound - bound)


def save_checkpoint(path: str | Path, state: TrainState, config: TrainConfig) -> None:
    """Writes a resumable checkpoint (tensors and plain data only, so it loads with ``weights_only``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(dict(net=state.net.state_dict(), optimizer=state.optimizer.state_dict(), step=state.step,
                    config=json.dumps(config.to_dict()), history=json.dumps(state.history)), tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, config: TrainConfig, model: Any) -> TrainState:
    """Resumes from a checkpoint written by the same configuration.

    Raises:
        PatchslimError: the checkpoint belongs to a different configuration (says which setting differs).
    """
    record = torch.load(Path(path), map_location="cpu", weights_only=True)
    saved = json.loads(record["config"])
    current = config.to_dict()
    differ = [k for k in current if k != "steps" and saved.get(k) != current[k]]
    if differ:
        key = differ[0]
        raise PatchslimError(
            f"checkpoint {path} was written by a run with {key}={saved.get(key)!r} (now {current[key]!r}); "
            "rerun with the same settings to resume, or pass --restart to start over"
        )
    state = new_train_state(config, model)
    state.net.load_state_dict(record["net"])
    state.optimizer.load_state_dict(record["optimizer"])
    state.step = int(record["step"])
    state.history = json.loads(record["history"])
    return state


def train_step(state: TrainState, config: TrainConfig, model: Any, images: torch.Tensor, labels: torch.Tensor,
               step: int) -> dict:
    """One REINFORCE update on a batch. Returns the step's statistics.

    One forward of the engine: the policy scores the tokens entering its block (with gradient), S keep sets
    per image are drawn from it, and the rest of the frozen ViT runs on the S x B slimmed token sets.
    """
    p = model.spec.num_prefix_tokens
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    images, labels = images.to(model.device), labels.to(model.device)
    s = config.samples
    rho = config.keep_ratios[step % len(config.keep_ratios)]
    drawn: dict[str, torch.Tensor] = {}

    def draw(tokens_state) -> torch.Tensor:
        logits = policy_logits(state.net, tokens_state.tokens, p)  # [B, M] with gradient
        drawn["logits"] = logits
        b, m = logits.shape
        if config.sampler == "topk":
            order = gumbel_topk(logits, target_count(rho, m), s, generator)  # [S, B, k]
            drawn["order"] = order
            return order.sort(-1).values.reshape(s * b, -1)
        keep = bernoulli_sample(logits, s, generator)  # [S, B, M]
        drawn["keep"] = keep
        return keep.reshape(s * b, m)

    out = keep_set_forward(model, images, config.block, draw, grad=True).logits.detach()
    logits = drawn["logits"]
    b, m = logits.shape
    with torch.no_grad():
        if config.sampler == "topk":
            cost = torch.full((s, b), drawn["order"].shape[-1] / m, device=logits.device)
        else:
            cost = drawn["keep"].float().mean(-1)
        y = labels.repeat(s)
        correct = (out.argmax(-1) == y).float()
        if config.accuracy_signal == "prob":
            accuracy = out.float().softmax(-1).gather(1, y[:, None]).squeeze(1)
        else:
            accuracy = correct
        reward = config.lam * accuracy.view(s, b) - (1 - config.lam) * cost
    log_prob = (plackett_luce_log_prob(logits, drawn["order"]) if config.sampler == "topk"
                else bernoulli_log_prob(logits, drawn["keep"]))
    loss, _ = reinforce_loss(log_prob, reward)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    return dict(step=step + 1, rho=rho, reward=float(reward.mean()), top1=float(correct.mean()),
                kept=float(cost.mean()))


@torch.no_grad()
def validate(net: PolicyNet | None, model: Any, block: int, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
             keep_ratios: tuple[float, ...], seed: int = 0) -> dict:
    """Top-1 of top-k selection by the policy, and by a seeded random choice at the same block.

    Returns:
        ``{"n": ..., "policy": {rho: acc}, "random": {rho: acc}, "unslimmed": acc}`` (rho as strings).
    """
    p = model.spec.num_prefix_tokens
    generator = torch.Generator().manual_seed(seed)
    hits = {"policy": {r: 0 for r in keep_ratios}, "random": {r: 0 for r in keep_ratios}}
    full, n = 0, 0
    for images, labels in batches:
        images, labels = images.to(model.device), labels.to(model.device)
        full += int((run(model, images).logits.argmax(-1) == labels).sum())
        m = model.spec.num_patches
        random_scores = torch.rand(images.shape[0], m, generator=generator).to(images.device)
        for r in keep_ratios:
            k = target_count(r, m)
            choices = {"random": lambda st, k=k: top_k_index(random_scores, k)}
            if net is not None:
                choices["policy"] = lambda st, k=k: top_k_index(policy_logits(net, st.tokens, p).float(), k)
            for name, choose in choices.items():
                out = keep_set_forward(model, images, block, choose).logits
                hits[name][r] += int((out.argmax(-1) == labels).sum())
        n += len(labels)
    return dict(n=n, unslimmed=full / max(n, 1),
                **{name: {f"{r:g}": h / max(n, 1) for r, h in d.items()} for name, d in hits.items()})


def train_policy(model: Any, config: TrainConfig, batch_fn: BatchFn, out: str | Path,
                 checkpoint: str | Path | None = None, restart: bool = False,
                 validation: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                 calibration: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                 checkpoint_every: int = 50, progress: bool = True, log: Callable[[str], None] | None = None,
                 ) -> tuple[PolicyNet, PolicyMeta]:
    """Trains a policy with REINFORCE, resumably, and writes the policy file.

    Args:
        model: the frozen :class:`~patchslim.models.LoadedModel`.
        config: the run's settings.
        batch_fn: ``step -> (images [B, C, H, W], labels [B])``, deterministic in ``step`` so a resumed run
            sees the same data.
        out: where the policy file goes.
        checkpoint: resumable checkpoint path (default: ``out`` + ``.ckpt.pt``).
        restart: ignore an existing checkpoint.
        validation: yields held-out (images, labels) batches; measured at the end (policy vs random).
        calibration: yields (images, labels) batches for the Bernoulli-mode thresholds (default: validation).
    """
    from tqdm.auto import tqdm

    if not 0 <= config.block < model.spec.depth:
        raise PatchslimError(f"--blocks must be a block index in 0..{model.spec.depth - 1}, got {config.block}")
    out = Path(out)
    checkpoint = Path(checkpoint) if checkpoint else out.with_name(out.name + ".ckpt.pt")
    if checkpoint.exists() and not restart:
        state = load_checkpoint(checkpoint, config, model)
        if log:
            log(f"resumed from {checkpoint} at step {state.step}")
    else:
        state = new_train_state(config, model)
    state.net.train()
    t0 = time.time()
    bar = tqdm(total=config.steps, initial=min(state.step, config.steps), disable=not progress,
               desc="train-policy", unit="step")
    running: dict[str, float] = {}
    while state.step < config.steps:
        images, labels = batch_fn(state.step)
        stats = train_step(state, config, model, images, labels, state.step)
        state.step += 1
        for key in ("reward", "top1", "kept"):
            running[key] = stats[key] if key not in running else 0.95 * running[key] + 0.05 * stats[key]
        bar.update(1)
        bar.set_postfix(reward=f"{running['reward']:.3f}", top1=f"{running['top1']:.3f}",
                        kept=f"{running['kept']:.2f}")
        if state.step % 25 == 0:
            state.history.append(dict(step=state.step, **{k: round(v, 4) for k, v in running.items()}))
            if log:
                log(json.dumps(state.history[-1]))
        if state.step % checkpoint_every == 0 or state.step == config.steps:
            save_checkpoint(checkpoint, state, config)
    bar.close()
    net = state.net.eval()

    validation_record: dict = {}
    if validation is not None:
        ratios = tuple(sorted(set(config.keep_ratios) | {0.3, 0.5, 0.7}))
        validation_record = validate(net, model, config.block, validation(), ratios, seed=config.seed)
        if log:
            log("validation (held-out training images): " + json.dumps(validation_record))
    calib_source = calibration or validation
    calib: dict = {}
    if calib_source is not None:
        feats = [(tokens_before(model, x.to(model.device), config.block).tokens, model.spec.num_prefix_tokens)
                 for x, _ in calib_source()]
        calib = calibrate(net, feats)
    meta = PolicyMeta(
        model=model.name, arch=arch_of(model), block=config.block, hidden=config.hidden, use_cls=config.use_cls,
        training=dict(config.to_dict(), seconds_this_run=round(time.time() - t0, 1),
                      weights=model.weights_name, history=state.history[-8:], torch=torch.__version__),
        calibration=calib, validation=validation_record,
    )
    save_policy(out, net, meta)
    return net, meta

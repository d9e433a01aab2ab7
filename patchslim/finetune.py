"""Fine-tuning a model with its slimming plan active, with optional distillation from the unslimmed model.

Training-free slimming shows a model token sets it never saw in training; the training-based methods of the
survey (DynamicViT, EViT and the others of its section 3.2) fine-tune the model under the slimming it will run
with. This module does that for any plan patchslim runs, through the engine's one forward
(:func:`patchslim.engine.run` with ``grad=True``), so the model is trained through exactly the walk it is
deployed in.

**Which tokens the model trains on.** For a *selection* plan on a ViT (every stage keeps some of the current
tokens before a block, with a count the plan fixes: ``uniform``, ``grid``, ``random``, ``attention``, ``entropy``
by rho, ``rl``), each step first runs the plan at inference (no gradient, the current weights) and reads the
patches it kept, then trains through keep-set stages (:class:`patchslim.plan.KeepSet`, the engine's keep-set
primitive) that keep exactly those patches: the kept set per image is the one inference picks, and no gradient
flows through the scoring. ``random`` draws a new set at every step (the plan's seed is the run's seed and the
step). Merging and fusing plans (``tome``, ``evit``, ...), plans whose count depends on the image, and windowed
models (Swin, where a keep set does not apply: a token that sits out a block comes back for the next) are
trained through the plan itself with ``grad=True``, in eval mode (no dropout or drop-path: timm's Swin has
drop-path 0.1 by default), so that forward picks what inference picks for the same weights (a test checks it on
Swin).

**Loss** (:func:`finetune_loss`)::

    L = CE(student(x), y) + lambda * T^2 * KL( softmax(teacher(x) / T) || softmax(student(x) / T) )

the second term only with ``distill``; the teacher is the unslimmed model as loaded (frozen). Defaults follow
the DynamicViT recipe (Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token
Sparsification", NeurIPS 2021, section 3.4 and its released training settings): the KL divergence between the
slimmed model's and the unslimmed teacher's predictions is weighted lambda_KL = 0.5 and taken between the plain
softmaxes, i.e. temperature T = 1. (DynamicViT also distils the kept tokens' final features and adds a
keep-ratio loss for its learned predictor; neither applies to a fixed plan, so only the logit term is kept, as
EViT does.) The T^2 factor (Hinton et al. 2015) keeps the gradient scale when another temperature is chosen.

**Resumable and seeded.** Batches are a function of the step (:data:`BatchFn`), the learning rate a function of
the step (linear warm-up, cosine decay), and a checkpoint with the optimizer state is written every
``checkpoint_every`` steps and at every epoch end; rerunning the same command continues from it, and gives the
weights an uninterrupted run gives (a test checks it).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from patchslim.cards import CARD_SUFFIX, FORMAT, METADATA_KEY, card_path
from patchslim.engine import check_plan, run
from patchslim.errors import PatchslimError, PlanError
from patchslim.plan import KeepSet, SlimPlan, Stage

DEFAULT_TEMPERATURE = 1.0  # DynamicViT: KL between the plain softmaxes
DEFAULT_DISTILL_WEIGHT = 0.5  # DynamicViT's lambda_KL
TRAINABLE_PRECISIONS = ("fp32", "bf16")

BatchFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
Batches = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]


# --------------------------------------------------------------------------- loss

def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    Args:
        student_logits, teacher_logits: ``[B, classes]``.
    """
    t = float(temperature)
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * (t * t)


def finetune_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                  temperature: float = DEFAULT_TEMPERATURE,
                  distill_weight: float = DEFAULT_DISTILL_WEIGHT) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy, plus the weighted distillation term when teacher logits are given (module docstring).

    Args:
        student_logits: ``[B, classes]`` of the slimmed model being trained.
        labels: ``[B]`` class indices.
        teacher_logits: ``[B, classes]`` of the unslimmed teacher, or None (plain fine-tuning).

    Returns:
        (the loss, ``{"ce": ..., "kl": ...}`` as floats; kl is 0 without a teacher)
    """
    ce = F.cross_entropy(student_logits.float(), labels)
    if teacher_logits is None:
        return ce, dict(ce=float(ce.detach()), kl=0.0)
    kl = distillation_kl(student_logits, teacher_logits, temperature)
    return ce + distill_weight * kl, dict(ce=float(ce.detach()), kl=float(kl.detach()))


# --------------------------------------------------------------------------- the kept set of inference

def selects_by_keep_set(model: Any, plan: SlimPlan) -> bool:
    """Whether fine-tuning replays the plan's choice through keep sets (module docstring): a ViT, and every stage
    a method that keeps a plan-fixed number of the current tokens before a block."""
    if model.spec.hierarchical or plan.is_empty:
        return False
    for stage in plan.stages:
        if not isinstance(stage, Stage):
            return False
        method = stage.slim_method
        if method.point != "pre" or method.merges or method.adaptive_reason(dict(stage.options)) is not None:
            return False
    return True


def _keep_ids(ids: torch.Tensor) -> Callable:
    """A keep set (a callable of the tokens) that keeps the tokens standing for patch ``ids`` (``[B, K]``)."""

    def choose(state) -> torch.Tensor:
        current = state.provenance.ids  # [B, M] patch ids of the tokens entering the block, in their order
        return (current.unsqueeze(2) == ids.unsqueeze(1)).int().argmax(1)

    return choose


def inference_keep_sets(model: Any, images: torch.Tensor, plan: SlimPlan) -> SlimPlan:
    """The keep-set plan that keeps, per image, what ``plan`` keeps at inference with the current weights.

    One keep set per action of the plan, at its block, keeping the patches the action kept (read from the
    inference trace's provenance).

    Raises:
        PlanError: a plan :func:`selects_by_keep_set` does not accept.
    """
    if not selects_by_keep_set(model, plan):
        raise PlanError("this plan merges, fuses or keeps an image-dependent count: fine-tune it through the plan")
    trace = run(model, images, plan)
    stages = []
    for i, record in enumerate(trace.stages):
        following = trace.stages[i + 1] if i + 1 < len(trace.stages) else None
        if following is not None and following.block == record.block:
            kept = following.provenance_before.ids
        else:
            kept = trace.blocks[record.block].provenance.ids
        stages.append(KeepSet(record.block, _keep_ids(kept.clone())))
    return SlimPlan(tuple(stages), seed=plan.seed)


def with_seed(plan: SlimPlan, seed: int) -> SlimPlan:
    """The same plan with another seed (what random methods draw from)."""
    return SlimPlan(plan.stages, plan.attention_blocks, seed)


# --------------------------------------------------------------------------- the model being trained

def trainable_copy(model: Any) -> Any:
    """A :class:`~patchslim.models.LoadedModel` whose timm module is a deep copy with gradients on (the loaded
    model, shared with the teacher, is left untouched)."""
    adapter = copy.deepcopy(model.adapter)  # copies the module with it (the adapter reads its blocks)
    module = adapter.module
    module.requires_grad_(True).train()
    return dataclasses.replace(model, model=module, adapter=adapter)


def check_trainable(model: Any) -> None:
    """Refuses a model fine-tuning cannot train.

    Raises:
        PatchslimError: a precision other than fp32 / bf16 (int8 layers give no gradient).
    """
    precision = getattr(model, "precision", "fp32")
    if precision not in TRAINABLE_PRECISIONS:
        raise PatchslimError(f"fine-tuning needs a model in {' or '.join(TRAINABLE_PRECISIONS)}; {model.name} is "
                             f"loaded in {precision}, whose layers give no gradient: load it with --precision fp32")


# --------------------------------------------------------------------------- training

@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (everything that must match to resume a checkpoint)."""

    model: str
    base_weights: str
    plan: dict
    method: str
    keep_ratio: float
    epochs: float
    steps_per_epoch: int
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup: float = 0.05
    distill: bool = False
    temperature: float = DEFAULT_TEMPERATURE
    distill_weight: float = DEFAULT_DISTILL_WEIGHT
    seed: int = 0
    data: str = ""

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.steps_per_epoch < 1 or self.batch_size < 1:
            raise PatchslimError("--epochs must be positive and --batch-size at least 1")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.warmup < 1:
            raise PatchslimError("--lr must be positive, --weight-decay >= 0 and --warmup in [0, 1)")
        if self.temperature <= 0 or self.distill_weight < 0:
            raise PatchslimError("--temperature must be positive and --distill-weight >= 0")

    @property
    def steps(self) -> int:
        return max(1, round(self.epochs * self.steps_per_epoch))

    def learning_rate(self, step: int) -> float:
        """Linear warm-up over the first ``warmup`` share of the steps, then cosine decay to 0."""
        total = self.steps
        warm = max(1, round(self.warmup * total)) if self.warmup > 0 else 0
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinetuneState:
    """What a checkpoint holds: the model's weights, the optimizer, the step reached and the records."""

    student: Any
    optimizer: torch.optim.Optimizer
    step: int = 0
    history: list[dict] = field(default_factory=list)
    running: dict = field(default_factory=lambda: dict(loss=0.0, ce=0.0, kl=0.0, correct=0, seen=0))


def new_state(model: Any, config: FinetuneConfig) -> FinetuneState:
    student = trainable_copy(model)
    decay = [p for n, p in student.model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in student.model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=config.weight_decay),
                                   dict(params=no_decay, weight_decay=0.0)], lr=config.lr)
    return FinetuneState(student, optimizer)


def save_checkpoint(path: Path, state: FinetuneState, config: FinetuneConfig) -> None:
    """Writes a resumable checkpoint (tensors and plain data only, read back with ``weights_only``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(dict(model=state.student.model.state_dict(), optimizer=state.optimizer.state_dict(),
                    step=state.step, config=json.dumps(config.to_dict()), history=json.dumps(state.history),
                    running=json.dumps(state.running)), tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, config: FinetuneConfig, model: Any) -> FinetuneState:
    """Resumes from a checkpoint of the same configuration.

    Raises:
        PatchslimError: the checkpoint belongs to another configuration (says which setting differs).
    """
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(record["config"])
    except Exception as exc:
        raise PatchslimError(f"checkpoint {path} cannot be read ({str(exc).splitlines()[0]}); pass --restart to "
                             "start over") from None
    current = config.to_dict()
    differ = [k for k in current if saved.get(k) != current[k]]
    if differ:
        key = differ[0]
        raise PatchslimError(f"checkpoint {path} was written by a run with {key}={saved.get(key)!r} (now "
                             f"{current[key]!r}); rerun with the same settings to resume, or pass --restart to "
                             "start over")
    state = new_state(model, config)
    state.student.model.load_state_dict(record["model"])
    state.optimizer.load_state_dict(record["optimizer"])
    state.step = int(record["step"])
    state.history = json.loads(record["history"])
    state.running = json.loads(record["running"])
    return state


def train_step(state: FinetuneState, config: FinetuneConfig, plan: SlimPlan, teacher: Any | None,
               images: torch.Tensor, labels: torch.Tensor, step: int) -> dict:
    """One optimizer step on a batch; returns the step's loss terms and top-1.

    The plan's seed becomes ``seed * 1000003 + step`` (random methods draw a new set per step). For a selection
    plan the kept set is the one inference picks (:func:`inference_keep_sets`); otherwise the plan runs itself.
    """
    student = state.student
    images, labels = images.to(student.device), labels.to(student.device)
    step_plan = with_seed(plan, config.seed * 1_000_003 + step)
    replay = selects_by_keep_set(student, step_plan)
    student.model.eval()  # the choice of inference: no dropout, no drop-path
    if replay:
        step_plan = inference_keep_sets(student, images, step_plan)
        student.model.train()  # the kept set is fixed: dropout and drop-path may act in the training forward
    # else the plan chooses inside the training forward, which stays in eval mode so it chooses as inference does
    teacher_logits = run(teacher, images).logits if teacher is not None else None
    for group in state.optimizer.param_groups:
        group["lr"] = config.learning_rate(step)
    trace = run(student, images, step_plan, grad=True)
    loss, parts = finetune_loss(trace.logits, labels, teacher_logits, config.temperature, config.distill_weight)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    correct = int((trace.logits.detach().argmax(-1) == labels).sum())
    return dict(loss=float(loss.detach()), correct=correct, n=int(len(labels)), **parts)


@torch.no_grad()
def top1(model: Any, plan: SlimPlan, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Top-1 of ``model`` under ``plan`` (and unslimmed) over ``batches``: ``{"slimmed", "unslimmed", "n"}``."""
    hits = full = n = 0
    for images, labels in batches:
        images, labels = images.to(model.device), labels.to(model.device)
        hits += int((run(model, images, plan).logits.argmax(-1) == labels).sum())
        full += int((run(model, images).logits.argmax(-1) == labels).sum())
        n += len(labels)
    return dict(slimmed=hits / max(n, 1), unslimmed=full / max(n, 1), n=n)


@dataclass
class FinetuneResult:
    """What :func:`finetune` wrote and measured.

    Attributes:
        weights: the fine-tuned ``.safetensors`` file; ``card``: its card file; ``record``: the training record.
        model: the fine-tuned model (a :class:`~patchslim.models.LoadedModel`, eval mode, no gradients).
        card_data: the card as a dict.
    """

    weights: Path
    card: Path
    record: Path
    model: Any
    card_data: dict


def finetune(model: Any, plan: SlimPlan, config: FinetuneConfig, batch_fn: BatchFn, out: str | Path,
             validation: Batches | None = None, test: tuple[str, Batches] | None = None, restart: bool = False,
             checkpoint_every: int = 50, progress: bool = True, command: str | None = None,
             log: Callable[[str], None] | None = None, stem: str | None = None) -> FinetuneResult:
    """Fine-tunes ``model`` with ``plan`` active, resumably, and writes the checkpoint, its card and a record.

    Args:
        model: the loaded model (left untouched; with ``config.distill`` it is the teacher).
        plan: the slimming plan to train under.
        config: the run's settings.
        batch_fn: ``step -> (images [B, C, H, W], labels [B])``, deterministic in ``step``.
        out: folder of the outputs: ``STEM.safetensors``, ``STEM.card.json``, ``STEM.training.json`` and the
            resumable checkpoint ``STEM.ckpt.pt``.
        validation: held-out batches, measured at every epoch end (slimmed and unslimmed top-1).
        test: ``(description, batches)`` measured once at the end; its top-1 is the card's (else validation's).
        restart: ignore an existing checkpoint.
        command: the command line, recorded in the card and the record.
        stem: the file name stem (default: ``MODEL_METHOD_KEEP[_distill]``).

    Raises:
        PatchslimError: a model that cannot be trained, a plan that does not fit it, a checkpoint of another run.
    """
    from tqdm.auto import tqdm

    check_trainable(model)
    check_plan(model, plan)
    out = Path(out)
    stem = stem or default_stem(model.name, config.method, config.keep_ratio, config.distill)
    weights, checkpoint = out / f"{stem}.safetensors", out / f"{stem}.ckpt.pt"
    if checkpoint.exists() and not restart:
        state = load_checkpoint(checkpoint, config, model)
        if log:
            log(f"resumed from {checkpoint.name} at step {state.step} of {config.steps}")
    else:
        state = new_state(model, config)
    teacher = model if config.distill else None
    total = config.steps
    t0 = time.time()
    bar = tqdm(total=total, initial=min(state.step, total), disable=not progress, desc="finetune", unit="step")
    while state.step < total:
        images, labels = batch_fn(state.step)
        stats = train_step(state, config, plan, teacher, images, labels, state.step)
        state.step += 1
        r = state.running
        for key in ("loss", "ce", "kl"):
            r[key] += stats[key] * stats["n"]
        r["correct"] += stats["correct"]
        r["seen"] += stats["n"]
        bar.update(1)
        bar.set_postfix(loss=f"{r['loss'] / r['seen']:.3f}", top1=f"{r['correct'] / r['seen']:.3f}")
        epoch_end = state.step % config.steps_per_epoch == 0 or state.step == total
        if epoch_end:
            entry = dict(epoch=round(state.step / config.steps_per_epoch, 3), step=state.step,
                         loss=round(r["loss"] / r["seen"], 4), ce=round(r["ce"] / r["seen"], 4),
                         kl=round(r["kl"] / r["seen"], 4), train_top1=round(r["correct"] / r["seen"], 4))
            if validation is not None:
                state.student.model.eval()
                v = top1(state.student, plan, validation())
                state.student.model.train()
                entry.update(val_top1=round(v["slimmed"], 4), val_top1_unslimmed=round(v["unslimmed"], 4),
                             val_n=v["n"])
            state.history.append(entry)
            state.running = dict(loss=0.0, ce=0.0, kl=0.0, correct=0, seen=0)
            if log:
                log(json.dumps(entry))
        if epoch_end or state.step % checkpoint_every == 0:
            save_checkpoint(checkpoint, state, config)
    bar.close()

    student = state.student
    student.model.eval().requires_grad_(False)
    measured: dict = {}
    if test is not None:
        name, batches = test
        t = top1(student, plan, batches())
        measured = dict(value=round(t["slimmed"], 4), unslimmed=round(t["unslimmed"], 4), n=t["n"], data=name)
    elif state.history and "val_top1" in state.history[-1]:
        last = state.history[-1]
        measured = dict(value=last["val_top1"], unslimmed=last["val_top1_unslimmed"], n=last["val_n"],
                        data=f"held-out training images of {config.data}")
    card = dict(
        format=FORMAT, base_model=model.name, base_weights=model.weights_name, plan=plan.to_dict(),
        method=config.method, keep_ratio=config.keep_ratio,
        distill=dict(temperature=config.temperature, weight=config.distill_weight,
                     teacher="the unslimmed base model") if config.distill else None,
        data=config.data, epochs=config.epochs, steps=total, batch_size=config.batch_size, top1=measured,
        command=command,
    )
    write_checkpoint(weights, student.model, card)
    record_path = out / f"{stem}.training.json"
    record = dict(command=command, card=card, config=config.to_dict(), history=state.history,
                  seconds_last_run=round(time.time() - t0, 1), torch=torch.__version__)
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    student = dataclasses.replace(student, weights_source=f"file {weights.name} (fine-tuned from {model.name})")
    return FinetuneResult(weights, card_path(weights), record_path, student, card)


def default_stem(model_name: str, method: str, keep_ratio: float, distill: bool) -> str:
    """``fashion-vit_uniform_0.3_distill``: the outputs' file name stem."""
    safe = model_name.replace("/", "_").replace(":", "_")
    return f"{safe}_{method}_{keep_ratio:g}" + ("_distill" if distill else "")


def write_checkpoint(path: Path, module: torch.nn.Module, card: dict) -> None:
    """Writes the weights as safetensors with the card in its metadata, and the card beside it (both atomically)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    text = json.dumps(card, indent=2) + "\n"
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(card)})
    tmp.chmod(0o644)
    tmp.replace(path)
    sidecar = card_path(path)
    tmp_card = sidecar.with_suffix(".tmp")
    tmp_card.write_text(text, encoding="utf-8")
    tmp_card.replace(sidecar)


__all__ = ["CARD_SUFFIX", "FinetuneConfig", "FinetuneResult", "finetune", "finetune_loss", "distillation_kl",
           "inference_keep_sets", "selects_by_keep_set"]

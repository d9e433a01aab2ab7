"""The audit job: every (method x rho) plan on every shard of the data, resumable, one file per result.

The images are cut into shards of ``shard_size`` consecutive items. A shard task decodes its images batch by
batch, runs the unslimmed model once per batch and then every plan still missing for that shard, and writes
one ``.npz`` per (plan, shard) plus one for the unslimmed forward, atomically (a temporary file renamed
into place) under ``OUT/parts/``. Per-image outcomes are stored, not aggregates, so any grouping and any
bootstrap can be computed afterwards from the parts.

Resuming: a killed run is started again with the same command; every (plan, shard) whose file exists is
not recomputed, so at most the shard in progress is lost. ``OUT/parts/job.json`` records what the parts
were computed with (model, weights, data fingerprint, shard and batch size, seed, evidence); a run with
other settings refuses to mix its results in. New methods or rhos can be added to a finished audit.

Scaling out: shard tasks are independent and each is a pure function of (model, data, plans, shard)
(:meth:`AuditJob.compute_task`) whose result is written as its own files (:meth:`AuditJob.write_result`), so
they map onto ``torchrun`` ranks (``part=(rank, world_size)`` runs shards ``rank, rank + world_size, ...``)
and onto Ray actors (:mod:`patchslim.audit.ray_runner`) unchanged; the report is built once all parts exist.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from patchslim.data import LabelledImages, iter_batches
from patchslim.errors import PatchslimError
from patchslim.evaluate import Variant
from patchslim.plan import SlimPlan

PARTS_DIR = "parts"
JOB_FILE = "job.json"
FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 1000


@dataclass(frozen=True)
class AuditPlan:
    """One method at one keep ratio (or at one compute budget).

    Attributes:
        method: the variant's label (``evit``, ``entropy@1``).
        keep_ratio: rho requested (for a budget: the rho the method needed).
        plan: the slimming plan.
        budget: the fraction of the unslimmed GMACs the plan was found for (None: a plan at a given rho).
    """

    method: str
    keep_ratio: float
    plan: SlimPlan
    budget: float | None = None

    @property
    def key(self) -> str:
        """A file-name-safe name of the plan (``evit__rho0.5``, ``evit__budget0.5``)."""
        amount = f"rho{self.keep_ratio:g}" if self.budget is None else f"budget{self.budget:g}"
        return f"{re.sub(r'[^0-9A-Za-z_.+-]', '_', self.method)}__{amount}"

    @property
    def amount(self) -> str:
        """How much it slims, in words: ``rho 0.5`` or ``budget 0.5 (rho 0.44)``."""
        if self.budget is None:
            return f"rho {self.keep_ratio:g}"
        return f"budget {self.budget:g} (rho {self.keep_ratio:.3g})"


def audit_plans(variants: Sequence[Variant], keep_ratios: Sequence[float], seed: int = 0) -> list[AuditPlan]:
    """Every variant at every keep ratio."""
    return [AuditPlan(v.label, float(r), v.plan(float(r), seed)) for v in variants for r in keep_ratios]


def budget_audit_plans(model: Any, variants: Sequence[Variant], budgets: Sequence[float], seed: int = 0
                       ) -> tuple[list[AuditPlan], dict[str, str]]:
    """Every variant at every compute budget that it can meet, and why the others are left out.

    Raises:
        BudgetError: no variant meets any budget.
    """
    from patchslim.errors import BudgetError
    from patchslim.evaluate import budget_plans

    solved, refused = budget_plans(model, variants, budgets, seed)
    if not solved:
        raise BudgetError("no method meets any of the budgets: " + "; ".join(refused.values()))
    return [AuditPlan(v.label, s.keep_ratio, s.plan, budget) for v, budget, s in solved], refused


@dataclass(frozen=True)
class ShardTask:
    """One shard of work: items ``start .. stop - 1``, the plans still missing there, and whether the
    unslimmed forward's part is missing too."""

    shard: int
    start: int
    stop: int
    plans: tuple[str, ...]
    baseline: bool


@dataclass
class ShardResult:
    """What one shard task computed: the arrays of each part file it owes (written by
    :meth:`AuditJob.write_result`).

    Attributes:
        shard: the shard index.
        plans: plan key -> the arrays of its part file.
        baseline: the arrays of the unslimmed forward's part file (None when it existed already).
    """

    shard: int
    plans: dict[str, dict[str, np.ndarray]]
    baseline: dict[str, np.ndarray] | None


@dataclass
class RunSummary:
    """What a call of :meth:`AuditJob.run` did.

    Attributes:
        shards: shards in the audit.
        ran: shard tasks computed by this call.
        reused: shard tasks whose parts were already there.
        seconds: wall time of this call.
        complete: every (plan, shard) part exists.
    """

    shards: int
    ran: int
    reused: int
    seconds: float
    complete: bool


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **arrays)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


@dataclass
class AuditJob:
    """An audit of ``model`` on ``data`` for ``plans``, with its parts in ``out_dir/parts``.

    Attributes:
        model: a :class:`~patchslim.models.LoadedModel`.
        data: from :func:`~patchslim.data.load_labelled`.
        plans: from :func:`audit_plans`.
        out_dir: the output folder (the only place anything is written).
        batch_size: images per forward.
        shard_size: images per shard (the unit of resumption and of distribution).
        workers: DataLoader worker processes decoding image files (0: in this process).
        seed: the plans' seed (recorded; part of the job's identity).
        evidence: also measure the share of kept evidence (top ``share`` patches by the unslimmed model's
            attention rollout that each plan kept).
        share: the top share of patches that counts as the evidence.
    """

    model: Any
    data: LabelledImages
    plans: list[AuditPlan]
    out_dir: Path
    batch_size: int = 64
    shard_size: int = DEFAULT_SHARD_SIZE
    workers: int = 0
    seed: int = 0
    evidence: bool = False
    share: float = 0.1
    identity: dict = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.batch_size < 1:
            raise PatchslimError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.shard_size < 1:
            raise PatchslimError(f"--shard-size must be at least 1, got {self.shard_size}")
        if not self.plans:
            raise PatchslimError("an audit needs at least one method and keep ratio")
        if len({p.key for p in self.plans}) != len(self.plans):
            raise PatchslimError("a method and keep ratio are listed twice")
        for p in self.plans:  # a plan that does not fit the model fails before any image runs
            for action in p.plan.resolve(self.model.spec.depth, self.model.spec):
                action.method.check(dict(action.stage.options), action.stage.keep_ratio, self.model)
        self.identity = dict(
            version=FORMAT_VERSION, model=self.model.name, weights=self.model.weights_name,
            precision=getattr(self.model, "precision", "fp32"), data=self.data.fingerprint, n=len(self.data),
            shard_size=self.shard_size, batch_size=self.batch_size, seed=self.seed, evidence=self.evidence,
            share=self.share,
        )

    # ------------------------------------------------------------------ files

    @property
    def parts_dir(self) -> Path:
        return self.out_dir / PARTS_DIR

    def num_shards(self) -> int:
        return max(1, -(-len(self.data) // self.shard_size))

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Items ``start .. stop - 1`` of a shard."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, len(self.data))

    def baseline_path(self, shard: int) -> Path:
        return self.parts_dir / f"baseline__{shard:05d}.npz"

    def plan_path(self, plan: AuditPlan, shard: int) -> Path:
        return self.parts_dir / f"{plan.key}__{shard:05d}.npz"

    def claim(self) -> None:
        """Creates ``parts/job.json`` or checks that the parts there were computed with these settings.

        Raises:
            PatchslimError: the folder holds parts of an audit with other settings.
        """
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        path = self.parts_dir / JOB_FILE
        record = dict(self.identity, data_name=self.data.name)
        try:
            with open(path, "x") as f:  # exclusive: several workers may start at once
                json.dump(record, f, indent=1)
            return
        except FileExistsError:
            pass
        try:
            existing = json.loads(path.read_text())
        except ValueError:
            raise PatchslimError(f"{path} is damaged; delete {self.parts_dir} to start the audit again") from None
        differs = [k for k in self.identity if existing.get(k) != self.identity[k]]
        if differs:
            what = ", ".join(f"{k} {existing.get(k)!r} -> {self.identity[k]!r}" for k in differs)
            raise PatchslimError(f"{self.out_dir} holds an audit computed with other settings ({what}); use "
                                 f"another --out, or --fresh to discard it")

    def shard_tasks(self, part: tuple[int, int] = (0, 1)) -> list[ShardTask]:
        """The shard tasks still to do (of ``part = (rank, world_size)``: shards ``rank::world_size``)."""
        rank, world = part
        if world < 1 or not 0 <= rank < world:
            raise PatchslimError(f"--part must be RANK/WORLD with 0 <= RANK < WORLD, got {rank}/{world}")
        tasks = []
        for shard in range(rank, self.num_shards(), world):
            missing = tuple(p.key for p in self.plans if not self.plan_path(p, shard).exists())
            baseline = not self.baseline_path(shard).exists()
            if missing or baseline:
                start = shard * self.shard_size
                tasks.append(ShardTask(shard, start, min(start + self.shard_size, len(self.data)), missing,
                                       baseline))
        return tasks

    def complete(self) -> bool:
        return not self.shard_tasks()

    # ------------------------------------------------------------------ running

    def run(self, part: tuple[int, int] = (0, 1), progress: Callable[[int, int], None] | None = None,
            after_shard: Callable[[int], None] | None = None) -> RunSummary:
        """Runs every missing shard task (of this part), in order.

        Args:
            part: ``(rank, world_size)``: run only shards ``rank, rank + world_size, ...``.
            progress: ``progress(done, total)`` in forwards of one image, after every batch.
            after_shard: called with the shard index once its parts are written.
        """
        t0 = time.time()
        self.claim()
        tasks = self.shard_tasks(part)
        total = sum((t.stop - t.start) * (1 + len(t.plans)) for t in tasks)
        done = 0

        def step(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        if progress is not None:
            progress(0, total)
        for task in tasks:
            self.run_task(task, step)
            if after_shard is not None:
                after_shard(task.shard)
        rank, world = part
        shards = len(range(rank, self.num_shards(), world))
        return RunSummary(shards, len(tasks), shards - len(tasks), time.time() - t0, self.complete())

    def run_task(self, task: ShardTask, step: Callable[[int], None] | None = None) -> None:
        """Computes one shard task and writes its parts."""
        self.write_result(self.compute_task(task, step))

    def write_result(self, result: "ShardResult") -> None:
        """Writes a computed shard's part files (atomically: a killed writer leaves no half file)."""
        for key, arrays in result.plans.items():
            _atomic_savez(self.parts_dir / f"{key}__{result.shard:05d}.npz", **arrays)
        if result.baseline is not None:
            _atomic_savez(self.baseline_path(result.shard), **result.baseline)

    def compute_task(self, task: ShardTask, step: Callable[[int], None] | None = None) -> "ShardResult":
        """Computes one shard task: a pure function of the job and the shard, writing nothing (the local runner
        writes the result at once, the Ray runner's driver when the result arrives)."""
        from patchslim.engine import run
        from patchslim.explain.attention import rollout
        from patchslim.explain.evidence import top_patches
        from patchslim.metrics.flops import gmacs

        plans = [p for p in self.plans if p.key in task.plans]
        n = task.stop - task.start
        base = dict(index=np.arange(task.start, task.stop), ok=np.zeros(n, bool), pred=np.full(n, -1),
                    conf=np.full(n, np.nan), correct=np.zeros(n, bool), brightness=np.full(n, np.nan))
        errors: dict[int, str] = {}
        outs = {p.key: dict(pred=[], conf=[], correct=[], evidence=[], gmacs=[], reached=[], seconds=0.0)
                for p in plans}
        base_gmacs, decode_seconds, forward_seconds = [], 0.0, 0.0
        tick = time.perf_counter()
        base_plan = SlimPlan(attention_blocks="all") if self.evidence else SlimPlan()
        for batch in iter_batches(self.data, self.model, task.start, task.stop, self.batch_size, self.workers):
            decode_seconds += time.perf_counter() - tick
            rows = batch.index - task.start
            base["brightness"][rows] = batch.brightness
            errors.update(batch.errors)
            ok_rows = rows[batch.ok]
            base["ok"][ok_rows] = True
            if len(ok_rows):
                labels = torch.from_numpy(self.data.labels[batch.index[batch.ok]])
                images = batch.images.to(self.model.device)
                t = time.perf_counter()
                trace = run(self.model, images, base_plan)
                forward_seconds += time.perf_counter() - t
                probs = trace.logits.float().softmax(-1).cpu()
                pred = probs.argmax(-1)
                base["pred"][ok_rows] = pred.numpy()
                base["conf"][ok_rows] = probs.gather(1, pred[:, None])[:, 0].numpy()
                base["correct"][ok_rows] = (pred == labels).numpy()
                base_gmacs += [gmacs(trace)] * len(ok_rows)
                top = None
                if self.evidence:
                    top = np.stack([top_patches(rollout(trace, index=j), self.share).ravel()
                                    for j in range(len(ok_rows))])
                for p in plans:
                    t = time.perf_counter()
                    slim = run(self.model, images, p.plan)
                    out = outs[p.key]
                    out["seconds"] += time.perf_counter() - t
                    slim_probs = slim.logits.float().softmax(-1).cpu()
                    slim_pred = slim_probs.argmax(-1)
                    out["pred"].append(slim_pred.numpy())
                    out["conf"].append(slim_probs.gather(1, pred[:, None])[:, 0].numpy())
                    out["correct"].append((slim_pred == labels).numpy())
                    out["gmacs"].append(np.full(len(ok_rows), gmacs(slim)))
                    out["reached"].append(np.full(len(ok_rows), slim.keep_ratio))
                    if top is not None:
                        kept = slim.patch_mask().cpu().numpy().reshape(top.shape)
                        out["evidence"].append((top & kept).sum(1) / np.maximum(top.sum(1), 1))
                    else:
                        out["evidence"].append(np.full(len(ok_rows), np.nan))
                    if step is not None:
                        step(len(rows))
            elif step is not None:
                step(len(rows) * len(plans))
            if step is not None:
                step(len(rows))
            tick = time.perf_counter()
        ok_index = base["index"][base["ok"]]
        plan_parts: dict[str, dict[str, np.ndarray]] = {}
        for p in plans:
            out = outs[p.key]

            def cat(name: str, dtype) -> np.ndarray:
                return np.concatenate(out[name]).astype(dtype) if out[name] else np.zeros(0, dtype)

            plan_parts[p.key] = dict(index=ok_index, pred=cat("pred", np.int64), conf=cat("conf", np.float64),
                                     correct=cat("correct", bool), evidence=cat("evidence", np.float64),
                                     gmacs=cat("gmacs", np.float64), reached=cat("reached", np.float64),
                                     seconds=np.float64(out["seconds"]))
        baseline = None
        if task.baseline:
            baseline = dict(base, gmacs=np.asarray(base_gmacs, dtype=np.float64),
                            errors=np.asarray([f"{i}\t{msg}" for i, msg in sorted(errors.items())], dtype=str),
                            decode_seconds=np.float64(decode_seconds), forward_seconds=np.float64(forward_seconds))
        return ShardResult(task.shard, plan_parts, baseline)



# --------------------------------------------------------------------------- reading the parts back

@dataclass
class Outcomes:
    """Per-image outcomes of a finished audit, read from its parts.

    Attributes:
        ok: ``[n]`` which images were decoded and ran.
        pred, conf, correct: ``[n]`` the unslimmed prediction, its probability, whether it was right.
        brightness: ``[n]`` :func:`~patchslim.data.brightness`.
        errors: item index -> why it could not be decoded.
        plans: plan key -> dict of ``[n]`` arrays ``pred``, ``conf`` (probability of the unslimmed
            prediction), ``correct``, ``evidence``, ``gmacs``, ``reached`` (NaN / -1 where not ok) and
            ``seconds``.
        baseline_gmacs: GMACs per image of the unslimmed model.
        timing: seconds spent decoding, in unslimmed forwards, and in each plan's forwards.
        missing: shards left out because some of their parts are missing (only with ``missing_ok``); their
            images count as not audited.
    """

    ok: np.ndarray
    pred: np.ndarray
    conf: np.ndarray
    correct: np.ndarray
    brightness: np.ndarray
    errors: dict[int, str]
    plans: dict[str, dict[str, np.ndarray]]
    baseline_gmacs: float
    timing: dict[str, float]
    missing: list[int] = field(default_factory=list)


def read_outcomes(job: AuditJob, missing_ok: bool = False) -> Outcomes:
    """Gathers every part of a job into per-image arrays.

    Args:
        job: the job.
        missing_ok: leave out the shards whose parts are not all there (a run whose tasks failed) instead of
            refusing; they are listed in ``Outcomes.missing``.

    Raises:
        PatchslimError: parts are missing (the job has not finished) and not ``missing_ok``.
    """
    incomplete = job.shard_tasks()
    if incomplete and not missing_ok:
        raise PatchslimError(f"the audit in {job.out_dir} is not finished: {len(incomplete)} shard(s) still to run "
                             "(run the same command again to continue)")
    missing = sorted(t.shard for t in incomplete)
    present = [shard for shard in range(job.num_shards()) if shard not in set(missing)]
    n = len(job.data)
    ok, pred, conf = np.zeros(n, bool), np.full(n, -1), np.full(n, np.nan)
    correct, bright = np.zeros(n, bool), np.full(n, np.nan)
    errors: dict[int, str] = {}
    gm, decode, forward = [], 0.0, 0.0
    for shard in present:
        with np.load(job.baseline_path(shard)) as part:
            idx = part["index"]
            ok[idx], pred[idx], conf[idx] = part["ok"], part["pred"], part["conf"]
            correct[idx], bright[idx] = part["correct"], part["brightness"]
            gm.append(part["gmacs"])
            decode += float(part["decode_seconds"])
            forward += float(part["forward_seconds"])
            for line in part["errors"]:
                i, _, msg = str(line).partition("\t")
                errors[int(i)] = msg
    plans: dict[str, dict[str, np.ndarray]] = {}
    timing = dict(decode_seconds=decode, baseline_seconds=forward)
    for p in job.plans:
        arrays = dict(pred=np.full(n, -1), conf=np.full(n, np.nan), correct=np.zeros(n, bool),
                      evidence=np.full(n, np.nan), gmacs=np.full(n, np.nan), reached=np.full(n, np.nan))
        seconds = 0.0
        for shard in present:
            with np.load(job.plan_path(p, shard)) as part:
                idx = part["index"]
                for name in arrays:
                    arrays[name][idx] = part[name]
                seconds += float(part["seconds"])
        plans[p.key] = arrays
        timing[p.key] = seconds
    all_gm = np.concatenate(gm) if gm else np.zeros(0)
    return Outcomes(ok, pred, conf, correct, bright, errors, plans,
                    float(all_gm.mean()) if all_gm.size else float("nan"), timing, missing)


def job_settings(job: AuditJob) -> dict:
    """The job's settings for the report."""
    return dict(job.identity, workers=job.workers, plans=[dict(method=p.method, keep_ratio=p.keep_ratio,
                                                               **({} if p.budget is None else {"budget": p.budget}),
                                                               plan=p.plan.to_dict()) for p in job.plans])


def clear_parts(out_dir: str | Path) -> None:
    """Deletes the parts of an earlier audit in ``out_dir`` (``--fresh``); touches nothing else."""
    parts = Path(out_dir) / PARTS_DIR
    if not parts.is_dir():
        return
    for path in parts.iterdir():
        if path.is_file() and (path.suffix == ".npz" or path.name == JOB_FILE):
            path.unlink()



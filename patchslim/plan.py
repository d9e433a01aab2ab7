"""SlimPlan: what to slim, where and how much, as a validated immutable value.

A plan is a list of stages. Each stage names a registered method, a keep ratio rho (the share of the
current patch tokens each action keeps), the blocks where it acts, and the method's options. Stages
compose, so a plan can hold the survey's hybrid strategies (section 5.6), e.g. ``grid`` at the input
followed by ``attention`` before block 6. Block indices are 0-based, as in ``model.blocks[i]``.

An empty plan (``SlimPlan()``) runs the unslimmed model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from patchslim.errors import PlanError
from patchslim.methods import SlimMethod, get_method


@dataclass(frozen=True)
class Stage:
    """One slimming stage.

    Attributes:
        method: registered method name.
        keep_ratio: rho in (0, 1], the share of non-prefix tokens kept at each action.
        blocks: block indices where the method acts (None: the method's default).
        options: method options (validated against the method's option specs).
        stages: for a hierarchical model (Swin), the stages (0-based, as timm's ``model.layers``) in whose every
            block the method acts, instead of ``blocks`` (None with no blocks either: the model's default stages).
    """

    method: str
    keep_ratio: float = 1.0
    blocks: tuple[int, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    stages: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        method = get_method(self.method)
        try:
            ratio = float(self.keep_ratio)
        except (TypeError, ValueError):
            raise PlanError(f"keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}") from None
        if not (0.0 < ratio <= 1.0) or math.isnan(ratio):
            raise PlanError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        object.__setattr__(self, "keep_ratio", ratio)
        if self.blocks is not None:
            blocks = (self.blocks,) if isinstance(self.blocks, int) else tuple(int(b) for b in self.blocks)
            if not blocks:
                raise PlanError(f"stage {self.method!r}: blocks must not be empty (leave it unset for the default)")
            if len(set(blocks)) != len(blocks):
                raise PlanError(f"stage {self.method!r}: blocks must not repeat, got {blocks}")
            object.__setattr__(self, "blocks", tuple(sorted(blocks)))
        if self.stages is not None:
            if self.blocks is not None:
                raise PlanError(f"stage {self.method!r}: give blocks or stages, not both")
            try:
                stages = (self.stages,) if isinstance(self.stages, int) else tuple(int(s) for s in self.stages)
            except (TypeError, ValueError):
                raise PlanError(f"stage {self.method!r}: stages must be stage indices, got {self.stages!r}") from None
            if not stages or len(set(stages)) != len(stages) or min(stages) < 0:
                raise PlanError(f"stage {self.method!r}: stages must be distinct indices >= 0, got {self.stages!r}")
            object.__setattr__(self, "stages", tuple(sorted(stages)))
        parsed = method.parse_options(dict(self.options))
        object.__setattr__(self, "options", MappingProxyType(parsed))

    @property
    def slim_method(self) -> SlimMethod:
        return get_method(self.method)

    def to_dict(self) -> dict:
        out = dict(method=self.method, keep_ratio=self.keep_ratio,
                   blocks=None if self.blocks is None else list(self.blocks),
                   options={k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()})
        if self.stages is not None:
            out["stages"] = list(self.stages)
        return out


@dataclass(frozen=True, eq=False)
class KeepSet:
    """A stage that keeps a given set of tokens per image instead of a method's choice.

    The primitive behind policy training (sampled keep sets), fine-tuning with slimming and token-removal
    faithfulness tests. It acts once, before block ``block`` (``0``: the input), on the non-prefix tokens
    entering it.

    Attributes:
        block: where it acts.
        keep: one of

            - ``[B', K]`` int64 positions among the M current non-prefix tokens (K may be 0: prefix tokens
              alone go on);
            - ``[B', M]`` bool, True = keep. Rows with equal counts are gathered like an index; when counts
              differ per image, every token stays in the tensor and the left-out ones are masked as keys
              (no token attends to them, pooling skips them), which gives the logits of dropping them;
            - a callable ``TokenState -> one of the above``, called with the tokens entering the block (e.g.
              a policy scoring them; run with ``grad=True`` to train it).

            ``B'`` is the batch size or a multiple of it: then each image's tokens are repeated, row
            ``s * B + b`` being image ``b`` (several samples per image in one forward).
    """

    block: int
    keep: Any

    # What a plan reads of every stage (a keep set has no ratio or options of its own).
    method = "keep_set"
    keep_ratio = 1.0
    options = MappingProxyType({})
    stages = None

    def __post_init__(self) -> None:
        if isinstance(self.block, bool) or not isinstance(self.block, int):
            raise PlanError(f"a keep set's block must be an integer, got {self.block!r}")
        if not (callable(self.keep) or hasattr(self.keep, "dtype")):
            raise PlanError(f"a keep set must be a tensor or a callable, got {type(self.keep).__name__}")

    @property
    def blocks(self) -> tuple[int, ...]:
        return (self.block,)

    @property
    def slim_method(self) -> SlimMethod:
        from patchslim.methods.keep_set import GIVEN

        return GIVEN

    def to_dict(self) -> dict:
        return dict(method=self.method, blocks=[self.block], keep="given per image")


@dataclass(frozen=True)
class Action:
    """One resolved action of a stage at one place in the forward."""

    block: int
    point: str
    stage_index: int
    stage: Stage
    windowed: bool = False  # on a windowed model (Swin): at the method's window point when it has one

    @property
    def method(self) -> SlimMethod:
        return self.stage.slim_method

    @property
    def reads(self) -> bool:
        """Whether the action reads a block's attention, keys or values (a method at its window point does not)."""
        method = self.method
        if self.windowed and method.window_point:
            return False
        return method.needs_attention or method.needs_keys or method.needs_values

    @property
    def attention_block(self) -> int | None:
        """The block whose attention (or keys) the action reads, if it needs any."""
        if not self.reads:
            return None
        return self.block - 1 if self.point == "pre" else self.block


_POINT_ORDER = {"pre": 0, "mid": 1}


@dataclass(frozen=True)
class SlimPlan:
    """A validated slimming plan.

    Attributes:
        stages: the stages, applied in forward order (ties at one place in stage order): :class:`Stage` (a
            method's choice) or :class:`KeepSet` (tokens given per image).
        attention_blocks: blocks whose attention probabilities the Trace should keep, for maps and
            rollout (``"all"`` for every block). Attention is computed explicitly only there and where
            a method needs it; every other block uses fused attention.
        seed: seed of the random numbers methods draw; each image's stream is seeded by it and the image's own
            input (:mod:`patchslim.seeding`), so an image gets the same draws whatever batch it is in.
    """

    stages: tuple[Stage | KeepSet, ...] = ()
    attention_blocks: tuple[int, ...] | str = ()
    seed: int = 0

    def __post_init__(self) -> None:
        stages = tuple(self.stages)
        for stage in stages:
            if not isinstance(stage, (Stage, KeepSet)):
                raise PlanError(f"stages must be Stage or KeepSet objects, got {type(stage).__name__}")
        object.__setattr__(self, "stages", stages)
        if isinstance(self.attention_blocks, str):
            if self.attention_blocks != "all":
                raise PlanError(f"attention_blocks must be block indices or 'all', got {self.attention_blocks!r}")
        else:
            object.__setattr__(self, "attention_blocks", tuple(sorted({int(b) for b in self.attention_blocks})))
        if not isinstance(self.seed, int):
            raise PlanError(f"seed must be an integer, got {self.seed!r}")

    @classmethod
    def single(cls, method: str, keep_ratio: float = 1.0, blocks: tuple[int, ...] | int | None = None,
               *, seed: int = 0, attention_blocks: tuple[int, ...] | str = (),
               stages: tuple[int, ...] | int | None = None, **options: Any) -> "SlimPlan":
        """A plan with one stage: ``SlimPlan.single("random", 0.5)``; ``stages=(2, 3)`` for a Swin's stages."""
        return cls((Stage(method, keep_ratio, blocks, options, stages),), attention_blocks=attention_blocks,
                   seed=seed)

    @classmethod
    def from_options(cls, method: str, keep_ratio: float, options: dict[str, Any] | None = None,
                     *, seed: int = 0, attention_blocks: tuple[int, ...] | str = ()) -> "SlimPlan":
        """A one-stage plan from loose options, as the CLI and the app collect them.

        A ``blocks`` entry (``"3,6,9"`` or a sequence) sets where the stage acts; every other entry is a
        method option.
        """
        options = dict(options or {})
        where = {}
        for key in ("blocks", "stages"):
            value = options.pop(key, None)
            if value is not None and not isinstance(value, (tuple, list, int)):
                try:
                    value = tuple(int(b) for b in str(value).replace(";", ",").split(",") if b.strip())
                except ValueError:
                    raise PlanError(f"{key} must be comma-separated indices, got {value!r}") from None
            where[key] = value
        return cls.single(method, keep_ratio, where["blocks"], seed=seed, attention_blocks=attention_blocks,
                          stages=where["stages"], **options)

    @classmethod
    def from_budget(cls, model: Any, method: str, budget: float, blocks: tuple[int, ...] | int | None = None,
                    *, seed: int = 0, attention_blocks: tuple[int, ...] | str = (), **options: Any) -> "SlimPlan":
        """A one-stage plan of ``method`` costing ``budget`` (a fraction in (0, 1]) of the unslimmed GMACs of
        ``model``, within 2 %: ``SlimPlan.from_budget(model, "tome", 0.5)``.

        The plan only; :func:`patchslim.budget.plan_for_budget` also returns the rho it needed and the cost reached.

        Raises:
            BudgetError: a budget outside (0, 1], one the method cannot reach (with the range it can), or options
                that make its count depend on the image.
        """
        from patchslim.budget import plan_for_budget

        return plan_for_budget(model, method, budget, blocks, options, seed=seed,
                               attention_blocks=attention_blocks).plan

    @property
    def is_empty(self) -> bool:
        return not self.stages

    def with_attention(self, attention_blocks: tuple[int, ...] | str) -> "SlimPlan":
        """The same plan, keeping the attention of other blocks."""
        return SlimPlan(self.stages, attention_blocks, self.seed)

    def resolve(self, depth: int, spec: Any = None) -> list[Action]:
        """Places every stage's actions in a model with ``depth`` blocks, in forward order.

        Args:
            depth: the model's number of blocks.
            spec: the model's :class:`~patchslim.trace.ModelSpec`; needed for a hierarchical model (Swin), where a
                stage without blocks acts in every block of its stages (default: the model's default stages).

        Raises:
            PlanError: a block index or stage outside the model, or an action that would read attention
                before any block ran.
        """
        actions = []
        hierarchical = spec is not None and spec.hierarchical
        for index, stage in enumerate(self.stages):
            method = stage.slim_method
            point = (method.window_point or method.point) if hierarchical else method.point
            reads_block = Action(0, point, index, stage, hierarchical).reads
            if stage.stages is not None and not hierarchical:
                raise PlanError(f"stage {stage.method!r}: stages apply to hierarchical models (Swin); "
                                "this model has blocks only, name blocks instead")
            if stage.blocks is not None:
                blocks = stage.blocks
            elif hierarchical:
                stages = stage.stages if stage.stages is not None else spec.default_stages
                blocks = tuple(b for s in stages for b in spec.stage_blocks(s))
                if point == "pre" and reads_block:
                    blocks = tuple(b for b in blocks if b > 0)  # block 0 has no attention before it to read
            else:
                blocks = method.default_blocks(depth)
            for block in blocks:
                if not 0 <= block < depth:
                    raise PlanError(
                        f"stage {stage.method!r}: block {block} is outside the model (blocks 0..{depth - 1})"
                    )
                if point == "pre" and reads_block and block == 0:
                    raise PlanError(
                        f"stage {stage.method!r} reads the attention of the block before it, so it cannot act "
                        f"at block 0 (the input); use a block in 1..{depth - 1}"
                    )
                actions.append(Action(block, point, index, stage, hierarchical))
        actions.sort(key=lambda a: (a.block, _POINT_ORDER[a.point], a.stage_index))
        if self.attention_blocks != "all":
            for block in self.attention_blocks:
                if not 0 <= block < depth:
                    raise PlanError(f"attention block {block} is outside the model (blocks 0..{depth - 1})")
        return actions

    def attention_wanted(self, depth: int) -> set[int]:
        """Blocks whose attention the Trace keeps."""
        return set(range(depth)) if self.attention_blocks == "all" else set(self.attention_blocks)

    def to_dict(self) -> dict:
        return dict(stages=[s.to_dict() for s in self.stages], seed=self.seed,
                    attention_blocks=self.attention_blocks if isinstance(self.attention_blocks, str)
                    else list(self.attention_blocks))

    @classmethod
    def from_dict(cls, record: dict) -> "SlimPlan":
        """The plan :meth:`to_dict` wrote (a fine-tuning card's ``plan``): method stages only, since a per-image
        keep set is not plain data.

        Raises:
            PlanError: a stage without a method, or what :class:`Stage` refuses.
        """
        stages = []
        for item in record.get("stages", ()):
            if "method" not in item or "keep" in item:
                raise PlanError(f"a plan read from data needs method stages, got {item!r}")
            stages.append(Stage(item["method"], float(item.get("keep_ratio", 1.0)), item.get("blocks"),
                                dict(item.get("options") or {}), item.get("stages")))
        return cls(tuple(stages), attention_blocks=record.get("attention_blocks", ()), seed=int(record.get("seed", 0)))

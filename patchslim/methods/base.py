"""The interface every slimming method implements, its option specs, and the registry.

A method is a small class with flags that say what it needs and does, and one ``reduce`` function that
maps a :class:`~patchslim.tokens.TokenState` to a smaller one. The engine and the app read the flags;
they never special-case a method by name (the captum way: methods say what they can do).

Where a method acts:

- ``point = "pre"``: before block ``b`` runs (``b = 0`` is the input, right after the position embedding);
  a method that needs attention then reads the attention of block ``b - 1``.
- ``point = "mid"``: inside block ``b``, between attention and MLP (ToMe, EViT); it reads block ``b``'s
  attention or keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from patchslim.errors import PlanError, UnknownMethodError
from patchslim.tokens import TokenState


@dataclass(frozen=True)
class OptionSpec:
    """One option of a method, as the CLI parses it and the app draws it.

    Attributes:
        name: the key in ``SlimPlan`` options and ``--opt name=value``.
        kind: ``"int"``, ``"float"``, ``"str"``, ``"bool"`` or ``"blocks"`` (a tuple of block indices).
        default: value when the option is not given (None: the method decides).
        help: one sentence for humans.
        minimum, maximum: inclusive bounds for numbers.
        choices: allowed values for strings.
    """

    name: str
    kind: str
    default: Any = None
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def parse(self, value: Any, method: str = "") -> Any:
        """Converts a value (or its command-line string) and checks its range.

        Raises:
            PlanError: naming the option and what is allowed.
        """
        where = f"option {self.name!r}" + (f" of method {method!r}" if method else "")
        try:
            if self.kind == "int":
                parsed: Any = int(value) if not isinstance(value, bool) else int(value)
                if isinstance(value, float) and value != int(value):
                    raise ValueError
            elif self.kind == "float":
                parsed = float(value)
            elif self.kind == "bool":
                if isinstance(value, str):
                    if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError
                    parsed = value.lower() in ("1", "true", "yes")
                else:
                    parsed = bool(value)
            elif self.kind == "blocks":
                if isinstance(value, str):
                    parts = [p for p in value.replace(";", ",").split(",") if p.strip()]
                    parsed = tuple(int(p) for p in parts)
                elif isinstance(value, int):
                    parsed = (value,)
                else:
                    parsed = tuple(int(v) for v in value)
                if not parsed:
                    raise ValueError
            elif self.kind == "str":
                parsed = str(value)
            else:  # pragma: no cover - a spec bug
                raise PlanError(f"{where} has an unknown kind {self.kind!r}")
        except (TypeError, ValueError):
            raise PlanError(f"{where} must be {self.describe()}, got {value!r}") from None
        numbers = parsed if self.kind == "blocks" else (parsed,) if self.kind in ("int", "float") else ()
        for number in numbers:
            if (self.minimum is not None and number < self.minimum) or (
                self.maximum is not None and number > self.maximum
            ):
                raise PlanError(f"{where} must be {self.describe()}, got {value!r}")
        if self.kind == "str" and self.choices and parsed not in self.choices:
            raise PlanError(f"{where} must be one of {', '.join(self.choices)}, got {value!r}")
        return parsed

    def describe(self) -> str:
        """The allowed values in words, e.g. ``an integer in [0, 64]``."""
        noun = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                "blocks": "comma-separated block indices"}[self.kind]
        if self.kind == "str" and self.choices:
            return "one of " + ", ".join(self.choices)
        lo = "-inf" if self.minimum is None else f"{self.minimum:g}"
        hi = "inf" if self.maximum is None else f"{self.maximum:g}"
        if self.minimum is None and self.maximum is None:
            return noun
        return f"{noun} in [{lo}, {hi}]"


@dataclass(frozen=True)
class StageContext:
    """What a method sees when it acts once, besides the tokens.

    Attributes:
        block: the block index where it acts.
        point: ``"pre"`` or ``"mid"`` (see the module docstring).
        keep_ratio: the stage's keep ratio for this action.
        target: the number of non-prefix tokens the keep ratio asks for (nearest, at least 1).
        options: parsed options (defaults filled in).
        attention: ``[B, H, T, T]`` attention probabilities (softmax rows) of the relevant block, when the
            method ``needs_attention``; T counts prefix tokens. Only the P prefix tokens' rows, ``[B, H, P, T]``,
            when the method's ``attention_rows(options)`` is ``"prefix"`` and nothing else needs that block's
            full map (the engine then keeps fused attention there).
        keys: ``[B, H, T, d]`` the relevant block's keys, when the method ``needs_keys``.
        values: ``[B, H, T, d]`` the relevant block's values, when the method ``needs_values`` (PPT weighs CLS
            attention by each token's value norm).
        random: the forward's per-image random streams (:class:`patchslim.seeding.ImageRandom`, seeded by the
            plan's seed and each image's input), for methods that draw random numbers: an image gets the same
            draws whatever batch it is in.
        model: the :class:`~patchslim.models.LoadedModel` (read only), for learned methods.
        num_patches: N of the unslimmed image.
        grid_size: (rows, cols) of the patch grid.
        depth: number of blocks.
        stage_blocks: every block where this action's stage acts (resolved), in forward order; a method
            that spreads a budget over its stage (``tome`` deriving r from rho) reads it.
        stage_start_count: non-prefix tokens when this action's stage first acted (the M its keep ratio
            refers to for such methods).
        given: a :class:`~patchslim.plan.KeepSet`'s keep set (tensor or callable), for that stage alone.
        windowed: the tokens are one block's windows (``[B * W, n, C]``, W = ``state.groups``) of a windowed model
            (Swin), which its adapter puts back in place after the block.
        regions: ``[B * W, n]`` labels of the tokens of each window, when the window's attention keeps some of
            them apart (a shifted window's pieces, wrapped around from opposite edges of the image): a merge joins
            tokens of one label only. None: any tokens may join.
    """

    block: int
    point: str
    keep_ratio: float
    target: int
    options: dict
    attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    random: Any = None
    model: Any = None
    num_patches: int = 0
    grid_size: tuple[int, int] = (0, 0)
    depth: int = 0
    stage_blocks: tuple[int, ...] = ()
    stage_start_count: int = 0
    given: Any = None
    windowed: bool = False
    regions: torch.Tensor | None = None


@dataclass
class Reduction:
    """What ``reduce`` returns: the new tokens, plus optional per-token scores for visualization.

    Attributes:
        state: the tokens after the method acted.
        scores: ``[B, M]`` the importance the method gave each token it chose among (higher = kept
            first), aligned with the tokens *before* the action; None for methods without scores.
        selection_macs: multiply-adds the selection itself cost per image (scoring, matching), for the
            cost model.
    """

    state: TokenState
    scores: torch.Tensor | None = None
    selection_macs: float = 0.0


class SlimMethod:
    """Base class of slimming methods. Subclasses set the class attributes and implement ``reduce``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line the app can show
    explanation: ClassVar[str] = ""  # one paragraph, for teaching
    equation: ClassVar[str] = ""  # LaTeX
    reference: ClassVar[str] = ""
    point: ClassVar[str] = "pre"
    needs_attention: ClassVar[bool] = False
    needs_keys: ClassVar[bool] = False
    needs_values: ClassVar[bool] = False
    learned: ClassVar[bool] = False
    merges: ClassVar[bool] = False
    adaptive_count: ClassVar[bool] = False
    input_dependent: ClassVar[bool] = False
    # True when one action leaves ``ctx.target`` tokens (within one, from rounding) at its default options;
    # False when the count follows the method's own rule (grid: G x G; evit: ceil(rho M) + a fused token).
    # The Trace reports the rho reached either way.
    exact_count: ClassVar[bool] = True
    # Whether the method works on tokens grouped by window (a windowed model such as Swin hands a method its
    # tokens as ``[B * W, n, C]`` and puts them back in place after the block), and if not, why.
    windowed: ClassVar[bool] = False
    window_reason: ClassVar[str] = ""
    # Where a windowed method acts on a windowed model when not at ``point`` ("pre": tome merges each window's
    # tokens before the block's attention); acting there it reads its tokens alone (no attention, keys, values).
    window_point: ClassVar[str] = ""
    # How a stage acting at several blocks reads its keep ratio: False, each action keeps rho of the tokens it
    # receives (attention@3+6+9, evit); True, rho is the share left after the stage's last action, the removals
    # spread over its blocks (tome's schedule, read through ``StageContext.stage_blocks``).
    spreads_keep_ratio: ClassVar[bool] = False
    options: ClassVar[tuple[OptionSpec, ...]] = ()
    # What a compute budget (:mod:`patchslim.budget`) turns to meet its GMACs: ``"keep_ratio"`` (the stage's rho,
    # the default), or the name of one of the method's ``"int"`` / ``"float"`` options (e.g. a number of tokens
    # merged per block), searched between its OptionSpec bounds. The search reads the cost, so either direction
    # works.
    budget_knob: ClassVar[str] = "keep_ratio"

    def default_blocks(self, depth: int) -> tuple[int, ...]:
        """Where the method acts when a plan does not say: at the input by default."""
        return (0,)

    def parse_options(self, options: dict) -> dict:
        """Fills defaults and validates user options.

        Raises:
            PlanError: an unknown option name or a value out of range.
        """
        specs = {spec.name: spec for spec in self.options}
        unknown = sorted(set(options) - set(specs))
        if unknown:
            allowed = ", ".join(specs) if specs else "none"
            raise PlanError(f"method {self.name!r} has no option {unknown[0]!r} (its options: {allowed})")
        parsed = {name: spec.default for name, spec in specs.items()}
        for name, value in options.items():
            if value is None and specs[name].default is None:
                continue  # "unset", as a plan written by to_dict() records an option left at its None default
            parsed[name] = specs[name].parse(value, self.name)
        return parsed

    def attention_rows(self, options: dict) -> str:
        """Which rows of the attention probabilities ``reduce`` reads (with ``needs_attention``): ``"all"``,
        or ``"prefix"`` when it reads only the prefix tokens' rows (CLS attention). For ``"prefix"`` the engine
        keeps fused attention in that block and computes just those rows: no ``[B, H, T, T]`` tensor."""
        return "all"

    def pools_by_size(self, options: dict) -> bool:
        """For a method that ``merges``: whether the model's average pooling should count each final token by
        its size (how many patches it stands for) rather than once. The engine weighs pooling by size when any
        merging stage of a plan asks for it (the default); ``tome`` follows its reference and does not, unless
        an option says so."""
        return True

    def check(self, stage_options: dict, keep_ratio: float, model: Any) -> None:
        """Method-specific validation against a model (e.g. a policy trained for another model)."""

    def adaptive_reason(self, options: dict) -> str | None:
        """Why the number of tokens this method keeps depends on the image with ``options``; None when the plan
        fixes it. A compute budget is met through the count, so :mod:`patchslim.budget` refuses a stage that
        gives a reason. The default follows ``adaptive_count``; a method adaptive in one mode only overrides it."""
        if self.adaptive_count:
            return f"method {self.name!r} keeps a number of tokens that depends on the image"
        return None

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:  # pragma: no cover - interface
        raise NotImplementedError

    def info(self) -> dict:
        """The method's description and flags as plain data (for ``info`` and the app)."""
        return dict(
            name=self.name, summary=self.summary, reference=self.reference, point=self.point,
            needs_attention=self.needs_attention, needs_keys=self.needs_keys, needs_values=self.needs_values,
            learned=self.learned, merges=self.merges, spreads_keep_ratio=self.spreads_keep_ratio,
            adaptive_count=self.adaptive_count, input_dependent=self.input_dependent, exact_count=self.exact_count,
            windowed=self.windowed, window_reason=self.window_reason, window_point=self.window_point or self.point,
            budget_knob=self.budget_knob,
            options=[dict(name=o.name, kind=o.kind, default=o.default, help=o.help, allowed=o.describe())
                     for o in self.options],
        )


_REGISTRY: dict[str, SlimMethod] = {}


def register(cls: type[SlimMethod]) -> type[SlimMethod]:
    """Class decorator: registers one instance of a method under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> SlimMethod:
    """The registered method called ``name``.

    Raises:
        UnknownMethodError: listing the methods there are.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def method_names() -> list[str]:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


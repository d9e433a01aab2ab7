"""Plans at a compute budget: the keep ratio (or other knob) that makes a plan cost a given share of the
unslimmed model's GMACs.

"Same rho" does not mean "same cost": at rho 0.5 on the bundled model ``attention`` (one stage before block 2)
costs 0.62 of the unslimmed multiply-adds, ``tome`` (a little in every block) 0.73, input pruning 0.44. A budget
``F`` in (0, 1] asks instead for the plan whose analytic count (:mod:`patchslim.metrics.flops`, the methods' own
selection work included) is ``F`` times the unslimmed model's, within a relative tolerance (2 % by default:
``|reached - F| <= 0.02 F``), so that methods can be compared at equal cost.

How it is found, for any registered method and any plan family:

- the cost of a plan is read from a dry run of the one forward (:func:`patchslim.engine.run`) on one seeded
  noise image: the token counts per block are what the plan fixes, whatever the image, for every method whose
  count does not adapt to the image. Methods say when it does (``SlimMethod.adaptive_reason``: entropy with a
  threshold tau, rl's Bernoulli mode), and are refused; the count is also checked on a second image.
- the knob is the stage's keep ratio, or the option a method names in ``SlimMethod.budget_knob``; its range is
  sampled at a few points and every interval where the cost crosses the budget is bisected (:func:`search`).
  A method whose cost is not monotone in its knob (``lowrank``: the decomposition's own cost vanishes at
  rho = 1) is thereby searched over its whole reachable range.
- a budget outside the reachable range, or between two reachable costs further apart than the tolerance
  (``grid`` keeps G x G patches), is refused with what the method can reach (:class:`~patchslim.errors.BudgetError`).
- costs are cached per (model spec, method, placement, options, knob value), so a second budget for the same
  method, another session or another seed costs nothing; the spec holds the image size.

Example::

    solution = plan_for_budget(model, "tome", 0.6)
    solution.plan, solution.keep_ratio, solution.reached     # SlimPlan, the rho it needed, e.g. 0.598
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch

from patchslim.errors import BudgetError, PlanError
from patchslim.methods import get_method
from patchslim.plan import SlimPlan, Stage

DEFAULT_TOLERANCE = 0.02
SAMPLES = 9  # points of the knob's range evaluated before bisecting
KEEP_RATIO = "keep_ratio"


def check_budget(budget: Any, name: str = "budget") -> float:
    """``budget`` as a float in (0, 1].

    Raises:
        BudgetError: naming ``name`` and the allowed range.
    """
    if isinstance(budget, bool):
        raise BudgetError(f"{name} must be a fraction of the unslimmed GMACs in (0, 1], got {budget!r}")
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise BudgetError(f"{name} must be a fraction of the unslimmed GMACs in (0, 1], got {budget!r}") from None
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise BudgetError(f"{name} must be a fraction of the unslimmed GMACs in (0, 1], got {budget!r}")
    return value


def parse_budgets(text: str | Sequence[float], name: str = "--budget") -> list[float]:
    """``"0.7,0.5"`` -> ``[0.7, 0.5]``, each checked by :func:`check_budget`.

    Raises:
        BudgetError: a value that is not a number in (0, 1], or none at all.
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    budgets = [check_budget(part.strip() if isinstance(part, str) else part, name)
               for part in parts if not (isinstance(part, str) and not part.strip())]
    if not budgets:
        raise BudgetError(f"{name} needs at least one fraction of the unslimmed GMACs in (0, 1]")
    if len(set(budgets)) != len(budgets):
        raise BudgetError(f"{name} lists a budget twice")
    return budgets


# --------------------------------------------------------------------------- the search (pure)

@dataclass(frozen=True)
class Knob:
    """What a budget search turns.

    Attributes:
        name: ``"keep_ratio"`` or a method option.
        low, high: the range searched (inclusive).
        integer: only whole values.
        resolution: bisection stops when a bracket is this narrow (ignored for integers: 1).
    """

    name: str
    low: float
    high: float
    integer: bool = False
    resolution: float = 1e-4

    def values(self, count: int) -> list[float]:
        """``count`` evenly spaced values over the range, and the values one step inside each end (where a method
        often special-cases its knob: rho = 1 leaves the tokens untouched); whole and distinct for an integer knob."""
        if count < 2 or self.high <= self.low:
            return [self.high]
        step = 1.0 if self.integer else min(self.resolution, (self.high - self.low) / (4 * count))
        points = [self.low + (self.high - self.low) * i / (count - 1) for i in range(count)]
        points += [self.low + step, self.high - step]
        if self.integer:
            points = [float(round(p)) for p in points]
        return sorted(set(points))

    def between(self, a: float, b: float) -> float | None:
        """The midpoint of ``a < b`` on the knob's grid, or None when the bracket is as narrow as it gets."""
        if self.integer:
            middle = math.floor((a + b) / 2)
            return float(middle) if a < middle < b else None
        return (a + b) / 2 if b - a > self.resolution else None


@dataclass(frozen=True)
class SearchResult:
    """What :func:`search` found.

    Attributes:
        value: the knob value chosen.
        fraction: its cost as a fraction of the unslimmed cost.
        reachable: (lowest, highest) fraction among every value evaluated.
        evaluations: the cost function's calls.
    """

    value: float
    fraction: float
    reachable: tuple[float, float]
    evaluations: int


class Unreachable(BudgetError):
    """A budget no knob value lands within the tolerance of.

    Attributes:
        reachable: (lowest, highest) fraction seen.
        below, above: the nearest ``(value, fraction)`` below and above the budget (None when there is none).
    """

    def __init__(self, message: str, reachable: tuple[float, float],
                 below: tuple[float, float] | None, above: tuple[float, float] | None) -> None:
        super().__init__(message)
        self.reachable = reachable
        self.below = below
        self.above = above


def search(cost: Callable[[float], float], budget: float, knob: Knob, tolerance: float = DEFAULT_TOLERANCE,
           samples: int = SAMPLES, prefer_high: bool = True) -> SearchResult:
    """The knob value whose cost is nearest ``budget``, within ``tolerance`` of it (relative).

    ``cost`` is sampled at ``samples`` evenly spaced values (and next to both ends); every pair of neighbours whose
    costs lie on both sides of the budget is bisected until the bracket is as narrow as the knob allows. So a cost
    that is monotone between samples (a step function of token counts is) is solved exactly, and one that is not
    monotone over the whole range (a method whose own work vanishes at one end) is searched in each of its monotone
    stretches. Ties are broken towards the higher knob value (``prefer_high``: more tokens kept for a keep ratio),
    then a value with fewer decimals and the same cost replaces it (0.42 rather than 0.4197).

    Args:
        cost: knob value -> cost as a fraction of the unslimmed cost (a pure function; it is called once per value).
        budget: the fraction wanted.
        knob: the range and grid.
        tolerance: accepted relative error, ``|fraction - budget| <= tolerance * budget``.
        samples: values evaluated before bisecting.
        prefer_high: break ties towards higher knob values.

    Raises:
        Unreachable: no value lands within the tolerance (the message says what can be reached).
    """
    seen: dict[float, float] = {}

    def at(value: float) -> float:
        if value not in seen:
            seen[value] = float(cost(value))
        return seen[value]

    grid = knob.values(samples)
    for value in grid:
        at(value)
    for a, b in zip(grid, grid[1:]):
        fa, fb = at(a), at(b)
        if (fa - budget) * (fb - budget) > 0 or budget in (fa, fb):
            continue
        # bisect [a, b], keeping the ends on the two sides of the budget
        while (middle := knob.between(a, b)) is not None:
            if (at(middle) - budget) * (fa - budget) > 0:
                a, fa = middle, at(middle)
            else:
                b, fb = middle, at(middle)
    sign = 1.0 if prefer_high else -1.0
    best_value = min(seen, key=lambda v: (abs(seen[v] - budget), -sign * v))
    best = seen[best_value]
    fractions = list(seen.values())
    reachable = (min(fractions), max(fractions))
    if abs(best - budget) > tolerance * budget:
        below = max(((v, f) for v, f in seen.items() if f < budget), key=lambda p: (p[1], sign * p[0]), default=None)
        above = min(((v, f) for v, f in seen.items() if f > budget), key=lambda p: (p[1], -sign * p[0]),
                    default=None)
        raise Unreachable(_unreachable_message(budget, tolerance, reachable, below, above, knob), reachable, below,
                          above)
    if not knob.integer:
        for digits in (2, 3, 4):
            rounded = round(best_value, digits)
            if knob.low <= rounded <= knob.high and rounded != best_value and at(rounded) == best:
                best_value = rounded
                break
    return SearchResult(best_value, best, reachable, len(seen))


def _unreachable_message(budget: float, tolerance: float, reachable: tuple[float, float],
                         below: tuple[float, float] | None, above: tuple[float, float] | None, knob: Knob) -> str:
    low, high = reachable
    name = knob.name.replace("_", " ")
    if budget < low * (1 - 1e-12) or budget > high * (1 + 1e-12):
        return (f"budget {budget:g} is outside what it can reach: {low:.3f} to {high:.3f} of the unslimmed GMACs "
                f"({name} {_fmt(knob.low)} to {_fmt(knob.high)})")
    near = " and ".join(f"{f:.3f} ({name} {_fmt(v)})" for v, f in (below, above) if v is not None)
    return (f"no {name} lands within {100 * tolerance:g} % of budget {budget:g}: the nearest costs it can "
            f"reach are {near} of the unslimmed GMACs (its token counts come in steps)")


def _fmt(value: float) -> str:
    return f"{value:.4g}"


# --------------------------------------------------------------------------- plans at a budget

@dataclass(frozen=True)
class BudgetSolution:
    """A plan found for a compute budget, and what it costs.

    Attributes:
        plan: the plan.
        budget: the fraction of the unslimmed GMACs asked for.
        reached: the fraction the plan costs (analytic, selection included).
        gmacs, baseline_gmacs: GMACs per image of the plan and of the unslimmed model.
        knob: what was turned (``"keep_ratio"`` or an option name).
        value: the knob's value.
        keep_ratio: the plan's (first stage's) keep ratio rho.
        keep_ratio_reached: non-prefix tokens after the last block / N (``Trace.keep_ratio``).
        tokens_per_block: tokens (prefix included) each block's attention runs on.
        reachable: (lowest, highest) fraction the search saw.
        tolerance: the relative tolerance it was solved to.
    """

    plan: SlimPlan
    budget: float
    reached: float
    gmacs: float
    baseline_gmacs: float
    knob: str
    value: float
    keep_ratio: float
    keep_ratio_reached: float
    tokens_per_block: tuple[int, ...]
    reachable: tuple[float, float]
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def error(self) -> float:
        """``reached / budget - 1``: within ``[-tolerance, tolerance]``."""
        return self.reached / self.budget - 1.0

    def to_dict(self) -> dict:
        return dict(plan=self.plan.to_dict(), budget=self.budget, reached=self.reached, gmacs=self.gmacs,
                    baseline_gmacs=self.baseline_gmacs, knob=self.knob, value=self.value,
                    keep_ratio=self.keep_ratio, keep_ratio_reached=self.keep_ratio_reached,
                    tokens_per_block=list(self.tokens_per_block), reachable=list(self.reachable),
                    tolerance=self.tolerance)


@dataclass(frozen=True)
class _Cost:
    """What one dry run gave: the plan's cost and its token counts."""

    fraction: float
    gmacs: float
    baseline_gmacs: float
    keep_ratio_reached: float
    tokens_attention: tuple[int, ...]
    tokens_mlp: tuple[int, ...]


class _Cache:
    """A bounded, thread-safe mapping, least recently used dropped first (costs never change for a key)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_COSTS = _Cache(8192)  # (family key, knob value) -> _Cost
_SEARCHES = _Cache(1024)  # (family key, budget, tolerance) -> SearchResult, or the Unreachable it raised


def clear_cache() -> None:
    """Forgets every cost and search (for tests; costs of a key never change)."""
    _COSTS.clear()
    _SEARCHES.clear()


def probe_image(model: Any, seed: int = 0) -> torch.Tensor:
    """The dry run's input: seeded standard-normal noise of the model's input size, ``[1, C, H, W]``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, *model.input_size, generator=generator)


def _dry_run(model: Any, plan: SlimPlan, seed: int = 0) -> _Cost:
    from patchslim.engine import run
    from patchslim.metrics.flops import baseline_macs, count_macs

    trace = run(model, probe_image(model, seed), plan.with_attention(()))
    macs = count_macs(trace)
    base = baseline_macs(model.spec)
    return _Cost(macs.total / base.total, macs.gmacs, base.gmacs, float(trace.keep_ratio),
                 tuple(b.tokens_attention for b in trace.blocks), tuple(b.tokens_mlp for b in trace.blocks))


def solve_budget(model: Any, build: Callable[[float], SlimPlan], budget: float, knob: Knob, *,
                 key: Hashable | None = None, tolerance: float = DEFAULT_TOLERANCE, what: str = "this plan",
                 prefer_high: bool = True) -> BudgetSolution:
    """The plan of a one-parameter family ``build(value)`` that costs ``budget`` of the unslimmed GMACs.

    The general form of :func:`plan_for_budget`, for any family of plans (several stages moved together, a
    method at a placement of your choosing)::

        family = lambda rho: SlimPlan((Stage("attention", rho, blocks=(1,)), Stage("tome", 1.0, options={"r": 4})))
        solve_budget(model, family, 0.5, Knob("keep_ratio", 1e-3, 1.0))

    Args:
        model: a :class:`~patchslim.models.LoadedModel`.
        build: knob value -> plan. Its token counts must not depend on the image (checked on a second image).
        budget: fraction of the unslimmed GMACs in (0, 1].
        knob: the range searched.
        key: names the family for the cache (with the model's spec); None: no caching.
        tolerance: accepted relative error.
        what: the family in error messages (``"method 'tome'"``).
        prefer_high: break cost ties towards higher knob values.

    Raises:
        BudgetError: a bad budget or tolerance, a budget the family cannot reach (with its reachable range), or
            token counts that changed with the image.
        PlanError: a plan that does not fit the model.
    """
    budget = check_budget(budget)
    if not 0.0 < tolerance < 1.0:
        raise BudgetError(f"tolerance must be in (0, 1), got {tolerance!r}")
    family = None if key is None else (model.spec, key, knob)

    def cost(value: float) -> _Cost:
        cached = None if family is None else _COSTS.get((family, value))
        if cached is None:
            cached = _dry_run(model, build(value))
            if family is not None:
                _COSTS.put((family, value), cached)
        return cached

    found = None if family is None else _SEARCHES.get((family, budget, tolerance))
    if isinstance(found, Unreachable):  # refused before: the same answer, without searching again
        raise Unreachable(str(found), found.reachable, found.below, found.above)
    if found is None:
        try:
            found = search(lambda v: cost(v).fraction, budget, knob, tolerance, prefer_high=prefer_high)
        except Unreachable as exc:
            refusal = Unreachable(f"{what} cannot meet the budget: {exc}", exc.reachable, exc.below, exc.above)
            if family is not None:
                _SEARCHES.put((family, budget, tolerance), refusal)
            raise refusal from None
        if family is not None:
            _SEARCHES.put((family, budget, tolerance), found)
    plan = build(found.value)
    chosen = cost(found.value)
    checked = None if family is None else (family, found.value, "second image")
    other = chosen if checked is not None and _COSTS.get(checked) else _dry_run(model, plan, seed=1)
    if (other.tokens_attention, other.tokens_mlp) == (chosen.tokens_attention, chosen.tokens_mlp):
        if checked is not None:
            _COSTS.put(checked, True)
    else:
        raise BudgetError(f"{what} kept a different number of tokens on two images ({list(chosen.tokens_attention)} "
                          f"vs {list(other.tokens_attention)} per block): its cost depends on the image, so a "
                          "budget cannot fix it")
    first = plan.stages[0] if plan.stages else None
    return BudgetSolution(
        plan=plan, budget=budget, reached=chosen.fraction, gmacs=chosen.gmacs, baseline_gmacs=chosen.baseline_gmacs,
        knob=knob.name, value=found.value, keep_ratio=getattr(first, "keep_ratio", 1.0),
        keep_ratio_reached=chosen.keep_ratio_reached, tokens_per_block=chosen.tokens_attention,
        reachable=found.reachable, tolerance=tolerance,
    )


def method_knob(method: str, spec: Any) -> Knob:
    """The range a budget searches for ``method`` on a model of ``spec`` (see ``SlimMethod.budget_knob``)."""
    slim = get_method(method)
    if slim.budget_knob == KEEP_RATIO:
        # below 1 / (2N) every keep ratio keeps one token; 1e-3 is below that for every grid up to 500 patches
        # (a stage's count steps at rho = (k + 1/2) / M, M <= N: a bracket of 1 / (8N) holds at most one step)
        return Knob(KEEP_RATIO, min(1e-3, 0.5 / spec.num_patches), 1.0, resolution=1.0 / (8 * spec.num_patches))
    option = {o.name: o for o in slim.options}.get(slim.budget_knob)
    if option is None or option.kind not in ("int", "float"):
        raise PlanError(f"method {method!r} names {slim.budget_knob!r} as its budget knob, which is not one of its "
                        "int or float options")
    low = 0.0 if option.minimum is None else float(option.minimum)
    high = float(spec.num_patches) if option.maximum is None else float(option.maximum)
    return Knob(option.name, low, high, integer=option.kind == "int")


def plan_for_budget(model: Any, method: str, budget: float, blocks: tuple[int, ...] | int | None = None,
                    options: Mapping[str, Any] | None = None, *, seed: int = 0,
                    attention_blocks: tuple[int, ...] | str = (),
                    tolerance: float = DEFAULT_TOLERANCE) -> BudgetSolution:
    """A one-stage plan of ``method`` that costs ``budget`` of the unslimmed GMACs (within ``tolerance``).

    Args:
        model: a :class:`~patchslim.models.LoadedModel`.
        method: a registered method.
        budget: fraction of the unslimmed GMACs, in (0, 1].
        blocks: where the method acts (None: its default placement).
        options: the method's options (a ``blocks`` entry sets the placement, as in ``SlimPlan.from_options``);
            the budget's knob itself must not be among them.
        seed, attention_blocks: as in :class:`~patchslim.plan.SlimPlan`.
        tolerance: accepted relative error of the cost.

    Returns:
        The plan, the rho (or option value) it needed and the cost it reached.

    Raises:
        BudgetError: a budget outside (0, 1]; one the method cannot reach at this placement (the message gives the
            range it can); options that make the count depend on the image (entropy's tau, rl's Bernoulli mode) or
            that set the knob themselves.
        PlanError: an unknown method, bad options or blocks.
    """
    budget = check_budget(budget)
    slim = get_method(method)
    options = dict(options or {})
    if "blocks" in options:
        if blocks is not None:
            raise PlanError("give the blocks once: as blocks= or as the option 'blocks', not both")
        placed = SlimPlan.from_options(method, 1.0, {"blocks": options.pop("blocks")})
        blocks = placed.stages[0].blocks
    knob = method_knob(method, model.spec)
    if knob.name != KEEP_RATIO and knob.name in options:
        raise BudgetError(f"option {knob.name!r} of method {method!r} is what a budget sets; leave it unset with a "
                          "budget")
    stage = Stage(method, 1.0, blocks, options)  # validates the options and blocks
    reason = slim.adaptive_reason(dict(stage.options))
    if reason:
        raise BudgetError(f"{reason}. A budget is met through a count the plan fixes, so this cannot take one")
    given = {k: v for k, v in options.items()}

    def build(value: float) -> SlimPlan:
        if knob.name == KEEP_RATIO:
            return SlimPlan((Stage(method, value, stage.blocks, given),), attention_blocks, seed)
        chosen = int(value) if knob.integer else value
        return SlimPlan((Stage(method, 1.0, stage.blocks, {**given, knob.name: chosen}),), attention_blocks, seed)

    family = (method, stage.blocks, tuple(sorted((k, repr(v)) for k, v in stage.options.items())))
    what = f"method {method!r}" + ("" if blocks is None else f" at blocks {','.join(map(str, stage.blocks))}")
    try:
        return solve_budget(model, build, budget, knob, key=family, tolerance=tolerance, what=what,
                            prefer_high=knob.name == KEEP_RATIO)
    except Unreachable as exc:
        fixed = _options_fixing_cost(model, method, stage, knob, exc.reachable)
        if fixed:
            raise BudgetError(f"{what} costs {exc.reachable[0]:.3f} of the unslimmed GMACs whatever its "
                              f"{knob.name.replace('_', ' ')} with {fixed} set: that option fixes the count, so "
                              "leave it unset for a budget") from None
        raise


def _options_fixing_cost(model: Any, method: str, stage: Stage, knob: Knob, reachable: tuple[float, float]) -> str:
    """When the cost did not move with the knob: the options (set away from their defaults) without which it moves,
    as ``"option 'r'=13"``; "" when the cost moves or no single option explains it."""
    if reachable[1] - reachable[0] > 1e-12:
        return ""
    slim = get_method(method)
    defaults = {o.name: o.default for o in slim.options}
    named = []
    for name, value in stage.options.items():
        if value == defaults.get(name) or name == knob.name:
            continue
        options = {k: v for k, v in stage.options.items() if k != name}
        ends = []
        for end in (knob.low, knob.high):
            if knob.name == KEEP_RATIO:
                plan = SlimPlan((Stage(method, end, stage.blocks, options),))
            else:
                plan = SlimPlan((Stage(method, 1.0, stage.blocks, {**options, knob.name: int(end) if knob.integer
                                                                   else end}),))
            ends.append(_dry_run(model, plan).fraction)
        if abs(ends[1] - ends[0]) > 1e-12:
            named.append(f"option {name!r}={value}")
    return ", ".join(named)

"""patchslim: see, measure and audit patch slimming in Vision Transformers.

Public API::

    import patchslim
    model = patchslim.load_model("fashion-vit")
    trace = patchslim.run(model, images, patchslim.SlimPlan.single("random", 0.5))
    trace = patchslim.run(model, images, plan, grad=True)          # differentiable (captum, training)
    trace = patchslim.run(model, images, patchslim.SlimPlan((patchslim.KeepSet(1, keep),)))  # given tokens
    model = patchslim.wrap_model(my_timm_vit, name="mine")           # a model built in your own code
    solution = patchslim.plan_for_budget(model, "tome", 0.5)          # the plan costing half the GMACs
    model = patchslim.load_model("fashion-vit", precision="int8")     # int8 Linear layers (patchslim.int8_backends())
"""

from patchslim.errors import (  # noqa: F401
    BudgetError,
    ExplanationError,
    GradientUnavailableError,
    ImageError,
    Int8UnavailableError,
    PatchslimError,
    PlanError,
    UnknownMethodError,
    UnknownModelError,
    UnsupportedModelError,
    WeightsError,
    WeightsUnavailableError,
)
from patchslim.methods import get_method, method_names  # noqa: F401
from patchslim.plan import KeepSet, SlimPlan, Stage  # noqa: F401
from patchslim.models import LoadedModel, load_model, model_names, wrap_model  # noqa: F401
from patchslim.engine import run, tokens_before  # noqa: F401
from patchslim.trace import Trace  # noqa: F401
from patchslim.budget import BudgetSolution, plan_for_budget  # noqa: F401
from patchslim.quantize import int8_backends, refuse_gradients  # noqa: F401

__version__ = "0.1.0"

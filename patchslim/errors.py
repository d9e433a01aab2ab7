"""The exceptions patchslim raises. Each carries a message a person can act on.

Everything derives from :class:`PatchslimError`, so a caller (the CLI, the app) can catch one type
and show ``str(error)`` without a traceback.
"""


class PatchslimError(Exception):
    """Base class of every error patchslim raises on purpose."""


class UnknownModelError(PatchslimError, KeyError):
    """The model name is neither the bundled model nor a timm model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(PatchslimError):
    """A timm model that the plan-driven engine cannot walk (not a plain VisionTransformer)."""


class WeightsUnavailableError(PatchslimError):
    """Pretrained weights could not be found locally nor downloaded."""


class WeightsError(PatchslimError):
    """A weights file exists but cannot be used (unsafe, corrupt, or for another model)."""


class PlanError(PatchslimError, ValueError):
    """A slimming plan or one of its options is invalid."""


class ExplanationError(PatchslimError, ValueError):
    """An explanation or a faithfulness score that cannot be computed as asked: a parameter out of range (steps,
    mode, map kind), a map the model cannot produce (no class token to read attention from), or a way of removing
    patches the architecture does not support. The message names the parameter and the reason."""


class BudgetError(PlanError):
    """A compute budget that is out of range, that a method cannot reach (the message gives what it can reach), or
    that contradicts the plan's options (an adaptive count, a fixed count)."""


class ImageError(PatchslimError, ValueError):
    """An image cannot be read or is refused (empty, truncated, too large, unknown format)."""


class UnknownMethodError(PlanError, KeyError):
    """No slimming method is registered under the given name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DataError(PatchslimError, ValueError):
    """Labelled data cannot be used: an unknown kind of source, a bad manifest or zip, a canvas set asked for
    another model, a bad ``--limit``, or no usable labelled image at all (the message lists what was left out)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The data folder, manifest, zip or Fashion-MNIST files are not there."""


class ClusterError(PatchslimError):
    """A Ray cluster cannot be reached or used for an audit (an unreachable address, too few resources, workers
    that cannot see the data or the weights)."""


class Int8UnavailableError(PatchslimError):
    """Precision int8 on a device or PyTorch build where no int8 backend runs (the message names the precision, the
    device and what each backend lacks: :mod:`patchslim.quantize`)."""


class GradientUnavailableError(PatchslimError):
    """A feature that needs gradients through the forward (``run(grad=True)``, Integrated Gradients, gradient-weighted
    rollout, fine-tuning) asked of a model that cannot give them: an int8 model
    (:func:`patchslim.quantize.refuse_gradients`)."""

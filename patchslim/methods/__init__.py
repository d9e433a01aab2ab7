"""Slimming methods, one file each, registered by name on import.

Adding a method is one file defining a :class:`~patchslim.methods.base.SlimMethod` subclass decorated with
``@register``, plus one import line below.
"""

from patchslim.methods.base import (  # noqa: F401
    OptionSpec,
    Reduction,
    SlimMethod,
    StageContext,
    get_method,
    method_names,
    register,
)
from patchslim.methods import random  # noqa: F401,E402
from patchslim.methods import rl  # noqa: F401,E402
from patchslim.methods import uniform  # noqa: F401,E402
from patchslim.methods import grid  # noqa: F401,E402
from patchslim.methods import lowrank  # noqa: F401,E402
from patchslim.methods import entropy  # noqa: F401,E402
from patchslim.methods import attention  # noqa: F401,E402
from patchslim.methods import tome  # noqa: F401,E402
from patchslim.methods import evit  # noqa: F401,E402
from patchslim.methods import tofu  # noqa: F401,E402
from patchslim.methods import pitome  # noqa: F401,E402
from patchslim.methods import ppt  # noqa: F401,E402
from patchslim.methods import zerotprune  # noqa: F401,E402

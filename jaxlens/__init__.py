"""jaxlens: mechanistic-interpretability tooling native to JAX.

HF checkpoints become Flax models whose every activation is captured under TransformerLens's
hook names inside one compiled program.
"""

from jaxlens.cache import ActivationCache
from jaxlens.config import ModelConfig
from jaxlens.forward import forward, forward_jit
from jaxlens.hooked import HookedTransformer, from_pretrained, from_pretrained_no_processing
from jaxlens.hooks import Hooks, HookPoint, get_act_name, hook_names, make_hooks, resolve_names
from jaxlens import factored_matrix, head_detector, patching, utils  # TransformerLens's module names
from jaxlens.factored_matrix import FactoredMatrix

__version__ = "0.1.0"

__all__ = ["ActivationCache", "ModelConfig", "HookedTransformer", "from_pretrained", "from_pretrained_no_processing",
           "forward", "forward_jit",
           "Hooks", "HookPoint", "get_act_name", "hook_names", "make_hooks", "resolve_names",
           "FactoredMatrix", "factored_matrix", "head_detector", "patching", "utils"]

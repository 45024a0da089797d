"""jaxlens: mechanistic-interpretability tooling native to JAX.

HF checkpoints become Flax models whose every activation is captured under TransformerLens's
hook names inside one compiled program.

Layout: `model/` (the linen modules, the compiled forward, weight processing), `cache/` (the
activation cache and its analyses), `edits/` (interventions, patching, gradients,
extraction, hook points), `generation/` (KV-cache driver, sampling), `apps/` (CLI, demo,
report), `conversion/` (HF checkpoints). TransformerLens's module names stay reachable:
`jaxlens.patching`, `jaxlens.utils`, `jaxlens.head_detector`, `jaxlens.hook_points`,
`jaxlens.factored_matrix`, ... are the modules above under their short names, both as
attributes and for `import jaxlens.patching`.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from jaxlens.cache import ActivationCache
from jaxlens.config import ModelConfig
from jaxlens.model.forward import forward, forward_jit
from jaxlens.hooked import HookedTransformer, from_pretrained, from_pretrained_no_processing
from jaxlens.hooks import Hooks, HookPoint, get_act_name, hook_names, make_hooks, resolve_names
from jaxlens.cache import analysis, aggregate, head_detector, slice  # noqa: A004 (module name)
from jaxlens.edits import edge_attribution, extraction, gradients, hook_points, interchange, interventions, patching
from jaxlens.generation import generate, kv_cache
from jaxlens.model import factored_matrix, processing, projection_kernel, svd_interpreter
from jaxlens import utils
from jaxlens.model.factored_matrix import FactoredMatrix
from jaxlens.model.svd_interpreter import SVDInterpreter
from jaxlens.cache.logit_lens import logit_lens, logit_readout
from jaxlens.cache.dla import direct_logit_attribution
from jaxlens.edits.edge_attribution import (EdgeAttributionConfig, FaithfulnessConfig, Node, attribution_patch,
                                           faithfulness)

__version__ = "0.1.0"

# Short names (TransformerLens's where it has them) -> the module's home in the layout.
SHORT_NAMES = {
    "analysis": "jaxlens.cache.analysis", "aggregate": "jaxlens.cache.aggregate",
    "slice": "jaxlens.cache.slice", "head_detector": "jaxlens.cache.head_detector",
    "interventions": "jaxlens.edits.interventions", "patching": "jaxlens.edits.patching",
    "gradients": "jaxlens.edits.gradients", "extraction": "jaxlens.edits.extraction",
    "hook_points": "jaxlens.edits.hook_points", "edge_attribution": "jaxlens.edits.edge_attribution",
    "interchange": "jaxlens.edits.interchange",
    "kv_cache": "jaxlens.generation.kv_cache", "generate": "jaxlens.generation.generate",
    "forward": "jaxlens.model.forward", "processing": "jaxlens.model.processing",
    "factored_matrix": "jaxlens.model.factored_matrix",
    "svd_interpreter": "jaxlens.model.svd_interpreter", "projection_kernel": "jaxlens.model.projection_kernel",
    "cli": "jaxlens.apps.cli", "demo": "jaxlens.apps.demo", "report": "jaxlens.apps.report",
    "data": "jaxlens.apps.data", "export": "jaxlens.apps.export", "probes": "jaxlens.apps.probes",
}


class _ShortNameFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import jaxlens.demo` imports `jaxlens.apps.demo` and binds the same module object under
    both names (one module, so a monkeypatch or a `sys.modules` lookup sees one thing)."""

    def find_spec(self, name, path=None, target=None):
        short = name[len("jaxlens."):] if name.startswith("jaxlens.") else None
        return importlib.util.spec_from_loader(name, self) if short in SHORT_NAMES else None

    def create_module(self, spec):
        return importlib.import_module(SHORT_NAMES[spec.name[len("jaxlens."):]])

    def exec_module(self, module):
        pass


for _short, _home in SHORT_NAMES.items():
    if _home in sys.modules:  # already imported above: alias now (keeps `jaxlens.forward` the function)
        sys.modules[f"jaxlens.{_short}"] = sys.modules[_home]
if not any(isinstance(f, _ShortNameFinder) for f in sys.meta_path):
    sys.meta_path.append(_ShortNameFinder())

__all__ = ["ActivationCache", "ModelConfig", "HookedTransformer", "from_pretrained", "from_pretrained_no_processing",
           "forward", "forward_jit",
           "Hooks", "HookPoint", "get_act_name", "hook_names", "make_hooks", "resolve_names",
           "FactoredMatrix", "SVDInterpreter", "SHORT_NAMES", "logit_lens", "logit_readout", "direct_logit_attribution",
           "attribution_patch", "faithfulness", "Node", "EdgeAttributionConfig", "FaithfulnessConfig", "edge_attribution", "interchange",
           "analysis", "aggregate", "head_detector", "slice", "extraction", "gradients", "hook_points",
           "interventions", "patching", "generate", "kv_cache", "factored_matrix", "processing", "svd_interpreter",
           "projection_kernel", "utils"]

"""Registration with mergekit: the methods, and the planner hook in ``mergekit.merge``."""

from __future__ import annotations

import importlib


def install() -> None:
    """Idempotent: register every ``symmetry_aligned_*`` method and hook the planner."""
    # import_module, not attribute access: this can run while mergekit.merge is being
    # imported (from the .pth hook), when `mergekit.merge` is not yet an attribute.
    registry = importlib.import_module("mergekit.merge_methods.registry")
    merge = importlib.import_module("mergekit.merge")
    from .methods import all_methods
    from .planner import SymAlignPlanner

    known = {m.spec.name for m in registry.registered_methods()}
    for method in all_methods():
        if method.spec.name not in known:
            registry.register(method)
    if not (isinstance(merge.MergePlanner, type) and issubclass(merge.MergePlanner, SymAlignPlanner)):
        merge.MergePlanner = SymAlignPlanner

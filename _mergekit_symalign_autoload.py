"""Imported from mergekit_symalign.pth at interpreter start; must stay tiny.

Installs a meta-path hook that, right after ``mergekit.plan`` has been imported (every
entry point that plans a merge imports it: ``mergekit-yaml``, ``run_merge``, the
evolutionary merge), registers the ``symmetry_aligned_*`` merge methods and the planner
hook; and right after ``mergekit.merge`` has loaded (it imports ``mergekit.plan`` itself, so
the plugin is installed by then), wraps its ``run_merge`` so that a failed aligned merge
leaves no output folder (before ``mergekit-yaml`` binds the name). Processes that never
import mergekit pay for one small module and nothing else.
"""

import sys
from importlib.abc import MetaPathFinder

_TRIGGERS = ("mergekit.plan", "mergekit.merge")


def _register(module):
    import importlib
    import warnings

    try:
        plugin = importlib.import_module("mergekit_symalign.plugin")
        if module.__name__ == "mergekit.merge":
            plugin.hook_run_merge(module)
        else:
            plugin.install()
    except Exception as err:  # never break plain mergekit merges
        warnings.warn(
            f"mergekit-symalign could not register its merge methods ({err!r}); "
            f"plain mergekit methods are unaffected.",
            stacklevel=2,
        )


class _RegisterAfterMergekit(MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _TRIGGERS:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            _register(module)

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(f, _RegisterAfterMergekit) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterMergekit())

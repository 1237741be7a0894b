"""Registration with mergekit: the methods, and the hook in ``mergekit.plan.MergePlanner``.

mergekit 0.1.5 has no plugin discovery and always wraps a method in a fixed
``ExecuteMergeMethodTask(gather_tensors=...)``, so feeding a method aligned inputs needs a
planner hook. We hook the class itself, in place, rather than swapping a subclass into one
module's namespace: ``mergekit.merge``, ``mergekit.evo.actors`` and any other code that did
``from mergekit.plan import MergePlanner`` hold the very same (hooked) class. Each hooked
method does exactly what mergekit does unless the planner's method is a
``symmetry_aligned_*`` one; then planning goes to :class:`.planner.AlignedPlanning`.

Three more in-place hooks, inert for other methods:

* ``MergePlanner.plan_to_disk(out_path)`` tells the planning where the merge will write
  (refused if inside an input model's folder) and notes whether that folder existed;
* ``Executor.run`` / ``MultiGPUExecutor.run``: when the graph being run is an aligned merge's
  (its writer is one ``plan_to_disk`` noted), any failure while it runs — a task raising, a
  missing shard, ``--cuda`` without CUDA, Ctrl-C — removes the output folder if this merge
  created it (mergekit's writer creates it as the graph starts); never one that existed;
* ``mergekit.merge.run_merge`` (:func:`hook_run_merge`): the same for the rest of the merge,
  after the graph ran: ``config.json``, the model card, the tokenizer and tag-along files are
  written then, and a failure there (Ctrl-C included) would leave a folder that looks
  complete. ``mergekit-yaml`` binds ``run_merge`` by name as ``mergekit.merge`` finishes
  importing, before :func:`install` can run (it runs from inside that import), so the
  ``.pth`` autoload wraps it the moment ``mergekit.merge`` has loaded;
* ``MergeConfiguration.referenced_models()``: ``run_merge`` reads every model's config
  (``get_architecture_info``, before any planning), and a local folder that does not exist
  would reach the Hub client as a repo id ("Repo id must be in the form ..."). The first
  thing ``get_architecture_info`` does is list the recipe's models, so for our methods the
  list is checked there: a missing folder is named as such.
"""

from __future__ import annotations

import contextlib
import importlib
from collections import OrderedDict

from .compat import TARGET_VERSION
from .errors import IncompatibleMergekit
from .output import OutputFolder

HOOKED = ("_plan", "plan_module", "plan_layer", "plan_tensor", "plan_to_disk")
EXECUTORS = (("mergekit.graph", "Executor"), ("mergekit.multigpu_executor", "MultiGPUExecutor"))


def _mergekit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergekit")
    except PackageNotFoundError:
        return "(unknown version)"


_STATE = "_symalign_planning"
# Where the planner is (a module, a layer of it): mergekit's plan_layer calls plan_tensor
# without saying which layer of which model the tensor comes from, so the hooks remember it
# here between the two calls and hand it to AlignedPlanning.plan_tensor explicitly (the
# only ambient state of the planning; nothing below the plugin reads it).
_POSITION = "_symalign_position"


@contextlib.contextmanager
def _at(planner, position):
    outer = planner.__dict__.get(_POSITION)
    planner.__dict__[_POSITION] = position
    try:
        yield
    finally:
        if outer is None:
            planner.__dict__.pop(_POSITION, None)
        else:
            planner.__dict__[_POSITION] = outer


def install() -> None:
    """Idempotent: register every ``symmetry_aligned_*`` method and hook the planner."""
    # import_module, not attribute access: this can run while mergekit is being imported
    # (from the .pth hook), when submodules are not yet attributes of their package.
    registry = importlib.import_module("mergekit.merge_methods.registry")
    plan = importlib.import_module("mergekit.plan")
    from .compat import internals_problems, wrapped_method_problems
    from .methods import WRAPPED_METHODS, all_methods

    if "_symalign_original" not in plan.MergePlanner.__dict__:
        problems = internals_problems() + wrapped_method_problems(WRAPPED_METHODS)
        if problems:
            raise IncompatibleMergekit(
                "mergekit-symalign targets mergekit's internals as of mergekit "
                f"{TARGET_VERSION}; in the installed mergekit "
                f"{_mergekit_version()} these moved: " + "; ".join(problems) + ". Install "
                f"mergekit=={TARGET_VERSION} (pip install 'mergekit=={TARGET_VERSION}'). The "
                f"symmetry_aligned_* methods are not registered; plain mergekit is unaffected."
            )
    known = {m.spec.name for m in registry.registered_methods()}
    for method in all_methods():
        if method.spec.name not in known:
            registry.register(method)
    hook_planner(plan.MergePlanner)
    hook_config(importlib.import_module("mergekit.config").MergeConfiguration)
    for module, name in EXECUTORS:
        hook_executor(getattr(importlib.import_module(module), name))
    hook_run_merge()
    from .card import hook_card

    hook_card()


def hook_config(cls) -> None:
    """``referenced_models`` of an aligned recipe refuses a local model folder that does not
    exist (see the module docstring)."""
    if "_symalign_original_referenced_models" in cls.__dict__:
        return
    original = cls.__dict__["referenced_models"]

    def referenced_models(self):
        models = original(self)
        method = getattr(self, "merge_method", None)
        from .methods import PREFIX

        if isinstance(method, str) and method.startswith(PREFIX):
            from .validation import check_model_paths

            check_model_paths(models, method)
            from .crosssize_planning import check_architectures

            check_architectures(self, method)
        return models

    referenced_models.__wrapped__ = original
    referenced_models.__doc__ = original.__doc__
    referenced_models.__qualname__ = f"{cls.__qualname__}.referenced_models"
    cls.referenced_models = referenced_models
    cls._symalign_original_referenced_models = original


def _planning(planner):
    """The planner's :class:`AlignedPlanning`, or None when its method is not ours."""
    state = planner.__dict__.get(_STATE, False)
    if state is False:
        from .methods import SymmetryAlignedMerge
        from .planner import AlignedPlanning

        state = AlignedPlanning(planner) if isinstance(planner._method, SymmetryAlignedMerge) else None
        planner.__dict__[_STATE] = state
    return state


def hook_planner(cls) -> None:
    if "_symalign_original" in cls.__dict__:
        return
    original = {name: cls.__dict__[name] for name in HOOKED}

    def _plan(self):
        planning = _planning(self)
        if planning is not None:
            planning.check()  # before mergekit normalizes the config or builds a task
        return original["_plan"](self)

    def plan_module(self, module_name, definition):
        planning = _planning(self)
        if planning is None:
            return original["plan_module"](self, module_name, definition)
        from .layout import Position

        with _at(self, Position(module_name)):
            return original["plan_module"](self, module_name, definition)

    def plan_layer(self, sources, layer_offset, t, cfg_reader, module_name):
        planning = _planning(self)
        if planning is None:
            return original["plan_layer"](self, sources, layer_offset, t, cfg_reader, module_name)
        from .layout import Position

        indices = {s.model: s.layer_range[0] + layer_offset for s in sources}
        with _at(self, Position(module_name, indices)):
            return original["plan_layer"](self, sources, layer_offset, t, cfg_reader, module_name)

    def plan_tensor(self, weight, weights_in, models, cfg_reader):
        planning = _planning(self)
        if planning is None:
            return original["plan_tensor"](self, weight, weights_in, models, cfg_reader)
        from .layout import Position

        position = self.__dict__.get(_POSITION, Position())
        return planning.plan_tensor(weight, weights_in, models, cfg_reader, position)

    def plan_to_disk(self, out_path):
        planning = _planning(self)
        if planning is None:
            return original["plan_to_disk"](self, out_path)
        planning.out_path = out_path  # checked in planning.check(), from _plan
        folder = OutputFolder.before_merge(out_path)  # before the writer creates it
        targets = original["plan_to_disk"](self, out_path)
        _note_output(targets, folder)
        return targets

    for name, hooked in (("_plan", _plan), ("plan_module", plan_module),
                         ("plan_layer", plan_layer), ("plan_tensor", plan_tensor),
                         ("plan_to_disk", plan_to_disk)):
        hooked.__wrapped__ = original[name]
        hooked.__doc__ = original[name].__doc__
        hooked.__qualname__ = f"{cls.__qualname__}.{name}"
        setattr(cls, name, hooked)
    cls._symalign_original = original


# Output folders of aligned merges planned to disk and not yet run, by their writer task
# (mergekit builds one ``TensorWriterTask`` per merge; every ``SaveTensor`` target holds it).
# Bounded: a merge planned and never run leaves its entry behind.
_KEEP = 16
_OUTPUTS: "OrderedDict[object, OutputFolder]" = OrderedDict()


def _writer(task):
    return getattr(task, "writer_task", None)


def _note_output(targets, folder: OutputFolder) -> None:
    for task in targets:
        writer = _writer(task)
        if writer is not None:
            _OUTPUTS[writer] = folder
            while len(_OUTPUTS) > _KEEP:
                _OUTPUTS.popitem(last=False)
            return


def _output_of(executor):
    """The output folder of an aligned merge whose graph ``executor`` runs (taken: one run),
    or None for any other graph."""
    for handle in executor.targets:
        task = handle.task() if hasattr(handle, "task") else handle
        folder = _OUTPUTS.pop(_writer(task), None) if _writer(task) is not None else None
        if folder is not None:
            return folder
    return None


def hook_run_merge(module=None) -> None:
    """Idempotent: wrap ``run_merge`` in ``module`` (default: ``mergekit.merge`` if it has
    finished importing) so that an aligned merge that fails anywhere in it removes the output
    folder it created; inert for other methods."""
    import sys

    module = module if module is not None else sys.modules.get("mergekit.merge")
    original = getattr(module, "run_merge", None)
    if original is None or getattr(original, "_symalign", False):
        return  # half-imported (the autoload wraps it once loaded), or wrapped already
    from .methods import PREFIX

    def run_merge(merge_config, out_path, *args, **kwargs):
        method = getattr(merge_config, "merge_method", None)
        if not (isinstance(method, str) and method.startswith(PREFIX)):
            return original(merge_config, out_path, *args, **kwargs)
        with OutputFolder.before_merge(out_path).removed_on_failure():
            return original(merge_config, out_path, *args, **kwargs)

    run_merge.__wrapped__ = original
    run_merge.__doc__ = original.__doc__
    run_merge.__qualname__ = original.__qualname__
    run_merge._symalign = True
    module.run_merge = run_merge


def hook_executor(cls) -> None:
    """``cls.run`` (a generator) removes an aligned merge's output folder when it fails."""
    if "_symalign_original_run" in cls.__dict__:
        return
    original = cls.__dict__["run"]

    def run(self, *args, **kwargs):
        folder = _output_of(self)
        if folder is None:
            yield from original(self, *args, **kwargs)
            return
        with folder.removed_on_failure():
            yield from original(self, *args, **kwargs)

    run.__wrapped__ = original
    run.__doc__ = original.__doc__
    run.__qualname__ = f"{cls.__qualname__}.run"
    cls.run = run
    cls._symalign_original_run = original

"""The mergekit internals the plugin relies on, checked one by one (the canary).

mergekit has no plugin API for what the planner hook does, so the plugin targets mergekit
0.1.5's internals. :func:`internals_problems` names every internal that is missing or has
moved; :func:`.plugin.install` refuses to hook a mergekit that has any (plain merges keep
working, the aligned methods are not registered, and a warning says which internal moved).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import Callable, List

TARGET_VERSION = "0.1.5"

PLANNER_METHODS = {
    "_plan": ["self"],
    "plan_module": ["self", "module_name", "definition"],
    "plan_layer": ["self", "sources", "layer_offset", "t", "cfg_reader", "module_name"],
    "plan_tensor": ["self", "weight", "weights_in", "models", "cfg_reader"],
    "_model_arch": ["self", "model"],
    "normalize_config": ["self"],
    "plan_to_disk": ["self", "out_path"],
}


def _original(cls, name):
    """A planner method as mergekit defined it (before our hook wrapped it)."""
    original = cls.__dict__.get("_symalign_original", {})
    return original.get(name, getattr(cls, name, None))


def _parameters(func) -> List[str]:
    func = getattr(func, "__wrapped__", func)  # functools.lru_cache on _model_arch
    return list(inspect.signature(func).parameters)


def _executor_run(path: str) -> bool:
    mod, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(mod), name)
    run = cls.__dict__.get("_symalign_original_run", cls.run)
    return inspect.isgeneratorfunction(run) and _parameters(run)[:2] == ["self", "quiet"] \
        and "targets" in cls.__init__.__code__.co_names


def _lists_models_first(func) -> bool:
    names = func.__code__.co_names
    return "referenced_models" in names and (
        "config" not in names or names.index("referenced_models") < names.index("config"))


def internals_problems() -> List[str]:
    """Human-readable descriptions of every relied-on mergekit internal that is not as in
    mergekit 0.1.5 (empty when all are)."""
    problems: List[str] = []

    def check(what: str, test: Callable[[], bool]) -> None:
        try:
            ok = test()
        except Exception as err:  # a missing module or attribute is a moved internal too
            problems.append(f"{what} ({type(err).__name__}: {err})")
            return
        if not ok:
            problems.append(what)

    def module(name):
        return importlib.import_module(name)

    def fields(path):
        mod, cls = path.rsplit(".", 1)
        return set(getattr(module(mod), cls).model_fields)

    planner = lambda: module("mergekit.plan").MergePlanner  # noqa: E731
    for name, params in PLANNER_METHODS.items():
        check(f"mergekit.plan.MergePlanner.{name}{tuple(params[1:])}",
              lambda name=name, params=params: _parameters(_original(planner(), name)) == params)
    check("mergekit.plan.MergePlanner._plan calls normalize_config and plan_module",
          lambda: {"normalize_config", "plan_module"} <= set(_original(planner(), "_plan").__code__.co_names))
    check("mergekit.plan.MergePlanner.plan_to_disk calls _plan and TensorWriterTask (the "
          "output folder is created when the graph executes, not while planning)",
          lambda: {"_plan", "TensorWriterTask"} <= set(_original(planner(), "plan_to_disk").__code__.co_names))
    # A missing local model folder is refused in MergeConfiguration.referenced_models (the
    # plugin's hook): run_merge reads the models' configs in get_architecture_info before
    # planning, and that lists the models first. (run_merge itself is not read here: the
    # canary runs while mergekit.merge is being imported.)
    config_cls = lambda: module("mergekit.config").MergeConfiguration  # noqa: E731
    check("mergekit.config.MergeConfiguration.referenced_models(self)",
          lambda: _parameters(config_cls().__dict__.get("_symalign_original_referenced_models",
                                                        config_cls().referenced_models)) == ["self"])
    check("mergekit.architecture.get_architecture_info(config, options) lists "
          "config.referenced_models() before reading any model config",
          lambda: _lists_models_first(module("mergekit.architecture").get_architecture_info))
    check("mergekit.plan.MergePlanner.plan_layer calls plan_tensor",
          lambda: "plan_tensor" in _original(planner(), "plan_layer").__code__.co_names)
    check("mergekit.plan.MergePlanner has _method, _tensors, _tokenizer_task, config, options, "
          "arch_info", lambda: {"_method", "_tensors", "_tokenizer_task", "config", "options",
                                "arch_info"} <= set(planner().__annotations__))
    check("mergekit.merge_methods.task_adapter.ExecuteMergeMethodTask fields",
          lambda: {"method_name", "gather_tensors", "model_order", "base_model", "output_weight",
                   "parameters", "input_parameters", "dtype", "out_dtype"}
          <= fields("mergekit.merge_methods.task_adapter.ExecuteMergeMethodTask"))
    gta = lambda: module("mergekit.merge_methods.generalized_task_arithmetic")  # noqa: E731
    check("mergekit.merge_methods.generalized_task_arithmetic.GeneralizedTaskArithmeticMerge "
          "(consensus_method, sparsification_method).merge_group: weights the deltas, divides "
          "by the weights' sum when normalize, scales by lambda "
          "(tasks.transfer.single_delta_task_arithmetic repeats it for one skill; "
          "tests/test_kernels.py and tests/test_merge.py compare them bit for bit)",
          lambda: {"consensus_method", "sparsification_method"}
          <= set(gta().GeneralizedTaskArithmeticMerge.__dataclass_fields__)
          and {"normalize", "lambda", 1e-08} <= set(gta().GeneralizedTaskArithmeticMerge.merge_group.__code__.co_consts)
          and {"mul_", "sum"} <= set(gta().GeneralizedTaskArithmeticMerge.merge_group.__code__.co_names))
    # An aligned merge's output folder is removed when its graph fails (plugin.hook_executor):
    # found through the SaveTensor targets' writer task, around the executors' run().
    check("mergekit.io.tasks.SaveTensor has writer_task; TensorWriterTask has out_path",
          lambda: "writer_task" in fields("mergekit.io.tasks.SaveTensor")
          and "out_path" in fields("mergekit.io.tasks.TensorWriterTask"))
    for path in ("mergekit.graph.Executor", "mergekit.multigpu_executor.MultiGPUExecutor"):
        check(f"{path}.run(self, quiet, ...) is a generator and {path}.targets holds the targets",
              lambda path=path: _executor_run(path))
    check("mergekit.io.tasks.GatherTensors fields == {weight_info, dtype, device}",
          lambda: fields("mergekit.io.tasks.GatherTensors") == {"weight_info", "dtype", "device"})
    check("mergekit.io.tasks.LoadTensor fields",
          lambda: {"model", "tensor", "dtype", "device", "optional", "aliases", "tied_names"}
          <= fields("mergekit.io.tasks.LoadTensor"))
    check("mergekit.io.tasks.LoaderCache().get(model) -> LazyTensorLoader with .index",
          lambda: "get" in dir(module("mergekit.io.tasks").LoaderCache)
          and "index" in inspect.signature(module("mergekit.io.lazy_tensor_loader").LazyTensorLoader).parameters)
    check("mergekit.io.lazy_tensor_loader.ShardedTensorIndex.tensor_paths",
          lambda: "tensor_paths" in module("mergekit.io.lazy_tensor_loader").ShardedTensorIndex.__annotations__)
    check("mergekit.tokenizer.PermutedVocabulary fields",
          lambda: {"gather_tensors", "tokenizer_task", "tokens", "pad_to_multiple_of", "base_model",
                   "vocabulary_axis"} <= fields("mergekit.tokenizer.PermutedVocabulary"))
    check("mergekit.parameter_resolver.resolve_parameters(spec, tensor_name, inputs, sources, "
          "base_model, t)",
          lambda: _parameters(module("mergekit.parameter_resolver").resolve_parameters)
          == ["spec", "tensor_name", "inputs", "sources", "base_model", "t"])
    check("mergekit.merge_methods.registry.register/get/registered_methods",
          lambda: {"register", "get", "registered_methods"} <= set(dir(module("mergekit.merge_methods.registry"))))
    check("mergekit.merge_methods.base: GroupMergeMethod, ParameterSpec, ParameterScope, "
          "TensorGroup, TensorEntry, PerInputValues, InputContract, BasePolicy",
          lambda: all(hasattr(module("mergekit.merge_methods.base"), n) for n in (
              "GroupMergeMethod", "ParameterSpec", "ParameterScope", "TensorGroup",
              "TensorEntry", "PerInputValues", "InputContract", "BasePolicy", "MergeMethodSpec")))
    check("mergekit.architecture.ConfiguredModuleArchitecture.layer_weights(index)",
          lambda: _parameters(module("mergekit.architecture").ConfiguredModuleArchitecture.layer_weights)
          == ["self", "index"])
    check("mergekit.graph.Task: arguments, execute, group_label, priority, uses_accelerator",
          lambda: all(hasattr(module("mergekit.graph").Task, n) for n in (
              "arguments", "execute", "group_label", "priority", "uses_accelerator")))
    # The model card (.card) and the report (.report, .cli). mergekit.merge is read as source,
    # not imported: the plugin installs from inside its import.
    check("mergekit.card.generate_card(config, config_yaml, name)",
          lambda: _parameters(module("mergekit.card").generate_card)
          == ["config", "config_yaml", "name"])
    check("mergekit.merge imports generate_card from mergekit.card and run_merge calls "
          "generate_card(config=, config_yaml=, name=)", _run_merge_calls_generate_card)
    check("mergekit.merge._model_out_config(config, arch_info, trust_remote_code)",
          lambda: _function_args("mergekit.merge", "_model_out_config")
          == ["config", "arch_info", "trust_remote_code"])
    check("mergekit.options: add_merge_options, MergeOptions(device, low_cpu_memory, quiet, "
          "write_model_card)",
          lambda: hasattr(module("mergekit.options"), "add_merge_options")
          and {"device", "low_cpu_memory", "quiet", "write_model_card"}
          <= set(module("mergekit.options").MergeOptions.model_fields))
    return problems


def _module_tree(name: str) -> ast.Module:
    """A module's parsed source, without importing it."""
    return ast.parse(Path(importlib.util.find_spec(name).origin).read_text(encoding="utf-8"))


def _function(name: str, function: str) -> ast.FunctionDef:
    return next(n for n in _module_tree(name).body
                if isinstance(n, ast.FunctionDef) and n.name == function)


def _function_args(name: str, function: str) -> List[str]:
    return [a.arg for a in _function(name, function).args.args]


def _run_merge_calls_generate_card() -> bool:
    imported = any(isinstance(n, ast.ImportFrom) and n.module == "mergekit.card"
                   and any(a.name == "generate_card" and a.asname is None for a in n.names)
                   for n in _module_tree("mergekit.merge").body)
    calls = [c for c in ast.walk(_function("mergekit.merge", "run_merge"))
             if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
             and c.func.id == "generate_card"]
    return imported and len(calls) == 1 and {k.arg for k in calls[0].keywords} == {
        "config", "config_yaml", "name"}


def wrapped_method_problems(names) -> List[str]:
    """The wrapped methods must be mergekit's generalized task arithmetic."""
    registry = importlib.import_module("mergekit.merge_methods.registry")
    gta = importlib.import_module("mergekit.merge_methods.generalized_task_arithmetic")
    problems = []
    for name in names:
        try:
            method = registry.get(name)
        except Exception as err:
            problems.append(f"merge method {name} ({err})")
            continue
        if not isinstance(method, gta.GeneralizedTaskArithmeticMerge):
            problems.append(f"merge method {name} is no longer a GeneralizedTaskArithmeticMerge")
    return problems

"""Shipped recipes are valid, and the mergekit internals the plugin leans on are still there."""

import inspect
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid(path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import registry

    from mergekit_symalign.methods import SymmetryAlignedMerge
    from mergekit_symalign.validation import check_recipe

    config = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    method = registry.get(config.merge_method)
    assert isinstance(method, SymmetryAlignedMerge)
    check_recipe(config, method)


def test_tulu_recipe_is_the_papers_transfer():
    from mergekit.config import MergeConfiguration

    cfg = MergeConfiguration.model_validate(
        yaml.safe_load((Path(__file__).parent.parent / "recipes/tulu_reasoning.yml").read_text())
    )
    assert str(cfg.base_model) == "allenai/Llama-3.1-Tulu-3-8B"
    params = {str(m.model): m.parameters for m in cfg.models}
    assert params["meta-llama/Llama-3.1-8B-Instruct"] == {"role": "reference"}
    assert params["nvidia/Llama-3.1-Nemotron-Nano-8B-v1"] == {"weight": 1.0, "align": False}
    assert cfg.dtype == "bfloat16" and cfg.merge_method == "symmetry_aligned_task_arithmetic"


def test_canary_mergekit_internals():
    """Fails loudly if a mergekit release moves what the planner hook depends on."""
    assert version("mergekit") == "0.1.5", "the planner hook targets mergekit 0.1.5 exactly"
    import mergekit.merge
    from mergekit.io.tasks import GatherTensors, LoadTensor
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask, TensorDictWrapper
    from mergekit.parameter_resolver import resolve_parameters
    from mergekit.plan import MergePlanner

    from mergekit_symalign.methods import PREFIX, WRAPPED_METHODS
    from mergekit_symalign.planner import SymAlignPlanner

    # run_merge looks the planner up by global name at call time; we swap that global.
    assert "MergePlanner" in mergekit.merge.run_merge.__code__.co_names
    assert mergekit.merge.MergePlanner is SymAlignPlanner and issubclass(SymAlignPlanner, MergePlanner)
    assert list(inspect.signature(MergePlanner.plan_tensor).parameters) == [
        "self", "weight", "weights_in", "models", "cfg_reader"]
    for attr in ("_method", "_tensors", "_tokenizer_task", "_model_arch", "_plan", "arch_info"):
        assert hasattr(MergePlanner, attr) or attr in MergePlanner.__annotations__, attr
    assert {"method_name", "gather_tensors", "model_order", "base_model", "output_weight",
            "parameters", "input_parameters", "dtype"} <= set(ExecuteMergeMethodTask.model_fields)
    assert set(TensorDictWrapper.model_fields) == {"tensors"}
    assert {"weight_info", "dtype", "device"} == set(GatherTensors.model_fields)
    assert {"model", "tensor", "dtype", "device", "optional", "aliases", "tied_names"} <= set(
        LoadTensor.model_fields)
    assert list(inspect.signature(resolve_parameters).parameters) == [
        "spec", "tensor_name", "inputs", "sources", "base_model", "t"]
    for name in WRAPPED_METHODS:
        assert isinstance(registry.get(name), GeneralizedTaskArithmeticMerge)
        assert registry.get(PREFIX + name).spec.name == PREFIX + name
    assert {"register", "get", "registered_methods"} <= set(dir(registry))

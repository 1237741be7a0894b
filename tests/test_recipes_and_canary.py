"""Shipped recipes are valid, the planner hook covers every entry point, and the mergekit
internals the plugin leans on are still there (the canary names the one that moved)."""

import inspect
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .support import aligned_recipe, run_recipe

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


def test_canary_mergekit_internals():
    """Structural checks first, so a moved internal is named; the version pin last."""
    from mergekit_symalign.compat import TARGET_VERSION, internals_problems, wrapped_method_problems
    from mergekit_symalign.methods import WRAPPED_METHODS

    assert internals_problems() == []
    assert wrapped_method_problems(WRAPPED_METHODS) == []
    assert version("mergekit") == TARGET_VERSION, "the planner hook targets mergekit 0.1.5"


def test_canary_names_the_internal_that_moved(monkeypatch):
    import mergekit.io.tasks
    import mergekit.plan

    from mergekit_symalign.compat import internals_problems

    original = mergekit.plan.MergePlanner._symalign_original
    monkeypatch.setitem(original, "plan_layer", lambda self, sources, offset, cfg_reader, module: None)
    monkeypatch.setattr(mergekit.io.tasks.GatherTensors, "model_fields",
                        {"weight_info": None, "dtype": None, "device": None, "new_field": None})
    problems = internals_problems()
    assert any("MergePlanner.plan_layer" in p for p in problems)
    assert any("GatherTensors fields" in p for p in problems)
    assert all("plan_layer" in p or "GatherTensors" in p for p in problems)


def test_incompatible_mergekit_is_refused_not_hooked(monkeypatch):
    """install() on a mergekit whose internals moved: a clear error naming them, nothing hooked."""
    import mergekit.plan

    from mergekit_symalign import compat, plugin
    from mergekit_symalign.errors import IncompatibleMergekit

    class Fresh:  # an un-hooked planner class whose plan_tensor has another signature
        def plan_tensor(self, weight, models):
            pass

    monkeypatch.setattr(mergekit.plan, "MergePlanner", Fresh)
    with pytest.raises(IncompatibleMergekit, match="plan_tensor") as info:
        plugin.install()
    assert compat.TARGET_VERSION in str(info.value)
    assert "_symalign_original" not in vars(Fresh)


def test_one_planner_for_every_entry_point(family, tmp_path):
    """mergekit.merge and mergekit.plan (which the evolutionary merge imports) hold the same,
    hooked class: planning with ``mergekit.plan.MergePlanner`` directly gives the aligned
    merge. (mergekit 0.1.5's own ``plan_in_memory`` fails for every method, plain ones too:
    its ``ReturnTensor`` rejects ``ExecuteMergeMethodTask`` in pydantic validation; so this
    plans to disk, as run_merge does, and executes the graph here.)"""
    import mergekit.merge
    import mergekit.plan
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import MergeOptions, _model_out_config

    from mergekit_symalign.methods import PREFIX
    from mergekit_symalign.tasks import LayerAlignmentTask

    assert mergekit.merge.MergePlanner is mergekit.plan.MergePlanner
    assert "_symalign_original" in vars(mergekit.plan.MergePlanner)
    recipe = aligned_recipe(PREFIX + "task_arithmetic", family["reference_scrambled"],
                            family["reference"], [(family["skill"], {"align": False})])
    config = MergeConfiguration.model_validate(recipe)
    options = MergeOptions(quiet=True)
    LoaderCache().setup(options=options)
    arch = get_architecture_info(config, options)
    planner = mergekit.plan.MergePlanner(config, arch, options, _model_out_config(config, arch))
    tasks = planner.plan_to_disk(str(tmp_path / "direct"))
    found, stack = set(), list(tasks)
    while stack:  # the graph holds our alignment tasks
        task = stack.pop()
        found.add(type(task))
        stack.extend(task.arguments().values())
    assert any(issubclass(t, LayerAlignmentTask) for t in found)  # (or its collecting subclass)
    for _ in Executor(tasks).run(quiet=True):
        pass
    direct = load_file(f"{tmp_path / 'direct'}/model.safetensors")
    on_disk = load_file(f"{run_recipe(recipe, tmp_path / 'out')}/model.safetensors")
    assert direct.keys() == on_disk.keys()
    assert all(torch.equal(direct[k], on_disk[k]) for k in on_disk)


def test_plain_methods_are_planned_by_mergekit_unchanged():
    """The hook hands every other method to mergekit's own code paths."""
    import mergekit.plan

    original = mergekit.plan.MergePlanner._symalign_original
    for name in ("_plan", "plan_module", "plan_layer", "plan_tensor"):
        hooked = getattr(mergekit.plan.MergePlanner, name)
        assert hooked.__wrapped__ is original[name]
        assert inspect.signature(hooked) == inspect.signature(original[name])

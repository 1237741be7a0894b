"""mergekit's --multi-gpu executor partitions the task graph into islands (weakly connected
components of its parallel tasks) and gives each a GPU. On CPU, with the device count mocked:
an aligned merge must still split into at least one island per layer."""

from __future__ import annotations

import pytest
import torch
import transformers

import mergekit.multigpu_executor as multigpu
from .support import aligned_recipe, perturbed, plain_transfer_recipe
from mergekit_symalign.statedict import scramble_state_dict

from .conftest import make_config, save
from .test_moe import MOE_CONFIGS

LAYERS = 4


def island_count(recipe, out, monkeypatch, write_model_card: bool) -> int:
    """The number of islands mergekit's MultiGPUExecutor finds (with one mocked GPU per
    island, so that each island lands on its own device)."""
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import MergeOptions, _model_out_config
    from mergekit.plan import MergePlanner

    monkeypatch.setattr(multigpu, "get_torch_accelerator_type", lambda: "cuda")
    config = MergeConfiguration.model_validate(recipe)
    options = MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=write_model_card,
                           multi_gpu=True)
    arch = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    targets = MergePlanner(config, arch, options=options,
                           out_model_config=_model_out_config(config, arch)).plan_to_disk(out_path=str(out))
    executor = multigpu.MultiGPUExecutor(targets=targets, num_gpus=10_000)
    return len(executor.gpu_assignments)


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def moved_family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"islands_{request.param}")
    if request.param == "mixtral":
        config = MOE_CONFIGS["mixtral"](num_hidden_layers=LAYERS)
    else:
        config = make_config("llama", num_hidden_layers=LAYERS)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config).state_dict()
    states = {"reference": ref, "skill": perturbed(ref, seed=1),
              "moved": scramble_state_dict(ref, config, seed=2)[0]}
    return {n: save(sd, config, root / n) for n, sd in states.items()}


@pytest.mark.parametrize("card", [False, True])
@pytest.mark.parametrize("residual", ["none", "permutation", "orthogonal"])
def test_aligned_graph_splits_into_an_island_per_layer(moved_family, residual, card, tmp_path, monkeypatch):
    f = moved_family
    plain = island_count(plain_transfer_recipe(f["moved"], f["reference"], f["skill"]),
                         tmp_path / "plain", monkeypatch, card)
    aligned = island_count(aligned_recipe("symmetry_aligned_task_arithmetic", f["moved"],
                                          f["reference"], [f["skill"]], residual=residual),
                           tmp_path / "aligned", monkeypatch, card)
    assert plain >= LAYERS  # plain: every tensor on its own
    # aligned: a layer's tensors share their layer's alignment; the residual stream's
    # alignment, shared by every layer, is solved on each GPU (duplicate_per_gpu)
    assert aligned >= LAYERS, (plain, aligned)

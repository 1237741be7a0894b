"""The transfer's pure kernels against what they replace, on random inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from mergekit.architecture import WeightInfo
from mergekit.common import ImmutableMap, ModelReference
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask, TensorDictWrapper

from mergekit_symalign.tasks.transfer import single_delta_task_arithmetic

REFERENCE, SKILL = (ModelReference.parse(p) for p in ("/no/reference", "/no/skill"))


def task_arithmetic(weight, normalize, scale, dtype="float32") -> ExecuteMergeMethodTask:
    """mergekit's own task for one skill on the reference (its base), as the planner builds it."""
    return ExecuteMergeMethodTask(
        method_name="task_arithmetic",
        gather_tensors=TensorDictWrapper(tensors=ImmutableMap(data={})),
        model_order=(REFERENCE, SKILL), base_model=REFERENCE,
        output_weight=WeightInfo(name="model.layers.0.mlp.up_proj.weight"),
        parameters=ImmutableMap(data={"normalize": normalize, "lambda": scale, "int8_mask": False,
                                      "rescale": False}),
        input_parameters=ImmutableMap(data={REFERENCE: ImmutableMap(data={}),
                                            SKILL: ImmutableMap(data={"weight": weight, "density": 1.0})}),
        dtype=dtype)


@pytest.mark.parametrize("weight,normalize,scale", list(itertools.product(
    (1.0, 0.5, -0.3, 2.5, 1e-9, 0.0), (False, True), (1.0, 0.6, 1.5))))
@pytest.mark.parametrize("shape", [(37, 11), (53,), ()])
def test_single_skill_shortcut_is_mergekits_kernel_bit_for_bit(weight, normalize, scale, shape):
    """Why the copy exists (tasks.transfer.single_delta_task_arithmetic): the kernel makes
    three tensor-sized float32 temporaries and two passes over the zero base; the copy works
    in place. It must give the kernel's result exactly, for every option."""
    gen = torch.Generator().manual_seed(hash((weight, normalize, scale, shape)) % 2**31)
    delta = torch.randn(shape, generator=gen) * 3
    zero = torch.zeros((), dtype=torch.float32).expand(shape)
    task = task_arithmetic(weight, normalize, scale)
    kernel = task.execute(tensors={REFERENCE: zero, SKILL: delta.clone()})
    ours = single_delta_task_arithmetic(task, {REFERENCE: zero, SKILL: delta.clone()})
    assert ours is not None
    assert ours.dtype == kernel.dtype and torch.equal(ours, kernel)


def test_shortcut_declines_what_it_does_not_copy():
    delta = torch.randn(5, 3)
    zero = torch.zeros((), dtype=torch.float32).expand(5, 3)
    assert single_delta_task_arithmetic(task_arithmetic(1.0, False, 1.0, dtype="bfloat16"),
                                        {REFERENCE: zero, SKILL: delta}) is None
    assert single_delta_task_arithmetic(task_arithmetic(1.0, False, 1.0),
                                        {REFERENCE: zero, SKILL: delta.double()}) is None
    assert single_delta_task_arithmetic(task_arithmetic(1.0, False, 1.0),
                                        {REFERENCE: zero, SKILL: None}) is None

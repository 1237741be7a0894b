"""One output tensor's inputs, one function per input path, and the wrapped method's task:

* :func:`vocabulary_inputs` — embeddings under a tokenizer section: mergekit's own vocabulary
  permutation, then the residual stream's transform of each aligned model;
* :func:`transfer_inputs` — a transfer (base != reference): the skills' deltas on a zero base
  (:class:`.tasks.SkillDeltas`), so the method's result is the combined delta;
* :func:`merge_inputs` — no transfer (base = reference): the aligned models themselves;
* :func:`method_task` — mergekit's ``ExecuteMergeMethodTask`` of the wrapped method on them.

Each path returns ``(method inputs, sources)``: ``sources`` yields the base's and reference's
tensors for the :mod:`.tasks.transfer` task. A new input path (e.g. a skill vector restricted
to a pruned child's shape) is one more function here, chosen in
:meth:`.planner.AlignedPlanning._merged_task`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

from mergekit.architecture import WeightInfo
from mergekit.common import ImmutableMap, ModelReference
from mergekit.merge_methods.base import ParameterScope
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.tokenizer import PermutedVocabulary

from .layout import Layout, Moved
from .settings import Roles
from .tasks import (
    AlignTensorTask,
    AlignVocabularyTask,
    CheckedTensors,
    FiniteTensor,
    LayerAlignmentTask,
    SkillDeltas,
)


@dataclass(frozen=True, eq=False)
class TensorInputs:
    """What every input path of one output tensor needs."""

    layout: Layout
    by_model: Mapping[ModelReference, WeightInfo]  # each model's input tensor
    roles: Roles
    tensor: Moved  # the layer or module tensor an alignment moves, or None
    alignment: Callable[[ModelReference], Optional[Any]]  # model -> its alignment task (or None)

    def load(self, model):
        return self.layout.load(model, self.by_model[model])

    def aligned(self, model):
        """The model's tensor as the method takes it: moved by its alignment, if any (a layer
        tensor of an aligned model: its alignment task checked it as it loaded)."""
        transform = self.alignment(model)
        if transform is None:
            return self.load(model)  # checked by the task that takes it
        return AlignTensorTask(tensor=self.load(model), alignment=transform, name=self.tensor.name)

    def unchecked(self, models: Iterable[ModelReference]) -> ImmutableMap:
        """{model: its tensor's name} of those whose input no layer alignment checked (a
        LayerAlignmentTask checks every tensor it loads; residual-stream and activation
        alignments read only some, so their tensors are checked again)."""
        return ImmutableMap(data={m: self.by_model[m].name for m in models
                                  if not isinstance(self.alignment(m), LayerAlignmentTask)})

    def sources(self, check: Iterable[ModelReference]) -> CheckedTensors:
        """The base's and the reference's raw loads (``check``: those refused here if non-finite)."""
        roles = self.roles
        return CheckedTensors(
            tensors=ImmutableMap(data={m: self.load(m) for m in dict.fromkeys((roles.base, roles.reference))}),
            check=self.unchecked(check))


def vocabulary_inputs(inputs: TensorInputs, weight: WeightInfo, planner, cfg_reader) -> Tuple[Any, Any]:
    """Embeddings under a tokenizer section: mergekit's own vocabulary permutation (only the
    residual-stream transform, if any, acts on them); every model's permuted rows are checked
    before the transfer saves anything."""
    tokenizer = cfg_reader.config.tokenizer
    permuted = PermutedVocabulary(
        gather_tensors=inputs.layout.gather(inputs.by_model),
        tokenizer_task=planner._tokenizer_task,
        tokens=(tokenizer.tokens if tokenizer else None) or {},
        pad_to_multiple_of=tokenizer.pad_to_multiple_of if tokenizer else None,
        base_model=cfg_reader.base_model,
        vocabulary_axis=weight.vocabulary_axis,
    )
    sources = FiniteTensor(tensor=permuted, name=weight.name)
    moved = tuple((m, inputs.alignment(m)) for m in inputs.roles.merged
                  if inputs.alignment(m) is not None)
    if moved:  # the residual stream's transform, after mergekit's token permutation
        return AlignVocabularyTask(permuted=permuted, alignments=moved, name=inputs.tensor.name), sources
    return permuted, sources


def transfer_inputs(inputs: TensorInputs) -> Tuple[SkillDeltas, CheckedTensors]:
    """A transfer: the wrapped method merges the skills' deltas onto a zero base, so its
    result is the combined delta itself (see SkillDeltas). The deltas, and so the merge, wait
    for the base's layer alignment (the only case where the base is aligned). SkillDeltas
    checks the reference (and the skills not aligned), before the transfer reads the sources."""
    roles = inputs.roles
    deltas = SkillDeltas(
        tensors=ImmutableMap(data={roles.reference: inputs.load(roles.reference),
                                   **{m: inputs.aligned(m) for m in roles.skills}}),
        check=inputs.unchecked((roles.reference, *roles.skills)),
        reference_model=roles.reference, after=inputs.alignment(roles.base))
    return deltas, inputs.sources(check=(roles.base,))


def merge_inputs(inputs: TensorInputs) -> Tuple[CheckedTensors, CheckedTensors]:
    """No transfer: the method merges the (aligned) models themselves on the reference."""
    roles = inputs.roles
    merged = CheckedTensors(tensors=ImmutableMap(data={m: inputs.aligned(m) for m in roles.merged}),
                            check=inputs.unchecked(roles.merged))
    # the merged models were checked as the method's inputs
    return merged, inputs.sources(check=(m for m in (roles.base, roles.reference)
                                         if m not in roles.merged))


def method_task(method, weight: WeightInfo, roles: Roles, shared: Mapping[str, Any],
                per_input: Mapping[ModelReference, Mapping[str, Any]], gathered) -> ExecuteMergeMethodTask:
    """The wrapped method's own task on ``gathered``, with the reference as its base."""
    inner = method.inner.spec
    input_params: Dict[ModelReference, ImmutableMap] = {
        m: ImmutableMap(data={
            p.name: per_input[m][p.name]
            for p in inner.input_parameters
            if m != roles.reference or p.scope == ParameterScope.INPUT
        })
        for m in roles.merged
    }
    return ExecuteMergeMethodTask(
        method_name=inner.name,
        gather_tensors=gathered,
        model_order=roles.merged,
        base_model=roles.reference,
        output_weight=weight,
        parameters=ImmutableMap(data={p.name: shared[p.name] for p in inner.shared_parameters}),
        input_parameters=ImmutableMap(data=input_params),
        # A transfer keeps the skill vector in float32 (the deltas; or, through mergekit's
        # vocabulary permutation, the models, the reference being subtracted again).
        dtype="float32" if roles.transfer else None,
    )

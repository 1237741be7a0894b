"""The transfer: ``aligned(B) + combine(...)``, the task each output tensor is saved from.

* :class:`TransferTask` takes the wrapped method's merged result as an input (a graph node).
* :class:`FusedTransferTask` takes the skills' loads and alignments themselves and runs the
  AlignTensorTasks, SkillDeltas and the wrapped method's task that ``merge`` describes inside
  it (their own ``execute``, unchanged). Why: mergekit's executor moves every task's inputs to
  the GPU and its result back to host memory, so as nodes the float32 aligned skills and
  deltas, the zero base (materialized by the move) and the merged delta crossed the bus in
  both directions; fused, only the loaded tensors go up and the result comes down, as in a
  plain merge (H200, 1B-shaped --cuda merge: 1.69x -> 1.16x plain; docs/how-it-works.md).

The arithmetic is :func:`.kernels.transferred`; these classes only route tensors to it.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch

from mergekit.common import ModelReference
from mergekit.graph import Task
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

from ..kernels import transferred, weighted_single_delta
from ..spec import LayerTransform
from .alignment import Alignment, AlignTensorTask
from .inputs import SkillDeltas


class _Transfer(Task[Optional[torch.Tensor]]):
    """``aligned(B) + delta``; with ``output_frame: base`` expressed as ``B + inverse_B(delta)``
    (the group acts linearly, so both are the same model), where ``delta`` is the merged
    result itself (``merged_is_delta``: the method merged SkillDeltas' inputs) or
    ``merged - R`` (the vocabulary-permuted embeddings of a recipe with a tokenizer section).

    ``sources`` yields the base's and the reference's tensors (raw loads, or mergekit's
    vocabulary-permuted ones for embeddings when the recipe has a tokenizer section)."""

    sources: Task
    base_model: ModelReference
    reference_model: ModelReference
    base_alignment: Optional[Alignment] = None
    name: Optional[str] = None
    output_frame: str = "base"
    merged_is_delta: bool = False

    def _inputs(self) -> Dict[str, Task]:
        args = {"sources": self.sources}
        if self.base_alignment is not None:
            args["transform"] = self.base_alignment
        return args

    def _transfer(self, merged, sources, transform, owned: bool, **refold) -> Optional[torch.Tensor]:
        if merged is None:
            return None
        base = sources.get(self.base_model)
        reference = sources.get(self.reference_model)
        if self.merged_is_delta and base is None and reference is not None:
            # no base tensor: the transfer onto the reference
            return torch.add(merged.to(torch.float32), reference).to(reference.dtype)
        if self.reference_model == self.base_model or base is None:
            return merged.to(base.dtype if base is not None else merged.dtype)
        if reference is None:
            raise RuntimeError(
                f"tensor {self.name or ''}: present in base model {self.base_model} but not in "
                f"the reference model {self.reference_model}; the skill vector cannot be "
                f"measured against it."
            )
        return transferred(merged, base, reference, transform, self.name,
                           merged_is_delta=self.merged_is_delta, output_frame=self.output_frame,
                           owned=owned, **refold)


class TransferTask(_Transfer):
    """The transfer of a merged result computed by another task (``merged``). Under
    ``residual: orthogonal`` in the base's frame, a reader or norm also takes its norm's
    merged delta and sources (``fold_norm``, :func:`.kernels.refolded`)."""

    merged: Task
    fold_norm: Optional[str] = None
    norm_merged: Optional[Task] = None  # the norm's merge took SkillDeltas' inputs: a delta
    norm_sources: Optional[Task] = None

    def arguments(self) -> Dict[str, Task]:
        args = {"merged": self.merged, **self._inputs()}
        if self.norm_merged is not None:
            args["norm_merged"] = self.norm_merged
            args["norm_sources"] = self.norm_sources
        return args

    def group_label(self) -> Optional[str]:
        return self.merged.group_label()

    def uses_accelerator(self) -> bool:
        return True

    def execute(self, sources: Dict[ModelReference, torch.Tensor], merged: Optional[torch.Tensor] = None,
                transform: Optional[LayerTransform] = None, norm_merged: Optional[torch.Tensor] = None,
                norm_sources: Optional[Dict[ModelReference, torch.Tensor]] = None) -> Optional[torch.Tensor]:
        refold = {}
        if self.fold_norm is not None:
            refold["fold_norm"] = self.fold_norm
        if norm_merged is not None:
            refold.update(norm_merged=norm_merged, norm_base=norm_sources[self.base_model])
        # mergekit may hand the same merged result to other tasks: never written in place
        return self._transfer(merged, sources, transform, owned=False, **refold)


class FusedTransferTask(_Transfer):
    """The transfer with the skills' merge inside (see the module docstring): ``merge`` is the
    wrapped method's ``ExecuteMergeMethodTask`` over a :class:`SkillDeltas`, kept as the
    description of what runs here, not as a graph node. Its inputs are SkillDeltas' inputs,
    an aligned skill's AlignTensorTask replaced by its load and its alignment."""

    merge: ExecuteMergeMethodTask
    merged_is_delta: bool = True

    def _deltas(self) -> SkillDeltas:
        return self.merge.gather_tensors

    def arguments(self) -> Dict[str, Task]:
        args = {}
        for i, task in enumerate(self._deltas().tensors.data.values()):
            if isinstance(task, AlignTensorTask):
                args[f"skill:{i}"], args[f"skill:{i}:transform"] = task.tensor, task.alignment
            else:
                args[f"skill:{i}"] = task
        return {**args, **self._inputs()}

    def group_label(self) -> Optional[str]:
        return self.merge.group_label()

    def uses_accelerator(self) -> bool:
        return self.merge.uses_accelerator()

    def execute(self, sources: Dict[ModelReference, torch.Tensor],
                transform: Optional[LayerTransform] = None, **inputs) -> Optional[torch.Tensor]:
        merged = self._merged(inputs)
        del inputs
        # ``merged`` is this task's alone (the single-skill path's delta, or a tensor the
        # kernel made from this task's deltas), except a broadcast view of the zero base when
        # no skill has the tensor: written in place unless it is that view.
        owned = merged is not None and merged.is_contiguous()
        return self._transfer(merged, sources, transform, owned=owned)

    def _merged(self, inputs: Dict[str, Any]) -> Optional[torch.Tensor]:
        """The wrapped method's combined delta: each skill's input (aligned here when its
        AlignTensorTask was fused), SkillDeltas, then the method's kernel."""
        deltas_task, tensors = self._deltas(), {}
        for i, task in enumerate(deltas_task.tensors.data.values()):
            value = inputs[f"skill:{i}"]
            if isinstance(task, AlignTensorTask):
                value = task.execute(tensor=value, transform=inputs[f"skill:{i}:transform"])
            tensors[SkillDeltas.argument(i)] = value
        deltas = deltas_task.execute(**tensors)
        direct = single_delta_task_arithmetic(self.merge, deltas)
        return direct if direct is not None else self.merge.execute(tensors=deltas)


def single_delta_task_arithmetic(task: ExecuteMergeMethodTask,
                                 deltas: Mapping[ModelReference, Optional[torch.Tensor]]
                                 ) -> Optional[torch.Tensor]:
    """mergekit's ``task_arithmetic`` kernel on SkillDeltas' output for **one** skill, in place
    on that skill's delta (:func:`.kernels.weighted_single_delta`, bit for bit the kernel's
    result). Kept as a copy rather than calling the kernel because the kernel makes two
    passes over the zero base and three tensor-sized float32 temporaries (the difference, the
    stacked deltas and their sum; 672 MiB for a Llama-3.1-8B MLP tensor, the peak of an
    aligned bf16 merge's memory). ``None`` (run the kernel) for any other method, several
    skills, a missing or non-float tensor, a shape the kernel would refuse, or a dtype it
    would convert. The delta is SkillDeltas' fresh result inside a FusedTransferTask: no
    one else holds it."""
    from mergekit import merge_methods
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

    method = merge_methods.get(task.method_name)
    if type(method) is not GeneralizedTaskArithmeticMerge or method.sparsification_method is not None \
            or method.consensus_method is not None or task.out_dtype is not None \
            or task.dtype not in (None, "float32"):
        return None
    skills = [m for m in task.model_order if m != task.base_model]
    zero = deltas.get(task.base_model)
    delta = deltas.get(skills[0]) if len(skills) == 1 else None
    if delta is None or zero is None or delta.dtype != torch.float32 or zero.dtype != torch.float32 \
            or delta.shape != zero.shape:
        return None
    try:
        weight = float(task.input_parameters[skills[0]]["weight"])
        normalize, scale = bool(task.parameters["normalize"]), float(task.parameters["lambda"])
    except (KeyError, TypeError, ValueError):
        return None
    return weighted_single_delta(delta, weight, normalize, scale)

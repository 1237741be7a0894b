"""The wrapped method's inputs, checked as they load: :class:`FiniteTensor`,
:class:`CheckedTensors` and, in a transfer, :class:`SkillDeltas` (the skills' deltas on a zero
base). Each refuses a NaN/Inf input (:func:`.validation.check_finite`: one reduction, no copy)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from mergekit.common import ImmutableMap, ModelReference
from mergekit.graph import Task
from mergekit.merge_methods.task_adapter import TensorDictWrapper

from ..kernels import widened_difference
from ..validation import check_finite

AFTER = "__after__"  # SkillDeltas' ordering-only argument


class FiniteTensor(Task[Any]):
    """Passes a loaded tensor through after :func:`.validation.check_finite` (one reduction,
    no copy). ``tensor`` is a ``LoadTensor`` (``model`` is its model), or a task returning
    ``{model: tensor}`` such as mergekit's ``PermutedVocabulary`` (``model`` None)."""

    tensor: Task
    model: Optional[ModelReference] = None
    name: str

    def arguments(self) -> Dict[str, Task]:
        return {"tensor": self.tensor}

    def group_label(self) -> Optional[str]:
        return self.tensor.group_label()

    def priority(self) -> int:
        return self.tensor.priority()

    def execute(self, tensor):
        if isinstance(tensor, dict):
            for model, value in tensor.items():
                check_finite(value, model, self.name)
        else:
            check_finite(tensor, self.model, self.name)
        return tensor


class CheckedTensors(TensorDictWrapper):
    """``{model: tensor}`` of several tasks, each tensor refused if it holds a NaN/Inf
    (:func:`.validation.check_finite`: one reduction, no copy): what mergekit's
    ``TensorDictWrapper`` over one ``FiniteTensor`` per model did, as one task (a subclass,
    so mergekit's ``ExecuteMergeMethodTask`` takes it as its input). mergekit's executor pays
    per task (its loop scans the graph's targets and live values for each), and those
    wrappers and checks were half of an aligned merge's tasks.

    ``check`` names each model's tensor as that model calls it; a model it leaves out was
    checked already (an aligned tensor: its alignment task checked it as it loaded)."""

    check: ImmutableMap[ModelReference, str]

    @staticmethod
    def argument(index: int) -> str:
        """The argument name of the ``index``-th model's tensor."""
        return f"tensor:{index}"

    def arguments(self) -> Dict[str, Task]:
        return {self.argument(i): task for i, task in enumerate(self.tensors.data.values())}

    def group_label(self) -> Optional[str]:
        return max((task.group_label() or "" for task in self.tensors.data.values()), default="") or None

    def execute(self, **tensors) -> Dict[ModelReference, Optional[torch.Tensor]]:
        return self._checked(tensors)

    def _checked(self, tensors) -> Dict[ModelReference, Optional[torch.Tensor]]:
        out = {}
        for i, model in enumerate(self.tensors.data.keys()):
            out[model] = tensors[self.argument(i)]
            if model in self.check.data:
                check_finite(out[model], model, self.check[model])
        return out


class SkillDeltas(CheckedTensors):
    """The wrapped method's inputs in a transfer: each skill's ``S_i - R`` in at least
    float32, and for the reference a zero base (float32 zeros shaped like its tensor, a
    broadcast view of one zero: no memory); one task for all of them (see CheckedTensors).
    ``tensors`` holds the reference's load and each skill's input, ``check`` names those
    refused here if non-finite (the reference always).

    mergekit's task-arithmetic family only ever uses its inputs as ``model - base`` and adds
    the base back at the end; on a zero base its result is the combined delta itself. The
    transfer needs exactly that delta: merging the models and subtracting the reference again
    computes the same numbers with two more float32 copies of every tensor (the reference's,
    converted, and ``R + delta``) inside the method, the peak of a bf16 merge's memory."""

    reference_model: ModelReference
    # The base's layer alignment, computed first. mergekit's scheduler runs a ready task as
    # soon as nothing of higher priority is: without this, a layer's deltas and merges ran
    # while the layer was still loading for its alignment, and their float32 results (224 MiB
    # per MLP tensor at 8B shapes) waited for it.
    after: Optional[Task] = None

    def arguments(self) -> Dict[str, Task]:
        args = super().arguments()
        if self.after is not None:
            args[AFTER] = self.after
        return args

    def group_label(self) -> Optional[str]:
        return self.tensors[self.reference_model].group_label()

    def execute(self, **tensors) -> Dict[ModelReference, Optional[torch.Tensor]]:
        tensors.pop(AFTER, None)
        out = self._checked(tensors)
        reference = out[self.reference_model]
        if reference is None:
            return out  # the method sees what it would have seen (TransferTask refuses)
        for model, tensor in out.items():
            if model == self.reference_model:
                dtype = torch.promote_types(reference.dtype, torch.float32)
                out[model] = torch.zeros((), dtype=dtype, device=reference.device).expand(reference.shape)
            elif tensor is not None:
                out[model] = widened_difference(tensor, reference)
        return out

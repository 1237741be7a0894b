"""mergekit task-graph nodes of an aligned merge, by concern:

* :mod:`.alignment` — what moves a model into the reference's frame (residual, layer and
  activation alignments) and the tasks that apply a transform to a tensor;
* :mod:`.inputs` — the wrapped method's inputs, checked as they load (and a transfer's skill
  deltas);
* :mod:`.transfer` — ``aligned(B) + combine(...)``, the task each output tensor is saved from.

The arithmetic lives in :mod:`..kernels` (pure torch), the solves in :mod:`..solve`; the
output folder's cleanup on failure is the plugin's (:mod:`..plugin`), not the tasks'.
"""

from .alignment import (
    ActivationAlignmentTask,
    Alignment,
    AlignTensorTask,
    AlignVocabularyTask,
    LayerAlignmentTask,
    NamedLoads,
    PickLayerTransform,
    PickModuleTransform,
    ResidualAlignmentTask,
    ResidualResult,
)
from .inputs import CheckedTensors, FiniteTensor, SkillDeltas
from .transfer import FusedTransferTask, TransferTask, single_delta_task_arithmetic

__all__ = [
    "ActivationAlignmentTask", "Alignment", "AlignTensorTask", "AlignVocabularyTask",
    "CheckedTensors", "FiniteTensor", "FusedTransferTask", "LayerAlignmentTask", "NamedLoads",
    "PickLayerTransform", "PickModuleTransform", "ResidualAlignmentTask", "ResidualResult",
    "SkillDeltas", "TransferTask", "single_delta_task_arithmetic",
]

"""The aligned half of mergekit's ``MergePlanner``: the task graph of an aligned merge.

:mod:`.plugin` hooks ``mergekit.plan.MergePlanner`` itself (so every entry point that plans a
merge — ``mergekit-yaml``, ``run_merge``, the evolutionary merge — gets it) and, when the
recipe's method is a ``symmetry_aligned_*`` one, hands planning to :class:`AlignedPlanning`:

* :meth:`AlignedPlanning.check` runs every recipe check
  (:func:`.validation.check_aligned_merge`) before mergekit builds anything, so a refused
  merge writes nothing;
* :meth:`AlignedPlanning.plan_tensor` builds one output tensor's tasks, in four steps each
  owned by one module: which tensor it is (:mod:`.layout`, from the :class:`.layout.Position`
  the plugin passes), which alignment task each model gets (:mod:`.alignments`), the wrapped
  method's inputs and task (:mod:`.tensor_inputs`), and the transfer (:mod:`.tasks.transfer`)::

    LoadTensor(S_i) --AlignTensorTask(LayerAlignmentTask(S_i, R))--+
    LoadTensor(R) -------------------------------------------------SkillDeltas(S_i - R; zero base)
                                                                    -> ExecuteMergeMethodTask
                                                                        (wrapped method: combined delta)
    CheckedTensors(LoadTensor(B), LoadTensor(R)), LayerAlignmentTask(B, R) --> TransferTask -> save

  In a transfer, AlignTensorTask, SkillDeltas and the method's task run inside one
  :class:`.tasks.FusedTransferTask` (the graph shows it), except where a ``residual:
  orthogonal`` refold shares a norm's merged delta between tasks. Without a transfer (base =
  reference) the method merges the models themselves on R.

Roles and settings are resolved by :mod:`.settings` (pure functions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

from mergekit.architecture import WeightInfo
from mergekit.common import ModelReference
from mergekit.config import ConfigReader
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.parameter_resolver import resolve_parameters

from .alignments import Alignments
from .collect import for_planning
from .crosssize_planning import detect as detect_cross_size
from .layout import LayerTensor, Layout, Moved, Position
from .settings import Roles, TensorSettings, resolve_roles, resolve_settings
from .tasks import FusedTransferTask, TransferTask
from .tensor_inputs import TensorInputs, merge_inputs, method_task, transfer_inputs, vocabulary_inputs
from .validation import LayerConsistency, activation_models, check_aligned_merge

LOG = logging.getLogger(__name__)

# A transfer's merge runs inside its FusedTransferTask (False: as graph nodes; tests compare).
FUSE = True


@dataclass(frozen=True, eq=False)
class Planned:
    """One output tensor's merge, before its transfer."""

    merged: ExecuteMergeMethodTask
    sources: object
    roles: Roles
    settings: TensorSettings
    tensor: Moved  # the layer or module tensor an alignment moves, or None
    inputs: TensorInputs
    delta_inputs: bool = False  # merged is the combined delta, not R + delta


class AlignedPlanning:
    """Per-merge state of an aligned merge's planning (one per ``MergePlanner``)."""

    def __init__(self, planner):
        self.planner = planner
        self.method = planner._method
        self.out_path: Optional[str] = None  # set by plan_to_disk; None when planned in memory
        self.layout: Optional[Layout] = None  # after check()
        self.alignments: Optional[Alignments] = None
        self._planned: Dict[str, Planned] = {}
        self._consistency = LayerConsistency()
        self.cross_size = None  # a CrossSizePlanning when the base is a pruned child (check())
        # Report hook (.collect): a key when the merge's alignments are recorded (for the model
        # card or `mergekit-symalign report`); alignment tasks are then built by collected().
        self.collector: Optional[str] = for_planning(planner)

    def check(self) -> None:
        """Every recipe check, before mergekit normalizes the config or builds a task."""
        self.cross_size = detect_cross_size(self.planner, self.method)
        if self.cross_size is not None:  # a pruned child as the base: its own planning
            self.cross_size.check(self.out_path)
            self.cross_size.solve()
            self.cross_size.normalize()
            return
        facts = check_aligned_merge(self.planner, self.method, self.out_path)
        self.layout = Layout(self.planner, facts.arch, facts.geometry, facts.module, facts.tied)
        config = self.planner.config
        self.alignments = Alignments(self.layout, lambda reference: activation_models(config, reference),
                                     self.collector)

    def plan_tensor(self, weight: WeightInfo, weights_in: List[WeightInfo], models: List[ModelReference],
                    cfg_reader: ConfigReader, position: Position) -> None:
        """Plan one output tensor (mergekit's ``plan_tensor``, with where mergekit is)."""
        if self.cross_size is not None:
            return self.cross_size.plan_tensor(weight, weights_in, models, cfg_reader)
        if weight.optional and not any(self.layout.present(m, w) for m, w in zip(models, weights_in)):
            LOG.info("Skipping optional weight %s", weight.name)
            return
        planned = self._merged_task(weight, weights_in, models, cfg_reader, position)
        roles, settings = planned.roles, planned.settings
        common = dict(sources=planned.sources, base_model=roles.base, reference_model=roles.reference,
                      base_alignment=planned.inputs.alignment(roles.base),
                      name=planned.tensor.name if planned.tensor is not None else None,
                      output_frame=settings.output_frame, merged_is_delta=planned.delta_inputs)
        refold = self._refold(weight, planned, models, cfg_reader, position)
        if planned.delta_inputs and not refold and FUSE:
            final = FusedTransferTask(merge=planned.merged, **common)
        else:
            final = TransferTask(merged=planned.merged, **refold, **common)
        self.planner._tensors.append((weight, final))

    def _merged_task(self, weight: WeightInfo, weights_in: List[WeightInfo], models: List[ModelReference],
                     cfg_reader: ConfigReader, position: Position) -> Planned:
        """The wrapped method's task for one output tensor (memoized by name: a reader's
        refold under ``residual: orthogonal`` needs its norm's merged value too)."""
        if weight.name in self._planned:
            return self._planned[weight.name]
        shared, per_input = resolve_parameters(
            self.method.spec, tensor_name=weight.name,
            inputs={m: w.name for m, w in zip(models, weights_in)},
            sources=cfg_reader.parameter_sources, base_model=cfg_reader.base_model, t=cfg_reader.t)
        for m in models:
            self._consistency.check(("role", m), per_input[m]["role"], f"role of model {m}")
        roles = resolve_roles(models, cfg_reader.base_model, per_input, self.method.spec.name, weight.name)
        settings = resolve_settings(shared)
        tensor = self.layout.classify(weight, weights_in, models, position, settings.align)
        if isinstance(tensor, LayerTensor):
            self._check_layer(tensor, settings, per_input)
        inputs = TensorInputs(self.layout, dict(zip(models, weights_in)), roles, tensor,
                              self._alignment_of(roles, tensor, settings, position))
        delta_inputs = False
        if weight.vocabulary_axis is not None and self.planner._tokenizer_task is not None:
            gathered, sources = vocabulary_inputs(inputs, weight, self.planner, cfg_reader)
        elif roles.transfer:
            (gathered, sources), delta_inputs = transfer_inputs(inputs), True
        else:
            gathered, sources = merge_inputs(inputs)
        merged = method_task(self.method, weight, roles, shared, per_input, gathered)
        planned = Planned(merged, sources, roles, settings, tensor, inputs, delta_inputs)
        self._planned[weight.name] = planned
        return planned

    def _alignment_of(self, roles: Roles, tensor: Moved, settings: TensorSettings, position: Position):
        """model -> the task that moves its ``tensor`` (None: not moved)."""
        def alignment(model):
            if tensor is None or model not in roles.aligned:
                return None
            return self.alignments.for_tensor(model, roles.reference, tensor, settings.align, position)
        return alignment

    def _check_layer(self, tensor: LayerTensor, settings: TensorSettings, per_input) -> None:
        for m, prefix in tensor.prefixes.items():
            self._consistency.check(("layer", m, prefix), settings.align, f"{m} {prefix}* settings")
            self._consistency.check(("align", m, prefix), per_input[m]["align"], f"align of {m}")

    def _refold(self, weight: WeightInfo, planned: Planned, models, cfg_reader, position: Position) -> dict:
        """``residual: orthogonal`` in the base's coordinates: a reader (or norm) is mapped
        back with the *merged* model's own norm weight folded in, not the reference's, so the
        result is exactly the merged function with the base's norms (:func:`.kernels.refolded`)."""
        tensor, roles, settings = planned.tensor, planned.roles, planned.settings
        if (settings.align.residual != "orthogonal" or settings.output_frame != "base"
                or tensor is None or not roles.transfer or roles.base not in roles.aligned):
            return {}
        norm = self.layout.reading_norm(tensor)
        if norm is None:
            return {}
        out_name = weight.name[: len(weight.name) - len(tensor.name)] + f"{norm}.weight"
        norm_in = self.layout.norm_weights_in(tensor, norm, models, position)
        norm_planned = self._merged_task(WeightInfo(name=out_name), norm_in, models, cfg_reader, position)
        # a transfer, and a norm has no vocabulary axis: its merge took deltas too
        assert norm_planned.delta_inputs
        return {"fold_norm": f"{norm}.weight", "norm_merged": norm_planned.merged,
                "norm_sources": norm_planned.sources}

"""mergekit task-graph nodes: per-(layer, model) alignment, aligned tensors, the transfer.

* :class:`LayerAlignmentTask` loads one layer of a model and of the reference (the very
  ``LoadTensor`` tasks mergekit builds, so loads are shared), solves the layer's symmetry
  group once, and returns the small :class:`LayerTransform`; the graph frees it after the
  last tensor of the layer has used it.
* :class:`ResidualAlignmentTask` solves one model's residual-stream transform from its and
  the reference's embedding and ``lm_head`` rows (read in chunks through mergekit's lazy
  loader, not held), once per model; every layer's alignment starts from it.
* :class:`AlignTensorTask` moves one tensor of a model into the reference's frame.
* :class:`SkillDeltas`: the wrapped method's inputs in a transfer, the skills' float32
  deltas ``S_i - R`` on a zero base, so its output is ``combine(S_i - R)``.
* :class:`TransferTask` turns that into ``aligned(B) + combine(...)``, in the base's or the
  reference's coordinates.
* :class:`CheckedTensors` / :class:`FiniteTensor` refuse a NaN/Inf input tensor as it loads
  (SkillDeltas checks its inputs too).

Tasks that can refuse during execution carry the merge's :class:`OutputFolder`: a refusal
removes the output folder if this merge created it (mergekit's writer creates it as the
graph starts), so a refused merge leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from pydantic import BaseModel

from mergekit.common import ImmutableMap, ModelReference
from mergekit.graph import Task
from mergekit.io.tasks import LoadTensor
from mergekit.merge_methods.task_adapter import TensorDictWrapper

import logging

from . import cache
from . import residual as res
from .architectures import ARCHITECTURES, Geometry, layer_spec
from .groups import rows_per_chunk
from .rope import attention_logit_change
from .settings import AlignSettings
from .spec import LayerTransform, WorkingCopy, align_layer
from .statedict import RESIDUAL_ROWS, _rows
from .validation import check_finite

LOG = logging.getLogger(__name__)

NamedLoads = Tuple[Tuple[str, LoadTensor], ...]


class OutputFolder(BaseModel, frozen=True):
    """The merge's output folder, and whether it existed before the merge was planned."""

    path: str
    existed: bool

    @classmethod
    def before_merge(cls, out_path: str) -> "OutputFolder":
        path = os.path.abspath(out_path)
        return cls(path=path, existed=os.path.lexists(path))

    def remove_if_created(self) -> None:
        """Remove the folder if this merge created it (never one that existed before)."""
        if not self.existed and os.path.isdir(self.path) and not os.path.islink(self.path):
            LOG.warning("merge refused: removing the output folder %s that it created", self.path)
            shutil.rmtree(self.path, ignore_errors=True)


def cleans_output(execute):
    """``execute`` of a task with an ``output`` field: on any error, remove the output
    folder this merge created, then re-raise."""

    @functools.wraps(execute)
    def run(self, *args, **kwargs):
        try:
            return execute(self, *args, **kwargs)
        except BaseException:
            if self.output is not None:
                self.output.remove_if_created()
            raise

    return run


class FiniteTensor(Task[Any]):
    """Passes a loaded tensor through after :func:`.validation.check_finite` (one reduction,
    no copy). ``tensor`` is a ``LoadTensor`` (``model`` is its model), or a task returning
    ``{model: tensor}`` such as mergekit's ``PermutedVocabulary`` (``model`` None)."""

    tensor: Task
    model: Optional[ModelReference] = None
    name: str
    output: Optional[OutputFolder] = None

    def arguments(self) -> Dict[str, Task]:
        return {"tensor": self.tensor}

    def group_label(self) -> Optional[str]:
        return self.tensor.group_label()

    def priority(self) -> int:
        return self.tensor.priority()

    @cleans_output
    def execute(self, tensor):
        if isinstance(tensor, dict):
            for model, value in tensor.items():
                check_finite(value, model, self.name)
        else:
            check_finite(tensor, self.model, self.name)
        return tensor


@dataclass(frozen=True, eq=False)
class ResidualResult:
    element: res.ResidualElement
    module: LayerTransform  # the embeddings', final norm's and lm_head's steps
    key: Optional[str] = None  # its alignment-cache key (when a cache is used)


class ResidualAlignmentTask(Task[ResidualResult]):
    model: ModelReference
    reference: ModelReference
    architecture: str
    geometry: Geometry
    mode: str
    tied: bool
    max_rows: int = RESIDUAL_ROWS
    cache: str = ""

    def arguments(self) -> Dict[str, Task]:
        return {}

    def priority(self) -> int:
        return 50

    def duplicate_per_gpu(self) -> bool:
        # Shared by every layer: as one task it joins the whole graph into one island of
        # mergekit's --multi-gpu executor; it loads its own inputs, so each GPU solves it.
        return True

    def execute(self) -> ResidualResult:
        from mergekit.io.tasks import LoaderCache

        arch = ARCHITECTURES[self.architecture]
        names = res.input_names(arch, self.tied)

        def load(model):
            loader = LoaderCache().get(model)
            out = {}
            for name in names:
                if name in loader.index.tensor_paths:
                    tensor = loader.get_tensor(name, device="cpu")
                    check_finite(tensor, model, name)
                    out[name] = tensor
            return out

        mine, theirs = load(self.model), load(self.reference)
        key = element = None
        if self.cache:
            key = cache.residual_key(self.mode, self.architecture, self.max_rows, mine, theirs)
            element = cache.load_residual(cache.AlignmentCache(self.cache), key)
        if element is None:
            rows = _rows(theirs[arch.embed], self.max_rows)
            try:
                statistic = res.embedding_statistic(theirs, mine, arch, self.tied, rows)
            except ValueError as err:
                raise ValueError(f"residual alignment of {self.model} to {self.reference}: {err}") from None
            element = res.solve(arch, self.mode, statistic)
            if key is not None:
                cache.save_residual(cache.AlignmentCache(self.cache), key, element)
        module = res.model_transforms(
            arch, self.geometry, element,
            lambda _layer, norm: mine[f"{norm}.weight"], lambda _layer, norm: theirs[f"{norm}.weight"],
            (), self.tied, str(self.model),
        )[res.MODULE]
        if element.fit is not None:
            LOG.info("residual: %s -> %s: %s (rotation explains %.1f%% beyond the best signed "
                     "permutation%s)", self.model, self.reference, element.mode,
                     100 * element.fit.explained, ", snapped" if element.fit.snapped else "")
        return ResidualResult(element, module, key)


class PickModuleTransform(Task[LayerTransform]):
    """The module-level steps (embeddings, final norm, lm_head) of a residual alignment."""

    source: ResidualAlignmentTask

    def arguments(self) -> Dict[str, Task]:
        return {"result": self.source}

    def execute(self, result: ResidualResult) -> LayerTransform:
        return result.module


class LayerAlignmentTask(Task[LayerTransform]):
    model: ModelReference
    reference: ModelReference
    layer_prefix: str  # the model's own prefix, e.g. "model.layers.7." (for messages)
    architecture: str
    geometry: Geometry
    settings: AlignSettings
    model_tensors: NamedLoads
    reference_tensors: NamedLoads
    residual: Optional[ResidualAlignmentTask] = None
    output: Optional[OutputFolder] = None

    def arguments(self) -> Dict[str, Task]:
        args = {f"model:{rel}": load for rel, load in self.model_tensors}
        args.update({f"reference:{rel}": load for rel, load in self.reference_tensors})
        if self.residual is not None:
            args["residual"] = self.residual
        return args

    def group_label(self) -> Optional[str]:
        return max(load.group_label() or "" for _, load in self.model_tensors)

    def priority(self) -> int:
        return 100  # as soon as its loads are in: the layer's merges wait for it (SkillDeltas)

    def uses_accelerator(self) -> bool:
        return True

    @cleans_output
    def execute(self, residual: Optional[ResidualResult] = None, **kwargs) -> LayerTransform:
        return self.solve(residual, **kwargs)

    def solve(self, residual: Optional[ResidualResult] = None, working: Optional[WorkingCopy] = None,
              **kwargs) -> LayerTransform:
        """:meth:`execute`'s work; ``working`` receives what the solve leaves of its working
        copy (nothing when the transform came from the alignment cache), for the model
        card's record (:class:`.collect.CollectedLayerAlignment`)."""
        moving: Dict[str, torch.Tensor] = {}
        fixed: Dict[str, torch.Tensor] = {}
        sides = {"model": (self.model, dict(self.model_tensors), moving),
                 "reference": (self.reference, dict(self.reference_tensors), fixed)}
        for key, value in kwargs.items():
            side, rel = key.split(":", 1)
            if value is None:
                continue
            model, loads, tensors = sides[side]
            check_finite(value, model, loads[rel].tensor)
            tensors[rel] = value
        settings = self.settings
        spec = layer_spec(self.architecture, self.geometry, settings.qk_rotation)
        arch = ARCHITECTURES[self.architecture]
        store = key = solved = None
        if settings.alignment_cache:
            store = cache.AlignmentCache(settings.alignment_cache)
            key = cache.layer_key(
                cache.weight_solve_settings(settings.switches, settings.qk_rotation, settings.residual),
                self.architecture, self.geometry, moving, fixed,
                residual.key if residual is not None else None)
            solved = cache.load_layer(store, key, spec)
        try:
            first = LayerTransform()
            if residual is not None:  # the residual stream first, then the layer's groups
                sites = res.layer_sites(arch, self.geometry)
                first = res.transform(arch, sites, residual.element, moving, fixed, str(self.model))
                moving = first.apply(moving)
            if solved is None:
                solved = align_layer(spec, fixed, moving, settings.switches, label=str(self.model),
                                     working=working)
                if store is not None:
                    cache.save_layer(store, key, solved)
            transform = first.then(solved)
            if key is not None:
                transform = dataclasses.replace(transform, cache_key=key)
        except ValueError as err:
            raise ValueError(
                f"aligning {self.layer_prefix}* of model {self.model} to reference {self.reference}: {err}"
            ) from None
        if settings.qk_rotation == "full" and settings.switches.rotation:
            change = attention_logit_change(
                moving, solved.within_heads(moving), arch,
                self.geometry, self.geometry.rope_theta or 10000.0,
            )
            LOG.warning(
                "qk_rotation: full altered %s %s*: relative change of attention logits on "
                "random probes at relative positions %s",
                self.model, self.layer_prefix,
                ", ".join(f"{pos}: {value:.1%}" for pos, value in change.items()),
            )
        return transform


class ActivationAlignmentTask(Task[Dict[str, Dict[int, LayerTransform]]]):
    """``alignment: activations``: stream every model and the reference layer by layer over
    the calibration tokens (one layer of weights resident at a time, via mergekit's lazy
    loaders) and solve each layer's group on activations. Runs once per merge; its result
    (one small transform per layer and model) lives until the last layer has used it."""

    reference: ModelReference
    models: Tuple[ModelReference, ...]
    settings: AlignSettings
    device: Optional[str] = None
    trust_remote_code: bool = False
    output: Optional[OutputFolder] = None

    def arguments(self) -> Dict[str, Task]:
        return {}

    def priority(self) -> int:
        return 100

    @cleans_output
    def execute(self) -> Dict[str, Dict[int, LayerTransform]]:
        from mergekit.io.tasks import LoaderCache

        from .activations import align_by_activations, compose_residual

        settings = self.settings
        # Tokenized (and checked) at plan time already: this is the cached result.
        token_ids = calibration_tokens(self.reference, self.models, settings.calibration or None,
                                       settings.calibration_samples,
                                       settings.calibration_max_tokens, self.trust_remote_code)

        def source(model):
            loader = LoaderCache().get(model)

            def get_tensor(name):
                tensor = loader.get_tensor(name, device="cpu")
                check_finite(tensor, model, name)
                return tensor
            return get_tensor

        config = self.reference.config(trust_remote_code=self.trust_remote_code)
        labels = [str(m) for m in self.models]
        sources = {str(m): source(m) for m in self.models}
        store = key = None
        if settings.alignment_cache:
            from .activations import activation_plan

            store = cache.AlignmentCache(settings.alignment_cache)
            key = cache.activation_key(
                {**cache.weight_solve_settings(settings.switches, settings.qk_rotation,
                                               settings.residual), "alignment": "activations"},
                token_ids,
                [(str(m), _all_tensors(m)) for m in (self.reference, *self.models)])
            found = cache.load_activations(store, key, labels,
                                           activation_plan(config, settings.qk_rotation).weight_spec)
            if found is not None:
                return compose_residual(config, *found, sources, source(self.reference))
        results, elements = align_by_activations(
            source(self.reference),
            sources,
            config,
            token_ids,
            switches=settings.switches,
            qk_rotation=settings.qk_rotation,
            device=self.device or "cpu",
            residual=settings.residual,
            # each model runs its forward pass with its own config
            model_configs={str(m): m.config(trust_remote_code=self.trust_remote_code)
                           for m in self.models},
            compose=False,
        )
        if store is not None:
            cache.save_activations(store, key, results, elements, labels)
        return compose_residual(config, results, elements, sources, source(self.reference))


class _LazyTensors(Mapping):
    """Every tensor of a checkpoint, loaded one at a time when asked for (and not kept): the
    cache key hashes a whole model without holding it in memory."""

    def __init__(self, model: ModelReference):
        from mergekit.io.tasks import LoaderCache

        self.loader = LoaderCache().get(model)

    def __getitem__(self, name):
        return self.loader.get_tensor(name, device="cpu")

    def __iter__(self):
        return iter(sorted(self.loader.index.tensor_paths))

    def __len__(self):
        return len(self.loader.index.tensor_paths)


def _all_tensors(model: ModelReference) -> Mapping[str, torch.Tensor]:
    return _LazyTensors(model)


def calibration_tokens(reference: ModelReference, models, calibration: Optional[str],
                       samples: int, max_tokens: int, trust_remote_code: bool = False) -> torch.Tensor:
    """The calibration token ids every model of an activation alignment runs on, tokenized
    with each model's tokenizer (which must agree); ``samples == 0``: as many prompts as
    the reference's width needs. Cached: the plan-time check and the task share one call."""
    from .architectures import geometry_from_config
    from .calibration import calibration_token_ids, default_token_budget

    budget = None
    if not samples:
        g = geometry_from_config(reference.config(trust_remote_code=trust_remote_code), str(reference))
        budget = default_token_budget(g.intermediate_size, g.head_dim)
    return calibration_token_ids(
        tuple((str(m), m.model.path, m.model.revision) for m in (reference, *models)),
        calibration, samples, max_tokens, trust_remote_code, budget,
    )


class PickLayerTransform(Task[LayerTransform]):
    """One (model, layer) transform out of an :class:`ActivationAlignmentTask`."""

    source: ActivationAlignmentTask
    model: ModelReference
    layer: Union[int, str]  # a layer index, or residual.MODULE

    def arguments(self) -> Dict[str, Task]:
        return {"transforms": self.source}

    def execute(self, transforms) -> LayerTransform:
        return transforms[str(self.model)][self.layer]


_AFTER = "__after__"  # SkillDeltas' ordering-only argument


def _fused_key(name: str, part: Optional[str] = None) -> str:
    """A fused TransferTask's argument for SkillDeltas' argument ``name`` (and, where that
    is an AlignTensorTask, for its own argument ``part``)."""
    return f"delta:{name}" if part is None else f"delta:{name}:aligned:{part}"


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
    output: Optional[OutputFolder] = None

    def arguments(self) -> Dict[str, Task]:
        return {f"tensor:{i}": task for i, task in enumerate(self.tensors.data.values())}

    def group_label(self) -> Optional[str]:
        return max((task.group_label() or "" for task in self.tensors.data.values()), default="") or None

    @cleans_output
    def execute(self, **tensors) -> Dict[ModelReference, Optional[torch.Tensor]]:
        return self._checked(tensors)

    def _checked(self, tensors) -> Dict[ModelReference, Optional[torch.Tensor]]:
        out = {}
        for i, model in enumerate(self.tensors.data.keys()):
            out[model] = tensors[f"tensor:{i}"]
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
    (as before) computed the same numbers with two more float32 copies of every tensor (the
    reference's, converted, and ``R + delta``) inside the method, which was the peak of a bf16
    merge's memory."""

    reference_model: ModelReference
    # The base's layer alignment, computed first. mergekit's scheduler runs a ready task as
    # soon as nothing of higher priority is: without this, a layer's deltas and merges ran
    # while the layer was still loading for its alignment, and their float32 results (224 MiB
    # per MLP tensor at 8B shapes) waited for it.
    after: Optional[Task] = None

    def arguments(self) -> Dict[str, Task]:
        args = super().arguments()
        if self.after is not None:
            args[_AFTER] = self.after
        return args

    def group_label(self) -> Optional[str]:
        return self.tensors[self.reference_model].group_label()

    @cleans_output
    def execute(self, **tensors) -> Dict[ModelReference, Optional[torch.Tensor]]:
        tensors.pop(_AFTER, None)
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


def widened_difference(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``tensor - reference`` in at least float32: exact for bfloat16/float16 inputs. A float32
    input is one pass. A narrower one is widened a block of rows at a time into the result:
    the widened block is still in cache when it is subtracted, where widening the whole tensor
    first writes and reads back a tensor-sized float32 copy (40 % faster on 2 CPU cores at
    Llama-3.2-1B and 3.1-8B MLP shapes: 8192 x 2048 in 27 ms instead of 45 ms)."""
    work = torch.promote_types(tensor.dtype, torch.float32)
    if tensor.dtype == work:
        return torch.sub(tensor, reference)
    if tensor.dim() == 0 or tensor.shape != reference.shape or \
            torch.promote_types(work, reference.dtype) != work:
        return tensor.to(work).sub_(reference)
    out = torch.empty(tensor.shape, dtype=work, device=tensor.device)
    step = rows_per_chunk(tensor[0].numel())
    for start in range(0, tensor.shape[0], step):
        rows = slice(start, start + step)
        torch.sub(tensor[rows].to(work), reference[rows], out=out[rows])
    return out


class AlignTensorTask(Task[Optional[torch.Tensor]]):
    tensor: LoadTensor
    alignment: Union[LayerAlignmentTask, PickLayerTransform, PickModuleTransform]
    name: str  # layer-relative name the spec knows

    def arguments(self) -> Dict[str, Task]:
        return {"tensor": self.tensor, "transform": self.alignment}

    def group_label(self) -> Optional[str]:
        return self.tensor.group_label()

    def uses_accelerator(self) -> bool:
        return True

    def execute(self, tensor: Optional[torch.Tensor], transform: LayerTransform):
        if tensor is None:
            return None
        # Work in at least float32 so a bf16 checkpoint is rounded once, at save time.
        work = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
        return transform.apply_one(self.name, work, inplace=work is not tensor)


class TransferTask(Task[Optional[torch.Tensor]]):
    """``aligned(B) + delta``; with ``output_frame: base`` expressed as ``B + inverse_B(delta)``
    (the group acts linearly, so both are the same model), where ``delta`` is ``merged`` itself
    (``merged_is_delta``: the method merged SkillDeltas' inputs) or ``merged - R`` (the
    vocabulary-permuted embeddings of a recipe with a tokenizer section).

    ``sources`` yields the base's and the reference's tensors (raw loads, or mergekit's
    vocabulary-permuted ones for embeddings when the recipe has a tokenizer section).
    """

    merged: Task
    sources: Task
    base_model: ModelReference
    reference_model: ModelReference
    base_alignment: Optional[Union[LayerAlignmentTask, PickLayerTransform, PickModuleTransform]] = None
    name: Optional[str] = None
    output_frame: str = "base"
    # ``merged`` is the wrapped method's combined delta (SkillDeltas' inputs), not R + delta.
    merged_is_delta: bool = False
    # residual: orthogonal, base frame: the norm this tensor reads (or is), and its merged
    # value and sources (see :meth:`_refolded`).
    fold_norm: Optional[str] = None
    norm_merged: Optional[Task] = None  # the norm's merge took SkillDeltas' inputs: a delta
    norm_sources: Optional[Task] = None
    # ``merged`` is mergekit's ExecuteMergeMethodTask over a SkillDeltas, and both run inside
    # this task (their own execute, unchanged) instead of as graph nodes, as do the
    # AlignTensorTasks of aligned skills among SkillDeltas' inputs: mergekit's executor
    # moves every task's inputs to the GPU and its result back to host memory, so as nodes
    # the float32 aligned skills and deltas, the zero base (materialized by the move) and the
    # merged delta crossed the bus in both directions; fused, only the loaded tensors go up
    # and the result comes down, as in a plain merge.
    fused: bool = False

    def _skill_inputs(self) -> Dict[str, Task]:
        """SkillDeltas' arguments, but its ordering-only one: the base's alignment is this
        task's ``transform``."""
        inputs = self.merged.gather_tensors.arguments()
        inputs.pop(_AFTER, None)
        return inputs

    def _fused_inputs(self) -> Dict[str, Task]:
        """SkillDeltas' arguments, an AlignTensorTask's replaced by its own two."""
        out = {}
        for name, task in self._skill_inputs().items():
            if isinstance(task, AlignTensorTask):
                out.update({_fused_key(name, part): value for part, value in task.arguments().items()})
            else:
                out[_fused_key(name)] = task
        return out

    def _merge_fused(self, inputs: Dict[str, Any]) -> Optional[torch.Tensor]:
        """The wrapped method's combined delta from the fused inputs (see ``fused``)."""
        tensors = {}
        for name, task in self._skill_inputs().items():
            if isinstance(task, AlignTensorTask):
                tensors[name] = task.execute(**{part: inputs[_fused_key(name, part)]
                                                for part in task.arguments()})
            else:
                tensors[name] = inputs[_fused_key(name)]
        deltas = self.merged.gather_tensors.execute(**tensors)
        direct = single_delta_task_arithmetic(self.merged, deltas)
        return direct if direct is not None else self.merged.execute(tensors=deltas)

    def arguments(self) -> Dict[str, Task]:
        if self.fused:
            args = self._fused_inputs()
        else:
            args = {"merged": self.merged}
        args["sources"] = self.sources
        if self.base_alignment is not None:
            args["transform"] = self.base_alignment
        if self.norm_merged is not None:
            args["norm_merged"] = self.norm_merged
            args["norm_sources"] = self.norm_sources
        return args

    def group_label(self) -> Optional[str]:
        return self.merged.group_label()

    def uses_accelerator(self) -> bool:
        return self.merged.uses_accelerator() if self.fused else True

    def execute(
        self,
        sources: Dict[ModelReference, torch.Tensor],
        merged: Optional[torch.Tensor] = None,
        transform: Optional[LayerTransform] = None,
        norm_merged: Optional[torch.Tensor] = None,
        norm_sources: Optional[Dict[ModelReference, torch.Tensor]] = None,
        **inputs,
    ) -> Optional[torch.Tensor]:
        if self.fused:
            merged = self._merge_fused(inputs)
            del inputs
        if merged is None:
            return None
        base = sources.get(self.base_model)
        reference = sources.get(self.reference_model)
        if self.merged_is_delta and base is None and reference is not None:
            # no base tensor: the transfer onto the reference (as before deltas were merged)
            return torch.add(merged.to(torch.float32), reference).to(reference.dtype)
        out_dtype = base.dtype if base is not None else merged.dtype
        if self.reference_model == self.base_model or base is None:
            return merged.to(out_dtype)
        if reference is None:
            raise RuntimeError(
                f"tensor {self.name or ''}: present in base model {self.base_model} but not in "
                f"the reference model {self.reference_model}; the skill vector cannot be "
                f"measured against it."
            )
        work = torch.promote_types(base.dtype, torch.float32)
        # Fused, ``merged`` is this task's alone (the single-skill path's delta, or a tensor
        # the kernel made from this task's deltas), except a broadcast view of the zero base
        # when no skill has the tensor: written in place unless it is that view. As a node,
        # mergekit may hand the same result to other tasks: never written.
        owned = self.fused and merged.is_contiguous()
        if transform is None or not transform.touches(self.name):  # one pass per operation
            delta = merged.to(work) if self.merged_is_delta else merged.to(work) - reference
            if delta is not merged or owned:  # no fresh tensor-sized output: add in place
                return delta.add_(base).to(out_dtype)
            return torch.add(delta, base).to(out_dtype)
        if self.output_frame == "base" and work == torch.float32 and self.fold_norm is None:
            blocks = transform.inverse().gathered_blocks(self.name, tuple(base.shape), delta=True)
            if blocks is not None:
                return _transfer_by_blocks(merged, None if self.merged_is_delta else reference,
                                           base, blocks, out_dtype)
        # In place on this task's own temporaries: at 8B shapes every extra tensor-sized
        # float32 copy is 224 MiB of fresh memory (a bf16 operand is widened exactly).
        delta = merged.to(work, copy=not owned)
        if not self.merged_is_delta:
            delta.sub_(reference)
        if self.output_frame == "base" and norm_merged is not None and \
                any(s.name == f"residual.unfold.{self.fold_norm[:-len('.weight')]}" for s, _ in transform.steps):
            out = self._refolded(transform, base.to(work), delta, norm_merged, norm_sources, work)
        elif self.output_frame == "base":
            out = transform.inverse().apply_one(self.name, delta, delta=True, inplace=True).add_(base)
        else:
            base_w = base.to(work)
            out = transform.apply_one(self.name, base_w, inplace=base_w is not base).add_(delta)
        return out.to(out_dtype)

    def _refolded(self, transform: LayerTransform, base_w, delta, norm_merged, norm_sources, work):
        """The merged model (reference's coordinates) mapped into the base's with its own
        merged norm folded in: the base's transform reversed, except that the step which
        unfolded the reference's norm now unfolds the merged one. Exact for the merged
        function, whatever the deltas did to the norm (a linear map of the deltas is not:
        the rotation does not commute with a change of the norm's weights)."""
        norm = self.fold_norm
        merged_norm = transform.apply_one(norm, norm_sources[self.base_model].to(work)) + norm_merged.to(work)
        unfold = f"residual.unfold.{norm[:-len('.weight')]}"
        offset = next(site.offset for s, _ in transform.steps if s.name == unfold for site in s.sites)
        steps = tuple((s, (merged_norm.double() + offset) if s.name == unfold else e)
                      for s, e in transform.steps)
        full = transform.apply_one(self.name, base_w) + delta
        return LayerTransform(steps).inverse().apply_one(self.name, full)


def single_delta_task_arithmetic(task: Task, deltas: Mapping[ModelReference, Optional[torch.Tensor]]
                                 ) -> Optional[torch.Tensor]:
    """mergekit's ``task_arithmetic`` kernel (``GeneralizedTaskArithmeticMerge.merge_group``
    without sparsification or consensus) on SkillDeltas' output for **one** skill, computed
    in place on that skill's delta: ``delta * weight``, then ``/ weight`` when ``normalize``
    (``1`` below 1e-8, as the kernel does), then ``* lambda`` when it is not 1 — the kernel's
    own float32 operations in its order, so its result bit for bit (tested; on the zero base
    its ``x - 0`` and ``0 + x`` are exact). What it saves is the rest of the kernel: two
    passes over the zero base and three tensor-sized float32 temporaries (the difference,
    the stacked deltas and their sum; 672 MiB for a Llama-3.1-8B MLP tensor, the peak of an
    aligned bf16 merge's memory). ``None`` (run the kernel) for any other method, several
    skills, a missing or non-float tensor, a shape the kernel would refuse, or a dtype it
    would convert. The delta is SkillDeltas' fresh result inside a fused TransferTask: no
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
    weights = torch.tensor(weight, dtype=delta.dtype, device=delta.device)
    if weight != 1.0:
        delta.mul_(weights)
    if normalize:
        delta /= torch.where(weights.abs() < 1e-8, torch.ones_like(weights), weights)
    if scale != 1:
        delta *= scale
    return delta


def _transfer_by_blocks(merged, reference, base, blocks, out_dtype) -> torch.Tensor:
    """``base + factor * (merged - reference)[index]`` for a transform that only permutes and
    rescales positions (``LayerTransform.gathered_blocks``), a block of rows at a time,
    written straight into the output dtype: the same float32 arithmetic as the general path
    (subtract, scale, permute, add the base, round once) without its three tensor-sized
    float32 temporaries."""
    out = None
    for rows, take, factor in blocks:
        part = take(merged).to(torch.float32)  # a fresh tensor (take gathers)
        if reference is not None:  # merged = R + delta (else merged is the delta)
            part.sub_(take(reference))
        if factor is not None:
            part.mul_(factor.to(part.device))
        part.add_(base[rows])
        if len(blocks) == 1 and out_dtype == torch.float32:
            return part  # the whole tensor, in its dtype already: no copy
        if out is None:
            out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
        out[rows] = part
    return out


class AlignVocabularyTask(Task[Dict[ModelReference, torch.Tensor]]):
    """Embeddings under a tokenizer section (mergekit's vocabulary permutation first), moved
    by each aligned model's residual-stream transform."""

    permuted: Task
    alignments: Tuple[Tuple[ModelReference, Union[PickModuleTransform, PickLayerTransform]], ...]
    name: str

    def arguments(self) -> Dict[str, Task]:
        args = {"tensors": self.permuted}
        args.update({f"align:{i}": task for i, (_m, task) in enumerate(self.alignments)})
        return args

    def uses_accelerator(self) -> bool:
        return True

    def execute(self, tensors: Dict[ModelReference, torch.Tensor], **transforms) -> Dict[ModelReference, torch.Tensor]:
        out = dict(tensors)
        for i, (model, _task) in enumerate(self.alignments):
            if out.get(model) is not None:
                work = out[model].to(torch.promote_types(out[model].dtype, torch.float32))
                out[model] = transforms[f"align:{i}"].apply_one(self.name, work)
        return out

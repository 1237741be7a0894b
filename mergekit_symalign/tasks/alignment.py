"""Alignment tasks: what moves one model into the reference's frame, and the tasks that apply it.

* :class:`ResidualAlignmentTask` solves one model's residual-stream transform from its and
  the reference's embedding and ``lm_head`` rows (read through mergekit's lazy loader, not
  held), once per model; every layer's alignment starts from it.
* :class:`LayerAlignmentTask` loads one layer of a model and of the reference (the very
  ``LoadTensor`` tasks mergekit builds, so loads are shared), solves the layer's symmetry
  group once (:func:`.solve.solve_layer`) and returns the small :class:`LayerTransform`; the
  graph frees it after the last tensor of the layer has used it.
* :class:`ActivationAlignmentTask` (``alignment: activations``) solves every layer of every
  model at once; :class:`PickLayerTransform` / :class:`PickModuleTransform` take one
  (model, layer) transform out of it or out of a residual solve.
* :class:`AlignTensorTask` / :class:`AlignVocabularyTask` move one tensor (or mergekit's
  vocabulary-permuted embeddings) by such a transform.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from mergekit.common import ImmutableMap, ModelReference
from mergekit.graph import Task
from mergekit.io.tasks import LoaderCache, LoadTensor
from mergekit.merge_methods.task_adapter import TensorDictWrapper

from .. import cache
from .. import residual as res
from ..architectures import ARCHITECTURES, Geometry
from ..calibration import calibration_tokens
from ..rope import attention_logit_change
from ..settings import AlignSettings
from ..solve import RESIDUAL_ROWS, ResidualSolution, solve_layer, solve_residual
from ..spec import LayerTransform, WorkingCopy
from ..validation import check_finite

LOG = logging.getLogger(__name__)

NamedLoads = Tuple[Tuple[str, LoadTensor], ...]


@dataclass(frozen=True, eq=False)
class ResidualResult(ResidualSolution):
    """A model's residual solve (what every layer's solve starts from) and its module-level
    steps (embeddings, final norm, lm_head)."""

    module: Optional[LayerTransform] = None


def _checked_tensors(model: ModelReference, names) -> Dict[str, torch.Tensor]:
    """The tensors of ``names`` that ``model`` has, each refused if non-finite."""
    loader = LoaderCache().get(model)
    out = {}
    for name in names:
        if name in loader.index.tensor_paths:
            out[name] = loader.get_tensor(name, device="cpu")
            check_finite(out[name], model, name)
    return out


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
        arch = ARCHITECTURES[self.architecture]
        names = res.input_names(arch, self.tied)
        model, reference = _checked_tensors(self.model, names), _checked_tensors(self.reference, names)
        solution = solve_residual(arch, self.mode, model, reference, self.tied,
                                  cache_folder=self.cache, max_rows=self.max_rows,
                                  label=f"{self.model} to {self.reference}")
        element = solution.element
        module = res.model_transforms(
            arch, self.geometry, element,
            lambda _layer, norm: model[f"{norm}.weight"], lambda _layer, norm: reference[f"{norm}.weight"],
            (), self.tied, str(self.model),
        )[res.MODULE]
        if element.fit is not None:
            LOG.info("residual: %s -> %s: %s (rotation explains %.1f%% beyond the best signed "
                     "permutation%s)", self.model, self.reference, element.mode,
                     100 * element.fit.explained, ", snapped" if element.fit.snapped else "")
        return ResidualResult(element, solution.key, module)


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

    def execute(self, residual: Optional[ResidualResult] = None, **kwargs) -> LayerTransform:
        return self.solve(residual, **kwargs)

    def _sides(self, loaded: Mapping[str, Optional[torch.Tensor]]):
        """(model's, reference's) layer tensors by relative name, each checked finite."""
        model: Dict[str, torch.Tensor] = {}
        reference: Dict[str, torch.Tensor] = {}
        sides = {"model": (self.model, dict(self.model_tensors), model),
                 "reference": (self.reference, dict(self.reference_tensors), reference)}
        for key, value in loaded.items():
            side, rel = key.split(":", 1)
            if value is None:
                continue
            owner, loads, tensors = sides[side]
            check_finite(value, owner, loads[rel].tensor)
            tensors[rel] = value
        return model, reference

    def solve(self, residual: Optional[ResidualResult] = None, working: Optional[WorkingCopy] = None,
              **kwargs) -> LayerTransform:
        """:meth:`execute`'s work; ``working`` receives what the solve leaves of its working
        copy (nothing when the transform came from the alignment cache), for the model
        card's record (:class:`.collect.CollectedLayerAlignment`)."""
        model, reference = self._sides(kwargs)
        settings, arch = self.settings, ARCHITECTURES[self.architecture]
        try:
            solution = solve_layer(
                arch, self.geometry, settings.switches, settings.qk_rotation, settings.residual,
                model, reference,
                residual,
                cache_folder=settings.alignment_cache, label=str(self.model), working=working)
        except ValueError as err:
            raise ValueError(
                f"aligning {self.layer_prefix}* of model {self.model} to reference {self.reference}: {err}"
            ) from None
        if settings.qk_rotation == "full" and settings.switches.rotation:
            self._warn_full_qk(solution.residual_steps.apply(model), solution.layer_steps, arch)
        return solution.transform

    def _warn_full_qk(self, moved, solved: LayerTransform, arch) -> None:
        change = attention_logit_change(moved, solved.within_heads(moved), arch,
                                        self.geometry, self.geometry.rope_theta or 10000.0)
        LOG.warning(
            "qk_rotation: full altered %s %s*: relative change of attention logits on "
            "random probes at relative positions %s",
            self.model, self.layer_prefix,
            ", ".join(f"{pos}: {value:.1%}" for pos, value in change.items()),
        )


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

    def arguments(self) -> Dict[str, Task]:
        return {}

    def priority(self) -> int:
        return 100

    def execute(self) -> Dict[str, Dict[int, LayerTransform]]:
        from ..activations import align_by_activations, compose_residual

        settings = self.settings
        # Tokenized (and checked) at plan time already: this is the cached result.
        token_ids = calibration_tokens(self.reference, self.models, settings.calibration or None,
                                       settings.calibration_samples,
                                       settings.calibration_max_tokens, self.trust_remote_code)
        config = self.reference.config(trust_remote_code=self.trust_remote_code)
        labels = [str(m) for m in self.models]
        sources = {str(m): _checked_source(m) for m in self.models}
        store = key = None
        if settings.alignment_cache:
            from ..activations import activation_plan

            store = cache.AlignmentCache(settings.alignment_cache)
            key = cache.activation_key(
                {**cache.weight_solve_settings(settings.switches, settings.qk_rotation,
                                               settings.residual), "alignment": "activations"},
                token_ids,
                [(str(m), _LazyTensors(m)) for m in (self.reference, *self.models)])
            found = cache.load_activations(store, key, labels,
                                           activation_plan(config, settings.qk_rotation).weight_spec)
            if found is not None:
                return compose_residual(config, *found, sources, _checked_source(self.reference))
        results, elements = align_by_activations(
            _checked_source(self.reference),
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
        return compose_residual(config, results, elements, sources, _checked_source(self.reference))


def _checked_source(model: ModelReference):
    """``name -> tensor`` of ``model`` through mergekit's lazy loader, each refused if non-finite."""
    loader = LoaderCache().get(model)

    def get_tensor(name):
        tensor = loader.get_tensor(name, device="cpu")
        check_finite(tensor, model, name)
        return tensor
    return get_tensor


class _LazyTensors(Mapping):
    """Every tensor of a checkpoint, loaded one at a time when asked for (and not kept): the
    cache key hashes a whole model without holding it in memory."""

    def __init__(self, model: ModelReference):
        self.loader = LoaderCache().get(model)

    def __getitem__(self, name):
        return self.loader.get_tensor(name, device="cpu")

    def __iter__(self):
        return iter(sorted(self.loader.index.tensor_paths))

    def __len__(self):
        return len(self.loader.index.tensor_paths)


class PickLayerTransform(Task[LayerTransform]):
    """One (model, layer) transform out of an :class:`ActivationAlignmentTask`."""

    source: ActivationAlignmentTask
    model: ModelReference
    layer: Union[int, str]  # a layer index, or residual.MODULE

    def arguments(self) -> Dict[str, Task]:
        return {"transforms": self.source}

    def execute(self, transforms) -> LayerTransform:
        return transforms[str(self.model)][self.layer]


Alignment = Union[LayerAlignmentTask, PickLayerTransform, PickModuleTransform]


class AlignTensorTask(Task[Optional[torch.Tensor]]):
    tensor: LoadTensor
    alignment: Alignment
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


class AlignVocabularyTask(TensorDictWrapper):
    """Embeddings under a tokenizer section (mergekit's vocabulary permutation first), moved
    by each aligned model's residual-stream transform. A ``TensorDictWrapper`` (its
    ``tensors`` left empty) so mergekit's ``ExecuteMergeMethodTask`` takes it as its input."""

    tensors: ImmutableMap = ImmutableMap(data={})
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

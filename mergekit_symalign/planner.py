"""The aligned half of mergekit's ``MergePlanner``: the task graph of an aligned merge.

:mod:`.plugin` hooks ``mergekit.plan.MergePlanner`` itself (so every entry point that plans a
merge — ``mergekit-yaml``, ``run_merge``, the evolutionary merge — gets it) and, when the
recipe's method is a ``symmetry_aligned_*`` one, hands planning to :class:`AlignedPlanning`:

* :meth:`AlignedPlanning.check` runs every recipe check (:mod:`.validation`) before mergekit
  builds anything, so a refused merge writes nothing;
* mergekit's own ``plan_layer`` says which layer of which model each output tensor comes
  from (slices may take different layers from different models); the layer's tensor names
  come from mergekit's architecture definition of that model;
* :meth:`AlignedPlanning.plan_tensor` builds, for one output tensor::

    LoadTensor(S_i) --AlignTensorTask(LayerAlignmentTask(S_i, R))--+
    LoadTensor(R) -------------------------------------------------+-> ExecuteMergeMethodTask
                                                                        (wrapped method, base R)
    LoadTensor(B), LayerAlignmentTask(B, R) ----------------------------> TransferTask -> save

Roles and settings are resolved by :mod:`.settings` (pure functions); this module only
builds the graph.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Mapping, Optional, Tuple

from mergekit.architecture import WeightInfo
from mergekit.common import ImmutableMap, ModelReference
from mergekit.config import ConfigReader
from mergekit.io.tasks import GatherTensors, LoaderCache, LoadTensor
from mergekit.merge_methods.base import ParameterScope
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask, TensorDictWrapper
from mergekit.parameter_resolver import resolve_parameters
from mergekit.tokenizer import PermutedVocabulary

from .architectures import full_qk_warning, layer_spec
from .collect import collected, for_planning
from .errors import SymAlignConfigError
from .settings import AlignSettings, Roles, TensorSettings, resolve_roles, resolve_settings
from .tasks import (
    ActivationAlignmentTask,
    AlignTensorTask,
    LayerAlignmentTask,
    PickLayerTransform,
    TransferTask,
)
from .validation import (
    LayerConsistency,
    check_activation_layers,
    check_architecture_settings,
    check_calibration,
    check_layer_tensors,
    check_models,
    check_options,
    check_recipe,
    check_same_optional_tensors,
    never_aligned,
)

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerContext:
    """What mergekit's ``plan_layer`` is planning: a module, and each source's layer index."""

    module: str
    indices: Mapping[ModelReference, int]


@dataclass(frozen=True)
class LayerTensor:
    """An output tensor that a layer symmetry moves: its layer-relative name and, per model,
    the layer's name prefix and index in that model's own numbering."""

    name: str
    prefixes: Mapping[ModelReference, str]
    indices: Mapping[ModelReference, int]


def layer_prefix(names: List[str], index: int) -> Optional[str]:
    """``model.layers.7.`` from the names of layer 7's tensors (their common prefix)."""
    common = os.path.commonprefix(names)
    marker = f"{index}."
    cut = common.rfind(marker)
    if cut < 0 or (cut > 0 and common[cut - 1] != "."):
        return None
    return common[: cut + len(marker)]


class AlignedPlanning:
    """Per-merge state of an aligned merge's planning (one per ``MergePlanner``)."""

    def __init__(self, planner):
        self.planner = planner
        self.method = planner._method
        self.arch = None
        self.geometry = None
        self.module: Optional[str] = None  # the text decoder's module in mergekit's definition
        self.context: Optional[LayerContext] = None  # set while mergekit plans a layer
        self._alignments: Dict[Tuple, object] = {}
        self._consistency = LayerConsistency()
        self._warned_full = False
        # Report hook (.collect): a key when the merge's alignments are recorded (for the model
        # card or `mergekit-symalign report`); alignment tasks are then built by collected().
        self.collector: Optional[str] = for_planning(planner)

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        """Every recipe check, before mergekit normalizes the config or builds a task."""
        cfg, options = self.planner.config, self.planner.options
        check_recipe(cfg, self.method)
        check_options(options, self.method)
        configs = {m: m.config(trust_remote_code=options.trust_remote_code)
                   for m in cfg.referenced_models()}
        self.arch, self.geometry = check_models(self.method.spec.name, configs)
        check_architecture_settings(cfg, self.arch)
        check_calibration(cfg.parameters or {})
        self.module = self._decoder_module()

    def _decoder_module(self) -> str:
        """The module of mergekit's architecture definition that is our text decoder (a
        multimodal checkpoint's vision tower is merged by the wrapped method, unaligned)."""
        modules = self.planner.arch_info.modules
        for name, module in modules.items():
            model_type = getattr(module.architecture, "name", lambda: None)()
            if model_type in self.arch.model_types:
                return name
        if len(modules) == 1:
            return next(iter(modules))
        raise SymAlignConfigError(
            f"{self.method.spec.name}: mergekit's architecture definition "
            f"{self.planner.arch_info.expected_model_type} has no module for the "
            f"{self.arch.name} text decoder (modules: {', '.join(modules)}); it cannot be aligned."
        )

    # ------------------------------------------------------------------ mergekit's knowledge

    def _gather(self, weight_info: Mapping[ModelReference, WeightInfo]) -> GatherTensors:
        """mergekit's own GatherTensors, built as its planner builds it (so loads are shared)."""
        return GatherTensors(
            weight_info=ImmutableMap(data=dict(weight_info)),
            dtype=self.planner.config.dtype,
            device=self.planner.options.device if self.planner.options.read_to_gpu else None,
        )

    def _load(self, model: ModelReference, info: WeightInfo) -> LoadTensor:
        (load,) = self._gather({model: info}).arguments().values()
        return load

    @staticmethod
    def _present(model: ModelReference, info: WeightInfo) -> bool:
        index = LoaderCache().get(model).index
        return any(n in index.tensor_paths for n in [info.name, *(info.aliases or ())])

    @lru_cache(maxsize=None)
    def _layer_infos(self, model: ModelReference, module: str, index: int) -> Tuple[str, Dict[str, WeightInfo]]:
        """(prefix, {relative name: WeightInfo}) of one layer, from mergekit's definition."""
        infos = self.planner._model_arch(model).get_module(module).layer_weights(index=index) or []
        prefix = layer_prefix([w.name for w in infos], index)
        if prefix is None:
            raise SymAlignConfigError(
                f"cannot tell the layer prefix of layer {index} of {model} from mergekit's "
                f"architecture definition ({', '.join(w.name for w in infos[:3])}, ...)."
            )
        return prefix, {w.name[len(prefix):]: w for w in infos}

    def _layer_tensor(self, weights_in: List[WeightInfo], models: List[ModelReference],
                      settings: AlignSettings) -> Optional[LayerTensor]:
        context = self.context
        if context is None or context.module != self.module:
            return None
        prefixes, names = {}, set()
        for model, info in zip(models, weights_in):
            prefix, _ = self._layer_infos(model, context.module, context.indices[model])
            if not info.name.startswith(prefix):
                return None
            prefixes[model] = prefix
            names.add(info.name[len(prefix):])
        spec = layer_spec(self.arch.name, self.geometry, settings.qk_rotation)
        if len(names) != 1 or next(iter(names)) not in spec.tensors():
            return None
        return LayerTensor(next(iter(names)), prefixes, dict(context.indices))

    # ------------------------------------------------------------------ alignment tasks

    def _layer_loads(self, model: ModelReference, layer: LayerTensor, settings: AlignSettings):
        module, index = self.context.module, layer.indices[model]
        prefix, infos = self._layer_infos(model, module, index)
        spec = layer_spec(self.arch.name, self.geometry, settings.qk_rotation)

        def info(rel):
            return infos.get(rel) or WeightInfo(name=prefix + rel, optional=True)

        found = check_layer_tensors(
            spec, model, prefix,
            present=lambda rel: self._present(model, info(rel)),
            listed=lambda rel: rel in infos,
            architecture_name=self.planner.arch_info.expected_model_type,
        )
        return tuple((rel, self._load(model, info(rel))) for rel in found)

    def _pair_loads(self, model, reference, layer: LayerTensor, settings: AlignSettings):
        model_loads = self._layer_loads(model, layer, settings)
        reference_loads = self._layer_loads(reference, layer, settings)
        check_same_optional_tensors(model, reference, layer.prefixes[model],
                                    (r for r, _ in model_loads), (r for r, _ in reference_loads))
        return model_loads, reference_loads

    def _alignment(self, model: ModelReference, reference: ModelReference, layer: LayerTensor,
                   settings: AlignSettings):
        if settings.alignment == "activations":
            return self._activation_alignment(model, reference, layer, settings)
        key = (model, layer.prefixes[model], reference, layer.prefixes[reference], settings)
        if key not in self._alignments:
            model_loads, reference_loads = self._pair_loads(model, reference, layer, settings)
            self._warn_full_qk(model, settings)
            task = LayerAlignmentTask(
                model=model,
                reference=reference,
                layer_prefix=layer.prefixes[model],
                architecture=self.arch.name,
                geometry=self.geometry,
                settings=settings,
                model_tensors=model_loads,
                reference_tensors=reference_loads,
            )
            self._alignments[key] = collected(self.collector, task, layer=layer.indices[model])
        return self._alignments[key]

    def _activation_alignment(self, model, reference, layer: LayerTensor, settings: AlignSettings):
        check_activation_layers(model, reference, layer.prefixes, layer.indices)
        loads = self._pair_loads(model, reference, layer, settings)  # same checks; the streamer loads
        key = (reference, settings)
        if key not in self._alignments:
            never = never_aligned(self.planner.config)
            models = [m for m in self.planner.config.referenced_models()
                      if m != reference and m not in never]
            device = self.planner.options.device
            self._alignments[key] = ActivationAlignmentTask(
                reference=reference,
                models=tuple(sorted(models, key=str)),
                settings=settings,
                device=device if device != "cpu" else None,
                trust_remote_code=self.planner.options.trust_remote_code,
            )
        source = self._alignments[key]
        if model not in source.models:
            raise SymAlignConfigError(f"model {model} was planned without alignment")
        pick = PickLayerTransform(source=source, model=model, layer=layer.indices[model])
        return collected(self.collector, pick, reference=reference,
                         prefix=layer.prefixes[model], loads=loads)

    def _warn_full_qk(self, model, settings: AlignSettings) -> None:
        if settings.qk_rotation == "full" and not self._warned_full:
            full_qk_warning(str(model))
            self._warned_full = True

    # ------------------------------------------------------------------ one output tensor

    def _check_layer(self, layer: LayerTensor, roles: Roles, settings: TensorSettings, per_input) -> None:
        for m, prefix in layer.prefixes.items():
            self._consistency.check(("layer", m, prefix), settings.align, f"{m} {prefix}* settings")
            self._consistency.check(("align", m, prefix), per_input[m]["align"], f"align of {m}")

    def plan_tensor(self, weight: WeightInfo, weights_in: List[WeightInfo],
                    models: List[ModelReference], cfg_reader: ConfigReader) -> None:
        if weight.optional and not any(self._present(m, w) for m, w in zip(models, weights_in)):
            LOG.info("Skipping optional weight %s", weight.name)
            return
        method = self.method
        base = cfg_reader.base_model
        shared, per_input = resolve_parameters(
            method.spec,
            tensor_name=weight.name,
            inputs={m: w.name for m, w in zip(models, weights_in)},
            sources=cfg_reader.parameter_sources,
            base_model=base,
            t=cfg_reader.t,
        )
        for m in models:
            self._consistency.check(("role", m), per_input[m]["role"], f"role of model {m}")
        roles = resolve_roles(models, base, per_input, method.spec.name, weight.name)
        settings = resolve_settings(shared)
        by_model = dict(zip(models, weights_in))
        layer = self._layer_tensor(weights_in, models, settings.align)
        if layer is not None:
            self._check_layer(layer, roles, settings, per_input)

        def alignment(m):
            if layer is None or m not in roles.aligned:
                return None
            return self._alignment(m, roles.reference, layer, settings.align)

        def aligned_input(m):
            load, transform = self._load(m, by_model[m]), alignment(m)
            if transform is None:
                return load
            return AlignTensorTask(tensor=load, alignment=transform, name=layer.name)

        inner = method.inner.spec
        input_params = {
            m: ImmutableMap(data={
                p.name: per_input[m][p.name]
                for p in inner.input_parameters
                if m != roles.reference or p.scope == ParameterScope.INPUT
            })
            for m in roles.merged
        }
        if weight.vocabulary_axis is not None and self.planner._tokenizer_task is not None:
            # Embeddings under a tokenizer section: mergekit's own vocabulary permutation
            # (no layer symmetry acts on them, so nothing is aligned here).
            tokenizer = cfg_reader.config.tokenizer
            inputs = sources = PermutedVocabulary(
                gather_tensors=self._gather(by_model),
                tokenizer_task=self.planner._tokenizer_task,
                tokens=(tokenizer.tokens if tokenizer else None) or {},
                pad_to_multiple_of=tokenizer.pad_to_multiple_of if tokenizer else None,
                base_model=base,
                vocabulary_axis=weight.vocabulary_axis,
            )
        else:
            inputs = TensorDictWrapper(
                tensors=ImmutableMap(data={m: aligned_input(m) for m in roles.merged})
            )
            sources = TensorDictWrapper(tensors=ImmutableMap(data={
                m: self._load(m, by_model[m]) for m in dict.fromkeys((base, roles.reference))
            }))
        merged = ExecuteMergeMethodTask(
            method_name=inner.name,
            gather_tensors=inputs,
            model_order=roles.merged,
            base_model=roles.reference,
            output_weight=weight,
            parameters=ImmutableMap(data={p.name: shared[p.name] for p in inner.shared_parameters}),
            input_parameters=ImmutableMap(data=input_params),
            # A transfer subtracts the reference again: keep the delta in float32.
            dtype="float32" if roles.transfer else None,
        )
        final = TransferTask(
            merged=merged,
            sources=sources,
            base_model=base,
            reference_model=roles.reference,
            base_alignment=alignment(base),
            name=layer.name if layer is not None else None,
            output_frame=settings.output_frame,
        )
        self.planner._tensors.append((weight, final))

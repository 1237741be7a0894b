"""The planner hook: plain mergekit planning, with aligned inputs for our methods.

mergekit 0.1.5 always wraps a method in a fixed ``ExecuteMergeMethodTask(gather_tensors=...)``
(see docs/how-it-works.md); to feed it aligned tensors we subclass ``MergePlanner`` and
swap it into ``mergekit.merge``. For every other method the subclass does exactly what
mergekit does (it calls the parent).

For an aligned method and one output tensor the graph is::

    LoadTensor(S_i) --AlignTensorTask(LayerAlignmentTask(S_i, R))--+
    LoadTensor(R) -------------------------------------------------+-> ExecuteMergeMethodTask
                                                                        (wrapped method, base R)
    LoadTensor(B), LayerAlignmentTask(B, R) ----------------------------> TransferTask -> save
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any, Dict, List, Tuple

from mergekit.architecture import WeightInfo
from mergekit.common import ImmutableMap, ModelReference
from mergekit.config import ConfigReader
from mergekit.io.tasks import GatherTensors, LoaderCache, LoadTensor
from mergekit.merge_methods.base import ParameterScope
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask, TensorDictWrapper
from mergekit.parameter_resolver import resolve_parameters
from mergekit.plan import MergePlanner
from mergekit.tokenizer import PermutedVocabulary

from .architectures import (
    UnsupportedArchitecture,
    architecture_for,
    check_same_geometry,
    full_qk_warning,
    geometry_from_config,
    layer_spec,
    split_layer_name,
)
from .methods import SymAlignConfigError, SymmetryAlignedMerge
from .recipe import check_recipe, parameter_scopes
from .tasks import (
    ActivationAlignmentTask,
    AlignTensorTask,
    LayerAlignmentTask,
    PickLayerTransform,
    TransferTask,
)

LOG = logging.getLogger(__name__)
LAYER_SETTINGS = ("alignment", "permutation", "rotation", "scaling", "qk_rotation", "output_frame",
                  "calibration", "calibration_samples", "calibration_max_tokens")


class SymAlignPlanner(MergePlanner):
    def __init__(self, config, arch_info, options, out_model_config):
        super().__init__(config, arch_info, options, out_model_config)
        self._aligned = isinstance(self._method, SymmetryAlignedMerge)
        self._alignments: Dict[Tuple, LayerAlignmentTask] = {}
        self._layer_settings: Dict[Tuple, Dict[str, Any]] = {}
        self._roles: Dict[ModelReference, str] = {}
        self._geometry = None
        self._arch = None
        self._warned_full = False

    # ------------------------------------------------------------------ recipe checks

    def _plan(self):
        if self._aligned:
            self._check_recipe()
        return super()._plan()

    def _check_recipe(self):
        method: SymmetryAlignedMerge = self._method
        check_recipe(self.config, method)
        cfg = self.config
        name = method.spec.name
        if self.options.unsafe_truncate_embeddings:
            raise SymAlignConfigError(
                f"{name} does not support --unsafe-truncate-embeddings; use a tokenizer "
                f"section (tokenizer: {{source: base}}) to reconcile vocabularies instead."
            )
        models = cfg.referenced_models()
        if len(models) < 2:
            raise SymAlignConfigError(f"{name}: the recipe has no model to transfer from.")
        trust = self.options.trust_remote_code
        geometries = {}
        for model in models:
            try:
                geometries[str(model)] = geometry_from_config(model.config(trust), str(model))
            except UnsupportedArchitecture as err:
                raise SymAlignConfigError(str(err)) from None
        types = {g.model_type for g in geometries.values()}
        if len(types) > 1:
            raise SymAlignConfigError(
                f"{name}: models have different architectures "
                f"({', '.join(f'{m}: {g.model_type}' for m, g in geometries.items())}); "
                f"symmetry alignment needs one architecture."
            )
        try:
            check_same_geometry(geometries)
        except ValueError as err:
            raise SymAlignConfigError(f"{name}: {err}") from None
        self._geometry = next(iter(geometries.values()))
        self._arch = architecture_for(self._geometry.model_type)
        params = cfg.parameters or {}
        if params.get("alignment") == "activations":
            from .calibration import load_calibration

            try:  # a bad calibration file is refused before anything is loaded or written
                load_calibration(params.get("calibration") or None,
                                 params.get("calibration_samples", 256))
            except ValueError as err:
                raise SymAlignConfigError(str(err)) from None

    # ------------------------------------------------------------------ planning

    def _gather(self, weight_info: Dict[ModelReference, WeightInfo]) -> GatherTensors:
        """mergekit's own GatherTensors, built as its planner builds it (so loads are shared)."""
        return GatherTensors(
            weight_info=ImmutableMap(data=weight_info),
            dtype=self.config.dtype,
            device=self.options.device if self.options.read_to_gpu else None,
        )

    def _load(self, model: ModelReference, info: WeightInfo) -> LoadTensor:
        (load,) = self._gather({model: info}).arguments().values()
        return load

    @lru_cache(maxsize=None)
    def _layer_weight_infos(self, model: ModelReference, index: int) -> Dict[str, WeightInfo]:
        """mergekit's WeightInfos of one layer of a model, by tensor name."""
        infos = {}
        for module_name in self.arch_info.modules:
            try:
                weights = self._model_arch(model).get_module(module_name).layer_weights(index=index)
            except Exception:  # not every module has this layer index
                continue
            infos.update((info.name, info) for info in weights or ())
        return infos

    def _present(self, model: ModelReference, info: WeightInfo) -> bool:
        index = LoaderCache().get(model).index
        return any(n in index.tensor_paths for n in [info.name, *(info.aliases or ())])

    def _layer_loads(self, model, prefix, index, spec, optional_names):
        loads = []
        for rel in spec.tensors():
            info = self._layer_weight_infos(model, index).get(prefix + rel)
            known = info is not None
            info = info or WeightInfo(name=prefix + rel, optional=True)
            present = self._present(model, info)
            if present and not known:
                raise SymAlignConfigError(
                    f"model {model} has tensor {prefix + rel}, but mergekit's architecture "
                    f"definition for {self.arch_info.expected_model_type} does not list it, so the merged "
                    f"model would silently lose it (this happens to plain mergekit merges too). "
                    f"Use a checkpoint without it, or an architecture definition that lists it."
                )
            if not present and rel not in optional_names:
                raise SymAlignConfigError(
                    f"model {model} lacks tensor {prefix + rel}, which the {spec.architecture} "
                    f"symmetry spec moves together with the rest of the layer. The checkpoint "
                    f"is incomplete or not a standard {spec.architecture} model: re-download "
                    f"it, or check its config.json (model_type)."
                )
            if present:
                loads.append((rel, self._load(model, info)))
        return tuple(loads)

    def _pair_loads(self, model, reference, prefixes, indices, qk_rotation):
        """Both models' loads of one layer's spec tensors, checked: every required tensor
        present, none that mergekit would drop, and the same optional tensors (biases)."""
        spec = layer_spec(self._arch.name, self._geometry, qk_rotation)
        optional = {s.tensor for sym in spec.symmetries() for s in sym.sites if s.optional}
        model_loads = self._layer_loads(model, prefixes[model], indices[model], spec, optional)
        ref_loads = self._layer_loads(reference, prefixes[reference], indices[reference], spec, optional)
        if {r for r, _ in model_loads} != {r for r, _ in ref_loads}:
            diff = {r for r, _ in model_loads} ^ {r for r, _ in ref_loads}
            raise SymAlignConfigError(
                f"models {model} and {reference} differ in which optional tensors they carry "
                f"in {prefixes[model]}* ({', '.join(sorted(diff))}): they are not the same "
                f"architecture variant and cannot be aligned."
            )
        return model_loads, ref_loads

    def _activation_models(self, reference: ModelReference):
        """Models that may need aligning: all but the reference, except those whose `align`
        is a plain false everywhere in the recipe (no forward pass is spent on them)."""
        seen = {}
        for _where, params, model in parameter_scopes(self.config):
            if model is not None and params and "align" in params:
                seen.setdefault(model, set()).add(params["align"] is False)
        never = {m for m, flags in seen.items() if flags == {True}}
        return tuple(m for m in self.config.referenced_models() if m != reference and m not in never)

    def _activation_alignment(self, model, reference, prefixes, indices, settings):
        if indices[model] != indices[reference]:
            raise SymAlignConfigError(
                f"alignment: activations pairs layers by index while streaming, but output layer "
                f"{prefixes[reference]}* takes layer {indices[model]} of {model} and layer "
                f"{indices[reference]} of the reference {reference}. Use equal layer ranges, or "
                f"alignment: weights."
            )
        # The same checks as the weight path; the streamer does its own loading.
        self._pair_loads(model, reference, prefixes, indices, settings["qk_rotation"])
        key = (reference, tuple(settings[k] for k in LAYER_SETTINGS if k != "output_frame"))
        if key not in self._alignments:
            models = self._activation_models(reference)
            self._alignments[key] = ActivationAlignmentTask(
                reference=reference,
                models=tuple(sorted(models, key=str)),
                qk_rotation=settings["qk_rotation"],
                permutation=settings["permutation"],
                rotation=settings["rotation"],
                scaling=settings["scaling"],
                calibration=settings["calibration"],
                calibration_samples=settings["calibration_samples"],
                calibration_max_tokens=settings["calibration_max_tokens"],
                device=self.options.device if self.options.device != "cpu" else None,
                trust_remote_code=self.options.trust_remote_code,
            )
        source = self._alignments[key]
        if model not in source.models:
            raise SymAlignConfigError(f"model {model} was planned without alignment")
        return PickLayerTransform(source=source, model=model, layer=indices[model])

    def _alignment(self, model, reference, prefixes, indices, settings):
        if settings["alignment"] == "activations":
            return self._activation_alignment(model, reference, prefixes, indices, settings)
        key = (model, prefixes[model], reference, prefixes[reference],
               tuple(settings[k] for k in LAYER_SETTINGS))
        if key in self._alignments:
            return self._alignments[key]
        model_loads, ref_loads = self._pair_loads(
            model, reference, prefixes, indices, settings["qk_rotation"])
        if settings["qk_rotation"] == "full" and not self._warned_full:
            full_qk_warning(str(model))
            self._warned_full = True
        task = LayerAlignmentTask(
            model=model,
            reference=reference,
            layer_prefix=prefixes[model],
            architecture=self._arch.name,
            geometry=self._geometry,
            qk_rotation=settings["qk_rotation"],
            permutation=settings["permutation"],
            rotation=settings["rotation"],
            scaling=settings["scaling"],
            model_tensors=model_loads,
            reference_tensors=ref_loads,
        )
        self._alignments[key] = task
        return task

    def _consistent(self, key, value, what: str):
        seen = self._layer_settings.setdefault(key, value)
        if seen != value:
            raise SymAlignConfigError(
                f"{what} resolves differently for different tensors ({seen} vs {value}): "
                f"every tensor of a layer moves together, so set it per model or per layer "
                f"(no tensor filters)."
            )

    def plan_tensor(self, weight: WeightInfo, weights_in: List[WeightInfo],
                    models: List[ModelReference], cfg_reader: ConfigReader):
        if not self._aligned:
            return super().plan_tensor(weight, weights_in, models, cfg_reader)
        if weight.optional and not any(self._present(m, w) for m, w in zip(models, weights_in)):
            logging.info(f"Skipping optional weight {weight.name}")
            return
        method: SymmetryAlignedMerge = self._method
        base = cfg_reader.base_model
        shared, per_input = resolve_parameters(
            method.spec,
            tensor_name=weight.name,
            inputs={m: w.name for m, w in zip(models, weights_in)},
            sources=cfg_reader.parameter_sources,
            base_model=base,
            t=cfg_reader.t,
        )
        w_by_model = dict(zip(models, weights_in))
        for m in models:
            self._consistent(("role", m), per_input[m]["role"], f"role of model {m}")
        refs = [m for m in models if per_input[m]["role"] == "reference" and m != base]
        reference = refs[0] if refs else base
        skills = [m for m in models if m not in (base, reference)]
        for m in skills:
            if per_input[m].get("weight") is None:
                raise SymAlignConfigError(
                    f"model {m} is a skill model but has no weight (tensor {weight.name}). "
                    f"Give it `weight:` or mark it `role: reference`."
                )
        if not skills:
            raise SymAlignConfigError(
                f"{method.spec.name}: no skill model contributes to {weight.name}; the recipe "
                f"needs at least one model besides the base and the reference."
            )

        # Which layer tensor is this, in each model's own numbering (slices may differ)?
        spec = layer_spec(self._arch.name, self._geometry, shared["qk_rotation"])
        splits = {m: split_layer_name(self._arch, w.name) for m, w in w_by_model.items()}
        rels = {s[2] for s in splits.values() if s is not None}
        touched = len(rels) == 1 and all(s is not None for s in splits.values()) and (
            next(iter(rels)) in spec.tensors()
        )
        rel = next(iter(rels)) if touched else None
        prefixes = {m: s[0] for m, s in splits.items() if s is not None}
        indices = {m: s[1] for m, s in splits.items() if s is not None}
        settings = {k: shared[k] for k in LAYER_SETTINGS}
        if touched:
            for m in models:
                self._consistent(("layer", m, prefixes[m]), settings, f"{m} {prefixes[m]}* settings")
                self._consistent(("align", m, prefixes[m]), per_input[m]["align"], f"align of {m}")

        def needs_alignment(m):
            return touched and m != reference and bool(per_input[m]["align"])

        def aligned_input(m):
            load = self._load(m, w_by_model[m])
            if not needs_alignment(m):
                return load
            alignment = self._alignment(m, reference, prefixes, indices, settings)
            return AlignTensorTask(tensor=load, alignment=alignment, name=rel)

        inner = method.inner.spec
        inner_models = (reference, *skills)
        input_params = {}
        for m in inner_models:
            input_params[m] = ImmutableMap(data={
                p.name: per_input[m][p.name]
                for p in inner.input_parameters
                if m != reference or p.scope == ParameterScope.INPUT
            })
        if weight.vocabulary_axis is not None and self._tokenizer_task is not None:
            # Embeddings under a tokenizer section: mergekit's own vocabulary permutation
            # (no layer symmetry acts on them, so nothing is aligned here).
            tokenizer = cfg_reader.config.tokenizer
            inputs = sources = PermutedVocabulary(
                gather_tensors=self._gather(dict(w_by_model)),
                tokenizer_task=self._tokenizer_task,
                tokens=(tokenizer.tokens if tokenizer else None) or {},
                pad_to_multiple_of=tokenizer.pad_to_multiple_of if tokenizer else None,
                base_model=base,
                vocabulary_axis=weight.vocabulary_axis,
            )
        else:
            inputs = TensorDictWrapper(
                tensors=ImmutableMap(data={m: aligned_input(m) for m in inner_models})
            )
            sources = TensorDictWrapper(tensors=ImmutableMap(data={
                m: self._load(m, w_by_model[m]) for m in dict.fromkeys((base, reference))
            }))
        merged = ExecuteMergeMethodTask(
            method_name=inner.name,
            gather_tensors=inputs,
            model_order=inner_models,
            base_model=reference,
            output_weight=weight,
            parameters=ImmutableMap(data={p.name: shared[p.name] for p in inner.shared_parameters}),
            input_parameters=ImmutableMap(data=input_params),
            # A transfer subtracts the reference again: keep the delta in float32.
            dtype="float32" if reference != base else None,
        )
        final = TransferTask(
            merged=merged,
            sources=sources,
            base_model=base,
            reference_model=reference,
            base_alignment=(
                self._alignment(base, reference, prefixes, indices, settings)
                if needs_alignment(base) else None
            ),
            name=rel,
            output_frame=settings["output_frame"],
        )
        self._tensors.append((weight, final))

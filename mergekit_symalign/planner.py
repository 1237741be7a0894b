"""The aligned half of mergekit's ``MergePlanner``: the task graph of an aligned merge.

:mod:`.plugin` hooks ``mergekit.plan.MergePlanner`` itself (so every entry point that plans a
merge — ``mergekit-yaml``, ``run_merge``, the evolutionary merge — gets it) and, when the
recipe's method is a ``symmetry_aligned_*`` one, hands planning to :class:`AlignedPlanning`:

* :meth:`AlignedPlanning.check` runs every recipe check (:mod:`.validation`) before mergekit
  builds anything, so a refused merge writes nothing;
* mergekit's own ``plan_layer`` says which layer of which model each output tensor comes
  from (slices may take different layers from different models); the layer's tensor names
  come from mergekit's architecture definition of that model;
* :meth:`AlignedPlanning.plan_tensor` builds, for one output tensor of a transfer::

    LoadTensor(S_i) --AlignTensorTask(LayerAlignmentTask(S_i, R))--+
    LoadTensor(R) -------------------------------------------------SkillDeltas(S_i - R; zero base)
                                                                    -> ExecuteMergeMethodTask
                                                                        (wrapped method: combined delta)
    CheckedTensors(LoadTensor(B), LoadTensor(R)), LayerAlignmentTask(B, R) --> TransferTask -> save

  AlignTensorTask, SkillDeltas and the method's task run inside the TransferTask (``fused``:
  one task, whose inputs are the loads and transforms and whose result is the saved tensor),
  except where a ``residual: orthogonal`` refold shares a norm's merged delta between tasks.
  Without a transfer (base = reference) the method merges the models themselves on R.

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
from mergekit.architecture.conversion import can_convert_checkpoint_keys
from mergekit.common import ImmutableMap, ModelReference
from mergekit.config import ConfigReader
from mergekit.io.tasks import GatherTensors, LoaderCache, LoadTensor
from mergekit.merge_methods.base import ParameterScope
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.parameter_resolver import resolve_parameters
from mergekit.tokenizer import PermutedVocabulary

from .architectures import full_qk_warning, text_config
from .collect import collected, for_planning
from .errors import SymAlignConfigError
from .settings import AlignSettings, Roles, TensorSettings, resolve_roles, resolve_settings
from . import residual as res
from .statedict import layer_tensor_names, tied_embeddings
from .tasks import (
    ActivationAlignmentTask,
    AlignTensorTask,
    AlignVocabularyTask,
    CheckedTensors,
    FiniteTensor,
    LayerAlignmentTask,
    OutputFolder,
    PickLayerTransform,
    PickModuleTransform,
    ResidualAlignmentTask,
    SkillDeltas,
    TransferTask,
    calibration_tokens,
)
from .validation import (
    LayerConsistency,
    check_activation_layers,
    check_architecture_settings,
    check_calibration,
    check_layer_tensors,
    check_models,
    check_options,
    check_output_path,
    check_recipe,
    check_residual,
    check_same_computation,
    check_same_optional_tensors,
    check_vocabularies,
    never_aligned,
    recipe_reference,
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


@dataclass(frozen=True)
class ModuleTensor:
    """A module-level tensor the residual-stream transform moves (embeddings, final norm,
    lm_head), by its name relative to the decoder module."""

    name: str


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
        self.module_context: Optional[str] = None  # set while mergekit plans a module
        self.residual = "none"
        self.tied = False
        self._alignments: Dict[Tuple, object] = {}
        self._planned: Dict[str, "Planned"] = {}
        self._consistency = LayerConsistency()
        self._warned_full = False
        self.output: Optional[OutputFolder] = None  # None when planned in memory
        # Report hook (.collect): a key when the merge's alignments are recorded (for the model
        # card or `mergekit-symalign report`); alignment tasks are then built by collected().
        self.collector: Optional[str] = for_planning(planner)

    def set_output(self, out_path: str) -> None:
        """Where the merge will be written (from ``plan_to_disk``), and whether the folder
        existed before: a refusal during execution removes it only if this merge made it."""
        self.output = OutputFolder.before_merge(out_path)

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        """Every recipe check, before mergekit normalizes the config or builds a task."""
        cfg, options = self.planner.config, self.planner.options
        name = self.method.spec.name
        check_recipe(cfg, self.method)
        check_options(options, self.method)
        models = cfg.referenced_models()  # (hooked: a missing local folder is refused)
        if self.output is not None:
            check_output_path(self.output.path, models, name)
        configs = {m: m.config(trust_remote_code=options.trust_remote_code) for m in models}
        self.arch, self.geometry = check_models(name, configs)
        activations = (cfg.parameters or {}).get("alignment") == "activations"
        check_same_computation(name, configs, refuse=activations)
        check_vocabularies(name, configs, cfg.base_model,
                           has_tokenizer=cfg.tokenizer is not None or cfg.tokenizer_source is not None)
        check_architecture_settings(cfg, self.arch)
        reference = recipe_reference(cfg)
        check_calibration(
            cfg,
            lambda path, samples, max_tokens: calibration_tokens(
                reference, self._activation_models(reference), path, samples, max_tokens,
                options.trust_remote_code),
            geometry=self.geometry,
            vocab_size=getattr(text_config(configs[reference]), "vocab_size", None),
        )
        self.module = self._decoder_module()
        self.residual = check_residual(cfg, self.arch, configs, len(self.planner.arch_info.modules),
                                       self.method.spec.name)
        tied = {m: tied_embeddings(c) for m, c in configs.items()}
        if self.residual != "none" and len(set(tied.values())) > 1:
            raise SymAlignConfigError(
                f"{self.method.spec.name}: residual: {self.residual} needs all models tied or "
                f"all untied (tie_word_embeddings: {', '.join(f'{m}: {t}' for m, t in tied.items())})."
            )
        self.tied = next(iter(tied.values()))

    def _activation_models(self, reference: ModelReference) -> Tuple[ModelReference, ...]:
        """The models an activation alignment streams besides the reference (sorted)."""
        never = never_aligned(self.planner.config)
        return tuple(sorted((m for m in self.planner.config.referenced_models()
                             if m != reference and m not in never), key=str))

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
        names = [info.name, *(info.aliases or ())]
        if any(n in index.tensor_paths for n in names):
            return True
        # As mergekit's LoadTensor reads it: converted from the checkpoint's layout (a Hub
        # MoE's per-expert tensors into the fused experts tensor its definition names).
        model_type = model.config(trust_remote_code=LoaderCache().trust_remote_code).model_type
        keys = set(index.tensor_paths)
        return any(can_convert_checkpoint_keys(model_type, keys, n) for n in names)

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

    def _layer_names(self, settings: AlignSettings) -> Tuple[Tuple[str, ...], set]:
        """(every layer-relative tensor an alignment moves, those that may be absent)."""
        return layer_tensor_names(self.arch, self.geometry, settings.qk_rotation, settings.residual)

    def _module_names(self) -> Tuple[str, ...]:
        arch = self.arch
        return (arch.embed, f"{arch.final_norm}.weight", f"{arch.final_norm}.bias", arch.lm_head)

    def _aligned_tensor(self, weight: WeightInfo, weights_in: List[WeightInfo],
                        models: List[ModelReference], settings: AlignSettings):
        """The layer or module-level tensor an alignment moves, or None."""
        context = self.context
        if context is None:
            if settings.residual == "none" or self.module_context != self.module:
                return None
            prefix = self.planner.arch_info.modules[self.module].weight_prefix or ""
            rel = weight.name[len(prefix):] if weight.name.startswith(prefix) else None
            return ModuleTensor(rel) if rel in self._module_names() else None
        if context.module != self.module:
            return None
        prefixes, names = {}, set()
        for model, info in zip(models, weights_in):
            prefix, _ = self._layer_infos(model, context.module, context.indices[model])
            if not info.name.startswith(prefix):
                return None
            prefixes[model] = prefix
            names.add(info.name[len(prefix):])
        if len(names) != 1 or next(iter(names)) not in self._layer_names(settings)[0]:
            return None
        return LayerTensor(next(iter(names)), prefixes, dict(context.indices))

    # ------------------------------------------------------------------ alignment tasks

    def _layer_loads(self, model: ModelReference, layer: LayerTensor, settings: AlignSettings):
        module, index = self.context.module, layer.indices[model]
        prefix, infos = self._layer_infos(model, module, index)
        names, optional = self._layer_names(settings)

        def info(rel):
            return infos.get(rel) or WeightInfo(name=prefix + rel, optional=True)

        found = check_layer_tensors(
            names, optional, model, prefix,
            present=lambda rel: self._present(model, info(rel)),
            listed=lambda rel: rel in infos,
            architecture_name=self.planner.arch_info.expected_model_type,
            spec_name=self.arch.name,
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
                residual=self._residual(model, reference, settings),
                model=model,
                reference=reference,
                layer_prefix=layer.prefixes[model],
                architecture=self.arch.name,
                geometry=self.geometry,
                settings=settings,
                model_tensors=model_loads,
                reference_tensors=reference_loads,
                output=self.output,
            )
            self._alignments[key] = collected(self.collector, task, layer=layer.indices[model])
        return self._alignments[key]

    def _residual(self, model, reference, settings: AlignSettings) -> Optional[ResidualAlignmentTask]:
        if settings.residual == "none":
            return None
        key = ("residual", model, reference, settings.residual)
        if key not in self._alignments:
            self._alignments[key] = ResidualAlignmentTask(
                model=model, reference=reference, architecture=self.arch.name,
                geometry=self.geometry, mode=settings.residual, tied=self.tied,
                cache=settings.alignment_cache,
            )
        return self._alignments[key]

    def _module_alignment(self, model, reference, settings: AlignSettings):
        if settings.alignment == "activations":
            return PickLayerTransform(source=self._activation_source(reference, settings),
                                      model=model, layer=res.MODULE)
        return PickModuleTransform(source=self._residual(model, reference, settings))

    def _activation_source(self, reference, settings: AlignSettings) -> ActivationAlignmentTask:
        key = (reference, settings)
        if key not in self._alignments:
            device = self.planner.options.device
            self._alignments[key] = ActivationAlignmentTask(
                reference=reference,
                models=self._activation_models(reference),
                settings=settings,
                device=device if device != "cpu" else None,
                trust_remote_code=self.planner.options.trust_remote_code,
                output=self.output,
            )
        return self._alignments[key]

    def _activation_alignment(self, model, reference, layer: LayerTensor, settings: AlignSettings):
        check_activation_layers(model, reference, layer.prefixes, layer.indices)
        loads = self._pair_loads(model, reference, layer, settings)  # same checks; the streamer loads
        source = self._activation_source(reference, settings)
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
        planned = self._merged_task(weight, weights_in, models, cfg_reader)
        layer, roles, settings = planned.layer, planned.roles, planned.settings
        refold = self._refold(weight, planned, models, cfg_reader)
        final = TransferTask(
            merged=planned.merged,
            sources=planned.sources,
            base_model=roles.base,
            reference_model=roles.reference,
            base_alignment=planned.alignment(roles.base),
            name=layer.name if layer is not None else None,
            output_frame=settings.output_frame,
            merged_is_delta=planned.delta_inputs,
            # The tensor's own merge runs inside its transfer, unless a refold shares a norm's
            # merged delta between several tasks.
            fused=planned.delta_inputs and not refold,
            **refold,
        )
        self.planner._tensors.append((weight, final))

    def _merged_task(self, weight: WeightInfo, weights_in: List[WeightInfo],
                     models: List[ModelReference], cfg_reader: ConfigReader) -> "Planned":
        """The wrapped method's task for one output tensor (memoized by name: a reader's
        refold under ``residual: orthogonal`` needs its norm's merged value too)."""
        if weight.name in self._planned:
            return self._planned[weight.name]
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
        layer = self._aligned_tensor(weight, weights_in, models, settings.align)
        if isinstance(layer, LayerTensor):
            self._check_layer(layer, roles, settings, per_input)

        def alignment(m):
            if layer is None or m not in roles.aligned:
                return None
            if isinstance(layer, ModuleTensor):
                return self._module_alignment(m, roles.reference, settings.align)
            return self._alignment(m, roles.reference, layer, settings.align)

        def aligned_input(m):
            transform = alignment(m)
            if transform is None:
                return self._load(m, by_model[m])  # checked by the task that takes it
            # a layer tensor of an aligned model: its alignment task checked it as it loaded
            return AlignTensorTask(tensor=self._load(m, by_model[m]), alignment=transform,
                                   name=layer.name)

        def unchecked(ms):
            """{model: its tensor's name} of those whose input no layer alignment checked (a
            LayerAlignmentTask checks every tensor it loads; residual-stream and activation
            alignments read only some, so their tensors are checked again)."""
            return ImmutableMap(data={m: by_model[m].name for m in ms
                                      if not isinstance(alignment(m), LayerAlignmentTask)})

        inner = method.inner.spec
        input_params = {
            m: ImmutableMap(data={
                p.name: per_input[m][p.name]
                for p in inner.input_parameters
                if m != roles.reference or p.scope == ParameterScope.INPUT
            })
            for m in roles.merged
        }
        delta_inputs = False
        if weight.vocabulary_axis is not None and self.planner._tokenizer_task is not None:
            # Embeddings under a tokenizer section: mergekit's own vocabulary permutation
            # (only the residual-stream transform, if any, acts on them).
            tokenizer = cfg_reader.config.tokenizer
            inputs = PermutedVocabulary(
                gather_tensors=self._gather(by_model),
                tokenizer_task=self.planner._tokenizer_task,
                tokens=(tokenizer.tokens if tokenizer else None) or {},
                pad_to_multiple_of=tokenizer.pad_to_multiple_of if tokenizer else None,
                base_model=base,
                vocabulary_axis=weight.vocabulary_axis,
            )
            # every model's (permuted) rows, checked before the transfer saves anything
            sources = FiniteTensor(tensor=inputs, name=weight.name, output=self.output)
            moved = tuple((m, alignment(m)) for m in roles.merged if alignment(m) is not None)
            if moved:  # the residual stream's transform, after mergekit's token permutation
                inputs = AlignVocabularyTask(permuted=inputs, alignments=moved, name=layer.name)
        else:
            if roles.transfer:
                # The wrapped method merges the skills' deltas onto a zero base: its result is
                # the combined delta itself (see SkillDeltas). The deltas, and so the merge, wait
                # for the base's layer alignment (the only case where the base is aligned).
                # SkillDeltas checks the reference (and the skills not aligned), before the
                # TransferTask that reads the sources again.
                inputs = SkillDeltas(
                    tensors=ImmutableMap(data={
                        roles.reference: self._load(roles.reference, by_model[roles.reference]),
                        **{m: aligned_input(m) for m in roles.skills}}),
                    check=unchecked((roles.reference, *roles.skills)),
                    reference_model=roles.reference, after=alignment(base), output=self.output)
                delta_inputs = True
                check = unchecked((base,))
            else:
                inputs = CheckedTensors(
                    tensors=ImmutableMap(data={m: aligned_input(m) for m in roles.merged}),
                    check=unchecked(roles.merged), output=self.output)
                # the merged models were checked as the method's inputs
                check = unchecked(m for m in (base, roles.reference) if m not in roles.merged)
            sources = CheckedTensors(
                tensors=ImmutableMap(data={m: self._load(m, by_model[m])
                                           for m in dict.fromkeys((base, roles.reference))}),
                check=check, output=self.output)
        merged = ExecuteMergeMethodTask(
            method_name=inner.name,
            gather_tensors=inputs,
            model_order=roles.merged,
            base_model=roles.reference,
            output_weight=weight,
            parameters=ImmutableMap(data={p.name: shared[p.name] for p in inner.shared_parameters}),
            input_parameters=ImmutableMap(data=input_params),
            # A transfer keeps the skill vector in float32 (the deltas; or, through mergekit's
            # vocabulary permutation, the models, the reference being subtracted again).
            dtype="float32" if roles.transfer else None,
        )
        planned = Planned(merged, sources, roles, settings, layer, alignment, delta_inputs)
        self._planned[weight.name] = planned
        return planned

    def _refold(self, weight: WeightInfo, planned: "Planned", models, cfg_reader) -> dict:
        """``residual: orthogonal`` in the base's coordinates: a reader (or norm) is mapped
        back with the *merged* model's own norm weight folded in, not the reference's, so the
        result is exactly the merged function with the base's norms (TransferTask)."""
        layer, roles, settings = planned.layer, planned.roles, planned.settings
        if (settings.align.residual != "orthogonal" or settings.output_frame != "base"
                or layer is None or not roles.transfer or roles.base not in roles.aligned):
            return {}
        norm = self._reading_norm(layer)
        if norm is None:
            return {}
        out_name = weight.name[: len(weight.name) - len(layer.name)] + f"{norm}.weight"
        if isinstance(layer, LayerTensor):
            context = self.context
            norm_in = [self._layer_infos(m, context.module, context.indices[m])[1][f"{norm}.weight"]
                       for m in models]
        else:
            prefix = self.planner.arch_info.modules[self.module].weight_prefix or ""
            norm_in = [WeightInfo(name=prefix + f"{norm}.weight") for _m in models]
        norm_planned = self._merged_task(WeightInfo(name=out_name), norm_in, models, cfg_reader)
        # a transfer, and a norm has no vocabulary axis: its merge took deltas too
        assert norm_planned.delta_inputs
        return {"fold_norm": f"{norm}.weight", "norm_merged": norm_planned.merged,
                "norm_sources": norm_planned.sources}

    def _reading_norm(self, tensor) -> Optional[str]:
        """The reader-side norm whose output ``tensor`` reads (or which it is)."""
        if isinstance(tensor, ModuleTensor):
            sites = res.module_sites(self.arch, self.tied)
        else:
            sites = res.layer_sites(self.arch, self.geometry)
        for norm, readers in sites.readers:
            if norm is not None and (tensor.name in readers or tensor.name == f"{norm}.weight"):
                return norm
        return None


@dataclass(frozen=True, eq=False)
class Planned:
    merged: ExecuteMergeMethodTask
    sources: object
    roles: Roles
    settings: TensorSettings
    layer: object  # LayerTensor, ModuleTensor or None
    alignment: object  # model -> its alignment task (or None)
    delta_inputs: bool = False  # merged is the combined delta, not R + delta

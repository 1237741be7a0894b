"""Which alignment task a model gets for a tensor, built once and shared (memoized per merge):
one :class:`.tasks.LayerAlignmentTask` per (layer, model), one residual solve per model, one
activation solve per merge (``alignment: activations``), each wrapped for the model card's
record when the merge has a collector (:func:`.collect.collected`).

A new kind of alignment (e.g. a rectangular restriction onto a pruned child) is one more
method here, chosen in :meth:`Alignments.for_tensor`.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from mergekit.architecture import WeightInfo
from mergekit.common import ModelReference

from . import residual as res
from .architectures import full_qk_warning
from .collect import collected
from .errors import SymAlignConfigError
from .layout import LayerTensor, Layout, ModuleTensor, Moved, Position
from .settings import AlignSettings
from .tasks import (
    ActivationAlignmentTask,
    LayerAlignmentTask,
    PickLayerTransform,
    PickModuleTransform,
    ResidualAlignmentTask,
)
from .validation import check_activation_layers, check_layer_tensors, check_same_optional_tensors


class Alignments:
    def __init__(self, layout: Layout,
                 activation_models: Callable[[ModelReference], Tuple[ModelReference, ...]],
                 collector: Optional[str]):
        self.layout = layout
        self.planner = layout.planner
        self.activation_models = activation_models  # reference -> the models streamed beside it
        self.collector = collector
        self._tasks: Dict[Tuple, object] = {}
        self._warned_full = False

    def for_tensor(self, model: ModelReference, reference: ModelReference, tensor: Moved,
                   settings: AlignSettings, position: Position):
        """The task whose result moves ``model``'s ``tensor`` into ``reference``'s frame."""
        if isinstance(tensor, ModuleTensor):
            if settings.alignment == "activations":
                return PickLayerTransform(source=self._activation_source(reference, settings),
                                          model=model, layer=res.MODULE)
            return PickModuleTransform(source=self._residual(model, reference, settings))
        if settings.alignment == "activations":
            return self._activation_layer(model, reference, tensor, settings, position)
        return self._layer(model, reference, tensor, settings, position)

    # ---------------------------------------------------------------- one layer's loads

    def _layer_loads(self, model: ModelReference, tensor: LayerTensor, settings: AlignSettings,
                     position: Position):
        layout = self.layout
        prefix, infos = layout.layer_infos(model, position.module, tensor.indices[model])
        names, optional = layout.layer_names(settings)

        def info(rel):
            return infos.get(rel) or WeightInfo(name=prefix + rel, optional=True)

        found = check_layer_tensors(
            names, optional, model, prefix,
            present=lambda rel: layout.present(model, info(rel)),
            listed=lambda rel: rel in infos,
            architecture_name=self.planner.arch_info.expected_model_type,
            spec_name=layout.arch.name,
        )
        return tuple((rel, layout.load(model, info(rel))) for rel in found)

    def _pair_loads(self, model, reference, tensor: LayerTensor, settings: AlignSettings,
                    position: Position):
        model_loads = self._layer_loads(model, tensor, settings, position)
        reference_loads = self._layer_loads(reference, tensor, settings, position)
        check_same_optional_tensors(model, reference, tensor.prefixes[model],
                                    (r for r, _ in model_loads), (r for r, _ in reference_loads))
        return model_loads, reference_loads

    # ---------------------------------------------------------------- by weights

    def _layer(self, model, reference, tensor: LayerTensor, settings: AlignSettings, position: Position):
        key = (model, tensor.prefixes[model], reference, tensor.prefixes[reference], settings)
        if key not in self._tasks:
            model_loads, reference_loads = self._pair_loads(model, reference, tensor, settings, position)
            self._warn_full_qk(model, settings)
            task = LayerAlignmentTask(
                residual=self._residual(model, reference, settings),
                model=model,
                reference=reference,
                layer_prefix=tensor.prefixes[model],
                architecture=self.layout.arch.name,
                geometry=self.layout.geometry,
                settings=settings,
                model_tensors=model_loads,
                reference_tensors=reference_loads,
            )
            self._tasks[key] = collected(self.collector, task, layer=tensor.indices[model])
        return self._tasks[key]

    def _residual(self, model, reference, settings: AlignSettings) -> Optional[ResidualAlignmentTask]:
        if settings.residual == "none":
            return None
        key = ("residual", model, reference, settings.residual)
        if key not in self._tasks:
            self._tasks[key] = ResidualAlignmentTask(
                model=model, reference=reference, architecture=self.layout.arch.name,
                geometry=self.layout.geometry, mode=settings.residual, tied=self.layout.tied,
                cache=settings.alignment_cache,
            )
        return self._tasks[key]

    def _warn_full_qk(self, model, settings: AlignSettings) -> None:
        if settings.qk_rotation == "full" and not self._warned_full:
            full_qk_warning(str(model))
            self._warned_full = True

    # ---------------------------------------------------------------- by activations

    def _activation_source(self, reference, settings: AlignSettings) -> ActivationAlignmentTask:
        key = (reference, settings)
        if key not in self._tasks:
            options = self.planner.options
            self._tasks[key] = ActivationAlignmentTask(
                reference=reference,
                models=self.activation_models(reference),
                settings=settings,
                device=options.device if options.device != "cpu" else None,
                trust_remote_code=options.trust_remote_code,
            )
        return self._tasks[key]

    def _activation_layer(self, model, reference, tensor: LayerTensor, settings: AlignSettings,
                          position: Position):
        check_activation_layers(model, reference, tensor.prefixes, tensor.indices)
        # the same checks as by weights; the streamer loads, the record measures these
        loads = self._pair_loads(model, reference, tensor, settings, position)
        source = self._activation_source(reference, settings)
        if model not in source.models:
            raise SymAlignConfigError(f"model {model} was planned without alignment")
        pick = PickLayerTransform(source=source, model=model, layer=tensor.indices[model])
        return collected(self.collector, pick, reference=reference,
                         prefix=tensor.prefixes[model], loads=loads)

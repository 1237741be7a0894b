"""Which output tensor is which, from mergekit's architecture definition: a layer tensor that
a layer symmetry moves (:class:`LayerTensor`), a module-level tensor the residual stream's
transform moves (:class:`ModuleTensor`), or neither; and mergekit's loads of them.

:class:`Position` is where mergekit's planner is when it plans a tensor (see :mod:`.plugin`:
mergekit's ``plan_layer`` does not hand the layer to ``plan_tensor``, so the hook remembers
it and passes it here explicitly).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Mapping, Optional, Tuple, Union

from mergekit.architecture import WeightInfo
from mergekit.common import ImmutableMap, ModelReference
from mergekit.io.tasks import GatherTensors, LoaderCache, LoadTensor

from . import residual as res
from .errors import SymAlignConfigError
from .settings import AlignSettings
from .statedict import layer_tensor_names


@dataclass(frozen=True)
class Position:
    """Where mergekit is planning: a module (None outside any), and inside one of its layers
    each source model's layer index (None for the module's pre/post weights)."""

    module: Optional[str] = None
    indices: Optional[Mapping[ModelReference, int]] = None


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


Moved = Union[LayerTensor, ModuleTensor, None]


def layer_prefix(names: List[str], index: int) -> Optional[str]:
    """``model.layers.7.`` from the names of layer 7's tensors (their common prefix)."""
    common = os.path.commonprefix(names)
    marker = f"{index}."
    cut = common.rfind(marker)
    if cut < 0 or (cut > 0 and common[cut - 1] != "."):
        return None
    return common[: cut + len(marker)]


def decoder_module(arch_info, arch, method_name: str) -> str:
    """The module of mergekit's architecture definition that is our text decoder (a
    multimodal checkpoint's vision tower is merged by the wrapped method, unaligned)."""
    modules = arch_info.modules
    for name, module in modules.items():
        model_type = getattr(module.architecture, "name", lambda: None)()
        if model_type in arch.model_types:
            return name
    if len(modules) == 1:
        return next(iter(modules))
    raise SymAlignConfigError(
        f"{method_name}: mergekit's architecture definition {arch_info.expected_model_type} has "
        f"no module for the {arch.name} text decoder (modules: {', '.join(modules)}); it "
        f"cannot be aligned."
    )


class Layout:
    """The classification of one merge's tensors (one per aligned merge, after its checks)."""

    def __init__(self, planner, arch, geometry, module: str, tied: bool):
        self.planner, self.arch, self.geometry, self.tied = planner, arch, geometry, tied
        self.module = module  # the text decoder's (:func:`decoder_module`)

    # ---------------------------------------------------------------- mergekit's loads

    def gather(self, weight_info: Mapping[ModelReference, WeightInfo]) -> GatherTensors:
        """mergekit's own GatherTensors, built as its planner builds it (so loads are shared)."""
        return GatherTensors(
            weight_info=ImmutableMap(data=dict(weight_info)),
            dtype=self.planner.config.dtype,
            device=self.planner.options.device if self.planner.options.read_to_gpu else None,
        )

    def load(self, model: ModelReference, info: WeightInfo) -> LoadTensor:
        (load,) = self.gather({model: info}).arguments().values()
        return load

    @staticmethod
    def present(model: ModelReference, info: WeightInfo) -> bool:
        index = LoaderCache().get(model).index
        return any(n in index.tensor_paths for n in [info.name, *(info.aliases or ())])

    # ---------------------------------------------------------------- names

    @lru_cache(maxsize=None)
    def layer_infos(self, model: ModelReference, module: str, index: int) -> Tuple[str, Dict[str, WeightInfo]]:
        """(prefix, {relative name: WeightInfo}) of one layer, from mergekit's definition."""
        infos = self.planner._model_arch(model).get_module(module).layer_weights(index=index) or []
        prefix = layer_prefix([w.name for w in infos], index)
        if prefix is None:
            raise SymAlignConfigError(
                f"cannot tell the layer prefix of layer {index} of {model} from mergekit's "
                f"architecture definition ({', '.join(w.name for w in infos[:3])}, ...)."
            )
        return prefix, {w.name[len(prefix):]: w for w in infos}

    def layer_names(self, settings: AlignSettings) -> Tuple[Tuple[str, ...], set]:
        """(every layer-relative tensor an alignment moves, those that may be absent)."""
        return layer_tensor_names(self.arch, self.geometry, settings.qk_rotation, settings.residual)

    def module_names(self) -> Tuple[str, ...]:
        arch = self.arch
        return (arch.embed, f"{arch.final_norm}.weight", f"{arch.final_norm}.bias", arch.lm_head)

    def module_prefix(self) -> str:
        return self.planner.arch_info.modules[self.module].weight_prefix or ""

    # ---------------------------------------------------------------- classification

    def classify(self, weight: WeightInfo, weights_in: List[WeightInfo], models: List[ModelReference],
                 position: Position, settings: AlignSettings) -> Moved:
        """The layer or module-level tensor an alignment moves, or None."""
        if position.module != self.module:
            return None
        if position.indices is None:
            return self._module_tensor(weight.name, settings)
        prefixes, names = {}, set()
        for model, info in zip(models, weights_in):
            prefix, _ = self.layer_infos(model, position.module, position.indices[model])
            if not info.name.startswith(prefix):
                return None
            prefixes[model] = prefix
            names.add(info.name[len(prefix):])
        if len(names) != 1 or next(iter(names)) not in self.layer_names(settings)[0]:
            return None
        return LayerTensor(next(iter(names)), prefixes, dict(position.indices))

    def _module_tensor(self, name: str, settings: AlignSettings) -> Optional[ModuleTensor]:
        if settings.residual == "none":
            return None
        prefix = self.module_prefix()
        rel = name[len(prefix):] if name.startswith(prefix) else None
        return ModuleTensor(rel) if rel in self.module_names() else None

    def reading_norm(self, tensor: Moved) -> Optional[str]:
        """The reader-side norm whose output ``tensor`` reads (or which it is)."""
        if isinstance(tensor, ModuleTensor):
            sites = res.module_sites(self.arch, self.tied)
        else:
            sites = res.layer_sites(self.arch, self.geometry)
        for norm, readers in sites.readers:
            if norm is not None and (tensor.name in readers or tensor.name == f"{norm}.weight"):
                return norm
        return None

    def norm_weights_in(self, tensor: Moved, norm: str, models, position: Position) -> List[WeightInfo]:
        """Each model's input ``WeightInfo`` of the norm ``norm`` beside ``tensor``."""
        if isinstance(tensor, LayerTensor):
            return [self.layer_infos(m, position.module, position.indices[m])[1][f"{norm}.weight"]
                    for m in models]
        return [WeightInfo(name=self.module_prefix() + f"{norm}.weight") for _m in models]

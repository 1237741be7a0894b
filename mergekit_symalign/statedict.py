"""Whole-model alignment and scrambling on plain state dicts (no mergekit needed).

Useful from Python, in tests (ground truth: scramble a model by a random element of its
exact group, then require the alignment to undo it) and in the demo.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import torch

from .architectures import architecture_for, geometry_from_config, layer_spec, split_layer_name
from .spec import LayerSpec, LayerTransform, Switches, align_layer, random_transform


def _by_layer(arch, state_dict: Mapping[str, torch.Tensor]):
    layers: Dict[int, Tuple[str, Dict[str, torch.Tensor]]] = {}
    for name, tensor in state_dict.items():
        split = split_layer_name(arch, name)
        if split is None:
            continue
        prefix, index, rel = split
        layers.setdefault(index, (prefix, {}))[1][rel] = tensor
    return layers


def spec_for_config(config: Any, qk_rotation: str = "rope", model: str = "model") -> LayerSpec:
    geometry = geometry_from_config(config, model)
    return layer_spec(architecture_for(geometry.model_type, model).name, geometry, qk_rotation)


def transform_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: Any,
    transforms: Mapping[int, LayerTransform],
) -> Dict[str, torch.Tensor]:
    """Apply one :class:`LayerTransform` per layer index; other tensors are copied as is."""
    arch = architecture_for(geometry_from_config(config).model_type)
    out = dict(state_dict)
    for index, (prefix, tensors) in _by_layer(arch, state_dict).items():
        if index in transforms:
            moved = transforms[index].apply(tensors)
            out.update({prefix + rel: t for rel, t in moved.items()})
    return out


def scramble_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: Any,
    seed: int = 0,
    switches: Switches = Switches(),
    qk_rotation: str = "rope",
) -> Tuple[Dict[str, torch.Tensor], Dict[int, LayerTransform]]:
    """Apply a random element of every layer's exact symmetry group (same function)."""
    spec = spec_for_config(config, qk_rotation)
    generator = torch.Generator().manual_seed(seed)
    arch = architecture_for(geometry_from_config(config).model_type)
    transforms = {
        index: random_transform(spec, generator, switches)
        for index in sorted(_by_layer(arch, state_dict))
    }
    return transform_state_dict(state_dict, config, transforms), transforms


def align_state_dict(
    reference: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    config: Any,
    switches: Switches = Switches(),
    qk_rotation: str = "rope",
) -> Tuple[Dict[str, torch.Tensor], Dict[int, LayerTransform]]:
    """Align ``model`` layer by layer into ``reference``'s coordinates."""
    spec = spec_for_config(config, qk_rotation)
    arch = architecture_for(spec.architecture)
    reference_layers = _by_layer(arch, reference)
    transforms = {}
    for index, (_prefix, tensors) in _by_layer(arch, model).items():
        transforms[index] = align_layer(spec, reference_layers[index][1], tensors, switches)
    return transform_state_dict(model, config, transforms), transforms

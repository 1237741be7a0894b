"""Whole-model alignment and scrambling on plain state dicts (no mergekit needed).

Useful from Python, in tests (ground truth: scramble a model by a random element of its
exact group, then require the alignment to undo it) and in the benchmarks.

Transforms are returned per layer index, plus :data:`MODULE` for the module-level tensors
(embeddings, final norm, ``lm_head``) that the residual-stream transform moves; each is a
:class:`.spec.LayerTransform` over names relative to its layer (or to the decoder's module,
e.g. ``model.embed_tokens.weight``).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from . import residual as res
from .architectures import (
    Architecture,
    architecture_for,
    geometry_from_config,
    layer_spec,
    split_layer_name,
    text_config,
    tied_embeddings,
)
from .solve import solve_layer, solve_residual
from .spec import LayerSpec, LayerTransform, Switches, random_transform

MODULE = res.MODULE
Key = Union[int, str]


def _by_layer(arch, state_dict: Mapping[str, torch.Tensor]):
    layers: Dict[int, Tuple[str, Dict[str, torch.Tensor]]] = {}
    for name, tensor in state_dict.items():
        split = split_layer_name(arch, name)
        if split is None:
            continue
        prefix, index, rel = split
        layers.setdefault(index, (prefix, {}))[1][rel] = tensor
    return layers


def _module_prefix(layers) -> str:
    """``language_model.`` from ``language_model.model.layers.3.`` (``""`` for a causal LM)."""
    prefix = next(iter(layers.values()))[0] if layers else "model.layers.0."
    return prefix[: prefix.rindex("model.layers.")]


def _module_tensors(arch: Architecture, state_dict, prefix: str) -> Dict[str, torch.Tensor]:
    names = (arch.embed, f"{arch.final_norm}.weight", f"{arch.final_norm}.bias", arch.lm_head)
    return {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}


def spec_for_config(config: Any, qk_rotation: str = "rope", model: str = "model") -> LayerSpec:
    geometry = geometry_from_config(config, model)
    return layer_spec(architecture_for(geometry.model_type, model).name, geometry, qk_rotation)


def transform_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: Any,
    transforms: Mapping[Key, LayerTransform],
) -> Dict[str, torch.Tensor]:
    """Apply one :class:`LayerTransform` per layer index (and :data:`MODULE`); other tensors
    are copied as is."""
    arch = architecture_for(geometry_from_config(config).model_type)
    out = dict(state_dict)
    layers = _by_layer(arch, state_dict)
    for index, (prefix, tensors) in layers.items():
        if index in transforms:
            moved = transforms[index].apply(tensors)
            out.update({prefix + rel: t for rel, t in moved.items()})
    if MODULE in transforms:
        prefix = _module_prefix(layers)
        moved = transforms[MODULE].apply(_module_tensors(arch, state_dict, prefix))
        out.update({prefix + rel: t for rel, t in moved.items()})
    return out


def residual_transforms(
    state_dict: Mapping[str, torch.Tensor],
    reference_norms_from: Mapping[str, torch.Tensor],
    config: Any,
    element: res.ResidualElement,
    model: str = "model",
) -> Dict[Key, LayerTransform]:
    """The residual ``element``'s steps for every layer and the module level of
    ``state_dict`` (folding with its own norms, unfolding with those of
    ``reference_norms_from``, a state dict with the same names)."""
    geometry = geometry_from_config(config, model)
    arch = architecture_for(geometry.model_type, model)
    layers = _by_layer(arch, state_dict)
    module = _module_prefix(layers)

    def getter(tensors):
        def norm(layer, name):
            prefix = module if layer is None else layers[layer][0]
            return tensors[f"{prefix}{name}.weight"]
        return norm

    return res.model_transforms(arch, geometry, element, getter(state_dict),
                                getter(reference_norms_from), sorted(layers),
                                tied_embeddings(config), model)


def layer_tensor_names(arch: Architecture, geometry, qk_rotation: str, residual: str):
    """(every layer-relative tensor an alignment moves, those that may be absent): the
    layer spec's, and the residual stream's readers, writers and norms."""
    spec = layer_spec(arch.name, geometry, qk_rotation)
    names = list(spec.tensors())
    optional = {s.tensor for sym in spec.symmetries() for s in sym.sites if s.optional}
    if residual != "none":
        sites = res.layer_sites(arch, geometry)
        names += [n for n in sites.tensors() if n not in names]
        if arch.norm == "layernorm":
            biases = [f"{n}.bias" for n in sites.norms()]
            names += biases
            optional |= set(biases)
    return tuple(dict.fromkeys(names)), optional


def scramble_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: Any,
    seed: int = 0,
    switches: Switches = Switches(),
    qk_rotation: str = "rope",
    residual: str = "none",
) -> Tuple[Dict[str, torch.Tensor], Dict[Key, LayerTransform]]:
    """Apply a random element of the model's exact symmetry group (same function): every
    layer's group, and with ``residual`` a random residual-stream transform (``orthogonal``
    leaves the norms folded: a QuaRot/SliceGPT-style rotated checkpoint, all norms 1)."""
    spec = spec_for_config(config, qk_rotation)
    generator = torch.Generator().manual_seed(seed)
    geometry = geometry_from_config(config)
    arch = architecture_for(geometry.model_type)
    transforms: Dict[Key, LayerTransform] = {}
    if residual != "none":
        res.check_supported(arch, residual, tied_embeddings(config), text_config(config))
        element = res.random_residual(arch, geometry.hidden_size, residual, generator)
        unit = {k: (torch.ones_like(v) - res.norm_offset(arch)) if "norm" in k.rsplit(".", 2)[-2]
                else v for k, v in state_dict.items()}
        transforms = residual_transforms(state_dict, unit, config, element)
    for index in sorted(_by_layer(arch, state_dict)):
        layer_element = random_transform(spec, generator, switches)
        transforms[index] = transforms[index].then(layer_element) if index in transforms else layer_element
    return transform_state_dict(state_dict, config, transforms), transforms


def align_state_dict(
    reference: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    config: Any,
    switches: Switches = Switches(),
    qk_rotation: str = "rope",
    residual: str = "none",
    cache: Optional[str] = None,
) -> Tuple[Dict[str, torch.Tensor], Dict[Key, LayerTransform]]:
    """Align ``model`` into ``reference``'s coordinates: the residual stream first (solved
    from the embedding and ``lm_head`` rows of the same tokens), then every layer's group on
    the residual-aligned tensors (:mod:`.solve`, as a merge solves). ``cache``: a folder of
    saved alignments, shared with merges that use ``alignment_cache`` (the same entries are
    found and written)."""
    geometry = geometry_from_config(config)
    arch = architecture_for(geometry.model_type)
    transforms: Dict[Key, LayerTransform] = {}
    solution = None
    if residual != "none":
        tied = tied_embeddings(config)
        res.check_supported(arch, residual, tied, text_config(config))
        prefix = _module_prefix(_by_layer(arch, model))
        names = res.input_names(arch, tied)
        solution = solve_residual(arch, residual,
                                  {n: model[prefix + n] for n in names if prefix + n in model},
                                  {n: reference[prefix + n] for n in names if prefix + n in reference},
                                  tied, cache_folder=cache or "")
        transforms = residual_transforms(model, reference, config, solution.element)
    reference_layers = _by_layer(arch, reference)
    names = layer_tensor_names(arch, geometry, qk_rotation, residual)[0]
    for index, (_prefix, tensors) in _by_layer(arch, model).items():
        def own(layer_tensors):
            return {n: t for n, t in layer_tensors.items() if n in names}

        solved = solve_layer(arch, geometry, switches, qk_rotation, residual, own(tensors),
                             own(reference_layers[index][1]), solution, cache_folder=cache or "")
        transforms[index] = transforms[index].then(solved.layer_steps) if index in transforms \
            else solved.layer_steps
    return transform_state_dict(model, config, transforms), transforms

"""Iterative weight matching, the algorithm this benchmark adds on the package's public pieces.

The package aligns in one pass: the residual stream from the embedding and lm_head rows, then
every layer's group (``statedict.align_state_dict``). Between models trained from different
random initialisations the embeddings alone say little about the residual frame, so here the
residual transform is re-solved from *all* the evidence, every layer's reader rows and writer
columns in the coordinates the layer groups found, alternating with the layer groups
(coordinate descent). With ``rounds=0`` it is the package's one-pass solve, tensor for tensor
(tests/test_benchmarks.py checks that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from benchmarks.independent_init.states import (
    StateDict,
    layer_names,
    load_state,
    relative_distance,
    split_layers,
)
from mergekit_symalign import residual as res
from mergekit_symalign.activations import align_by_activations
from mergekit_symalign.architectures import architecture_for, geometry_from_config
from mergekit_symalign.spec import LayerSpec, LayerTransform, Switches, align_layer
from mergekit_symalign.statedict import residual_transforms, spec_for_config, transform_state_dict


ROUNDS = 5  # iterative weight matching: residual re-solves after the first pass


def _folded_readers(sd: Mapping[str, torch.Tensor], sites: res.ResidualSites, prefix: str):
    """Each reader's rows with its norm's weight folded into the columns (the form in which a
    residual transform, signed permutation or rotation, acts on them)."""
    for norm, readers in sites.readers:
        scale = sd[f"{prefix}{norm}.weight"].float() if norm else None
        for name in readers:
            w = sd[prefix + name].float()
            yield w * scale[None, :] if scale is not None else w


def residual_evidence(reference: StateDict, model: StateDict, config, arch, geometry,
                      layers: bool = True) -> res.ResidualStatistic:
    """The ``[D, D]`` statistic of the residual stream from weights: the same tokens'
    embedding and lm_head rows (the package's :func:`residual.embedding_statistic`) and, with
    ``layers``, every layer's reader rows (norms folded) and writer columns, with the layer
    groups already applied to ``model`` (so the rows and columns of the two models are the
    same neurons and heads)."""
    module = {n: reference[n] for n in (arch.embed, f"{arch.final_norm}.weight", arch.lm_head)}
    stat = res.embedding_statistic(module, {n: model[n] for n in module}, arch, False)
    if not layers:
        return stat
    sites = res.layer_sites(arch, geometry)
    for i in layer_names(config):
        prefix = f"model.layers.{i}."
        for a, b in zip(_folded_readers(reference, sites, prefix),
                        _folded_readers(model, sites, prefix)):
            stat.add(a, b)
        for name in sites.writers:
            stat.add(reference[prefix + name].float().T, model[prefix + name].float().T)
    return stat


def weight_matching(reference: StateDict, model: StateDict, config, residual: str = "none",
                    heads: bool = True, rounds: int = 0, switches: Switches = Switches(),
                    trace: Optional[List[Dict]] = None) -> Tuple[StateDict, Dict[Any, LayerTransform]]:
    """Align ``model`` to ``reference`` by weights: the residual stream first (embedding and
    lm_head rows), then every layer's group; then ``rounds`` times: re-solve the residual
    transform from all the evidence (:func:`residual_evidence`, in the coordinates the
    layer groups found) and the layer groups again in the new residual frame.

    ``rounds=0`` with ``heads`` is the package's :func:`statedict.align_state_dict`.
    ``heads=False`` leaves the attention-head permutations (outer blocks) out.
    ``trace``: a list that receives, per pass, the relative distance to the reference.
    """
    geometry = geometry_from_config(config)
    arch = architecture_for(geometry.model_type)
    spec = spec_for_config(config)
    if not heads:
        spec = LayerSpec(spec.architecture, tuple(b for b in spec.blocks if not b.outer))
    layers = layer_names(config)
    element = None
    if residual != "none":
        res.check_supported(arch, residual, False, config)
        element = res.solve(arch, residual, residual_evidence(reference, model, config, arch,
                                                              geometry, layers=False))
    reference_layers = split_layers(reference, layers)
    for step in range(rounds + 1):
        transforms: Dict[Any, LayerTransform] = {}
        current = model
        if element is not None:
            transforms = residual_transforms(model, reference, config, element)
            current = transform_state_dict(model, config, transforms)
        current_layers = split_layers(current, layers)
        layer_steps = {i: align_layer(spec, reference_layers[i], current_layers[i], switches)
                       for i in layers}
        for i in layers:
            transforms[i] = transforms[i].then(layer_steps[i]) if i in transforms else layer_steps[i]
        aligned = transform_state_dict(model, config, transforms)
        if trace is not None:
            trace.append({"round": step, "distance": relative_distance(reference, aligned),
                          "residual": "none" if element is None else element.mode})
        if step == rounds or element is None:
            break
        # The layer groups act on the other axes than the residual transform (rows of the
        # readers, columns of the writers), so they commute: apply them alone to the model
        # in its own residual frame, and re-solve the residual transform from everything.
        layered = transform_state_dict(model, config, layer_steps)
        element = res.solve(arch, residual, residual_evidence(reference, layered, config, arch,
                                                              geometry))
    return aligned, transforms


def residual_fit(paths: Dict[str, Path], config) -> Dict[str, Any]:
    """The one-pass weight-based ``residual: orthogonal`` decision (the package's
    :func:`residual.solve` on the embedding and lm_head rows, as in ``+ residual orthogonal``):
    the rotation's share of the best signed permutation's objective that it removes, against
    the noise limit it must beat (``groups.noise_limit`` for ``D (D - 1) / 2`` parameters over
    ``2 V D`` entries); below it the package keeps the signed permutation ("snapped")."""
    from mergekit_symalign.groups import noise_limit

    a, b = load_state(paths["base"]), load_state(paths["base-other-init"])
    geometry = geometry_from_config(config)
    arch = architecture_for(geometry.model_type)
    stat = residual_evidence(a, b, config, arch, geometry, layers=False)
    element = res.solve(arch, "orthogonal", stat)
    dim = config.hidden_size
    fit = element.fit
    return {"mode": element.mode, "entries": stat.entries, "vocab": config.vocab_size,
            "gain_share": fit.gain / fit.baseline if fit.baseline > 0 else 0.0,
            "threshold": noise_limit(dim * (dim - 1) // 2, max(stat.entries, 1))}


def activation_matching(reference: StateDict, model: StateDict, config, ids: torch.Tensor,
                        residual: str) -> StateDict:
    found = align_by_activations(reference.__getitem__, {"model": model.__getitem__}, config,
                                 ids, residual=residual, progress=False)
    return transform_state_dict(model, config, found["model"])


def align_variant(how: Optional[Dict], reference: StateDict, model: StateDict, config,
                  ids: torch.Tensor, trace: Optional[List[Dict]] = None) -> StateDict:
    """``model`` aligned to ``reference`` as a fusion variant says (``variants.FUSION``: None
    is plain, "weights" this module's matching, "activations" the package's on ``ids``)."""
    if how is None:
        return model
    if how["how"] == "weights":
        aligned, _ = weight_matching(reference, model, config, how["residual"],
                                     how.get("heads", True), how.get("rounds", 0), trace=trace)
        return aligned
    return activation_matching(reference, model, config, ids, how["residual"])

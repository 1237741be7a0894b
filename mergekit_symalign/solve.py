"""One cached weight solve: the residual stream first, then each layer, through the alignment
cache (no mergekit import).

The merge's tasks (:mod:`.tasks.alignment`: one residual solve per model, one layer solve per
(layer, model)) and :func:`.statedict.align_state_dict` (a whole state dict in memory) both
call :func:`solve_residual` and :func:`solve_layer`, so a merge and a Python caller solve the
same way and find each other's cache entries. Research code that needs the same one-pass
solve (e.g. ``benchmarks/independent_init.py``'s ``rounds=0``) can call these two.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from . import cache
from . import residual as res
from .architectures import Architecture, Geometry, layer_spec
from .spec import LayerTransform, Switches, WorkingCopy, align_layer

# Embedding rows a weight-based residual solve reads: all up to this many, else this many
# tokens drawn once (seeded; the same rows in both models). 8x a large hidden size pins a
# [D, D] statistic down; Llama 3's full 128k-token vocabulary would cost 4 TFLOP a pass.
RESIDUAL_ROWS = 32768

Tensors = Mapping[str, torch.Tensor]


def residual_rows(embed: torch.Tensor, max_rows: int = RESIDUAL_ROWS):
    """The (reference, model) embedding rows the residual solve reads (None: all of them)."""
    vocab = embed.shape[0]
    if vocab <= max_rows:
        return None
    pick = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:max_rows].sort().values
    return pick, pick


@dataclass(frozen=True, eq=False)
class ResidualSolution:
    element: res.ResidualElement
    key: Optional[str] = None  # its alignment-cache key (when a cache is used)


def solve_residual(arch: Architecture, mode: str, model: Tensors, reference: Tensors, tied: bool,
                   *, cache_folder: str = "", max_rows: int = RESIDUAL_ROWS,
                   label: str = "") -> ResidualSolution:
    """The residual-stream element mapping ``model`` onto ``reference``, from their
    embedding and ``lm_head`` rows (:func:`.residual.input_names`, module-relative names),
    read from ``cache_folder``'s entry for exactly these tensors when there is one.
    ``label`` (e.g. "M to R") prefixes a refusal of the inputs."""
    store = cache.AlignmentCache(cache_folder) if cache_folder else None
    key = element = None
    if store is not None:
        key = cache.residual_key(mode, arch.name, max_rows, model, reference)
        element = cache.load_residual(store, key)
    if element is None:
        try:
            statistic = res.embedding_statistic(reference, model, arch, tied,
                                                residual_rows(reference[arch.embed], max_rows))
        except ValueError as err:
            if not label:
                raise
            raise ValueError(f"residual alignment of {label}: {err}") from None
        element = res.solve(arch, mode, statistic)
        if store is not None:
            cache.save_residual(store, key, element)
    return ResidualSolution(element, key)


@dataclass(frozen=True, eq=False)
class LayerSolution:
    residual_steps: LayerTransform  # the residual element's steps on this layer (or none)
    layer_steps: LayerTransform  # the layer group's element, solved after them
    key: Optional[str] = None

    @property
    def transform(self) -> LayerTransform:
        out = self.residual_steps.then(self.layer_steps)
        return dataclasses.replace(out, cache_key=self.key) if self.key is not None else out


def solve_layer(arch: Architecture, geometry: Geometry, switches: Switches, qk_rotation: str,
                residual_mode: str, model: Tensors, reference: Tensors,
                residual: Optional[ResidualSolution] = None, *, cache_folder: str = "",
                label: str = "model", working: Optional[WorkingCopy] = None) -> LayerSolution:
    """One layer of ``model`` aligned to ``reference`` (layer-relative names: the layer's
    tensors that :func:`.statedict.layer_tensor_names` lists): the residual element's steps
    first, then the layer's group on the moved tensors; the group's element read from
    ``cache_folder`` when an entry for exactly these tensors exists. ``working`` receives
    what the solve leaves of its working copy (nothing when read from the cache)."""
    spec = layer_spec(arch.name, geometry, qk_rotation)
    store = key = solved = None
    if cache_folder:
        store = cache.AlignmentCache(cache_folder)
        key = cache.layer_key(cache.weight_solve_settings(switches, qk_rotation, residual_mode),
                              arch.name, geometry, model, reference,
                              residual.key if residual is not None else None)
        solved = cache.load_layer(store, key, spec)
    first, moved = LayerTransform(), model
    if residual is not None:
        first = res.transform(arch, res.layer_sites(arch, geometry), residual.element, model,
                              reference, label)
        moved = first.apply(model)
    if solved is None:
        solved = align_layer(spec, reference, moved, switches, label=label, working=working)
        if store is not None:
            cache.save_layer(store, key, solved)
    return LayerSolution(first, solved, key)

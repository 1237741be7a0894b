"""A layer's symmetry spec, and the one generic align / apply / invert that read it.

A :class:`LayerSpec` lists *blocks* (MLP neurons, V/O heads, Q/K heads); each block has an
optional main symmetry (a permutation or a rotation) and an optional scale on the same
slots. Blocks act on disjoint (tensor, axis) sites, so solving them one after another is
the same as solving them jointly. Names are layer-relative (``mlp.up_proj.weight``); the
caller maps them to checkpoint names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .groups import Kind, Symmetry, apply, distance, inverse, random_element, solve


@dataclass(frozen=True, eq=False)
class Block:
    name: str
    main: Optional[Symmetry] = None  # permutation, orthogonal or plane_rotation
    scale: Optional[Symmetry] = None

    def symmetries(self) -> Tuple[Symmetry, ...]:
        return tuple(s for s in (self.main, self.scale) if s is not None)


@dataclass(frozen=True)
class Switches:
    """Which kinds of symmetry to use (the paper's ablation switches)."""

    permutation: bool = True
    rotation: bool = True
    scaling: bool = True

    def enabled(self, symmetry: Symmetry) -> bool:
        if symmetry.kind == Kind.permutation:
            return self.permutation
        if symmetry.kind == Kind.scale:
            return self.scaling
        return self.rotation


@dataclass(frozen=True, eq=False)
class LayerSpec:
    architecture: str
    blocks: Tuple[Block, ...]
    notes: Tuple[str, ...] = ()  # what was restricted for this architecture, and why

    def symmetries(self) -> Tuple[Symmetry, ...]:
        return tuple(s for b in self.blocks for s in b.symmetries())

    def tensors(self) -> Tuple[str, ...]:
        """Every layer-relative tensor name that some symmetry moves."""
        return tuple(dict.fromkeys(t for s in self.symmetries() for t in s.tensors))


Step = Tuple[Symmetry, torch.Tensor]


@dataclass(frozen=True, eq=False)
class LayerTransform:
    """An element of the layer's group, as the ordered steps that build it."""

    steps: Tuple[Step, ...] = ()

    def apply(self, tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = dict(tensors)
        for symmetry, element in self.steps:
            out = apply(symmetry, element, out)
        return out

    def apply_one(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return self.apply({name: tensor})[name]

    def inverse(self) -> "LayerTransform":
        return LayerTransform(tuple((s, inverse(s.kind, e)) for s, e in reversed(self.steps)))

    def touches(self, name: str) -> bool:
        return any(name in s.tensors for s, _ in self.steps)


def align_layer(
    spec: LayerSpec,
    anchor: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    switches: Switches = Switches(),
    model: str = "target",
) -> LayerTransform:
    """The element of the layer's group that best maps ``target`` onto ``anchor``."""
    current = dict(target)
    steps: List[Step] = []
    for block in spec.blocks:
        scale = block.scale if block.scale is not None and switches.enabled(block.scale) else None
        for symmetry in block.symmetries():
            if not switches.enabled(symmetry):
                continue
            kw = {"scale": scale} if symmetry is block.main else {}
            try:
                element = solve(symmetry, anchor, current, model=model, **kw)
            except (KeyError, ValueError) as err:
                raise ValueError(f"{spec.architecture} {symmetry.name}: {err}") from None
            current = apply(symmetry, element, current)
            steps.append((symmetry, element))
    return LayerTransform(tuple(steps))


def random_transform(
    spec: LayerSpec, generator: torch.Generator, switches: Switches = Switches()
) -> LayerTransform:
    """A random element of the (enabled part of the) layer's exact group."""
    return LayerTransform(
        tuple((s, random_element(s, generator)) for s in spec.symmetries() if switches.enabled(s))
    )


def layer_distance(spec: LayerSpec, anchor, target) -> float:
    return distance(anchor, target, spec.tensors())

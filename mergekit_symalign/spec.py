"""A layer's symmetry spec, and the one generic align / apply / invert that read it.

A :class:`LayerSpec` lists *blocks* (MLP neurons, V/O heads, Q/K heads); each block has an
optional main symmetry (a permutation or a rotation) and an optional scale on the same
slots. Blocks act on disjoint (tensor, axis) sites, so solving them one after another is
the same as solving them jointly. Names are layer-relative (``mlp.up_proj.weight``); the
caller maps them to checkpoint names.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from .assignment import index_along
from .groups import (
    DEGREES_OF_FREEDOM,
    Kind,
    RowSketches,
    Symmetry,
    apply,
    distance,
    fit_gain,
    identity_element,
    inverse,
    is_identity,
    position_factor,
    position_index,
    random_element,
    rows_per_chunk,
    solve,
    solve_and_fit,
    worth_keeping,
)


@dataclass(frozen=True, eq=False)
class Block:
    name: str
    main: Optional[Symmetry] = None  # permutation, orthogonal or plane_rotation
    scale: Optional[Symmetry] = None
    # An outer block permutes whole slots (attention heads) that later blocks transform
    # inside: it may move the same positions as those blocks (the group is a semidirect
    # product: heads first, then the within-head transforms on the permuted layout).
    outer: bool = False

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

    def symmetries(self) -> Tuple[Symmetry, ...]:
        return tuple(s for b in self.blocks for s in b.symmetries())

    def tensors(self) -> Tuple[str, ...]:
        """Every layer-relative tensor name that some symmetry moves."""
        return tuple(dict.fromkeys(t for s in self.symmetries() for t in s.tensors))

    def describe(self) -> str:
        """A readable table: per block and symmetry, which tensor axes and positions move."""
        lines = [f"{self.architecture} layer symmetry spec"]
        for block in self.blocks:
            lines.append(f"  block {block.name}")
            for symmetry in block.symmetries():
                n, k = symmetry.slots, symmetry.coords
                kind = symmetry.kind.value + ("" if symmetry.signed or symmetry.kind != Kind.scale
                                              else ", positive")
                lines.append(f"    {symmetry.name}: {kind}, {n} slots x {k} coords")
                for site in symmetry.sites:
                    _, c, _ = site.index.shape
                    flat = site.index.reshape(-1)
                    where = "rows" if site.axis == 0 else f"axis {site.axis}"
                    tensor = site.tensor + ("" if site.part is None else f"[{site.part}]") + \
                        (" (parts as rows)" if site.flatten else "")
                    lines.append(
                        f"      {tensor:<32} {where:<7} {_ranges(flat)}"
                        f"  ({c} cop{'y' if c == 1 else 'ies'} per slot)"
                        f"{'  x g^-T' if site.contragredient else ''}"
                        f"{'  optional' if site.optional else ''}"
                    )
        return "\n".join(lines)


def _ranges(flat: torch.Tensor) -> str:
    """``0..79`` for a contiguous run, else the first positions and a count."""
    values = flat.tolist()
    low, high = min(values), max(values)
    if sorted(values) == list(range(low, high + 1)):
        return f"{low}..{high}"
    head = ",".join(map(str, values[:6]))
    return f"{{{head},...}} ({len(values)} positions in {low}..{high})"


class SpecError(ValueError):
    """A symmetry spec that cannot be an exact group action as declared."""


def _check_sites(block: Block, shapes: Mapping[str, Tuple[int, ...]]):
    """Yield ``(symmetry, site)`` for the block's present sites, each checked against the
    tensor shapes (and the matching features of head permutations too)."""
    for symmetry in block.symmetries():
        features = tuple(site for feature in symmetry.features for site in feature)
        for site in symmetry.sites + features:
            shape = shapes.get(site.tensor)
            if shape is None:
                if site.optional:
                    continue
                raise SpecError(f"{symmetry.name}: tensor {site.tensor} is not in the layer")
            if site.part is not None and not 0 <= site.part < shape[0]:
                raise SpecError(f"{symmetry.name}: {site.tensor} has no part {site.part} "
                                f"(it stacks {shape[0]})")
            shape = site.view_shape(shape)
            if site.axis >= len(shape):
                raise SpecError(f"{symmetry.name}: {site.tensor} has no axis {site.axis}")
            flat = site.index.reshape(-1)
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= shape[site.axis]):
                raise SpecError(
                    f"{symmetry.name}: {site.tensor} axis {site.axis} positions "
                    f"{int(flat.min())}..{int(flat.max())} exceed its size {shape[site.axis]}"
                )
            if flat.unique().numel() != flat.numel():
                raise SpecError(f"{symmetry.name}: {site.tensor} lists a position twice")
            if site in symmetry.sites:
                yield symmetry, site


def validate_spec(spec: LayerSpec, shapes: Mapping[str, Tuple[int, ...]]) -> None:
    """Check a spec against a layer's tensor shapes (layer-relative names).

    * every site's tensor exists (unless optional) and its axis and positions lie inside it;
    * no position is listed twice within a site;
    * a block's scale acts only on positions its main symmetry moves;
    * blocks are disjoint: no (tensor, axis, position) is moved by two blocks, which is what
      makes solving the blocks one after another the same as solving them jointly.
    """
    owner: Dict[Tuple[str, int, int], str] = {}
    for block in spec.blocks:
        if block.outer:
            for symmetry in block.symmetries():
                if symmetry.kind != Kind.permutation:
                    raise SpecError(f"{symmetry.name}: an outer block may only permute slots")
            list(_check_sites(block, shapes))
            continue
        block_positions = set()
        main_positions = set()
        for symmetry, site in _check_sites(block, shapes):
            # a part's positions are its own; a flattened site's are those of every part
            where = (site.tensor, site.part, site.flatten)
            positions = {(where, site.axis, int(i)) for i in site.index.reshape(-1)}
            if symmetry is block.main:
                main_positions |= positions
            elif block.main is not None and not positions <= main_positions:
                raise SpecError(
                    f"{symmetry.name}: scales {site.tensor} positions that "
                    f"{block.main.name} does not move"
                )
            block_positions |= positions
        for position in block_positions:
            other = owner.setdefault(position, block.name)
            if other != block.name:
                raise SpecError(
                    f"blocks {other} and {block.name} both move {position[0][0]}"
                    f"{'' if position[0][1] is None else f'[{position[0][1]}]'} axis "
                    f"{position[1]} position {position[2]}"
                )


Step = Tuple[Symmetry, torch.Tensor]


@dataclass(frozen=True, eq=False)
class LayerTransform:
    """An element of the layer's group, as the ordered steps that build it."""

    steps: Tuple[Step, ...] = ()
    # Per solved symmetry: how well its element was determined (see :class:`Fit`).
    fits: Tuple["Fit", ...] = ()
    # The alignment-cache key it was solved (or found) under, if any (the card's record is
    # cached next to it).
    cache_key: Optional[str] = None

    def apply(self, tensors: Mapping[str, torch.Tensor], delta: bool = False,
              inplace: bool = False) -> Dict[str, torch.Tensor]:
        """Move the tensors; ``delta``: they are differences of two models (linear part);
        ``inplace``: they are the caller's temporaries, which the steps may overwrite."""
        out = dict(tensors)
        for symmetry, element in self.steps:
            out = apply(symmetry, element, out, delta=delta,
                        inplace=inplace or _on_own_copies(symmetry, tensors, out))
        return out

    def apply_one(self, name: str, tensor: torch.Tensor, delta: bool = False,
                  inplace: bool = False) -> torch.Tensor:
        return self.apply({name: tensor}, delta=delta, inplace=inplace)[name]

    def along_axis(self, name: str, shape: Tuple[int, ...], delta: bool = False
                   ) -> Optional[Tuple[int, torch.Tensor, Optional[torch.Tensor]]]:
        """``(axis, index, factor)`` when every step that moves ``name`` (of ``shape``)
        permutes, rescales or flips whole positions along one axis: the transform is then
        ``moved[i] = factor[i] * x[index[i]]`` along that axis (``factor`` None: no scale), a
        single gather that can be fused with the arithmetic around it. ``None`` otherwise
        (rotations, several sites, partial sites)."""
        axis = index = factor = None
        for symmetry, element in self.steps:
            sites = [site for site in symmetry.sites if site.tensor == name]
            if not sites:
                continue
            if len(sites) > 1 or symmetry.kind not in (Kind.permutation, Kind.scale, Kind.sign):
                return None
            site = sites[0]
            if site.viewed or site.index.numel() != shape[site.axis] or not site.is_arange or \
                    (axis is not None and site.axis != axis) or \
                    (symmetry.kind == Kind.scale and site.offset and not delta):
                return None
            if axis is None:
                axis, index = site.axis, torch.arange(shape[site.axis])
            if symmetry.kind == Kind.permutation:  # new position i takes old position q[i]
                q = position_index(element, site)
                index = index[q]
                factor = factor[q] if factor is not None else None
            else:  # as groups._act_along_axis computes it, so one step gives the same bits
                f = position_factor(symmetry.kind, element, site, torch.float32)
                factor = f if factor is None else factor * f
        return None if axis is None else (axis, index, factor)

    def gathered_blocks(self, name: str, shape: Tuple[int, ...], delta: bool = False,
                        views: bool = False):
        """For a tensor :meth:`along_axis` describes: blocks of rows (dim 0) of the moved
        tensor, as ``(rows, take, factor)``: ``factor * take(x)`` is rows ``rows`` of the
        moved ``x`` (``factor`` None or broadcastable; ``take`` gathers those rows' values in
        ``x``'s dtype). A column permutation (down_proj) gathers within contiguous rows.
        ``None`` where :meth:`along_axis` is. ``views``: where nothing is permuted (only
        scales or signs), ``take`` returns a view of ``x``'s rows instead of a gathered copy
        (for readers only: a caller that writes into ``take``'s result must leave it off)."""
        moves = self.along_axis(name, shape, delta)
        if moves is None:
            return self._expert_blocks(name, shape, delta)
        axis, index, factor = moves
        view = [1] * len(shape)
        view[axis] = -1
        factor = factor.view(view) if factor is not None else None
        rows = shape[0]
        step = rows_per_chunk(math.prod(shape[1:]))
        unpermuted = views and torch.equal(index, torch.arange(index.numel(), device=index.device))
        blocks = []
        for start in range(0, rows, step):
            part = slice(start, min(rows, start + step))
            if unpermuted:  # a view of the rows: no gathered copy
                blocks.append((part, functools.partial(_rows, part),
                               factor[part] if factor is not None and axis == 0 else factor))
            elif axis == 0:
                picked = index[part]
                blocks.append((part, functools.partial(_take, 0, picked),
                               factor[part] if factor is not None else None))
            else:
                blocks.append((part, functools.partial(_take_in_rows, part, axis, index), factor))
        return blocks

    def _expert_blocks(self, name: str, shape: Tuple[int, ...], delta: bool):
        """:meth:`gathered_blocks` of a stacked tensor (fused experts) whose steps permute its
        parts (axis 0) and permute, rescale or flip positions along one axis inside each part:
        one block per part, ``moved[e] = factor_e * x[source_e]`` gathered along that axis.
        ``None`` for anything else."""
        if len(shape) < 2:
            return None
        parts = shape[0]
        source = torch.arange(parts)
        inner = index = factor = None
        for symmetry, element in self.steps:
            for site in (site for site in symmetry.sites if site.tensor == name):
                kind = symmetry.kind
                if kind not in (Kind.permutation, Kind.scale, Kind.sign) or site.flatten or \
                        (kind == Kind.scale and site.offset and not delta):
                    return None
                if site.part is None:  # whole parts: a permutation along axis 0 only
                    if kind != Kind.permutation or site.axis != 0 or not site.is_arange or \
                            site.index.numel() != parts:
                        return None
                    q = position_index(element, site)
                    source = source[q]
                    index = index[q] if index is not None else None
                    factor = factor[q] if factor is not None else None
                    continue
                if inner is None:
                    inner = site.axis + 1
                    index = torch.arange(shape[inner]).repeat(parts, 1)
                if site.axis + 1 != inner:
                    return None
                positions = site.index.reshape(-1)
                if kind == Kind.permutation:  # new position i takes old position q[i]
                    taken = positions[position_index(element, site)]
                    index[site.part, positions] = index[site.part, taken]
                    if factor is not None:
                        factor[site.part, positions] = factor[site.part, taken]
                else:
                    if factor is None:
                        factor = torch.ones(parts, shape[inner], dtype=torch.float32)
                    factor[site.part, positions] *= position_factor(kind, element, site, torch.float32)
        if inner is None:
            return None
        view = [1] * len(shape)
        view[inner] = -1
        return [(slice(e, e + 1), functools.partial(_take_part, int(source[e]), inner, index[e]),
                 factor[e].view(view) if factor is not None else None) for e in range(parts)]

    def free_axis(self, name: str, shape: Tuple[int, ...]) -> Optional[int]:
        """An axis of ``name`` (of ``shape``, more than one position) that no step acts on:
        the transform moves each slice along it on its own (o_proj's rows, q_proj's
        columns), so it can be applied a block of that axis at a time, in cache. ``None``
        when every axis is acted on (or the tensor is 1-D and touched)."""
        acted = set()
        for symmetry, _ in self.steps:
            for site in symmetry.sites:
                if site.tensor == name:  # a view's axis, counted in the stored tensor
                    acted |= {0, site.axis + 1} if site.part is not None else \
                        {0, 1, site.axis + 1} if site.flatten and site.axis else \
                        {0, 1} if site.flatten else {site.axis}
        free = [axis for axis in range(len(shape)) if axis not in acted and shape[axis] > 1]
        return free[0] if free else None

    def inverse(self) -> "LayerTransform":
        return LayerTransform(tuple((s, inverse(s.kind, e)) for s, e in reversed(self.steps)))

    def touches(self, name: str) -> bool:
        return any(name in s.tensors for s, _ in self.steps)

    def is_identity(self, tol: float = 0.0) -> bool:
        return all(is_identity(s.kind, e, tol) for s, e in self.steps)

    def within_heads(self, tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``tensors`` moved by this transform, with the head permutations undone at the end:
        the within-head part alone, in the original head order (``P^-1 W P``), e.g. to
        measure how much an inexact Q/K rotation changes each head's attention logits."""
        heads = LayerTransform(tuple((s, e) for s, e in self.steps
                                     if s.kind == Kind.permutation and s.features))
        return heads.inverse().apply(self.apply(tensors))

    def then(self, other: "LayerTransform") -> "LayerTransform":
        """This transform followed by ``other``."""
        return LayerTransform(self.steps + other.steps, self.fits + other.fits)


def _on_own_copies(symmetry: Symmetry, given: Mapping[str, torch.Tensor],
                   current: Mapping[str, torch.Tensor]) -> bool:
    """May a step of ``symmetry`` overwrite ``current``'s tensors? Yes for one acting on
    parts of stacked tensors (one expert each) that earlier steps already copied: each of a
    layer's many per-expert steps would otherwise copy every expert's tensor again."""
    return all(site.part is not None for site in symmetry.sites) and all(
        site.tensor not in current or current[site.tensor] is not given.get(site.tensor)
        for site in symmetry.sites)


def _take(axis: int, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return index_along(x, axis, index)


def _take_part(part: int, axis: int, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return index_along(x[part:part + 1], axis, index)


def _rows(rows: slice, x: torch.Tensor) -> torch.Tensor:
    return x[rows]


def _take_in_rows(rows: slice, axis: int, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return index_along(x[rows], axis, index)


@dataclass(frozen=True)
class Fit:
    """How much one solved continuous element lowered the squared distance to the reference
    (``gain`` of ``baseline``, over ``entries`` scalars), and whether it was snapped to the
    identity because that is no more than fitting noise would give."""

    symmetry: str
    gain: float
    baseline: float
    entries: int
    snapped: bool

    @property
    def explained(self) -> float:
        return self.gain / self.baseline if self.baseline > 0 else 0.0


Solver = Callable[[Symmetry, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass(eq=False)
class WorkingCopy:
    """What :func:`align_layer` leaves of its working copy of the model: ``tensors``, moved by
    every returned step except ``pending`` (steps whose tensors no later symmetry reads, e.g.
    each block's last scale, which the solve leaves unapplied to save a copy of their
    tensors). ``pending`` applied to ``tensors`` is the aligned model, so a record of the
    aligned layer (the model card's distances) need not move the model a second time."""

    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    pending: LayerTransform = field(default_factory=LayerTransform)


def align_layer(
    spec: LayerSpec,
    reference: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    switches: Switches = Switches(),
    label: str = "model",
    solvers: Optional[Mapping[str, Solver]] = None,
    snap: bool = True,
    timings: Optional[Dict[str, float]] = None,
    moved: Optional[Dict[str, torch.Tensor]] = None,
    working: Optional[WorkingCopy] = None,
) -> LayerTransform:
    """The element of the layer's group that best maps ``model`` onto ``reference``.

    Each block's main symmetry, then its scale, each solved on ``model`` moved by the steps
    before. ``solvers`` replaces the generic solver of the symmetries it names (e.g. a
    matching cost measured on activations). ``snap``: a continuous element that does not
    explain clearly more than fitting noise would, or moves no slot by more than
    :data:`groups.SNAP_DEVIATION`, is replaced by the identity (:func:`groups.worth_keeping`),
    so descendants of one base stay untouched.
    Identity elements are left out of the returned steps. ``timings`` (optional) receives
    the seconds each symmetry took (solve, fit test and apply; for benchmarks). ``moved``
    (optional) receives ``model`` moved by every returned step, which is then applied to the
    working copy even where no later symmetry reads it (the activation path's fit residuals
    compare it with the reference instead of moving every activation a second time).
    ``working`` (optional) receives the working copy as it is, with the steps left unapplied
    (:class:`WorkingCopy`); unlike ``moved`` it changes nothing in the solve.
    """
    current = dict(model)
    steps: List[Step] = []
    pending: List[Step] = []  # returned steps not applied to ``current``
    fits: List[Fit] = []
    sketches = (RowSketches(), RowSketches())  # the reference's and the model's, shared by head matchings
    order = [s for s in spec.symmetries() if switches.enabled(s)]
    # Tensors some later symmetry still reads: a step whose tensors none does is recorded but
    # not applied to the working copy (e.g. each block's last scale: a copy of the MLP's
    # three tensors for nothing). Custom solvers may read
    # anything, so with them every step is applied.
    read_later = [set().union(*(set(s.tensors) | {site.tensor for f in s.features for site in f}
                                for s in order[i + 1:])) for i in range(len(order))]
    position = 0
    for block in spec.blocks:
        scale = block.scale if block.scale is not None and switches.enabled(block.scale) else None
        for symmetry in block.symmetries():
            if not switches.enabled(symmetry):
                continue
            still_read = solvers or moved is not None or bool(read_later[position] & set(symmetry.tensors))
            position += 1
            started = time.perf_counter()
            try:
                fit = None
                if solvers and symmetry.name in solvers:
                    element = solvers[symmetry.name](symmetry, reference, current)
                elif symmetry.kind in DEGREES_OF_FREEDOM:  # solver and fit test share one pass
                    element, fit = solve_and_fit(symmetry, reference, current, label=label)
                else:
                    kw = {"scale": scale} if symmetry is block.main else {}
                    if symmetry.features:
                        kw["sketches"] = sketches
                    element = solve(symmetry, reference, current, label=label, **kw)
                if symmetry.kind in DEGREES_OF_FREEDOM:
                    gain, baseline, entries = fit or fit_gain(symmetry, element, reference, current)
                    snapped = snap and not worth_keeping(symmetry, element, gain, baseline, entries)
                    fits.append(Fit(symmetry.name, gain, baseline, entries, snapped))
                    if snapped:
                        element = identity_element(symmetry)
            except (KeyError, ValueError, FloatingPointError) as err:
                raise ValueError(f"{spec.architecture} {symmetry.name}: {err}") from None
            if not is_identity(symmetry.kind, element):  # identities: nothing to apply or store
                if still_read:
                    before, current = current, apply(symmetry, element, current,
                                                     inplace=_on_own_copies(symmetry, model, current))
                    sketches[1].follow(symmetry, element, before, current)
                else:
                    pending.append((symmetry, element))
                steps.append((symmetry, element))
            if timings is not None:
                if any(t.is_cuda for t in current.values()):
                    torch.cuda.synchronize()
                timings[symmetry.name] = time.perf_counter() - started
    if moved is not None:
        moved.update(current)
    if working is not None:
        working.tensors, working.pending = current, LayerTransform(tuple(pending))
    return LayerTransform(tuple(steps), tuple(fits))


def random_transform(
    spec: LayerSpec, generator: torch.Generator, switches: Switches = Switches()
) -> LayerTransform:
    """A random element of the (enabled part of the) layer's exact group."""
    return LayerTransform(
        tuple((s, random_element(s, generator)) for s in spec.symmetries() if switches.enabled(s))
    )


def layer_distance(spec: LayerSpec, reference, model) -> float:
    return distance(reference, model, spec.tensors())

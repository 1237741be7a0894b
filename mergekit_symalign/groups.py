"""Group actions and solvers for the exact symmetries of a transformer layer.

Pure mathematics on plain tensors: no mergekit import, so it is reusable on state dicts
and testable on its own.

Vocabulary
----------
A *site* says where a symmetry acts: positions along one axis of one tensor, arranged as
``index[n, c, k]`` — orbit slot ``n`` (a neuron, a KV group, a RoPE plane), copy ``c`` (the
same slot seen in several places, e.g. every query head of a KV group), coordinate ``k``
(the ``k`` dimensions a matrix element mixes: 1 for neurons, ``head_dim`` for V/O heads,
2 for a RoPE plane). A site is either *covariant* (rows that are multiplied by ``g``) or
*contragredient* (the matching columns, multiplied by ``g^{-T}``), so that the layer's
function is unchanged.

An *element* of a symmetry is stored as

* ``permutation``: ``LongTensor[n]`` — new slot ``i`` takes old slot ``perm[i]``;
* ``orthogonal`` / ``plane_rotation``: ``Tensor[n, k, k]`` orthogonal matrices
  (``plane_rotation``: ``k == 2`` and determinant +1, the rotations that commute with RoPE);
* ``sign``: ``Tensor[n]`` of +-1 (what survives of a plane rotation under QK-norm);
* ``scale``: ``Tensor[n]`` non-zero scalars.

Every solver returns the element ``g`` that moves the *model* towards the *reference*, i.e.
minimises ``sum over sites ||g . model - reference||^2`` within its group.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from dataclasses import dataclass
from enum import Enum
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

from .assignment import index_along

Tensors = Mapping[str, torch.Tensor]


class Kind(str, Enum):
    permutation = "permutation"
    orthogonal = "orthogonal"
    plane_rotation = "plane_rotation"
    sign = "sign"  # +-1 per slot on all its coords: e.g. a half-turn of a RoPE plane
    scale = "scale"


@dataclass(frozen=True, eq=False)
class Site:
    """Positions ``index[n, c, k]`` along ``axis`` of ``tensor`` moved by one symmetry."""

    tensor: str
    axis: int
    index: torch.Tensor
    contragredient: bool = False
    optional: bool = False  # e.g. a bias that only some checkpoints carry
    # The stored value is ``effective - offset`` (Gemma's RMSNorm multiplies by ``1 + w``):
    # the group acts on the effective value. Deltas (differences of two models) move by the
    # linear part alone.
    offset: float = 0.0

    def __post_init__(self):
        if self.index.dim() != 3:
            raise ValueError(f"site index for {self.tensor} must be [slots, copies, coords]")

    @functools.cached_property
    def is_arange(self) -> bool:
        """Are the positions ``0, 1, 2, ...`` in slot, copy, coordinate order?"""
        flat = self.index.reshape(-1)
        return bool((flat == torch.arange(flat.numel())).all())


@dataclass(frozen=True, eq=False)
class Symmetry:
    """One factor of a layer's symmetry group, declared by the sites it acts on."""

    name: str
    kind: Kind
    sites: Tuple[Site, ...]
    signed: bool = True  # scales only: may a scale be negative?
    # Permutations only: slots move only inside consecutive blocks of this size (e.g. the
    # query heads that share one KV head); 0 = any permutation.
    block_size: int = 0
    # Permutations of whole heads only: the matching cost. Each feature is a tuple of sites
    # (concatenated along the other axes) whose ``[n, c, k]`` index groups, per slot ``n`` and
    # copy ``c``, the ``k`` rows that some later symmetry mixes (rotates, scales, permutes).
    # The cost compares Gram matrices of those rows, which no such mixing changes, so heads
    # are matched regardless of the within-head transforms solved afterwards.
    features: Tuple[Tuple[Site, ...], ...] = ()

    @property
    def slots(self) -> int:
        return self.sites[0].index.shape[0]

    @property
    def coords(self) -> int:
        return self.sites[0].index.shape[2]

    @property
    def tensors(self) -> Tuple[str, ...]:
        return tuple(dict.fromkeys(site.tensor for site in self.sites))

    def __post_init__(self):
        shapes = {(s.index.shape[0], s.index.shape[2]) for s in self.sites}
        if len(shapes) != 1:
            raise ValueError(f"{self.name}: sites disagree on slots/coords: {shapes}")
        if self.kind in (Kind.permutation, Kind.scale) and self.coords != 1:
            raise ValueError(f"{self.name}: {self.kind.value} acts on single coordinates")
        if self.kind == Kind.plane_rotation and self.coords != 2:
            raise ValueError(f"{self.name}: plane rotations act on pairs of coordinates")
        if self.block_size and (self.kind != Kind.permutation or self.slots % self.block_size):
            raise ValueError(f"{self.name}: blocks of {self.block_size} need a permutation of "
                             f"a multiple of that many slots")


# --------------------------------------------------------------------------- gather / scatter


def _working(tensor: torch.Tensor) -> torch.Tensor:
    """Compute in at least float32 (bf16/fp16 checkpoints), keep float64 when given."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


#: Elements (4 MiB of float32) per slot chunk when statistics are gathered from, or a
#: continuous element is applied to, a large tensor: float32 working copies of one chunk at a
#: time instead of whole tensors. The allocator reuses chunk-sized buffers, where every
#: tensor-sized temporary was fresh memory the kernel had to fault in and zero (millions of
#: page faults in a bf16 merge of an 8B-shaped layer). 4 MiB rather than 16: a chunk's
#: conversions and products then stay in cache.
CHUNK_ELEMENTS = 1 << 20


def rows_per_chunk(row_elements: int) -> int:
    """How many rows of ``row_elements`` elements make one chunk (at least one)."""
    return max(1, CHUNK_ELEMENTS // max(row_elements, 1))


def _covers_axis(tensor: torch.Tensor, site: Site) -> bool:
    """Does the site list every position of its axis in order (no copy needed)?"""
    return site.index.numel() == tensor.shape[site.axis] and site.is_arange


def gather(tensor: torch.Tensor, site: Site) -> torch.Tensor:
    """Values of ``tensor`` at ``site`` as ``[n, c, k, rest]`` (rest = all other axes)."""
    n, c, k = site.index.shape
    if _covers_axis(tensor, site):
        picked = tensor
    else:
        picked = index_along(tensor, site.axis, site.index.reshape(-1))
    return picked.movedim(site.axis, 0).reshape(n, c, k, -1)


def scatter(tensor: torch.Tensor, site: Site, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` with ``values`` (``[n, c, k, rest]``) written back at ``site``."""
    moved_shape = list(tensor.movedim(site.axis, 0).shape)
    moved_shape[0] = site.index.numel()
    values = values.reshape(moved_shape).movedim(0, site.axis).to(tensor.dtype)
    if _covers_axis(tensor, site):
        return values.contiguous()
    return tensor.index_copy(site.axis, site.index.reshape(-1).to(tensor.device), values)


def slot_chunks(tensor: torch.Tensor, site: Site):
    """``(start, stop)`` ranges of the site's slots whose values hold about
    :data:`CHUNK_ELEMENTS` elements each; one range when the whole site fits."""
    n, c, k = site.index.shape
    step = rows_per_chunk(c * k * (tensor.numel() // max(tensor.shape[site.axis], 1)))
    return [(start, min(n, start + step)) for start in range(0, n, step)] or [(0, 0)]


def gather_slots(tensor: torch.Tensor, site: Site, start: int, stop: int) -> torch.Tensor:
    """:func:`gather` of slots ``start:stop`` only, in the working dtype (a float32 copy of
    those slots of a low-precision tensor; a view where no copy is needed)."""
    n, c, k = site.index.shape
    if _covers_axis(tensor, site):  # slot s holds positions [s c k, (s + 1) c k)
        picked = tensor.narrow(site.axis, start * c * k, (stop - start) * c * k)
    else:
        picked = index_along(tensor, site.axis, site.index[start:stop].reshape(-1))
    return _working(picked.movedim(site.axis, 0)).reshape(stop - start, c, k, -1)


def _scatter_slots(out: torch.Tensor, site: Site, start: int, stop: int, values: torch.Tensor) -> None:
    """Write ``values`` (slots ``start:stop`` of ``site``) into ``out`` in place."""
    moved_shape = list(out.movedim(site.axis, 0).shape)
    moved_shape[0] = values.shape[0] * values.shape[1] * values.shape[2]
    values = values.reshape(moved_shape).movedim(0, site.axis)
    n, c, k = site.index.shape
    if _covers_axis(out, site):
        out.narrow(site.axis, start * c * k, moved_shape[0]).copy_(values)
    else:
        out.index_copy_(site.axis, site.index[start:stop].reshape(-1).to(out.device), values.to(out.dtype))


# --------------------------------------------------------------------------- group actions


def act(kind: Kind, element: torch.Tensor, values: torch.Tensor, contragredient: bool,
        offset: float = 0.0, delta: bool = False):
    """Apply ``element`` to gathered ``values`` ``[n, c, k, rest]``.

    ``offset`` (a site's): act on ``values + offset``; ``delta``: the values are a difference
    of two models, which moves by the linear part alone (the offset cancels).
    """
    if offset and not delta and kind == Kind.scale:  # a permutation moves v + c like v
        return act(kind, element, values + offset, contragredient) - offset
    element = element.to(values.device)
    if kind == Kind.permutation:
        return values[element]
    if kind == Kind.scale:
        factor = element.to(values.dtype)
        factor = 1.0 / factor if contragredient else factor
        return values * factor[:, None, None, None]
    if kind == Kind.sign:  # its own inverse
        return values * element.to(values.dtype)[:, None, None, None]
    # Orthogonal matrices are their own inverse-transpose, so both site kinds see ``g``.
    return torch.einsum("nij,ncjr->ncir", element.to(values.dtype), values)


def position_index(element: torch.Tensor, site: Site) -> torch.Tensor:
    """A permutation element as positions along the site's axis: new position ``i`` takes
    old position ``index[i]`` (slot ``perm[i]``'s copies and coordinates come along)."""
    _n, c, k = site.index.shape
    within = torch.arange(c * k, device=element.device)
    return (element[:, None] * (c * k) + within).reshape(-1)


def position_factor(kind: Kind, element: torch.Tensor, site: Site, dtype: torch.dtype) -> torch.Tensor:
    """A scale or sign element as one factor per position along the site's axis (``1/s`` on
    a contragredient site), in ``dtype``."""
    _n, c, k = site.index.shape
    factor = element.to(dtype)
    if kind == Kind.scale and site.contragredient:
        factor = 1.0 / factor
    return factor.repeat_interleave(c * k)


def _act_along_axis(kind: Kind, element: torch.Tensor, tensor: torch.Tensor, site: Site,
                    delta: bool = False, inplace: bool = False):
    """:func:`act` on a site that covers its axis, without the ``[n, c, k, rest]`` copy and
    the transposes of gather/scatter (same arithmetic, same result); ``None`` if not
    applicable. ``inplace``: a scale or sign may overwrite ``tensor``."""
    if kind not in (Kind.permutation, Kind.scale, Kind.sign) or not _covers_axis(tensor, site):
        return None
    if kind == Kind.scale and site.offset and not delta:  # act() shifts by the offset first
        return None
    element = element.to(tensor.device)
    if kind == Kind.permutation:
        return index_along(tensor, site.axis, position_index(element, site))
    work_dtype = torch.promote_types(tensor.dtype, torch.float32)
    shape = [1] * tensor.dim()
    shape[site.axis] = -1
    factor = position_factor(kind, element, site, work_dtype).view(shape)
    if work_dtype == tensor.dtype:
        return tensor.mul_(factor) if inplace else tensor * factor
    # A low-precision tensor: converted a chunk of positions at a time, written in its dtype.
    out = torch.empty_like(tensor)
    positions = tensor.shape[site.axis]
    step = rows_per_chunk(tensor.numel() // max(positions, 1))
    for start in range(0, positions, step):
        length = min(step, positions - start)
        part = tensor.narrow(site.axis, start, length).to(work_dtype)
        out.narrow(site.axis, start, length).copy_(part * factor.narrow(site.axis, start, length))
    return out


def _act_by_slots(kind: Kind, element: torch.Tensor, tensor: torch.Tensor, site: Site,
                  delta: bool = False, inplace: bool = False) -> torch.Tensor:
    """:func:`act` + :func:`scatter` a chunk of slots at a time (every kind but permutations,
    whose slots move across chunks): float32 working copies of one chunk, not of the tensor.
    ``inplace``: write into ``tensor`` (each chunk is computed in full before it is written)."""
    if inplace:
        out = tensor
    else:
        out = torch.empty_like(tensor) if _covers_axis(tensor, site) else tensor.clone()
    for start, stop in slot_chunks(tensor, site):
        values = gather_slots(tensor, site, start, stop)
        moved = act(kind, element[start:stop], values, site.contragredient, site.offset, delta)
        _scatter_slots(out, site, start, stop, moved)
    return out


def apply(symmetry: Symmetry, element: torch.Tensor, tensors: Tensors,
          delta: bool = False, inplace: bool = False) -> Dict[str, torch.Tensor]:
    """Move every tensor ``symmetry`` acts on; tensors it does not touch are returned as is.
    ``delta``: the tensors are differences of two models (see :func:`act`). ``inplace``: the
    tensors are the caller's temporaries, which scales, signs and rotations may overwrite
    (a tensor in the working dtype only; permutations always make a new tensor)."""
    out = dict(tensors)
    for site in symmetry.sites:
        tensor = out.get(site.tensor)
        if tensor is None:
            continue
        own = inplace and tensor.dtype == torch.promote_types(tensor.dtype, torch.float32)
        moved = _act_along_axis(symmetry.kind, element, tensor, site, delta, own)
        if moved is None and symmetry.kind != Kind.permutation:
            moved = _act_by_slots(symmetry.kind, element, tensor, site, delta, own)
        if moved is None:
            moved = act(symmetry.kind, element, gather(_working(tensor), site),
                        site.contragredient, site.offset, delta)
            moved = scatter(tensor, site, moved)
        out[site.tensor] = moved
    return out


def is_identity(kind: Kind, element: torch.Tensor, tol: float = 0.0) -> bool:
    """Is ``element`` the identity (within ``tol`` for continuous kinds)?"""
    if kind == Kind.permutation:
        return bool((element == torch.arange(len(element))).all())
    if kind in (Kind.scale, Kind.sign):
        return bool(((element.double() - 1).abs() <= tol).all())
    eye = torch.eye(element.shape[-1], dtype=torch.float64)
    return bool(((element.double() - eye).abs() <= tol).all())


def identity_element(symmetry: Symmetry) -> torch.Tensor:
    n, k = symmetry.slots, symmetry.coords
    if symmetry.kind == Kind.permutation:
        return torch.arange(n)
    if symmetry.kind in (Kind.scale, Kind.sign):
        return torch.ones(n, dtype=torch.float64)
    return torch.eye(k, dtype=torch.float64).expand(n, k, k).clone()


def inverse(kind: Kind, element: torch.Tensor) -> torch.Tensor:
    if kind == Kind.permutation:
        return torch.argsort(element)
    if kind == Kind.scale:
        return 1.0 / element
    if kind == Kind.sign:
        return element
    return element.transpose(-1, -2)


def random_element(
    symmetry: Symmetry, generator: torch.Generator, scale_range: Tuple[float, float] = (0.5, 2.0)
) -> torch.Tensor:
    """A random element of ``symmetry`` (for scrambling models in tests and demos)."""
    n, k = symmetry.slots, symmetry.coords
    if symmetry.kind == Kind.permutation:
        if symmetry.block_size:
            b = symmetry.block_size
            return torch.cat([i * b + torch.randperm(b, generator=generator) for i in range(n // b)])
        return torch.randperm(n, generator=generator)
    if symmetry.kind == Kind.scale:
        lo, hi = math.log(scale_range[0]), math.log(scale_range[1])
        mag = torch.exp(lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64))
        if not symmetry.signed:
            return mag
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
        return mag * sign
    if symmetry.kind == Kind.sign:
        return torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    if symmetry.kind == Kind.plane_rotation:
        angle = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi
        return rotation_2d(angle)
    gauss = torch.randn(n, k, k, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    # Haar measure (incl. reflections): fix the sign ambiguity of QR.
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]


def rotation_2d(angle: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


# --------------------------------------------------------------------------- statistics


def _checked_sites(symmetry: Symmetry, reference: Tensors, model: Tensors, label: str = "model"):
    """Yield ``(site, reference_tensor, model_tensor)`` for each site present in both models."""
    for site in symmetry.sites:
        a, t = reference.get(site.tensor), model.get(site.tensor)
        if a is None and t is None:
            if site.optional:
                continue
            raise KeyError(f"tensor {site.tensor!r} is missing from both models")
        if a is None or t is None:
            which = "the reference" if a is None else label
            raise KeyError(
                f"tensor {site.tensor!r} is present in only one model (missing from {which})"
            )
        if a.shape != t.shape:
            raise ValueError(
                f"tensor {site.tensor!r} has shape {tuple(t.shape)} in {label} but "
                f"{tuple(a.shape)} in the reference"
            )
        yield site, a, t


def _site_pairs(symmetry: Symmetry, reference: Tensors, model: Tensors, label: str = "model"):
    """Yield ``(site, reference_values, model_values)`` (whole sites, working dtype) for each
    site present in both models."""
    for site, a, t in _checked_sites(symmetry, reference, model, label):
        a, t = gather(_working(a), site), gather(_working(t), site)
        if site.offset:
            a, t = a + site.offset, t + site.offset
        yield site, a, t


def _site_chunks(symmetry: Symmetry, reference: Tensors, model: Tensors, label: str = "model"):
    """Yield ``(site, slots, reference_values, model_values)`` a chunk of slots at a time
    (``slots`` a slice; values ``[stop - start, c, k, rest]`` in the working dtype)."""
    for site, a, t in _checked_sites(symmetry, reference, model, label):
        for slots, va, vt in _slot_chunks_of(site, a, t):
            yield site, slots, va, vt


def _slot_chunks_of(site: Site, a: torch.Tensor, t: torch.Tensor):
    for start, stop in slot_chunks(a, site):
        va, vt = gather_slots(a, site, start, stop), gather_slots(t, site, start, stop)
        if site.offset:
            va, vt = va + site.offset, vt + site.offset
        yield slice(start, stop), va, vt


@dataclass
class SiteSums:
    """The per-slot sums (float64, CPU) that a continuous symmetry's solver and its fit test
    need, from one pass over its sites: ``solve`` over every site, ``fit`` over the
    non-optional ones (see :func:`fit_gain`), ``entries`` scalars in those.

    Rotations and signs: ``cross`` (``sum A T^T``, ``[n, k, k]``); the fit also ``tt`` and
    ``aa`` (``||T||^2``, ``||A||^2`` per slot). Scales: ``xx``, ``xa``, ``xaa`` (``<T, T>``,
    ``<T, A>``, ``<A, A>`` over covariant sites) and ``yy``, ``ya``, ``yaa`` (contragredient).
    """

    solve: Dict[str, torch.Tensor]
    fit: Dict[str, torch.Tensor]
    entries: int = 0


_SCALE_SUMS = ("xx", "xa", "xaa", "yy", "ya", "yaa")


def site_sums(symmetry: Symmetry, reference: Tensors, model: Tensors, label: str = "model",
              fit: bool = True) -> SiteSums:
    """:class:`SiteSums` of ``symmetry`` between the models (``fit=False``: the solver's only)."""
    n, k = symmetry.slots, symmetry.coords
    scale = symmetry.kind == Kind.scale

    def zeros(*shape):
        return torch.zeros(*shape, dtype=torch.float64)

    def bucket(for_fit):
        if scale:
            return {key: zeros(n) for key in _SCALE_SUMS}
        return {"cross": zeros(n, k, k), **({"tt": zeros(n), "aa": zeros(n)} if for_fit else {})}

    sums = SiteSums(bucket(False), bucket(True) if fit else {})
    for site, whole_a, whole_t in _checked_sites(symmetry, reference, model, label):
        buckets = [sums.solve]
        if fit and not site.optional:
            # Biases: few entries that can carry much of a fine-tune's change (real Qwen2 q/k
            # biases are large), which a handful of parameters could "explain"; the decision
            # rests on the weights, where the noise is spread evenly.
            buckets.append(sums.fit)
            sums.entries += whole_a.numel()
        if scale:
            keys = ("yy", "ya", "yaa") if site.contragredient else ("xx", "xa", "xaa")
            if _covers_axis(whole_a, site):
                per_slots = [(slice(None), _covering_scale_sums(site, whole_a, whole_t))]
            else:
                per_slots = ((slots, _scale_terms(a, t))
                             for slots, a, t in _slot_chunks_of(site, whole_a, whole_t))
            for slots, values in per_slots:
                for bucket_ in buckets:
                    for key, value in zip(keys, values):
                        bucket_[key][slots] += value
            continue
        for slots, a, t in _slot_chunks_of(site, whole_a, whole_t):
            rows = slots.stop - slots.start
            term = torch.einsum("ncir,ncjr->nij", a, t).double().cpu()
            for bucket_ in buckets:
                bucket_["cross"][slots] += term
            if len(buckets) > 1:
                sums.fit["tt"][slots] += t.reshape(rows, -1).square().sum(-1).double().cpu()
                sums.fit["aa"][slots] += a.reshape(rows, -1).square().sum(-1).double().cpu()
    return sums


def _scale_terms(a: torch.Tensor, t: torch.Tensor):
    """Per slot ``<T, T>``, ``<T, A>``, ``<A, A>`` (float64) of gathered values."""
    t2, a2 = t.reshape(t.shape[0], -1), a.reshape(a.shape[0], -1)
    return [(x * y).sum(-1).double().cpu() for x, y in ((t2, t2), (t2, a2), (a2, a2))]


def _covering_scale_sums(site: Site, a: torch.Tensor, t: torch.Tensor):
    """Per slot ``<T, T>``, ``<T, A>``, ``<A, A>`` (float64) of a site that covers its axis,
    reduced a block of rows at a time whatever the axis: contiguous reads, where gathering
    slots along axis 1 (down_proj's columns) made strided, transposed copies."""
    n, c, k = site.index.shape
    axis = site.axis
    others = tuple(d for d in range(a.dim()) if d != axis)
    step = rows_per_chunk(a.numel() // max(a.shape[0], 1))
    totals = [torch.zeros(a.shape[axis], dtype=torch.float64) for _ in range(3)]
    for start in range(0, a.shape[0], step):
        va, vt = _working(a[start:start + step]), _working(t[start:start + step])
        if site.offset:
            va, vt = va + site.offset, vt + site.offset
        rows = slice(start, start + va.shape[0]) if axis == 0 else slice(None)
        for total, (x, y) in zip(totals, ((vt, vt), (vt, va), (va, va))):
            total[rows] += (x * y).sum(others).double().cpu() if others else (x * y).double().cpu()
    return [total.view(n, c * k).sum(-1) for total in totals]


def cross_products(symmetry: Symmetry, reference: Tensors, model: Tensors, **kw) -> torch.Tensor:
    """``sum over sites and copies of A[n] T[n]^T`` as ``[n, k, k]`` float64."""
    if symmetry.kind == Kind.scale:
        raise ValueError(f"{symmetry.name}: cross products are for rotations and signs")
    return site_sums(symmetry, reference, model, fit=False, **kw).solve["cross"]


# --------------------------------------------------------------------------- solvers


def solve_permutation(
    symmetry: Symmetry,
    reference: Tensors,
    model: Tensors,
    scale: Optional[Symmetry] = None,
    sketches: Optional[Tuple["RowSketches", "RowSketches"]] = None,
    **kw,
) -> torch.Tensor:
    """Linear assignment maximising the summed similarity of matched slots.

    With ``scale`` (a scale symmetry on the same slots that will be solved next), the terms
    of sites that the scale moves are replaced by a scale-invariant one: for a slot pair,
    covariant similarity ``x`` and contragredient similarity ``y`` become
    ``2 * sign(x*y) * sqrt(|x*y|)``. ``x*y`` is unchanged by any scale (``s`` and ``1/s``
    cancel), so a neuron rescaled by a negative or large factor is still matched to itself;
    at ``s = 1`` it is the geometric-mean version of the plain sum ``x + y``.

    A symmetry with ``features`` (whole heads) is matched on :func:`gram_similarity`
    instead (``sketches``: see :class:`RowSketches`); one with ``block_size`` is solved block
    by block.
    """
    if symmetry.features:
        return assign(gram_similarity(symmetry, reference, model, sketches=sketches), symmetry)
    from .assignment import CONTRAGREDIENT, COVARIANT, PLAIN, dense_similarity, match

    def moved_by_scale(site, contragredient):
        return scale is not None and any(
            s.tensor == site.tensor and s.axis == site.axis and s.contragredient == contragredient
            and s.index.shape == site.index.shape and torch.equal(s.index, site.index)
            for s in scale.sites
        )

    terms = []
    for site, a, t in _checked_sites(symmetry, reference, model, **kw):
        # In the checkpoint's dtype (views where the site covers its axis): the matcher
        # converts what it reads a chunk at a time (assignment.py).
        a, t = gather(a, site), gather(t, site)
        if site.offset:
            a, t = _working(a) + site.offset, _working(t) + site.offset
        role = COVARIANT if moved_by_scale(site, False) else \
            CONTRAGREDIENT if moved_by_scale(site, True) else PLAIN
        terms.append((a, t, role))
    if symmetry.block_size:  # within-block matching (query heads): small, dense, per block
        similarity = dense_similarity([(_working(a), _working(t), r) for a, t, r in terms],
                                      symmetry.slots)
        return torch.arange(symmetry.slots) if similarity is None else assign(similarity, symmetry)
    # Dense n x n similarity + scipy for small n; sketch, candidates and exact scores of
    # candidate pairs for large n (see assignment.py).
    return match(terms, symmetry.slots, name=symmetry.name)


def assign(similarity: torch.Tensor, symmetry: Symmetry) -> torch.Tensor:
    """The permutation maximising the summed similarity (within blocks, if the symmetry has
    them): ``perm[i]`` = the model's slot matched to the reference's slot ``i``."""
    from scipy.optimize import linear_sum_assignment

    cost = similarity.double().cpu()
    if not torch.isfinite(cost).all():
        raise FloatingPointError(f"{symmetry.name}: non-finite similarity matrix")
    n = cost.shape[0]
    b = symmetry.block_size or n
    perm = torch.empty(n, dtype=torch.long)
    for start in range(0, n, b):
        block = cost[start:start + b, start:start + b].numpy()
        rows, cols = linear_sum_assignment(block, maximize=True)
        perm[start + torch.as_tensor(rows)] = start + torch.as_tensor(cols, dtype=torch.long)
    return perm


GRAM_SKETCH_DIM = 512  # head-matching Grams: feature rows longer than SKETCH_ABOVE are sketched
# (assignment.SKETCH_DIM is another thing: the neuron matcher's candidate-search sketch)
SKETCH_ABOVE = 2048


@functools.lru_cache(maxsize=8)
def _sketch(width: int) -> torch.Tensor:
    """One fixed Gaussian sketch per width (seeded: the same for every model and run)."""
    generator = torch.Generator().manual_seed(width)
    return torch.randn(width, GRAM_SKETCH_DIM, generator=generator) / math.sqrt(GRAM_SKETCH_DIM)


def _feature_sites(feature: Tuple[Site, ...], tensors: Tensors):
    """``(site, tensor)`` for the feature's sites present in ``tensors`` (optional ones may
    be missing)."""
    for site in feature:
        tensor = tensors.get(site.tensor)
        if tensor is None:
            if site.optional:
                continue
            raise KeyError(f"tensor {site.tensor!r} is missing")
        yield site, tensor


def _feature_values(feature: Tuple[Site, ...], tensors: Tensors) -> torch.Tensor:
    """The feature's sites' values, concatenated: ``[n, c, k, rest]``."""
    return torch.cat([gather(_working(tensor), site) for site, tensor in _feature_sites(feature, tensors)],
                     dim=-1)


def _sketch_positions(tensor: torch.Tensor, axis: int, block: torch.Tensor) -> torch.Tensor:
    """``[positions along axis, GRAM_SKETCH_DIM]`` float32: each position's values (all other axes,
    flattened) times ``block``. bfloat16 is multiplied natively (float32 accumulation, the
    result rounded once: ~0.2 % relative, the order of the checkpoint's own rounding, so a
    bf16 copy's true match scores 1 to that precision; faster than converting); float16
    is converted a chunk at a time."""
    moved = tensor.movedim(axis, 0)
    moved = moved.reshape(moved.shape[0], -1)
    work = torch.promote_types(tensor.dtype, torch.float32)
    if moved.dtype == torch.bfloat16:
        return (moved @ block.to(device=tensor.device, dtype=torch.bfloat16)).to(work)
    block = block.to(device=tensor.device, dtype=work)
    if moved.dtype == block.dtype:
        return moved @ block
    step = rows_per_chunk(moved.shape[1])
    return torch.cat([moved[p:p + step].to(block.dtype) @ block for p in range(0, moved.shape[0], step)])


class RowSketches:
    """Sketched positions of one model's layer tensors (:func:`_sketch_positions`), shared
    by the head-matching symmetries of one layer alignment: the KV heads and then the query
    heads are matched on the same sketches of q_proj's rows and o_proj's columns, which are
    most of the cost of matching heads at 8B shapes.

    Entries belong to a tensor object (held weakly); :meth:`follow` carries an entry along a
    permutation of its positions that moved the tensor (the KV-head permutation moves q
    rows and o columns before the query heads are matched), and drops any other entry whose
    tensor was replaced.
    """

    def __init__(self):
        self._entries: Dict[tuple, tuple] = {}  # (name, axis, width, offset) -> (ref, sketched)

    def positions(self, name: str, tensor: torch.Tensor, axis: int, sketch: torch.Tensor,
                  offset: int, rest: int) -> torch.Tensor:
        key = (name, axis, sketch.shape[0], offset)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is tensor:
            return entry[1]
        value = _sketch_positions(tensor, axis, sketch[offset:offset + rest])
        self._entries[key] = (weakref.ref(tensor), value)
        return value

    def follow(self, symmetry: Symmetry, element: torch.Tensor, before: Tensors, after: Tensors) -> None:
        for key, (ref, value) in list(self._entries.items()):
            name, axis = key[0], key[1]
            old, new = before.get(name), after.get(name)
            if old is new or ref() is not old:
                continue
            sites = [site for site in symmetry.sites if site.tensor == name]
            moved = None
            if symmetry.kind == Kind.permutation and len(sites) == 1 and sites[0].axis == axis:
                moved = _act_along_axis(Kind.permutation, element, value,
                                        dataclasses.replace(sites[0], axis=0))
            if moved is None or new is None:
                del self._entries[key]
            else:
                self._entries[key] = (weakref.ref(new), moved)


def _sketched_feature(feature: Tuple[Site, ...], tensors: Tensors, sketch: torch.Tensor,
                      cache: Optional[RowSketches]) -> torch.Tensor:
    """``_feature_values(feature, tensors) @ sketch`` as a sum over the feature's sites of
    their positions' sketches (the concatenation times the sketch is that sum), from
    ``cache`` where it has them."""
    total, offset = None, 0
    cache = cache if cache is not None else RowSketches()
    for site, tensor in _feature_sites(feature, tensors):
        rest = tensor.numel() // tensor.shape[site.axis]
        rows = cache.positions(site.tensor, tensor, site.axis, sketch, offset, rest)
        if site.offset:  # (values + offset) @ block
            rows = rows + site.offset * sketch[offset:offset + rest].sum(0).to(rows)
        part = gather(rows, dataclasses.replace(site, axis=0))
        total = part if total is None else total + part
        offset += rest
    return total


def _cross_by_grams(k: int, r: int, block: int) -> bool:
    """``||X_a X_m^T||_F^2 = <X_a^T X_a, X_m^T X_m>_F``: score all pairs of a block through the
    ``r x r`` Grams (2 k r^2 per slot, then r^2 per pair) when that is cheaper than the
    ``k x k`` products (k^2 r per pair), e.g. o_proj's 4 x 128 columns per KV head against
    512 sketched dimensions."""
    return 2 * k * r * r + block * r * r < block * k * k * r


def _cross_by_rows(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``[n, n', c]``: ``||a[i, c] m[j, c]^T||_F^2`` for rows ``a [n, c, k, r]`` and ``m [n', c, k, r]``,
    as one ``[n k, r] x [r, n' k]`` product per copy. ``einsum("ncir,mcjr->nmcij")`` computes
    the same products, but slower at SmolLM2's head shapes."""
    n, c, k, r = a.shape
    n_m = m.shape[0]
    rows_a = a.permute(1, 0, 2, 3).reshape(c, n * k, r)
    rows_m = m.permute(1, 0, 2, 3).reshape(c, n_m * k, r)
    products = torch.bmm(rows_a, rows_m.transpose(1, 2)).view(c, n, k, n_m, k)
    return products.pow_(2).sum((2, 4)).permute(1, 2, 0)


def gram_similarity(symmetry: Symmetry, reference: Tensors, model: Tensors,
                    sketches: Optional[Tuple[RowSketches, RowSketches]] = None, **_kw) -> torch.Tensor:
    """``[n, n]`` similarity of slots, invariant to any orthogonal map or scale of each
    feature's rows (per slot and copy).

    For rows ``X`` (``k x rest``) moved as ``X -> s M X`` (``M`` orthogonal), the Gram
    ``X^T X`` only scales, so ``cos(X_a^T X_a, X_m^T X_m) = ||X_a X_m^T||_F^2 /
    (||X_a X_a^T||_F ||X_m X_m^T||_F)`` lies in ``[0, 1]`` and is 1 for the true match of an
    exactly transformed copy. Summed over copies and features. Rows longer than
    :data:`SKETCH_ABOVE` are first multiplied by one fixed random Gaussian sketch to
    :data:`GRAM_SKETCH_DIM` columns (shared by both models): the true match still scores exactly 1
    (the sketch acts on the other side of ``X``), other pairs approximately what they would.
    ``sketches`` (reference's, model's) share those products between symmetries.

    With ``block_size``, only pairs inside a block are scored (the rest stay 0: they can
    never be matched).
    """
    n = symmetry.slots
    block = symmetry.block_size or n
    total = torch.zeros(n, n, dtype=torch.float64)
    ref_cache, model_cache = sketches if sketches is not None else (None, None)
    for feature in symmetry.features:
        width = None
        for site in feature:
            tensor = reference.get(site.tensor)
            if tensor is not None:
                width = (width or 0) + tensor.numel() // tensor.shape[site.axis]
        if width is None:
            continue
        if width > SKETCH_ABOVE:
            a = _sketched_feature(feature, reference, _sketch(width), ref_cache)
            m = _sketched_feature(feature, model, _sketch(width), model_cache).to(a.device)
        else:
            a = _feature_values(feature, reference)
            m = _feature_values(feature, model).to(a.device)
        _n, c, k, r = a.shape
        by_grams = _cross_by_grams(k, r, block)
        if by_grams:
            gram_a = torch.einsum("ncir,ncis->ncrs", a, a)
            gram_m = torch.einsum("ncir,ncis->ncrs", m, m)
            norm_a, norm_m = gram_a.pow(2).sum((-1, -2)).sqrt(), gram_m.pow(2).sum((-1, -2)).sqrt()
        else:
            norm_a = torch.einsum("ncir,ncjr->ncij", a, a).pow(2).sum((-1, -2)).sqrt()
            norm_m = torch.einsum("ncir,ncjr->ncij", m, m).pow(2).sum((-1, -2)).sqrt()
        for start in range(0, n, block):
            part = slice(start, start + block)
            if by_grams:
                cross = torch.einsum("ncrs,mcrs->nmc", gram_a[part], gram_m[part])
            else:
                cross = _cross_by_rows(a[part], m[part])
            den = norm_a[part, None, :] * norm_m[None, part, :]
            score = torch.where(den > 0, cross / den.clamp_min(1e-300), torch.zeros_like(cross))
            total[part, part] += score.sum(-1).double().cpu()
    return total


class small_linalg:
    """Run a small LAPACK call on one thread. While other processes use the cores, OpenMP
    workers spinning for a busy core can make a small batched SVD two orders of magnitude
    slower on two threads than on one; for matrices this small one thread is never slower."""

    def __init__(self, size: int, limit: int = 1024):
        self.active = size <= limit

    def __enter__(self):
        if self.active:
            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.threads)
        return False


def quartic_scale(
    xx: torch.Tensor, xa: torch.Tensor, ya: torch.Tensor, yy: torch.Tensor, signed: bool = True
) -> torch.Tensor:
    """Per slot, ``argmin_s ||s X - X_a||^2 + ||Y/s - Y_a||^2`` from its four statistics.

    ``xx = ||X||^2``, ``xa = <X, X_a>``, ``ya = <Y, Y_a>``, ``yy = ||Y||^2``. Stationary
    points solve ``xx s^4 - xa s^3 + ya s - yy = 0``; we take the real root with the smallest
    objective, keep ``s`` away from 0 and infinity, and fall back to ``s = 1`` when no root
    improves on it (e.g. a slot whose rows are all zero).
    """
    xx, xa, ya, yy = (v.double().cpu() for v in (xx, xa, ya, yy))
    n = xx.shape[0]

    def objective(s):
        return xx * s**2 - 2 * xa * s + yy / s**2 - 2 * ya / s

    best = torch.ones(n, dtype=torch.float64)
    best_obj = objective(best)
    ok = (xx > 1e-30) & (yy > 1e-30)
    if ok.any():
        # Monic companion matrix of s^4 + p3 s^3 + p2 s^2 + p1 s + p0.
        safe_xx = torch.where(ok, xx, torch.ones_like(xx))
        p3, p2, p1, p0 = -xa / safe_xx, torch.zeros_like(xx), ya / safe_xx, -yy / safe_xx
        comp = torch.zeros(n, 4, 4, dtype=torch.float64)
        comp[:, 1, 0] = comp[:, 2, 1] = comp[:, 3, 2] = 1.0
        comp[:, :, 3] = -torch.stack([p0, p1, p2, p3], -1)
        roots = torch.linalg.eigvals(comp)  # [n, 4]
        real = roots.real
        is_real = roots.imag.abs() <= 1e-8 * (1 + roots.abs())
        sensible = (real.abs() > 1e-6) & (real.abs() < 1e6) & is_real & ok[:, None]
        if not signed:
            sensible &= real > 0
        for j in range(4):
            cand = torch.where(sensible[:, j], real[:, j], torch.ones_like(xx))
            obj = objective(cand)
            better = sensible[:, j] & (obj < best_obj)
            best = torch.where(better, cand, best)
            best_obj = torch.where(better, obj, best_obj)
    return best


def solve_continuous(symmetry: Symmetry, reference: Tensors, model: Tensors, **kw) -> torch.Tensor:
    """The element of a rotation, sign or scale symmetry (see :func:`_solve_from_sums`)."""
    return _solve_from_sums(symmetry, site_sums(symmetry, reference, model, fit=False, **kw))


def _solve_from_sums(symmetry: Symmetry, sums: SiteSums) -> torch.Tensor:
    """The continuous solvers, from :func:`site_sums` (``sums.solve``):

    * orthogonal: Procrustes per slot (reflections allowed), ``argmax tr(g T A^T)``;
    * plane rotation: closed-form optimal rotation in SO(2) per slot (2-D Kabsch without
      reflections);
    * sign: +1 or -1 per slot, whichever correlates the model with the reference;
    * scale: the quartic least-squares scale (both sides observed) or the free scale below.
    """
    stats, n = sums.solve, symmetry.slots
    if symmetry.kind == Kind.orthogonal:
        m = stats["cross"]  # sum A T^T
        with small_linalg(m.shape[-1]):
            u, _s, vh = torch.linalg.svd(m)
        return u @ vh
    if symmetry.kind == Kind.plane_rotation:
        m = stats["cross"]  # [n, 2, 2]
        # tr(R(theta) M^T) = cos(theta) (M00 + M11) + sin(theta) (M10 - M01)
        angle = torch.atan2(m[:, 1, 0] - m[:, 0, 1], m[:, 0, 0] + m[:, 1, 1])
        return rotation_2d(angle)
    if symmetry.kind == Kind.sign:
        trace = torch.diagonal(stats["cross"], dim1=-2, dim2=-1).sum(-1)
        return torch.where(trace < 0, -1.0, 1.0).double()
    if not any(site.contragredient for site in symmetry.sites):
        # Free scale: only one side is observed (e.g. an MLP neuron's activation h, whose
        # 1/s side sits in down_proj's weights, not in any activation). The least-squares
        # optimum <X, X_a> / ||X||^2 is biased towards 0 whenever X and X_a are not exactly
        # proportional (regression dilution: it is |cos| * ||X_a|| / ||X||), and a scale that
        # is too small wrecks a skill vector measured in the aligned frame. We take the
        # symmetric estimate sign(<X, X_a>) * ||X_a|| / ||X|| instead: exact for an exactly
        # scaled copy, 1 for two equally sized neurons, and the inverse of the swapped
        # problem's answer. Fall back to 1 for a (near-)zero slot, a (near-)zero or
        # non-finite ratio, and a non-positive one when the scale must be positive.
        xx, xa, aa = stats["xx"], stats["xa"], stats["xaa"]
        tiny = max(1e-30, 1e-20 * float(xx.max())) if n else 1e-30
        safe_xx = torch.where(xx > tiny, xx, torch.ones_like(xx))
        ratio = torch.sign(xa) * (aa / safe_xx).sqrt()
        ok = (xx > tiny) & (aa > tiny) & torch.isfinite(ratio) & (ratio.abs() > 1e-6) & \
            (ratio.abs() < 1e6)
        if not symmetry.signed:
            ok &= ratio > 0
        return torch.where(ok, ratio, torch.ones_like(ratio))
    return quartic_scale(stats["xx"], stats["xa"], stats["ya"], stats["yy"], signed=symmetry.signed)


def solve(symmetry: Symmetry, reference: Tensors, model: Tensors, **kw) -> torch.Tensor:
    if symmetry.kind == Kind.permutation:
        return solve_permutation(symmetry, reference, model, **kw)
    kw.pop("scale", None)  # the permutation's partner scale (align_layer passes it to mains)
    return solve_continuous(symmetry, reference, model, **kw)


# Continuous elements whose fit is not clearly better than fitting noise, or that barely move,
# are snapped to the identity (see :func:`worth_keeping`).
DEGREES_OF_FREEDOM = {
    Kind.scale: lambda k: 1,
    Kind.plane_rotation: lambda k: 1,
    Kind.orthogonal: lambda k: k * (k - 1) // 2,
}


def noise_limit(dof: int, entries: int) -> float:
    """The share of a squared distance over ``entries`` scalars that a least-squares fit of
    ``dof`` parameters removes from pure noise, with a wide margin: that share is about
    ``chi2(dof) / entries`` (mean ``dof``, standard deviation ``sqrt(2 dof)``), and
    ``dof + 6 sd + 12`` is exceeded with probability below about 1e-5 for any ``dof``."""
    return (dof + 6.0 * math.sqrt(2.0 * dof) + 12.0) / max(entries, 1)


def fit_gain(symmetry: Symmetry, element: torch.Tensor, reference: Tensors, model: Tensors,
             **kw) -> Tuple[float, float, int]:
    """``(gain, baseline, entries)``: how much ``element`` lowers ``sum ||g . model -
    reference||^2`` over the symmetry's (non-optional) sites (``baseline`` = the identity's
    value, over ``entries`` scalars).

    From sums the group action leaves simple, not by moving the tensors: a rotation keeps
    ``||T||``, so its gain is ``2 (<gT, A> - <T, A>)`` from the cross products; a scale's is
    its per-slot quartic objective at ``s`` against ``s = 1``.
    """
    return gain_from_sums(symmetry, element, site_sums(symmetry, reference, model, **kw))


def gain_from_sums(symmetry: Symmetry, element: torch.Tensor, sums: SiteSums) -> Tuple[float, float, int]:
    """:func:`fit_gain` from :func:`site_sums` (``sums.fit``)."""
    stats = sums.fit
    if not sums.entries:  # no non-optional site present: nothing to judge the fit on
        return 0.0, 0.0, 0
    if symmetry.kind == Kind.scale:
        s = element.double().cpu()
        xx, xa, yy, ya = (stats[k] for k in ("xx", "xa", "yy", "ya"))
        norms = float((xx + yy + stats["xaa"] + stats["yaa"]).sum())
        identity_cross = float((xa + ya).sum())
        moved_cross = float((xa * s + ya / s).sum())
        moved_norm = float((xx * s * s + yy / (s * s)).sum()) - float((xx + yy).sum())
        gain = 2 * (moved_cross - identity_cross) - moved_norm
    else:
        cross = stats["cross"]
        norms = float((stats["tt"] + stats["aa"]).sum())
        identity_cross = float(torch.diagonal(cross, dim1=-2, dim2=-1).sum())
        gain = 2 * (float((element.double().cpu() * cross).sum()) - identity_cross)
    baseline = norms - 2 * identity_cross
    return gain, max(baseline, 0.0), sums.entries


def solve_and_fit(symmetry: Symmetry, reference: Tensors, model: Tensors, **kw):
    """``(element, (gain, baseline, entries))`` of a continuous symmetry from one pass over
    its sites (the solver and the fit test read the same sums)."""
    sums = site_sums(symmetry, reference, model, **kw)
    element = _solve_from_sums(symmetry, sums)
    return element, gain_from_sums(symmetry, element, sums)


#: A fitted continuous element that moves no slot further from the identity than this is kept
#: at the identity, whatever it explains. Measured as the report measures it: ``|s - 1|`` of a
#: scale, ``||R - I||_F / sqrt(k)`` of a rotation. Fine-tunes of one base differ by more than
#: noise around the identity: where their change shrinks or grows one side of a scale's pair
#: (v_proj rows / o_proj columns, up_proj rows / down_proj columns) more than the other, a
#: fitted scale or plane rotation removes a little more of the distance than
#: :func:`noise_limit` allows, yet moves no weight by more than ~1e-3 (the demo's SmolLM2
#: fine-tunes: 3 of 60 layers kept such elements, within 1.2e-3 of the identity; an 8B-shaped
#: bf16 sibling kept all 14336 neuron scales, within 5e-4). A change of coordinates moves
#: elements by far more (random group elements: scales in [0.5, 2], any angle), so does a
#: fit between independently trained models.
SNAP_DEVIATION = 1e-2


def slot_deviations(element: torch.Tensor) -> torch.Tensor:
    """Per slot (float64, CPU), how far a continuous element is from the identity: ``|s - 1|``
    of a scalar per slot ``[n]`` (scale or sign), ``||R - I||_F / sqrt(k)`` of a matrix per
    slot ``[n, k, k]`` (rotation). The report's measure too (``measure.step_summary``)."""
    value = element.detach().double().cpu()
    if value.dim() == 1:
        return (value - 1).abs()
    k = value.shape[-1]
    return (value - torch.eye(k, dtype=value.dtype)).flatten(1).norm(dim=1) / math.sqrt(k)


def deviation(element: torch.Tensor) -> float:
    """How far a continuous element moves its furthest slot from the identity (see
    :data:`SNAP_DEVIATION`); 0 for no slots."""
    per_slot = slot_deviations(element)
    return float(per_slot.max()) if per_slot.numel() else 0.0


def worth_keeping(symmetry: Symmetry, element: torch.Tensor, gain: float, baseline: float,
                  entries: int) -> bool:
    """Keep a fitted continuous element only if it explains clearly more than fitting noise
    would (:func:`explains_more_than_noise`) and moves some slot by more than
    :data:`SNAP_DEVIATION`; otherwise the identity is kept."""
    return (explains_more_than_noise(symmetry, gain, baseline, entries)
            and deviation(element) > SNAP_DEVIATION)


def explains_more_than_noise(symmetry: Symmetry, gain: float, baseline: float, entries: int) -> bool:
    """Keep a fitted continuous element only if it removes clearly more of the distance than
    fitting its free parameters to noise would (:func:`noise_limit`). On descendants of one
    base (a fine-tune's noise around the identity) the identity is kept; a real transform (a
    rotated, rescaled or independently trained model) removes far more than that."""
    dof = DEGREES_OF_FREEDOM.get(symmetry.kind)
    if dof is None or entries == 0:
        return True
    if baseline <= 0.0:
        return False  # already equal: nothing to explain
    return gain / baseline > noise_limit(symmetry.slots * dof(symmetry.coords), entries)


def distance(reference: Tensors, model: Tensors, names: Iterable[str]) -> float:
    """Relative distance ``||T - A|| / ||A||`` over the named tensors present in both."""
    num = den = 0.0
    for name in names:
        a, t = reference.get(name), model.get(name)
        if a is None or t is None:
            continue
        num += float(((t.double() - a.double()) ** 2).sum())
        den += float((a.double() ** 2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def slot_index(slots: int, copies: int, coords: int) -> torch.Tensor:
    """``index[n, c, k]`` of contiguous blocks along one axis: ``n * copies * coords + c * coords + k``."""
    return torch.arange(slots * copies * coords).reshape(slots, copies, coords)

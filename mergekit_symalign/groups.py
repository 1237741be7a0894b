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

Every solver returns the element ``g`` that moves the *target* towards the *anchor*, i.e.
minimises ``sum over sites ||g . target - anchor||^2`` within its group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

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

    def __post_init__(self):
        if self.index.dim() != 3:
            raise ValueError(f"site index for {self.tensor} must be [slots, copies, coords]")


@dataclass(frozen=True, eq=False)
class Symmetry:
    """One factor of a layer's symmetry group, declared by the sites it acts on."""

    name: str
    kind: Kind
    sites: Tuple[Site, ...]
    signed: bool = True  # scales only: may a scale be negative?

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


# --------------------------------------------------------------------------- gather / scatter


def _working(tensor: torch.Tensor) -> torch.Tensor:
    """Compute in at least float32 (bf16/fp16 checkpoints), keep float64 when given."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _covers_axis(tensor: torch.Tensor, site: Site) -> bool:
    """Does the site list every position of its axis in order (no copy needed)?"""
    flat = site.index.reshape(-1)
    n = tensor.shape[site.axis]
    return flat.numel() == n and bool((flat == torch.arange(n)).all())


def gather(tensor: torch.Tensor, site: Site) -> torch.Tensor:
    """Values of ``tensor`` at ``site`` as ``[n, c, k, rest]`` (rest = all other axes)."""
    n, c, k = site.index.shape
    if _covers_axis(tensor, site):
        picked = tensor
    else:
        picked = tensor.index_select(site.axis, site.index.reshape(-1).to(tensor.device))
    return picked.movedim(site.axis, 0).reshape(n, c, k, -1)


def scatter(tensor: torch.Tensor, site: Site, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` with ``values`` (``[n, c, k, rest]``) written back at ``site``."""
    moved_shape = list(tensor.movedim(site.axis, 0).shape)
    moved_shape[0] = site.index.numel()
    values = values.reshape(moved_shape).movedim(0, site.axis).to(tensor.dtype)
    if _covers_axis(tensor, site):
        return values.contiguous()
    return tensor.index_copy(site.axis, site.index.reshape(-1).to(tensor.device), values)


# --------------------------------------------------------------------------- group actions


def act(kind: Kind, element: torch.Tensor, values: torch.Tensor, contragredient: bool):
    """Apply ``element`` to gathered ``values`` ``[n, c, k, rest]``."""
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


def _act_along_axis(kind: Kind, element: torch.Tensor, tensor: torch.Tensor, site: Site):
    """:func:`act` on a site that covers its axis, without the ``[n, c, k, rest]`` copy and
    the transposes of gather/scatter (same arithmetic, same result); ``None`` if not
    applicable."""
    if kind not in (Kind.permutation, Kind.scale, Kind.sign) or not _covers_axis(tensor, site):
        return None
    n, c, k = site.index.shape
    element = element.to(tensor.device)
    if kind == Kind.permutation:  # new slot i takes old slot perm[i], copies and coords along
        within = torch.arange(c * k, device=tensor.device)
        return tensor.index_select(site.axis, (element[:, None] * (c * k) + within).reshape(-1))
    work = _working(tensor)
    factor = element.to(work.dtype)
    if kind == Kind.scale and site.contragredient:
        factor = 1.0 / factor
    shape = [1] * tensor.dim()
    shape[site.axis] = -1
    return (work * factor.repeat_interleave(c * k).view(shape)).to(tensor.dtype)


def apply(symmetry: Symmetry, element: torch.Tensor, tensors: Tensors) -> Dict[str, torch.Tensor]:
    """Move every tensor ``symmetry`` acts on; tensors it does not touch are returned as is."""
    out = dict(tensors)
    for site in symmetry.sites:
        tensor = out.get(site.tensor)
        if tensor is None:
            continue
        moved = _act_along_axis(symmetry.kind, element, tensor, site)
        if moved is None:
            moved = act(symmetry.kind, element, gather(_working(tensor), site), site.contragredient)
            moved = scatter(tensor, site, moved)
        out[site.tensor] = moved
    return out


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


def _site_pairs(symmetry: Symmetry, anchor: Tensors, target: Tensors, model: str = "target"):
    """Yield ``(site, anchor_values, target_values)`` for each site present in both models."""
    for site in symmetry.sites:
        a, t = anchor.get(site.tensor), target.get(site.tensor)
        if a is None and t is None:
            if site.optional:
                continue
            raise KeyError(f"tensor {site.tensor!r} is missing from both models")
        if a is None or t is None:
            which = "anchor" if a is None else model
            raise KeyError(
                f"tensor {site.tensor!r} is present in only one model (missing from {which})"
            )
        if a.shape != t.shape:
            raise ValueError(
                f"tensor {site.tensor!r} has shape {tuple(t.shape)} in {model} but "
                f"{tuple(a.shape)} in the anchor"
            )
        yield site, gather(_working(a), site), gather(_working(t), site)


def cross_products(symmetry: Symmetry, anchor: Tensors, target: Tensors, **kw) -> torch.Tensor:
    """``sum over sites and copies of A[n] T[n]^T`` as ``[n, k, k]`` float64."""
    n, k = symmetry.slots, symmetry.coords
    total = None
    for _site, a, t in _site_pairs(symmetry, anchor, target, **kw):
        # a, t: [n, c, k, rest] -> contract copies and rest
        term = torch.einsum("ncir,ncjr->nij", a, t).double()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(n, k, k, dtype=torch.float64)
    return total


# --------------------------------------------------------------------------- solvers


def solve_permutation(
    symmetry: Symmetry,
    anchor: Tensors,
    target: Tensors,
    scale: Optional[Symmetry] = None,
    **kw,
) -> torch.Tensor:
    """Linear assignment maximising the summed similarity of matched slots.

    With ``scale`` (a scale symmetry on the same slots that will be solved next), the terms
    of sites that the scale moves are replaced by a scale-invariant one: for a slot pair,
    covariant similarity ``x`` and contragredient similarity ``y`` become
    ``2 * sign(x*y) * sqrt(|x*y|)``. ``x*y`` is unchanged by any scale (``s`` and ``1/s``
    cancel), so a neuron rescaled by a negative or large factor is still matched to itself;
    at ``s = 1`` it is the geometric-mean version of the plain sum ``x + y``.
    """
    from .assignment import CONTRAGREDIENT, COVARIANT, PLAIN, match

    def moved_by_scale(site, contragredient):
        return scale is not None and any(
            s.tensor == site.tensor and s.axis == site.axis and s.contragredient == contragredient
            and s.index.shape == site.index.shape and torch.equal(s.index, site.index)
            for s in scale.sites
        )

    terms = []
    for site, a, t in _site_pairs(symmetry, anchor, target, **kw):
        role = COVARIANT if moved_by_scale(site, False) else \
            CONTRAGREDIENT if moved_by_scale(site, True) else PLAIN
        terms.append((a, t, role))
    # Dense n x n similarity + scipy for small n; sketch, candidates and exact scores of
    # candidate pairs for large n (see assignment.py).
    return match(terms, symmetry.slots, name=symmetry.name)


def solve_orthogonal(symmetry: Symmetry, anchor: Tensors, target: Tensors, **kw) -> torch.Tensor:
    """Orthogonal Procrustes per slot (reflections allowed): ``argmax tr(g T A^T)``."""
    m = cross_products(symmetry, anchor, target, **kw)  # sum A T^T
    u, _s, vh = torch.linalg.svd(m)
    return u @ vh


def solve_plane_rotation(symmetry: Symmetry, anchor: Tensors, target: Tensors, **kw) -> torch.Tensor:
    """Closed-form optimal rotation in SO(2) per slot (2-D Kabsch without reflections)."""
    m = cross_products(symmetry, anchor, target, **kw)  # sum A T^T, [n, 2, 2]
    # tr(R(theta) M^T) = cos(theta) (M00 + M11) + sin(theta) (M10 - M01)
    angle = torch.atan2(m[:, 1, 0] - m[:, 0, 1], m[:, 0, 0] + m[:, 1, 1])
    return rotation_2d(angle)


def solve_sign(symmetry: Symmetry, anchor: Tensors, target: Tensors, **kw) -> torch.Tensor:
    """+1 or -1 per slot, whichever correlates the target with the anchor."""
    m = cross_products(symmetry, anchor, target, **kw)
    trace = torch.diagonal(m, dim1=-2, dim2=-1).sum(-1)
    return torch.where(trace < 0, -1.0, 1.0).double()


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


def solve_scale(symmetry: Symmetry, anchor: Tensors, target: Tensors, **kw) -> torch.Tensor:
    n = symmetry.slots
    stats = {key: torch.zeros(n, dtype=torch.float64) for key in ("xx", "xa", "ya", "yy", "aa")}
    for site, a, t in _site_pairs(symmetry, anchor, target, **kw):
        t, a = t.reshape(n, -1), a.reshape(n, -1)
        self_sq = (t * t).sum(-1).double()
        cross = (t * a).sum(-1).double()
        if site.contragredient:
            stats["yy"] += self_sq.cpu()
            stats["ya"] += cross.cpu()
        else:
            stats["xx"] += self_sq.cpu()
            stats["xa"] += cross.cpu()
            stats["aa"] += (a * a).sum(-1).double().cpu()
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
        xx, xa, aa = stats["xx"], stats["xa"], stats["aa"]
        tiny = max(1e-30, 1e-20 * float(xx.max())) if n else 1e-30
        safe_xx = torch.where(xx > tiny, xx, torch.ones_like(xx))
        ratio = torch.sign(xa) * (aa / safe_xx).sqrt()
        ok = (xx > tiny) & (aa > tiny) & torch.isfinite(ratio) & (ratio.abs() > 1e-6) & \
            (ratio.abs() < 1e6)
        if not symmetry.signed:
            ok &= ratio > 0
        return torch.where(ok, ratio, torch.ones_like(ratio))
    stats.pop("aa")
    return quartic_scale(signed=symmetry.signed, **stats)


SOLVERS = {
    Kind.orthogonal: solve_orthogonal,
    Kind.plane_rotation: solve_plane_rotation,
    Kind.sign: solve_sign,
    Kind.scale: solve_scale,
}


def solve(symmetry: Symmetry, anchor: Tensors, target: Tensors, **kw) -> torch.Tensor:
    if symmetry.kind == Kind.permutation:
        return solve_permutation(symmetry, anchor, target, **kw)
    kw.pop("scale", None)
    return SOLVERS[symmetry.kind](symmetry, anchor, target, **kw)


def distance(anchor: Tensors, target: Tensors, names: Iterable[str]) -> float:
    """Relative distance ``||T - A|| / ||A||`` over the named tensors present in both."""
    num = den = 0.0
    for name in names:
        a, t = anchor.get(name), target.get(name)
        if a is None or t is None:
            continue
        num += float(((t.double() - a.double()) ** 2).sum())
        den += float((a.double() ** 2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def slot_index(slots: int, copies: int, coords: int) -> torch.Tensor:
    """``index[n, c, k]`` of contiguous blocks along one axis: ``n * copies * coords + c * coords + k``."""
    return torch.arange(slots * copies * coords).reshape(slots, copies, coords)

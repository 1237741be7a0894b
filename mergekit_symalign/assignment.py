"""Maximum-similarity matching of permutation slots, without the dense n x n matrix for large n.

Pure torch + scipy (no mergekit import). :func:`match` takes the per-site features that
:func:`mergekit_symalign.groups.solve_permutation` gathers, as ``(reference [n, m], model [n, m],
role)`` terms, and returns ``perm`` with ``perm[i]`` = the model slot matched to reference slot
``i``. The similarity of reference slot ``i`` and model slot ``j`` is

* ``P + X + Y`` (``P``, ``X``, ``Y``: summed inner products ``<a_i, t_j>`` of the plain,
  covariant and contragredient terms) when the terms of one of the two scaled roles are
  missing, and
* ``P + 2 sign(X Y) sqrt(|X Y|)`` when both are present: ``X Y`` does not change when the
  model slot is rescaled by any ``s != 0`` (covariant rows by ``s``, contragredient ones by
  ``1/s``), so a neuron rescaled by a negative or large factor still matches its twin.

Small ``n`` (``n <= dense_below``): the dense ``n x n`` similarity and scipy's
``linear_sum_assignment``.

Large ``n`` (a Llama-3.1-8B MLP has 14336 neurons; its dense similarity is ~5 TFLOP):

1. *sketch*: the terms of each role are projected by seeded Gaussian matrices ``[m, d]``
   shared by reference and model; inner products of sketches estimate ``P``, ``X``, ``Y``;
2. *search*: a proxy of all ``n^2`` pairs, two ``n x n x d`` matmuls in row blocks:
   ``P + w_i w_j |cos(u_i, u_j) + cos(v_i, v_j)|`` with ``w = sqrt(|u| |v|)`` (``u``, ``v``:
   covariant and contragredient sketches). It ignores the scale, sign included, equals the
   objective for a rescaled copy and bounds it from above
   (``|c_u + c_v| >= 2 sqrt(c_u c_v)``). The top ``candidates`` slots of each row, plus the
   diagonal (identity) pair, form the candidate graph;
3. *exact* scores: each row's best sketched candidate is scored exactly (gathers of full
   features, no ``n x n`` matrix), then every candidate whose sketched score plus ``margin``
   standard errors reaches that value;
4. *certify*: a row is certain when the ``k``-th proxy plus ``CERTIFY_MARGIN`` standard errors
   stays below its best exact score (no slot outside the candidates can win); uncertain rows
   are scored exactly against every slot, and if more than ``DENSE_IF_UNCERTAIN`` of the rows
   are uncertain (models that are no near-permutation of each other) the dense path runs;
5. if every row's best scored pair is a distinct model slot, that is the answer (optimal on
   the candidate graph); otherwise every candidate is scored and a sparse assignment (scipy's
   LAPJVsp) is solved on the graph; if it has no perfect matching (only possible with
   ``include_identity=False``), the dense path runs.

The large-``n`` path is exact on the candidate graph, not on all pairs: it returns the dense
optimum when the rows' best pairs are distinct and certified, which is what planted
permutations (a copy of the reference moved by the group) and near-identical pairs (same-base
fine-tunes) give, by a wide margin. ``info`` (a dict, optional) receives the path taken,
counts and per-stage seconds.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

PLAIN = "plain"
COVARIANT = "covariant"  # rows a per-slot scale ``s`` multiplies (that scale is solved next)
CONTRAGREDIENT = "contragredient"  # the matching rows/columns, divided by ``s``
ROLES = (PLAIN, COVARIANT, CONTRAGREDIENT)

#: ``n <= DENSE_BELOW``: dense similarity + scipy. Above, the sketch path, which on
#: SmolLM2-135M's MLP (1536 neurons) found the dense path's permutations on the demo's targets
#: in less time: there the three dense n x n similarity products are about half a layer's solve.
DENSE_BELOW = 512
#: Sketch candidates kept per reference row on the large-n path.
CANDIDATES = 8
#: Dimensions of the Gaussian sketch of each role (plain, covariant, contragredient).
SKETCH_DIM = 64
#: Of those, the dimensions used by the all-pairs candidate search (its cost is
#: ``n^2 x 2 SEARCH_DIM`` flops plus a top-k over ``n^2`` proxies). All of them: with 32, the
#: proxies' noise (its largest of n draws) exceeded the certification's margin in most rows
#: of SmolLM2's MLPs, which then went to the dense path; with 64, 29 of 30 layers stay
#: row-wise. The proxies must be on the exact scores' scale: rows certified on proxies that
#: estimate half of each similarity can lose their true partners (tests/test_assignment.py).
SEARCH_DIM = 64
#: A candidate is scored exactly when its sketched similarity plus ``MARGIN`` (conservative)
#: standard errors reaches the exact similarity of its row's best estimate.
MARGIN = 3.0
#: A row is certified when no slot outside its top-k candidates can beat its best scored pair
#: unless the sketch erred by more than ``CERTIFY_MARGIN`` standard errors.
CERTIFY_MARGIN = 2.0
#: Rows that cannot be certified are scored exactly against every slot (``r x n x m`` flops
#: each, and ``n`` edges each in the sparse assignment). If more than this fraction of rows is
#: uncertain, the sketch is too coarse for the pair of models: use the dense path instead.
DENSE_IF_UNCERTAIN = 0.05

#: ``(reference_features, model_features, role)``, optionally with a fourth element
#: ``(reference_row_factors, model_row_factors)`` (``[n]`` each, or ``None``): the term's
#: similarity of slots ``i``, ``j`` is then ``w_a[i] w_t[j] <a_i, t_j>``, e.g. cosines from
#: the raw features and their inverse norms, without normalized copies of the features.
Term = Tuple


def _parts(term):
    """``(a, t, role, w_a, w_t)`` of a term with or without row factors."""
    a, t, role = term[:3]
    w_a, w_t = term[3] if len(term) > 3 and term[3] is not None else (None, None)
    return a, t, role, w_a, w_t


def _weighted(sim: torch.Tensor, w_a: Optional[torch.Tensor], w_t: Optional[torch.Tensor],
              rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sim`` (an ``[r, c]`` block, or pair scores ``[p]`` with ``rows``/``cols``) times the
    row factors of its reference rows and model slots."""
    if w_a is None:
        return sim
    if rows is not None:  # pair scores
        return sim * (w_a[rows].to(sim.dtype) * w_t[cols].to(sim.dtype))
    return sim * w_a.to(sim.dtype)[:, None] * w_t.to(sim.dtype)[None, :]


def _work(x: torch.Tensor) -> torch.Tensor:
    """At least float32. Features may come in the checkpoint's dtype (bf16 views of the
    weights, no whole-tensor copies); every exact product below reads them through this, one
    chunk or gathered block at a time (sketches: see :func:`_sketched`)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def index_along(x: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(axis, index)``, by advanced indexing for a 2-byte dtype along a later
    axis: torch's index_select has no fast kernel for that case (for float32 it is the
    faster)."""
    index = index.to(x.device)
    if axis != 0 and x.element_size() == 2:
        return x[(slice(None),) * axis + (index,)]
    return x.index_select(axis, index)


# Proxy rows per block, [512, n] float32 (28 MiB at n = 14336): fewer, larger parallel regions
# hold up far better than 128-row blocks when other processes compete for the cores.
_ROWS_PER_BLOCK = 512
_GROUPS = 16  # interleaved column groups of the blocked top-k
_PAIRS_PER_CHUNK = 1024  # gathered feature rows per chunk of exact pair scoring
_BLOCKED_ABOVE = 4096  # the dense path computes larger similarity matrices in row blocks
# Elements per chunk of the column-layout dot products (16 MiB of float32): 1 Mi-element chunks
# are faster on an idle machine but several times slower when other processes share the cores.
# (groups.CHUNK_ELEMENTS, 4x smaller, is the budget of the site sums' conversions: another loop.)
_DOT_CHUNK_ELEMENTS = 1 << 22


def _rows_per_chunk(width: int) -> int:
    """How many rows of ``width`` elements make one :data:`_DOT_CHUNK_ELEMENTS` chunk (>= 1)."""
    return max(1, _DOT_CHUNK_ELEMENTS // max(width, 1))


def match(
    terms: Sequence[Term],
    n: int,
    *,
    dense_below: Optional[int] = None,
    candidates: Optional[int] = None,
    sketch_dim: Optional[int] = None,
    search_dim: Optional[int] = None,
    margin: Optional[float] = None,
    seed: int = 0,
    include_identity: bool = True,
    name: str = "permutation",
    info: Optional[Dict] = None,
    margins: Optional[List[torch.Tensor]] = None,
) -> torch.Tensor:
    """``perm`` (``LongTensor[n]``) maximising the summed combined similarity of matched slots.

    ``terms``: ``(reference_features, model_features, role)`` with features ``[n, ...]``
    (flattened to ``[n, m]``; strided views and low-precision dtypes are fine: products are
    computed in at least float32) and ``role`` one of :data:`ROLES`.
    Options left at ``None`` take the module's constants (:data:`DENSE_BELOW`,
    :data:`CANDIDATES`, :data:`SKETCH_DIM`, :data:`SEARCH_DIM`, :data:`MARGIN`) at call time.
    ``include_identity=False`` leaves the diagonal out of the candidate graph (for tests: the
    graph may then have no perfect matching). Raises ``FloatingPointError`` (message prefixed
    by ``name``) on non-finite similarities.

    ``margins`` (a list, optional) receives a float64 tensor ``[n]``: per reference slot, its
    matched similarity minus the best similarity of any other model slot that was scored
    exactly in its row. The dense path scores every pair; the large-n path scores every pair
    that its sketch could not rule out (within ``margin`` standard errors of the row's best,
    and whole rows it could not certify), so a competitor close enough to tie is scored and a
    margin is never underestimated. ``inf`` where nothing else in the row was scored.
    """
    dense_below = DENSE_BELOW if dense_below is None else dense_below
    candidates = CANDIDATES if candidates is None else candidates
    sketch_dim = SKETCH_DIM if sketch_dim is None else sketch_dim
    search_dim = SEARCH_DIM if search_dim is None else search_dim
    margin = MARGIN if margin is None else margin
    info = {} if info is None else info
    terms = [(a.reshape(n, -1), t.reshape(n, -1), role, None if w_a is None else (w_a, w_t))
             for a, t, role, w_a, w_t in map(_parts, terms)]
    for _a, _t, role, weights in terms:
        if role not in ROLES:
            raise ValueError(f"unknown term role {role!r}; expected one of {ROLES}")
        if weights is not None and not all(w.shape == (n,) for w in weights):
            raise ValueError(f"row factors of a term must have shape ({n},)")
    if not terms:
        info["path"] = "empty"
        perm = torch.arange(n)
        if margins is not None:
            margins.append(torch.full((n,), math.inf, dtype=torch.float64))
        return perm
    k = min(candidates, n)
    if n <= dense_below or k < 1:
        info["path"] = "dense"
        return _dense(terms, n, name, margins)
    d_search = max(1, min(search_dim, sketch_dim))
    return _sparse(terms, n, k, sketch_dim, d_search, margin, seed, include_identity, name, info,
                   margins)


# --------------------------------------------------------------------------- dense (exact)


def dense_similarity(terms: Sequence[Term], n: int) -> Optional[torch.Tensor]:
    """The full ``n x n`` combined similarity, computed exactly as ``solve_permutation`` did."""
    plain = fwd = inv = None

    def add(acc, value):
        return value if acc is None else acc + value

    for a, t, role, w_a, w_t in map(_parts, terms):
        sim = _weighted(a.reshape(n, -1) @ t.reshape(n, -1).T, w_a, w_t)
        if role == COVARIANT:
            fwd = add(fwd, sim)
        elif role == CONTRAGREDIENT:
            inv = add(inv, sim)
        else:
            plain = add(plain, sim)
    if fwd is not None and inv is not None:
        prod = fwd.double() * inv.double()
        invariant = 2 * torch.sign(prod) * prod.abs().sqrt()
        plain = add(plain.double() if plain is not None else None, invariant)
    else:  # scale not active on both sides: plain sum is already the right objective
        for extra in (fwd, inv):
            if extra is not None:
                plain = add(plain, extra)
    return plain


def _dense(terms: Sequence[Term], n: int, name: str,
           margins: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
    """Dense similarity + scipy. Up to ``_BLOCKED_ABOVE`` slots exactly the former code; above,
    the same similarities are computed in row blocks into one float64 matrix (the former code
    held up to ~6 ``n x n`` matrices: ~10 GB at n = 14336)."""
    from scipy.optimize import linear_sum_assignment

    if n <= _BLOCKED_ABOVE:
        sim = dense_similarity([(_work(a), _work(t), role, w) for a, t, role, w in terms], n)
    else:
        sim = _exact_rows(_split(terms), torch.arange(n, device=terms[0][0].device))
    if sim is None:
        if margins is not None:
            margins.append(torch.full((n,), math.inf, dtype=torch.float64))
        return torch.arange(n)
    cost = sim.double().cpu().numpy()
    if not torch.isfinite(torch.from_numpy(cost)).all():
        raise FloatingPointError(f"{name}: non-finite similarity matrix")
    rows, cols = linear_sum_assignment(cost, maximize=True)
    perm = torch.empty(n, dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    if margins is not None:
        full = torch.from_numpy(cost)
        matched = full.gather(1, perm[:, None])[:, 0]
        if n > 1:
            top = full.topk(2, dim=1)
            runner_up = torch.where(top.indices[:, 0] == perm, top.values[:, 1], top.values[:, 0])
            margins.append(matched - runner_up)
        else:
            margins.append(torch.full_like(matched, math.inf))
    return perm


# --------------------------------------------------------------------------- sketches


class _Sketch:
    """Seeded Gaussian sketches of one role's terms, for reference (``a``) and model (``t``).

    ``<a[i], t[j]>`` estimates the role's summed ``<a_i, t_j>`` without bias, with variance
    ``(|a_i|^2 |t_j|^2 + <a_i, t_j>^2) / d`` (measured on the sketches' own norms below).
    """

    def __init__(self, pairs, d: int, draws):
        self.a = self.t = None
        for a, t, w_a, w_t in pairs:
            r = next(draws)
            r = r.to(device=a.device, dtype=torch.promote_types(a.dtype, torch.float32))
            sa, st = _sketched(a, r).float(), _sketched(t, r).float()
            if w_a is not None:  # the sketch of the rows times their factors
                sa.mul_(w_a.to(sa)[:, None])
                st.mul_(w_t.to(st)[:, None])
            self.a = sa if self.a is None else self.a.add_(sa)
            self.t = st if self.t is None else self.t.add_(st)
        self.norm_a, self.norm_t = self.a.norm(dim=1), self.t.norm(dim=1)

    def finite(self) -> bool:
        return bool(torch.isfinite(self.a).all() and torch.isfinite(self.t).all())

    def pairs(self, cand: torch.Tensor):
        """Estimates ``[n, c]`` for model slots ``cand[n, c]``, and their Cauchy-Schwarz bound."""
        # index_select of the flattened index, not ``self.t[cand]``: advanced indexing of rows
        # by a 2-D index is several times slower.
        t = self.t.index_select(0, cand.reshape(-1)).view(*cand.shape, -1)
        est = torch.einsum("nd,ncd->nc", self.a, t)
        return est, self.norm_a[:, None] * self.norm_t.take(cand)


@functools.lru_cache(maxsize=2)
def _projections(seed: int, widths: Tuple[int, ...], d: int) -> Tuple[torch.Tensor, ...]:
    """The sketches' Gaussian projections ``[width, d] / sqrt(d)`` (float64, CPU), drawn in
    order from one generator seeded with ``seed``. Cached: every layer of a model asks for
    the same widths, and at activation widths (tokens x 128) drawing them per layer is a
    visible part of an activation merge."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(w, d, generator=gen, dtype=torch.float64) / math.sqrt(d) for w in widths)


def _same_terms(x, y) -> bool:
    """Do two term lists read the same tensors (views of one storage) with the same row
    factors? (The activation path's ``h`` rows are both its covariant and its
    contragredient term.)"""
    def same(p, q):
        return p is q or (p is not None and q is not None and p.shape == q.shape and
                          p.stride() == q.stride() and p.dtype == q.dtype and
                          p.device == q.device and p.data_ptr() == q.data_ptr())
    return len(x) == len(y) and all(all(same(p, q) for p, q in zip(tx, ty)) for tx, ty in zip(x, y))


def _sketched(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x @ r`` in ``r``'s dtype. A bfloat16 ``x`` is multiplied natively (bf16 inputs,
    float32 accumulation, one rounding of the result: ~0.2 % relative, far inside the
    sketch's own standard error, which is >= 1/sqrt(d)), faster than converting it on
    CPUs with bf16 instructions; float16 is converted a block at a time (rows, or storage
    rows of a transposed view such as down_proj's columns). Only sketches use this: every
    exact score is taken in float32."""
    if x.dtype == r.dtype:
        return x @ r
    if x.dtype == torch.bfloat16:
        return (x @ r.to(torch.bfloat16)).to(r.dtype)
    n, m = x.shape
    if _column_layout(x, x):  # x = storage.T, storage [m, n] contiguous: sum over row blocks
        storage = x.T
        step = _rows_per_chunk(n)
        out = torch.zeros(n, r.shape[1], dtype=r.dtype, device=x.device)
        for k0 in range(0, m, step):
            out.addmm_(storage[k0:k0 + step].to(r.dtype).T, r[k0:k0 + step])
        return out
    step = _rows_per_chunk(m)
    return torch.cat([x[s:s + step].to(r.dtype) @ r for s in range(0, n, step)])


def _split(terms: Sequence[Term]):
    """(plain, covariant, contragredient) term lists; one-sided scaled terms count as plain.
    Where the contragredient terms read the same rows as the covariant ones (the activation
    path's ``h``), the same list object is returned for both (``contra is cov``): their
    sketch and exact scores are then computed once."""
    parts = [_parts(term) for term in terms]
    by_role = {role: [(a, t, w_a, w_t) for a, t, r, w_a, w_t in parts if r == role] for role in ROLES}
    if not (by_role[COVARIANT] and by_role[CONTRAGREDIENT]):
        plain = [(a, t, w_a, w_t) for a, t, _, w_a, w_t in parts]  # the plain sum of all terms
        return plain, [], []
    cov, contra = by_role[COVARIANT], by_role[CONTRAGREDIENT]
    return by_role[PLAIN], cov, cov if _same_terms(cov, contra) else contra


def _unit(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return x / norm.clamp_min(torch.finfo(x.dtype).tiny ** 0.5)[:, None]


def _proxy_features(p: Optional[_Sketch], u: Optional[_Sketch], v: Optional[_Sketch], d: int):
    """Features whose products give the proxy ``p_a p_t^T + |q_a q_t^T|`` on ``d`` sketch dims.

    ``q = sqrt(|u| |v|) (u/|u| + v/|v|)``: ``|<q_a, q_t>|`` estimates
    ``w_i w_j |cos_u + cos_v|`` (``w = sqrt(|u| |v|)``), which is the exact
    ``2 sqrt(|X Y|)`` for a rescaled copy and, like it, ignores the scale and its sign.
    """
    p_a = p_t = q_a = q_t = None
    # The sketches' first ``d`` of ``D`` columns (each scaled by 1/sqrt(D)) estimate d/D of
    # an inner product: rescaled by sqrt(D/d) each, so that the proxy estimates the full
    # similarity and the certification compares it with exact scores on one scale.
    if p is not None:
        c = math.sqrt(p.a.shape[1] / d)
        p_a, p_t = p.a[:, :d] * c, p.t[:, :d] * c
    if u is not None and u is v:  # one sketch of both scaled terms: |cos_u + cos_v| = 2 |cos|
        c = math.sqrt(2 * u.a.shape[1] / d)
        q_a, q_t = u.a[:, :d] * c, u.t[:, :d] * c
    elif u is not None:
        c = math.sqrt(u.a.shape[1] / d)
        sides = []
        for su, sv in ((u.a[:, :d] * c, v.a[:, :d] * c), (u.t[:, :d] * c, v.t[:, :d] * c)):
            nu, nv = su.norm(dim=1), sv.norm(dim=1)
            sides.append((nu * nv).sqrt()[:, None] * (_unit(su, nu) + _unit(sv, nv)))
        q_a, q_t = sides
    return p_a, p_t, q_a, q_t


def _top_candidates(p_a, p_t, q_a, q_t, n: int, k: int):
    """Top-``k`` model slots per reference row of ``p_a p_t^T + |q_a q_t^T|`` (and their proxies,
    best first), computed in row blocks.

    Top-k of a block via group maxima (``torch.topk`` over all ``n`` columns costs more):
    the columns are split into ``_GROUPS`` interleaved groups of width ``w``; the ``k`` best
    elements of a row lie in its ``k`` groups with the largest maxima, so a top-k over the
    ``w`` group maxima and then over those groups' ``k * _GROUPS`` columns is exact.
    """
    device = (p_a if p_a is not None else q_a).device
    c = _GROUPS if n >= 4 * _GROUPS * k else 1
    w = -(-n // c)  # padded width: c * w >= n columns, the padding set to -inf
    pad = c * w - n

    def padded(x):
        return torch.cat([x, x.new_zeros(pad, x.shape[1])]).T.contiguous() if x is not None else None

    p_tt, q_tt = padded(p_t), padded(q_t)
    idx = torch.empty(n, k, dtype=torch.long, device=device)
    vals = torch.empty(n, k, device=device)
    rows = min(_ROWS_PER_BLOCK, n)
    buf = torch.empty(rows, c * w, device=device)
    offsets = torch.arange(c, device=device) * w
    for s in range(0, n, rows):
        e = min(n, s + rows)
        b = buf[: e - s]
        if q_tt is not None:
            torch.mm(q_a[s:e], q_tt, out=b)
            b.abs_()
            if p_tt is not None:
                b.addmm_(p_a[s:e], p_tt)
        else:
            torch.mm(p_a[s:e], p_tt, out=b)
        if pad:
            b[:, n:] = -math.inf
        if c == 1:
            torch.topk(b, k, dim=1, out=(vals[s:e], idx[s:e]))
            continue
        best_groups = torch.topk(b.view(e - s, c, w).amax(1), k, dim=1, sorted=False).indices
        cols = (best_groups[:, :, None] + offsets).reshape(e - s, k * c)
        top = torch.topk(b.gather(1, cols), k, dim=1)
        vals[s:e] = top.values
        idx[s:e] = cols.gather(1, top.indices)
    return idx, vals


# --------------------------------------------------------------------------- exact pair scores


def _column_layout(a: torch.Tensor, t: torch.Tensor) -> bool:
    """Are ``a``/``t`` ``[n, m]`` transposed views of contiguous ``[m, n]`` (e.g. down_proj)?"""
    return a.shape[1] > 1 and a.stride(0) == 1 and t.stride(0) == 1 and \
        a.T.is_contiguous() and t.T.is_contiguous()


def _as_range(rows: torch.Tensor) -> Optional[slice]:
    """``rows`` as a slice when it is a run of consecutive indices (no gather needed)."""
    if rows.numel() == 0:
        return None
    start, stop = int(rows[0]), int(rows[-1]) + 1
    if stop - start == rows.numel() and bool((rows.diff() == 1).all()):
        return slice(start, stop)
    return None


def _pair_dots(a: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``<a[rows[p]], t[cols[p]]>`` for every pair ``p`` (float64), without an ``n x n`` matrix."""
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=a.device)
    if rows.numel() == 0:
        return out
    if _column_layout(a, t):  # gather along the storage rows, a few of them at a time
        a_s, t_s = a.T, t.T  # [m, n]
        m = a_s.shape[0]
        for s in range(0, rows.shape[0], 16 * _PAIRS_PER_CHUNK):
            e = min(rows.shape[0], s + 16 * _PAIRS_PER_CHUNK)
            r, c = rows[s:e], cols[s:e]
            run = _as_range(r)
            step = _rows_per_chunk(e - s)
            acc = torch.zeros(e - s, dtype=torch.float64, device=a.device)
            for k0 in range(0, m, step):
                k1 = min(m, k0 + step)
                picked = _work(index_along(t_s[k0:k1], 1, c))
                picked = picked.mul_(a_s[k0:k1, run] if run is not None else index_along(a_s[k0:k1], 1, r))
                acc += picked.sum(0).double()
            out[s:e] = acc
        return out
    for s in range(0, rows.shape[0], _PAIRS_PER_CHUNK):
        e = min(rows.shape[0], s + _PAIRS_PER_CHUNK)
        run = _as_range(rows[s:e])
        ag = _work(a[run] if run is not None else a.index_select(0, rows[s:e]))
        tg = _work(t.index_select(0, cols[s:e]))
        out[s:e] = _rowwise_dots(ag, tg).double()
    return out


def _rowwise_dots(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``<a[p], t[p]>`` per row, in their dtype. Not ``einsum("pm,pm->p")``: torch runs that
    as a batch of 1 x m by m x 1 products, several times slower than this."""
    return torch.linalg.vecdot(a, t)


def _diagonal_dots(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``<a[i], t[i]>`` for every slot (float64)."""
    if _column_layout(a, t):
        a_s, t_s = a.T, t.T
        m, n = a_s.shape
        step = _rows_per_chunk(n)
        acc = torch.zeros(n, dtype=torch.float64, device=a.device)
        for k0 in range(0, m, step):
            k1 = min(m, k0 + step)
            acc += (_work(a_s[k0:k1]) * t_s[k0:k1]).sum(0).double()
        return acc
    if a.dtype == torch.promote_types(a.dtype, torch.float32):
        return _rowwise_dots(a, t).double()
    n, m = a.shape
    step = _rows_per_chunk(m)
    return torch.cat([_rowwise_dots(_work(a[s:s + step]), _work(t[s:s + step])).double()
                      for s in range(0, n, step)])


def _exact(split, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]) -> torch.Tensor:
    """Exact combined similarity of pairs ``(rows, cols)`` (both ``None``: the diagonal)."""
    plain, cov, contra = split

    def summed(pairs):
        total = None
        for a, t, w_a, w_t in pairs:
            if rows is None:
                dots = _diagonal_dots(a, t)
                if w_a is not None:
                    dots = dots * (w_a.to(dots) * w_t.to(dots))
            else:
                dots = _weighted(_pair_dots(a, t, rows, cols), w_a, w_t, rows, cols)
            total = dots if total is None else total + dots
        return total

    total = summed(plain)
    if cov:
        x = summed(cov)
        prod = x * (x if contra is cov else summed(contra))  # shared: x^2
        invariant = 2 * torch.sign(prod) * prod.abs().sqrt()
        total = invariant if total is None else total + invariant
    return total


# --------------------------------------------------------------------------- the large-n path


def _sparse(terms, n, k, d, d_search, margin, seed, include_identity, name, info,
            margins=None) -> torch.Tensor:
    certify_margin = CERTIFY_MARGIN
    times = info.setdefault("seconds", {})
    clock = [time.perf_counter()]

    def lap(stage):
        now = time.perf_counter()
        times[stage] = times.get(stage, 0.0) + now - clock[0]
        clock[0] = now

    def refuse():
        return FloatingPointError(f"{name}: non-finite similarity matrix")

    split = _split(terms)
    plain, cov, contra = split
    device = terms[0][0].device
    # A covariant and a contragredient term over the same rows (``_split``) share one sketch
    # (``v is u``): two independent sketches of one matrix cost twice and estimate no better.
    shared = bool(cov) and contra is cov
    sketched = plain + cov + ([] if shared else contra)
    draws = iter(_projections(seed, tuple(a.shape[1] for a, *_ in sketched), d))
    p = _Sketch(plain, d, draws) if plain else None
    u = _Sketch(cov, d, draws) if cov else None
    v = u if shared else _Sketch(contra, d, draws) if contra else None
    # A NaN/Inf feature makes its row's Gaussian sketch non-finite (almost surely).
    if not all(s.finite() for s in (p, u, v) if s is not None):
        raise refuse()
    lap("sketch")

    search = _proxy_features(p, u, v, d_search)
    idx, proxy = _top_candidates(*search, n, k)
    lap("candidates")

    # Candidate graph: top-k per row, plus the diagonal (a duplicate of a top-k entry is masked).
    arange = torch.arange(n, device=device)
    cand = torch.cat([idx, arange[:, None]], 1) if include_identity else idx
    valid = torch.ones_like(cand, dtype=torch.bool)
    if include_identity:
        valid[:, -1] = ~(idx == arange[:, None]).any(1)
    # The sketched objective of every candidate and a conservative standard error of it.
    estimate = torch.zeros(cand.shape, device=device)
    bound = torch.zeros(cand.shape, device=device)
    if p is not None:
        est, cs = p.pairs(cand)
        estimate += est
        bound += cs
    if u is not None:
        x, cx = u.pairs(cand)
        y, cy = (x, cx) if v is u else v.pairs(cand)
        xy = x * y
        estimate += 2 * torch.sign(xy) * xy.abs().sqrt()
        bound += 2 * (cx * cy).sqrt()
    error = bound * math.sqrt(2.0 / d)
    estimate = torch.where(valid, estimate, -math.inf)
    lap("candidate_estimates")

    # Round 1: exact score of each row's best estimate; then of every candidate whose
    # estimate is within ``margin`` standard errors of that exact score.
    top = estimate.argmax(1)
    top_col = cand.gather(1, top[:, None])[:, 0]
    on_diag = top_col == arange
    top_exact = torch.empty(n, dtype=torch.float64, device=device)
    if int(on_diag.sum()) > n // 4:
        top_exact[on_diag] = _exact(split, None, None)[on_diag]
    elif on_diag.any():
        r = arange[on_diag]
        top_exact[on_diag] = _exact(split, r, r)
    if (~on_diag).any():
        r = arange[~on_diag]
        top_exact[~on_diag] = _exact(split, r, top_col[~on_diag])
    if not torch.isfinite(top_exact).all():
        raise refuse()
    lap("exact_top")

    scored = torch.zeros_like(valid)
    scored[arange, top] = True
    contender = (estimate.double() + margin * error.double() >= top_exact[:, None]) & valid & ~scored
    rows_c, slots_c = torch.nonzero(contender, as_tuple=True)
    cols_c = cand[rows_c, slots_c]
    exact_c = _exact(split, rows_c, cols_c)
    if not torch.isfinite(exact_c).all():
        raise refuse()
    scored |= contender
    lap("exact_contenders")
    rows, cols, values = [arange, rows_c], [top_col, cols_c], [top_exact, exact_c]

    # Certify each row: could a model slot outside its top-k beat the best scored pair? The
    # proxy bounds the exact similarity from above (|cos_u + cos_v| >= 2 sqrt(cos_u cos_v)),
    # so not unless the k-th proxy plus ``CERTIFY_MARGIN`` standard errors (of a pair of
    # typical, i.e. RMS, model norm) reaches that pair's value.
    best = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
    best.scatter_reduce_(0, rows_c, exact_c, "amax")
    best = torch.maximum(best, top_exact)
    spread = torch.zeros(n, device=device)
    for f_a, f_t in zip(search[::2], search[1::2]):
        if f_a is not None:
            spread += f_a.norm(dim=1) * f_t.square().sum(1).mean().sqrt()
    reach = proxy[:, -1].double() + certify_margin * math.sqrt(2.0 / d_search) * spread.double()
    uncertain = best < reach
    n_uncertain = int(uncertain.sum())
    info.update(path="rowwise", n=n, candidates=k, sketch_dim=d, search_dim=d_search,
                contenders=int(rows_c.numel()), uncertain_rows=n_uncertain)
    if n_uncertain > DENSE_IF_UNCERTAIN * n:
        info.update(path="dense_uncertain", exact_pairs=n * n)
        perm = _dense(terms, n, name, margins)
        lap("dense_uncertain")
        return perm
    if n_uncertain:
        # Those rows are scored exactly against every model slot; all of it joins the graph.
        r_u = arange[uncertain]
        full = _exact_rows(split, r_u)
        if not torch.isfinite(full).all():
            raise refuse()
        keep = ~uncertain[rows[0]], ~uncertain[rows[1]]
        rows = [rows[0][keep[0]], rows[1][keep[1]], r_u[:, None].expand(-1, n).reshape(-1)]
        cols = [cols[0][keep[0]], cols[1][keep[1]], arange.repeat(n_uncertain)]
        values = [values[0][keep[0]], values[1][keep[1]], full.reshape(-1)]
        scored[uncertain] = True  # nothing left to score in those rows
        lap("exact_uncertain_rows")
    rows, cols, values = (torch.cat(x).cpu() for x in (rows, cols, values))
    info["exact_pairs"] = int(rows.numel())
    perm = _rowwise_best(n, rows, cols, values)
    lap("rowwise")
    if perm is not None:
        if margins is not None:
            margins.append(_scored_margins(n, perm, rows, cols, values))
        return perm

    # Collisions: score every candidate exactly and solve the sparse assignment on them.
    rest_r, rest_s = torch.nonzero(valid & ~scored, as_tuple=True)
    rest_c = cand[rest_r, rest_s]
    exact_rest = _exact(split, rest_r, rest_c)
    if not torch.isfinite(exact_rest).all():
        raise refuse()
    lap("exact_rest")
    rows = torch.cat([rows, rest_r.cpu()])
    cols = torch.cat([cols, rest_c.cpu()])
    values = torch.cat([values, exact_rest.cpu()])
    info["exact_pairs"] += int(rest_r.numel())
    perm = _sparse_assignment(n, rows, cols, values)
    lap("sparse_assignment")
    if perm is None:
        info["path"] = "dense_fallback"
        perm = _dense(terms, n, name, margins)
        lap("dense_fallback")
        return perm
    info["path"] = "sparse"
    if margins is not None:
        margins.append(_scored_margins(n, perm, rows, cols, values))
    return perm


def _scored_margins(n, perm, rows, cols, values) -> torch.Tensor:
    """Per row: the matched pair's score minus the best other scored pair's (``inf``: none)."""
    matched = cols == perm[rows]
    score = torch.full((n,), math.nan, dtype=torch.float64)
    score.scatter_(0, rows[matched], values[matched])
    other = torch.full((n,), -math.inf, dtype=torch.float64)
    other.scatter_reduce_(0, rows[~matched], values[~matched], "amax")
    return score - other


def _exact_rows(split, rows: torch.Tensor) -> torch.Tensor:
    """Exact similarities ``[r, n]`` (float64) of reference ``rows`` to every model slot, computed
    in row blocks (no float32 ``n x n`` temporaries)."""
    plain, cov, contra = split
    any_t = (plain or cov)[0][1]  # (a, t, w_a, w_t)
    out = torch.empty(rows.numel(), any_t.shape[0], dtype=torch.float64, device=any_t.device)

    def summed(pairs, r):
        total = None
        for a, t, w_a, w_t in pairs:
            run = _as_range(r)
            rows_a = _work(a[run] if run is not None else a.index_select(0, r))
            if t.dtype == rows_a.dtype:
                sim = (rows_a @ t.T).double()
            else:  # a low-precision model side: converted a block of slots at a time
                step = _rows_per_chunk(t.shape[1])
                sim = torch.cat([rows_a @ _work(t[j:j + step]).T for j in range(0, t.shape[0], step)],
                                dim=1).double()
            if w_a is not None:
                sim = _weighted(sim, w_a[r], w_t)
            total = sim if total is None else total.add_(sim)
        return total

    shared = bool(cov) and contra is cov
    for s in range(0, rows.numel(), _ROWS_PER_BLOCK):
        r = rows[s:s + _ROWS_PER_BLOCK]
        sim = summed(plain, r)
        if cov:
            x = summed(cov, r)
            prod = x * x if shared else x.mul_(summed(contra, r))
            invariant = 2 * torch.sign(prod) * prod.abs().sqrt()
            sim = invariant if sim is None else sim.add_(invariant)
        out[s:s + r.numel()] = sim
    return out


def _rowwise_best(n, rows, cols, values) -> Optional[torch.Tensor]:
    """Each row's best scored column, if those columns are all distinct (else ``None``)."""
    best = torch.full((n,), -math.inf, dtype=torch.float64)
    best.scatter_reduce_(0, rows, values, reduce="amax")
    # Among a row's tied best pairs take the first scored.
    total = rows.numel()
    position = torch.where(values == best[rows], torch.arange(total), total)
    first = torch.full((n,), total, dtype=torch.long).scatter_reduce_(0, rows, position, "amin")
    if (first == total).any():
        return None
    perm = cols[first]
    if torch.unique(perm).numel() != n:
        return None
    return perm


def _sparse_assignment(n, rows, cols, values) -> Optional[torch.Tensor]:
    """Maximum-weight perfect matching on the scored pairs (``None`` if there is none)."""
    import numpy as np
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    _, first = np.unique((rows * n + cols).numpy(), return_index=True)
    r, c, v = rows.numpy()[first], cols.numpy()[first], values.numpy()[first]
    # LAPJVsp needs non-zero weights; a constant shift does not change a perfect matching.
    weights = v - v.min() + 1.0
    graph = csr_matrix((weights, (r, c)), shape=(n, n))
    try:
        row_ind, col_ind = min_weight_full_bipartite_matching(graph, maximize=True)
    except ValueError:  # no perfect matching on these pairs
        return None
    perm = torch.empty(n, dtype=torch.long)
    perm[torch.as_tensor(row_ind, dtype=torch.long)] = torch.as_tensor(col_ind, dtype=torch.long)
    return perm

"""The assignment solver: dense for small n (bit for bit as before), sketch + candidates for
large n (exact on planted permutations and near-identical pairs, dense when unsure)."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from mergekit_symalign import assignment, groups
from mergekit_symalign.assignment import CONTRAGREDIENT, COVARIANT, PLAIN, match

from .conftest import make_model

SPARSE = dict(dense_below=0)  # force the large-n path at test sizes


def _mlp(n, m, seed=0):
    """gate/up rows [n, m] and down_proj [m, n] with a few dozen-dimensional features."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, m, generator=g), torch.randn(n, m, generator=g),
            torch.randn(m, n, generator=g))


def _terms(reference, model):
    """Terms as solve_permutation builds them for an MLP with its scale: down is a view of
    columns ([n, m] with strides (1, n)), exercising the column layout."""
    (ga, ua, da), (gt, ut, dt) = reference, model
    return [(ga, gt, PLAIN), (ua, ut, COVARIANT), (da.T, dt.T, CONTRAGREDIENT)]


def _planted(reference, seed=1, noise=0.0):
    """Model slot j holds reference slot sigma[j], up scaled by s[j] and down by 1/s[j]."""
    gate, up, down = reference
    n = gate.shape[0]
    g = torch.Generator().manual_seed(seed)
    sigma = torch.randperm(n, generator=g)
    mag = torch.exp(torch.empty(n).uniform_(math.log(0.5), math.log(2.0), generator=g))
    s = mag * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    model = (gate[sigma], up[sigma] * s[:, None], (down[:, sigma] / s).contiguous())
    if noise:
        model = tuple(t + noise * torch.randn(t.shape, generator=g) for t in model)
    return model, torch.argsort(sigma)


def _reference(terms, n):
    """solve_permutation's similarity and assignment before assignment.py existed: a frozen
    copy of that code (assignment.dense_similarity must keep giving the same bits)."""
    plain = fwd = inv = None

    def add(acc, value):
        return value if acc is None else acc + value

    for a, t, role in terms:
        sim = a.reshape(n, -1) @ t.reshape(n, -1).T
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
    else:
        for extra in (fwd, inv):
            if extra is not None:
                plain = add(plain, extra)
    cost = plain.double().numpy()
    rows, cols = linear_sum_assignment(cost, maximize=True)
    perm = torch.empty(n, dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm, cost


def _objective(cost, perm):
    return float(cost[np.arange(len(perm)), perm.numpy()].sum())


# --------------------------------------------------------------------------- small n: dense


@pytest.mark.parametrize("roles", [(PLAIN, COVARIANT, CONTRAGREDIENT), (PLAIN, PLAIN, PLAIN),
                                   (PLAIN, COVARIANT, PLAIN)])
def test_small_n_is_the_dense_scipy_path_bit_for_bit(roles):
    reference = _mlp(300, 24, seed=2)
    model, _ = _planted(reference, noise=1.5)  # noisy: many near-ties, a real assignment problem
    terms = [(a, t, role) for (a, t, _), role in zip(_terms(reference, model), roles)]
    info = {}
    found = match(terms, 300, info=info)
    assert info["path"] == "dense"
    assert torch.equal(found, _reference(terms, 300)[0])


def _llama_mlp(seed):
    """The MLP block of a tiny Llama's spec and its layer 0 tensors."""
    from mergekit_symalign.statedict import spec_for_config

    model = make_model("llama", seed=seed)
    mlp = next(b for b in spec_for_config(model.config).blocks if b.name == "mlp")
    layer = {k.split("layers.0.", 1)[1]: v for k, v in model.state_dict().items() if "layers.0." in k}
    return mlp, layer


def _spy(monkeypatch, name):
    """Record the arguments of ``assignment.<name>`` while calling through."""
    calls = []
    original = getattr(assignment, name)
    monkeypatch.setattr(assignment, name, lambda *a, **kw: calls.append((a, kw)) or original(*a, **kw))
    return calls


def test_solve_permutation_matches_the_former_dense_solver(monkeypatch):
    mlp, layer = _llama_mlp(seed=10)
    gen = torch.Generator().manual_seed(3)
    moved = groups.apply(mlp.main, groups.random_element(mlp.main, gen), layer)
    noisy = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=gen) for k, v in moved.items()}
    calls = _spy(monkeypatch, "match")
    found = groups.solve_permutation(mlp.main, layer, noisy, scale=mlp.scale)
    (terms, n), _kw = calls[0]
    assert [role for _, _, role in terms] == [PLAIN, COVARIANT, CONTRAGREDIENT]  # gate, up, down
    assert torch.equal(found, _reference(terms, n)[0])


# --------------------------------------------------------------------------- large n: sparse


@pytest.mark.parametrize("n,m", [(256, 48), (2500, 64)])
def test_planted_permutation_with_signed_scales_is_recovered_exactly(n, m):
    reference = _mlp(n, m, seed=3)
    model, truth = _planted(reference, seed=4)
    info = {}
    found = match(_terms(reference, model), n, info=info, **SPARSE)
    assert torch.equal(found, truth)
    assert info["path"] == "rowwise" and info["uncertain_rows"] == 0
    assert info["exact_pairs"] < 2 * n  # no n x n work


def test_identity_is_found_on_reference_plus_noise():
    n, m = 1500, 64
    reference = _mlp(n, m, seed=5)
    g = torch.Generator().manual_seed(6)
    model = tuple(x + 0.05 * torch.randn(x.shape, generator=g) for x in reference)
    info = {}
    found = match(_terms(reference, model), n, info=info, **SPARSE)
    assert torch.equal(found, torch.arange(n))
    assert info["path"] == "rowwise" and info["exact_pairs"] < 2 * n


def test_large_n_path_through_solve_permutation(monkeypatch):
    """The module constant moves the threshold (defaults are read at call time)."""
    mlp, layer = _llama_mlp(seed=11)
    gen = torch.Generator().manual_seed(3)
    perm = groups.random_element(mlp.main, gen)
    scale = groups.random_element(mlp.scale, gen, scale_range=(0.5, 2.0))
    moved = groups.apply(mlp.scale, scale, groups.apply(mlp.main, perm, layer))
    monkeypatch.setattr(assignment, "DENSE_BELOW", 0)
    calls = _spy(monkeypatch, "_sparse")
    found = groups.solve_permutation(mlp.main, layer, moved, scale=mlp.scale)
    assert calls and torch.equal(found, torch.argsort(perm))


@pytest.mark.parametrize("path", ["dense", "sparse", "blocked_dense", "uncertain_rows"])
def test_bfloat16_features_are_scored_in_float32_chunks(path, monkeypatch):
    """Features in the checkpoint's dtype (no whole float32 copies): every exact score is
    taken in float32 a block at a time (sketches natively in bf16), and the result equals
    matching the float32-converted features, on every path, in both layouts."""
    n, m = 600, 40
    reference = tuple(x.bfloat16() for x in _mlp(n, m, seed=26))
    model, truth = _planted(tuple(x.float() for x in reference), seed=27, noise=0.05)
    model = tuple(x.bfloat16() for x in model)
    low = _terms(reference, model)
    assert low[2][0].dtype == torch.bfloat16 and low[2][0].stride(0) == 1  # column layout
    high = [(a.float(), t.float(), role) for a, t, role in low]
    monkeypatch.setattr(assignment, "_DOT_CHUNK_ELEMENTS", 1000)  # many blocks per product
    options = {"dense": dict(dense_below=n), "sparse": SPARSE, "blocked_dense": dict(dense_below=n),
               "uncertain_rows": dict(SPARSE, candidates=1)}[path]
    if path == "blocked_dense":
        monkeypatch.setattr(assignment, "_BLOCKED_ABOVE", 100)
    info_low, info_high = {}, {}
    found = match(low, n, info=info_low, **options)
    assert torch.equal(found, match(high, n, info=info_high, **options))
    assert torch.equal(found, truth)
    assert info_low["path"] == info_high["path"] == {"dense": "dense", "blocked_dense": "dense"}.get(
        path, info_low["path"])
    if path == "uncertain_rows":
        assert info_low["uncertain_rows"] > 0
    # Sketches (estimates by construction) of bf16 features: one bf16 rounding of the product
    r = torch.randn(m, 8, generator=torch.Generator().manual_seed(1))
    for feature in (low[2][1], low[0][1]):  # column layout and rows
        sketch_low, sketch_high = assignment._sketched(feature, r), feature.float() @ r
        assert sketch_low.dtype == torch.float32
        assert float((sketch_low - sketch_high).norm() / sketch_high.norm()) < 1e-2


def test_collisions_go_to_the_sparse_assignment_and_reach_the_dense_optimum():
    """Duplicated reference neurons both prefer the same model neuron: rows collide."""
    n, m = 600, 48
    gate, up, down = _mlp(n, m, seed=7)
    dup = torch.arange(0, 40, 2)
    for x in (gate, up):
        x[dup + 1] = x[dup]
    down[:, dup + 1] = down[:, dup]
    reference = (gate, up, down)
    model, _ = _planted(reference, seed=8, noise=0.02)
    terms = _terms(reference, model)
    info = {}
    found = match(terms, n, info=info, **SPARSE)
    assert info["path"] == "sparse"
    assert sorted(found.tolist()) == list(range(n))
    expected, cost = _reference(terms, n)
    assert _objective(cost, found) == pytest.approx(_objective(cost, expected), rel=1e-9)


def test_no_perfect_matching_on_candidates_falls_back_to_dense():
    """Three identical reference neurons and a single twin of them in the model: the three rows
    are certain of their best slot (the twin) and, with two candidates per row and no
    diagonal, share the same two candidate slots: the candidate graph has no perfect matching."""
    n, m = 400, 64
    gate, up, down = _mlp(n, m, seed=9)
    for i in (1, 2):
        gate[i], up[i], down[:, i] = gate[0], up[0], down[:, 0]
    reference = (gate, up, down)
    (tg, tu, td), truth = _planted(reference, seed=10)
    g = torch.Generator().manual_seed(11)
    for j in truth[1:3].tolist():  # the twins of reference neurons 1 and 2 become unrelated neurons
        tg[j], tu[j], td[:, j] = (torch.randn(m, generator=g) for _ in range(3))
    terms = _terms(reference, (tg, tu, td))
    info = {}
    found = match(terms, n, candidates=2, include_identity=False, info=info, **SPARSE)
    assert info["path"] == "dense_fallback" and info["uncertain_rows"] == 0
    assert torch.equal(found, _reference(terms, n)[0])


def test_unclear_pairs_use_the_dense_path():
    """Target far from any permutation of the reference: the sketch cannot certify its
    candidates, and the result is the dense optimum."""
    n, m = 500, 256
    reference = _mlp(n, m, seed=11)
    model, _ = _planted(reference, seed=12, noise=3.0)
    terms = _terms(reference, model)
    info = {}
    found = match(terms, n, info=info, **SPARSE)
    assert info["path"] == "dense_uncertain"
    assert torch.equal(found, _reference(terms, n)[0])


def test_uncertain_rows_are_scored_against_every_slot():
    """A few ambiguous rows: scored exactly against all slots, the rest stays sparse."""
    n, m = 800, 64
    reference = _mlp(n, m, seed=13)
    model, _ = _planted(reference, seed=14)
    gate, up, down = (t.clone() for t in model)
    g = torch.Generator().manual_seed(15)
    j = torch.arange(0, n, 40)  # 20 model neurons replaced by weak, noisy copies
    gate[j] = 0.2 * gate[j] + torch.randn(len(j), m, generator=g)
    up[j] = 0.2 * up[j] + torch.randn(len(j), m, generator=g)
    down[:, j] = 0.2 * down[:, j] + torch.randn(m, len(j), generator=g)
    terms = _terms(reference, (gate, up, down))
    info = {}
    found = match(terms, n, info=info, **SPARSE)
    assert 0 < info["uncertain_rows"] <= 0.25 * n
    expected, cost = _reference(terms, n)
    assert _objective(cost, found) == pytest.approx(_objective(cost, expected), rel=1e-9)


def test_exact_pair_scores_in_both_layouts():
    n, m = 300, 20
    g = torch.Generator().manual_seed(16)
    a, t = torch.randn(n, m, generator=g), torch.randn(n, m, generator=g)
    rows, cols = torch.randint(0, n, (500,), generator=g), torch.randint(0, n, (500,), generator=g)
    full = (a.double() @ t.double().T)
    for fa, ft in ((a, t), (a.T.contiguous().T, t.T.contiguous().T)):
        assert torch.allclose(assignment._pair_dots(fa, ft, rows, cols), full[rows, cols], atol=1e-4)
        assert torch.allclose(assignment._diagonal_dots(fa, ft), full.diagonal(), atol=1e-4)


def test_one_sided_scale_terms_are_plain_and_solved():
    """Covariant terms without contragredient ones: the objective is the plain sum."""
    n, m = 700, 48
    gate, up, _down = _mlp(n, m, seed=17)
    sigma = torch.randperm(n, generator=torch.Generator().manual_seed(18))
    terms = [(gate, gate[sigma], PLAIN), (up, up[sigma], COVARIANT)]
    info = {}
    found = match(terms, n, info=info, **SPARSE)
    assert info["path"] == "rowwise"
    assert torch.equal(found, torch.argsort(sigma))
    assert torch.equal(found, _reference(terms, n)[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("options", [{}, SPARSE], ids=["dense", "sparse"])
def test_non_finite_inputs_are_refused(bad, options):
    n, m = 300, 16
    reference = _mlp(n, m, seed=19)
    model, _ = _planted(reference, seed=20)
    model[2][3, 5] = bad
    with pytest.raises(FloatingPointError, match=r"mlp\.neurons: non-finite"):
        match(_terms(reference, model), n, name="mlp.neurons", **options)


def test_seeded_and_deterministic():
    n, m = 900, 32
    reference = _mlp(n, m, seed=21)
    model, _ = _planted(reference, seed=22, noise=0.3)
    terms = _terms(reference, model)
    assert torch.equal(match(terms, n, seed=3, **SPARSE), match(terms, n, seed=3, **SPARSE))


# --------------------------------------------------------------------------- apply fast path


@pytest.mark.parametrize("chunk", [None, 100], ids=["whole", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_apply_along_axis_is_bit_identical_to_gather_act_scatter(dtype, chunk, monkeypatch):
    """groups.apply moves covering sites along their axis directly, and continuous elements a
    chunk of slots at a time; same bits as gathering, acting and scattering whole tensors."""
    from mergekit_symalign.architectures import Geometry, layer_spec
    from mergekit_symalign.groups import _working, act, gather, scatter
    from mergekit_symalign.spec import random_transform

    g = Geometry("llama", 48, 6, 2, 8, 80, 8, 10000.0)
    spec = layer_spec("llama", g)
    gen = torch.Generator().manual_seed(23)
    shapes = {"self_attn.q_proj.weight": (48, 48), "self_attn.k_proj.weight": (16, 48),
              "self_attn.v_proj.weight": (16, 48), "self_attn.o_proj.weight": (48, 48),
              "mlp.gate_proj.weight": (80, 48), "mlp.up_proj.weight": (80, 48),
              "mlp.down_proj.weight": (48, 80)}
    layer = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    if chunk:  # several chunks per tensor (one or two slots each)
        monkeypatch.setattr(groups, "CHUNK_ELEMENTS", chunk)
    for sym, element in random_transform(spec, gen).steps:
        fast = groups.apply(sym, element, layer)
        slow = dict(layer)
        for site in sym.sites:
            if site.tensor in slow:
                moved = act(sym.kind, element, gather(_working(slow[site.tensor]), site),
                            site.contragredient, site.offset)
                slow[site.tensor] = scatter(slow[site.tensor], site, moved)
        for name in layer:
            assert fast[name].dtype == slow[name].dtype
            assert torch.equal(fast[name], slow[name]), (sym.name, name)
        layer = fast


def test_blocked_dense_similarity_for_large_n(monkeypatch):
    """Above _BLOCKED_ABOVE the dense path builds the similarity in row blocks (one float64
    n x n matrix instead of ~6): same permutation as the former code."""
    n, m = 300, 24
    reference = _mlp(n, m, seed=24)
    model, _ = _planted(reference, seed=25, noise=1.5)
    terms = _terms(reference, model)
    blocks = _spy(monkeypatch, "_exact_rows")
    monkeypatch.setattr(assignment, "_BLOCKED_ABOVE", 100)
    monkeypatch.setattr(assignment, "_ROWS_PER_BLOCK", 64)
    expected, cost = _reference(terms, n)
    found = match(terms, n, dense_below=n)
    assert blocks and torch.equal(found, expected)
    blocked = assignment._exact_rows(assignment._split(terms), torch.arange(n))
    assert torch.allclose(blocked, torch.from_numpy(cost), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_index_along_is_index_select(dtype):
    """index_along takes another kernel for 2-byte dtypes along a later axis: same values."""
    x = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
    for axis in range(3):
        index = torch.randperm(x.shape[axis], generator=torch.Generator().manual_seed(axis))
        got = assignment.index_along(x, axis, index)
        assert got.is_contiguous() and torch.equal(got, x.index_select(axis, index)), axis


def test_search_proxy_estimates_the_whole_similarity():
    """The candidate search reads the first ``search_dim`` of ``sketch_dim`` sketch columns:
    its proxies must estimate the full similarity (the certification compares them with exact
    scores). They used to estimate search_dim / sketch_dim of it."""
    n, m = 400, 256
    gate, up, down = _mlp(n, m)
    terms = _terms((gate, up, down), (gate, up, down))  # a copy: exact diagonal known
    split = assignment._split(terms)
    exact = assignment._exact(split, None, None).float()
    for d, d_search in ((64, 32), (64, 64), (128, 32)):
        draws = iter(assignment._projections(0, tuple(a.shape[1] for pairs in split for a, *_ in pairs), d))
        sketches = [assignment._Sketch(pairs, d, draws) if pairs else None for pairs in split]
        p_a, p_t, q_a, q_t = assignment._proxy_features(*sketches, d_search)
        proxy = (p_a * p_t).sum(1) + (q_a * q_t).sum(1).abs()
        ratio = float(proxy.mean() / exact.mean())
        assert abs(ratio - 1) < 0.1, (d, d_search, ratio)


def test_shared_sketch_of_one_matrix_as_both_scaled_terms():
    """The activation matcher passes the same ``h`` rows as its covariant and contragredient
    term: they share one sketch (``v is u``), whose search proxy must still estimate the whole
    similarity (2 |cos| for that pair of terms, not 4 |cos|), and the matcher must still find
    the planted permutation with the same margins as the dense path."""
    n, m = 700, 96
    truth, weighted = _normalized_terms(n, m, seed=21, weighted=True)
    gate_term, (up, ut, _role, up_w) = weighted[0], weighted[1]  # one object, as match_neurons
    terms = [gate_term, (up, ut, COVARIANT, up_w), (up, ut, CONTRAGREDIENT, up_w)]
    split = assignment._split(terms)
    assert assignment._same_terms(split[1], split[2]) and split[2] is split[1]
    exact = assignment._exact(split, torch.arange(n), truth).float()  # the true pairs
    for d, d_search in ((128, 128), (128, 64)):
        draws = iter(assignment._projections(0, (m, m), d))
        p, u = assignment._Sketch(split[0], d, draws), assignment._Sketch(split[1], d, draws)
        p_a, p_t, q_a, q_t = assignment._proxy_features(p, u, u, d_search)
        proxy = (p_a * p_t[truth]).sum(1) + (q_a * q_t[truth]).sum(1).abs()
        ratio = float(proxy.mean() / exact.mean())
        assert abs(ratio - 1) < 0.1, (d, d_search, ratio)
    sparse, dense, info = [], [], {}
    perm = assignment.match(terms, n, dense_below=0, sketch_dim=128, search_dim=128,
                            margins=sparse, info=info)
    assert info["path"] in ("rowwise", "sparse")
    assert torch.equal(perm, truth)
    assert torch.equal(assignment.match(terms, n, dense_below=n, margins=dense), truth)
    assert bool((sparse[0] >= dense[0] - 1e-9).all())


def _normalized_terms(n, m, seed, weighted):
    """Cosine terms (as the activation matcher builds them) of a planted copy with signed
    scales: by row factors, or on explicitly normalized copies."""
    (gate, up, _down) = _mlp(n, m, seed)
    model, truth = _planted((gate, up, up.T.contiguous()), seed=seed + 1, noise=0.3)
    gt, ut = model[0], model[1]
    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    inv = lambda x, c=1.0: c / x.norm(dim=1)  # noqa: E731
    if weighted:
        return truth, [(gate, gt, PLAIN, (inv(gate, 2 ** 0.5), inv(gt, 2 ** 0.5))),
                       (up, ut, COVARIANT, (inv(up), inv(ut))), (up, ut, CONTRAGREDIENT, (inv(up), inv(ut)))]
    return truth, [(unit(gate) * 2 ** 0.5, unit(gt) * 2 ** 0.5, PLAIN),
                   (unit(up), unit(ut), COVARIANT), (unit(up), unit(ut), CONTRAGREDIENT)]


@pytest.mark.parametrize("options", [dict(dense_below=10_000), SPARSE])
def test_row_factors_equal_normalized_features_and_margins_are_not_underestimated(options):
    n, m = 300, 96
    truth, weighted = _normalized_terms(n, m, 0, True)
    _, normalized = _normalized_terms(n, m, 0, False)
    margins_w, margins_n, info = [], [], {}
    found = match(weighted, n, margins=margins_w, info=info, **options)
    assert info["path"] == ("dense" if options is not SPARSE else info["path"])
    assert torch.equal(found, truth)
    assert torch.equal(found, match(normalized, n, margins=margins_n, **options))
    assert torch.allclose(margins_w[0], margins_n[0], atol=1e-5)
    # Against the dense similarity: the matched score minus the best other in each row.
    sim = assignment.dense_similarity(normalized, n).double()
    matched = sim[torch.arange(n), found]
    other = sim.clone()
    other[torch.arange(n), found] = -math.inf
    dense_margin = matched - other.max(1).values
    if options is SPARSE:  # only the pairs the sketch could not rule out were scored
        assert info["path"] in ("rowwise", "sparse") and (margins_w[0] >= dense_margin - 1e-5).all()
    else:
        assert torch.allclose(margins_w[0], dense_margin, atol=1e-5)
    assert (margins_w[0] > 0).all()

"""Every symmetry: a random group element keeps the logits and the solver undoes it exactly."""

import pytest
import torch

from mergekit_symalign import groups
from mergekit_symalign.groups import Kind
from mergekit_symalign.spec import Switches, align_layer, random_transform
from mergekit_symalign.statedict import align_state_dict, scramble_state_dict, spec_for_config

from .conftest import ARCH_CONFIGS, make_model, scale_of

IDS = torch.randint(0, 96, (2, 23), generator=torch.Generator().manual_seed(3))


def _logits(model, state_dict):
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return model(IDS).logits


def _max_rel_diff(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) / (scale_of(b[k]) + 1e-12) for k in b)


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_full_exact_group_keeps_logits_and_is_undone(arch):
    model = make_model(arch, seed=5)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    before = _logits(model, sd)
    scrambled, _ = scramble_state_dict(sd, model.config, seed=21)
    # the scramble really moved the weights ...
    assert _max_rel_diff(scrambled, sd) > 0.1
    # ... and did not change the function
    after = _logits(model, scrambled)
    assert float((after - before).abs().max()) <= 1e-4 * scale_of(before)
    aligned, _ = align_state_dict(sd, scrambled, model.config)
    assert _max_rel_diff(aligned, sd) < 1e-5


@pytest.mark.parametrize("kind", ["permutation", "rotation", "scaling"])
def test_each_switch_alone_is_exact_and_solved(kind):
    model = make_model("qwen2", seed=6)  # q/k/v biases exercise the bias sites
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    only = Switches(**{k: k == kind for k in ("permutation", "rotation", "scaling")})
    scrambled, _ = scramble_state_dict(sd, model.config, seed=4, switches=only)
    assert _max_rel_diff(scrambled, sd) > 0.05
    before, after = _logits(model, sd), _logits(model, scrambled)
    assert float((after - before).abs().max()) <= 1e-4 * scale_of(before)
    aligned, _ = align_state_dict(sd, scrambled, model.config, switches=only)
    assert _max_rel_diff(aligned, sd) < 1e-5
    # With that kind switched off the scramble cannot be undone.
    off = Switches(**{k: k != kind for k in ("permutation", "rotation", "scaling")})
    not_aligned, _ = align_state_dict(sd, scrambled, model.config, switches=off)
    assert _max_rel_diff(not_aligned, sd) > 1e-2


def test_solution_is_the_exact_inverse_element():
    model = make_model("llama", seed=8)
    spec = spec_for_config(model.config)
    layer = {k.split("layers.0.", 1)[1]: v for k, v in model.state_dict().items() if "layers.0." in k}
    g = random_transform(spec, torch.Generator().manual_seed(1))
    moved = g.apply(layer)
    solved = align_layer(spec, layer, moved)
    by_name = {s.name: e for s, e in g.steps}
    found = {s.name: e for s, e in solved.steps}
    assert list(found) == list(by_name)
    # permutations: the inverses of the scramble's
    for name in ("mlp.neurons", "attn.kv_heads"):
        assert torch.equal(found[name], torch.argsort(by_name[name]))
    # the scale the scramble applied after permuting, undone before permuting back
    assert torch.allclose(found["mlp.neuron_scale"],
                          1 / by_name["mlp.neuron_scale"][torch.argsort(by_name["mlp.neurons"])],
                          rtol=1e-4)
    # and the whole solved element undoes the scramble exactly
    back = solved.apply(moved)
    assert _max_rel_diff(back, layer) < 1e-5


def test_full_qk_rotation_changes_rope_model_but_not_without_rope():
    model = make_model("llama", seed=9)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    before = _logits(model, sd)
    scrambled, _ = scramble_state_dict(sd, model.config, seed=2, qk_rotation="full")
    after = _logits(model, scrambled)
    assert float((after - before).abs().max()) > 1e-3 * scale_of(before)
    # RoPE neutralised (all positions 0): the full rotation is exact again.
    pos = torch.zeros_like(IDS)
    model.load_state_dict(sd)
    with torch.no_grad():
        b0 = model(IDS, position_ids=pos).logits
    model.load_state_dict(scrambled)
    with torch.no_grad():
        a0 = model(IDS, position_ids=pos).logits
    assert float((a0 - b0).abs().max()) <= 1e-4 * scale_of(b0)


def test_quartic_recovers_signed_scales_and_guards_degenerate_rows():
    g = torch.Generator().manual_seed(0)
    xa, ya = torch.randn(50, 7, generator=g).double(), torch.randn(50, 5, generator=g).double()
    s = torch.tensor([0.3, -2.0, 5.0, -0.7, 1.0] * 10).double()
    x, y = xa / s[:, None], ya * s[:, None]  # target = anchor scaled by 1/s
    found = groups.quartic_scale((x * x).sum(1), (x * xa).sum(1), (y * ya).sum(1), (y * y).sum(1))
    assert torch.allclose(found, s, rtol=1e-6)
    zero = torch.zeros(3, dtype=torch.float64)
    assert torch.equal(groups.quartic_scale(zero, zero, zero, zero), torch.ones(3, dtype=torch.float64))
    positive = groups.quartic_scale(
        (x * x).sum(1), (x * xa).sum(1), (y * ya).sum(1), (y * y).sum(1), signed=False
    )
    assert (positive > 0).all()
    assert torch.allclose(positive[s > 0], s[s > 0], rtol=1e-6)


def test_free_scale_is_exact_symmetric_and_not_shrunk_by_noise():
    """One-sided (activation) scales: exact on a scaled copy; on a noisy copy of equal size the
    estimate stays near 1 (least squares would shrink it to ~|cos|); swapping anchor and target
    inverts it."""
    n = 40
    site = groups.Site("h", 0, torch.arange(n).view(n, 1, 1))
    sym = groups.Symmetry("neuron_scale", Kind.scale, (site,))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, 500, generator=g).double()
    s = torch.tensor([0.3, -2.0, 5.0, -0.7] * 10).double()
    exact = groups.solve(sym, {"h": a}, {"h": a / s[:, None]})
    assert torch.allclose(exact, s, rtol=1e-9)
    noise = torch.randn(n, 500, generator=g).double()
    noisy = (a + noise) / 2**0.5  # cos(a, noisy) ~ 0.71, same norm as a on average
    found = groups.solve(sym, {"h": a}, {"h": noisy})
    assert (found - 1).abs().max() < 0.15  # least squares gives ~0.71 here
    back = groups.solve(sym, {"h": noisy}, {"h": a})
    assert torch.allclose(found * back, torch.ones(n, dtype=torch.float64), rtol=1e-9)
    positive = groups.Symmetry("neuron_scale", Kind.scale, (site,), signed=False)
    assert torch.equal(groups.solve(positive, {"h": a}, {"h": -a}), torch.ones(n, dtype=torch.float64))


def test_permutation_matching_ignores_neuron_scales():
    """A neuron rescaled by a large or negative factor is still matched to itself."""
    model = make_model("llama", seed=10)
    spec = spec_for_config(model.config)
    mlp = next(b for b in spec.blocks if b.name == "mlp")
    layer = {k.split("layers.1.", 1)[1]: v for k, v in model.state_dict().items() if "layers.1." in k}
    gen = torch.Generator().manual_seed(3)
    perm = groups.random_element(mlp.main, gen)
    scale = groups.random_element(mlp.scale, gen, scale_range=(0.1, 10.0))
    moved = groups.apply(mlp.scale, scale, groups.apply(mlp.main, perm, layer))
    found = groups.solve_permutation(mlp.main, layer, moved, scale=mlp.scale)
    assert torch.equal(found, torch.argsort(perm))


def test_attention_logit_change_measures_full_rotation_only():
    from mergekit_symalign.architectures import ARCHITECTURES
    from mergekit_symalign.rope import attention_logit_change

    model = make_model("llama", seed=12)
    layer = {k.split("layers.0.", 1)[1]: v for k, v in model.state_dict().items() if "layers.0." in k}
    from mergekit_symalign.architectures import geometry_from_config

    g = geometry_from_config(model.config)
    arch = ARCHITECTURES["llama"]
    gen = torch.Generator().manual_seed(0)
    # (heads compared in their original order: head permutations are undone)
    exact = random_transform(spec_for_config(model.config), gen).within_heads(layer)
    full = random_transform(spec_for_config(model.config, qk_rotation="full"), gen).within_heads(layer)
    exact_change = attention_logit_change(layer, exact, arch, g)
    full_change = attention_logit_change(layer, full, arch, g)
    assert max(exact_change.values()) < 1e-6
    assert full_change[0] < 1e-6  # no relative rotation: the full rotation is exact
    assert min(v for pos, v in full_change.items() if pos > 0) > 0.05


# --------------------------------------------------------------------------- specs as data


def _layer_shapes(model, index: int = 0):
    prefix = f"model.layers.{index}."
    return {k[len(prefix):]: tuple(v.shape) for k, v in model.state_dict().items()
            if k.startswith(prefix)}


@pytest.mark.parametrize("qk_rotation", ["rope", "full"])
@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_every_spec_is_valid_and_printable(arch, qk_rotation):
    from mergekit_symalign.errors import UnsupportedArchitecture
    from mergekit_symalign.spec import validate_spec

    model = make_model(arch, seed=0)
    try:
        spec = spec_for_config(model.config, qk_rotation)
    except UnsupportedArchitecture as err:  # full Q/K rotation under QK-norm: refused
        assert qk_rotation == "full" and "QK-norm" in str(err)
        return
    shapes = _layer_shapes(model)
    validate_spec(spec, shapes)
    text = spec.describe()
    for symmetry in spec.symmetries():
        assert symmetry.name in text
        for site in symmetry.sites:
            assert site.tensor in text
    # every projection of the layer is moved by some symmetry
    moved = set(spec.tensors())
    projections = {n for n in shapes if n.endswith("proj.weight")}
    assert projections <= moved, projections - moved


def test_spec_validator_rejects_what_cannot_be_exact():
    from mergekit_symalign.groups import Site, Symmetry, slot_index
    from mergekit_symalign.spec import Block, LayerSpec, SpecError, validate_spec

    rows = slot_index(4, 1, 1)
    shapes = {"a.weight": (4, 3), "b.weight": (3, 4)}

    def spec(*blocks):
        return LayerSpec("toy", tuple(blocks))

    def perm(name, *sites):
        return Symmetry(name, Kind.permutation, tuple(sites))

    ok = Block("n", perm("n.perm", Site("a.weight", 0, rows), Site("b.weight", 1, rows)))
    validate_spec(spec(ok), shapes)
    with pytest.raises(SpecError, match="exceed its size"):
        validate_spec(spec(Block("n", perm("n.perm", Site("a.weight", 1, rows)))), shapes)
    with pytest.raises(SpecError, match="not in the layer"):
        validate_spec(spec(Block("n", perm("n.perm", Site("c.weight", 0, rows)))), shapes)
    with pytest.raises(SpecError, match="twice"):
        twice = torch.tensor([0, 1, 1, 2]).reshape(4, 1, 1)
        validate_spec(spec(Block("n", perm("n.perm", Site("a.weight", 0, twice)))), shapes)
    with pytest.raises(SpecError, match="both move"):
        other = Block("m", perm("m.perm", Site("b.weight", 1, rows)))
        validate_spec(spec(ok, other), shapes)
    with pytest.raises(SpecError, match="does not move"):
        half = slot_index(2, 1, 1)
        scale = Symmetry("s", Kind.scale, (Site("b.weight", 0, half),))
        main = perm("p", Site("a.weight", 0, half))
        validate_spec(spec(Block("x", main, scale)), shapes)


def test_fit_gain_from_sums_equals_moving_the_tensors():
    """The snap's gain, computed from cross products and per-slot sums, is exactly what moving
    the model's tensors by the element and measuring the distances gives."""
    from mergekit_symalign.groups import _site_pairs, act, fit_gain

    model = make_model("qwen2", seed=11)  # with biases, which the gain leaves out
    spec = spec_for_config(model.config)
    layer = {k.split("layers.0.", 1)[1]: v for k, v in model.state_dict().items() if "layers.0." in k}
    moved = random_transform(spec, torch.Generator().manual_seed(2)).apply(layer)
    for symmetry in spec.symmetries():
        if symmetry.kind not in (Kind.scale, Kind.orthogonal, Kind.plane_rotation):
            continue
        element = groups.random_element(symmetry, torch.Generator().manual_seed(3))
        before = after = 0.0
        for site, a, t in _site_pairs(symmetry, layer, moved):
            if site.optional:
                continue
            before += float(((t - a).double() ** 2).sum())
            after += float(((act(symmetry.kind, element, t, site.contragredient) - a).double() ** 2).sum())
        gain, baseline, _ = fit_gain(symmetry, element, layer, moved)
        assert gain == pytest.approx(before - after, rel=1e-6, abs=1e-9), symmetry.name
        assert baseline == pytest.approx(before, rel=1e-6), symmetry.name


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_sums_by_rows_equal_the_gathered_slots(arch, dtype, monkeypatch):
    """A scale's sums over a site that covers its axis are reduced a block of rows at a time,
    whatever the axis (down_proj's columns too), instead of gathering each chunk of slots:
    the same per-slot sums, biases and offsets included, in one block or many."""
    from mergekit_symalign.groups import _scale_terms, _site_chunks

    model = make_model(arch, seed=12)
    spec = spec_for_config(model.config)
    layer = {k.split("layers.0.", 1)[1]: v.to(dtype) for k, v in model.state_dict().items()
             if "layers.0." in k}
    moved = random_transform(spec, torch.Generator().manual_seed(4)).apply(layer)
    monkeypatch.setattr(groups, "CHUNK_ELEMENTS", 50)  # many row blocks and slot chunks
    checked = 0
    for symmetry in spec.symmetries():
        if symmetry.kind != Kind.scale:
            continue
        sums = groups.site_sums(symmetry, layer, moved).solve
        expected = {key: torch.zeros(symmetry.slots, dtype=torch.float64) for key in sums}
        for site, slots, a, t in _site_chunks(symmetry, layer, moved):
            keys = ("yy", "ya", "yaa") if site.contragredient else ("xx", "xa", "xaa")
            for key, value in zip(keys, _scale_terms(a, t)):
                expected[key][slots] += value
            checked += groups._covers_axis(layer[site.tensor], site)
        for key in sums:
            assert torch.allclose(sums[key], expected[key], rtol=1e-5, atol=1e-9), (symmetry.name, key)
    assert checked  # the row-block path was taken


@pytest.mark.parametrize("delta", [False, True])
def test_along_axis_is_the_transform_where_it_applies(delta):
    """LayerTransform.along_axis (the transfer's fused path): where it describes a tensor's
    moves as one gather and a factor, that is exactly what applying the steps gives; it
    describes the MLP's tensors (neuron permutation and scale) and declines the rotated
    attention tensors."""
    model = make_model("gemma", seed=12)  # norm offsets: scales of offset sites need delta
    spec = spec_for_config(model.config)
    layer = {k.split("layers.0.", 1)[1]: v for k, v in model.state_dict().items() if "layers.0." in k}
    transform = random_transform(spec, torch.Generator().manual_seed(13))
    for steps in (transform, transform.inverse()):
        described = set()
        for name, tensor in layer.items():
            moves = steps.along_axis(name, tuple(tensor.shape), delta=delta)
            if moves is None:
                continue
            described.add(name)
            axis, index, factor = moves
            expected = steps.apply_one(name, tensor, delta=delta)
            got = tensor.index_select(axis, index)
            if factor is not None:
                shape = [1] * tensor.dim()
                shape[axis] = -1
                got = got * factor.view(shape)
            assert torch.equal(got, expected), name
        assert {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"} <= described
        assert "self_attn.v_proj.weight" not in described  # V/O rotations


def test_cross_by_rows_is_the_squared_norm_of_each_pairs_product():
    """``_cross_by_rows`` (one product per copy) against its definition, pair by pair."""
    g = torch.Generator().manual_seed(31)
    a, m = torch.randn(3, 4, 2, 7, generator=g), torch.randn(5, 4, 2, 7, generator=g)
    got = groups._cross_by_rows(a, m)
    assert got.shape == (3, 5, 4)
    for i in range(3):
        for j in range(5):
            for c in range(4):
                expected = (a[i, c].double() @ m[j, c].double().T).pow(2).sum()
                assert float(got[i, j, c]) == pytest.approx(float(expected), rel=1e-5)


def test_head_matching_on_shared_sketches(monkeypatch):
    """Wide head features are sketched (here forced on a tiny model): the sketched features
    are the concatenated features times the sketch; the KV heads and the query heads share
    the sketches (reference side reused, model side carried along the KV permutation: one
    sketch per tensor and side); both ways of scoring all pairs agree; and the alignment is
    still exact."""
    model = make_model("llama", seed=14)
    spec = spec_for_config(model.config)
    layer = {k.split("layers.0.", 1)[1]: v for k, v in model.state_dict().items() if "layers.0." in k}
    moved = random_transform(spec, torch.Generator().manual_seed(15)).apply(layer)
    monkeypatch.setattr(groups, "SKETCH_ABOVE", 4)
    kv = next(s for s in spec.symmetries() if s.name == "attn.kv_heads")
    for feature in kv.features:
        width = sum(layer[s.tensor].numel() // layer[s.tensor].shape[s.axis]
                    for s in feature if s.tensor in layer)
        direct = groups._feature_values(feature, layer) @ groups._sketch(width)
        assert torch.allclose(groups._sketched_feature(feature, layer, groups._sketch(width), None),
                              direct, atol=1e-5)
    both = {}
    for forced in (False, True):
        monkeypatch.setattr(groups, "_cross_by_grams", lambda k, r, block, forced=forced: forced)
        both[forced] = groups.gram_similarity(kv, layer, moved)
    assert torch.allclose(both[False], both[True], rtol=1e-5, atol=1e-6)
    monkeypatch.undo()
    monkeypatch.setattr(groups, "SKETCH_ABOVE", 4)
    calls = []
    real = groups._sketch_positions
    monkeypatch.setattr(groups, "_sketch_positions", lambda *a: calls.append(a[1]) or real(*a))
    transform = align_layer(spec, layer, moved)
    sketched = {site.tensor for f in kv.features for site in f if site.tensor in layer}
    assert len(calls) == 2 * len(sketched)  # the query heads computed no new sketch
    aligned = transform.apply(moved)
    assert max(float((aligned[k] - layer[k]).abs().max()) / (scale_of(layer[k]) + 1e-12)
               for k in layer) < 1e-5


def _decayed_sibling(seed: int = 0):
    """Layer 0 of a tiny Llama and a fine-tune-like sibling: 1 % noise on every weight and
    v_proj shrunk by 2 % (as weight decay shrinks a tensor the task gradient barely reaches)."""
    model = make_model("llama", seed=12)
    prefix = "model.layers.0."
    ref = {k[len(prefix):]: v for k, v in model.state_dict().items()
           if k.startswith(prefix) and "norm" not in k}
    g = torch.Generator().manual_seed(seed)
    sibling = {k: (t + 0.01 * t.std() * torch.randn(t.shape, generator=g)) * (0.98 if "v_proj" in k else 1.0)
               for k, t in ref.items()}
    return spec_for_config(model.config), ref, sibling


def test_a_fit_to_a_fine_tunes_systematic_change_is_kept_at_the_identity():
    """The V/O scale fitted to the shrunk v_proj removes more of the distance than fitting
    noise would (the noise test alone kept it), but moves no slot by 1 %: it is a fit to the
    fine-tune, not a change of coordinates, and the alignment is the identity."""
    spec, ref, sibling = _decayed_sibling()
    unsnapped = align_layer(spec, ref, sibling, snap=False)
    element = dict((s.name, e) for s, e in unsnapped.steps)["attn.vo_scale"]
    vo = next(s for s in spec.symmetries() if s.name == "attn.vo_scale")
    fit = next(f for f in unsnapped.fits if f.symmetry == "attn.vo_scale")
    assert groups.explains_more_than_noise(vo, fit.gain, fit.baseline, fit.entries)
    assert fit.explained > 0.05
    assert 1e-3 < groups.deviation(element) < groups.SNAP_DEVIATION
    aligned = align_layer(spec, ref, sibling)
    assert aligned.is_identity() and not aligned.steps
    assert all(f.snapped for f in aligned.fits)


def test_a_change_of_coordinates_beyond_the_size_floor_is_still_undone():
    """The same sibling with one KV group's values rescaled by 1.05 (its output columns by
    1 / 1.05, an exact symmetry): that scale is found and undone, up to the ~0.5 % fit to the
    shrunk v_proj that comes with it."""
    spec, ref, sibling = _decayed_sibling()
    vo = next(s for s in spec.symmetries() if s.name == "attn.vo_scale")
    planted = groups.apply(vo, torch.tensor([1.05] + [1.0] * (vo.slots - 1), dtype=torch.float64), sibling)
    found = align_layer(spec, ref, planted)
    assert [s.name for s, _ in found.steps] == ["attn.vo_scale"]
    aligned = found.apply(planted)
    for name in ("self_attn.v_proj.weight", "self_attn.o_proj.weight"):
        before = float((planted[name] - sibling[name]).abs().max()) / scale_of(sibling[name])
        after = float((aligned[name] - sibling[name]).abs().max()) / scale_of(sibling[name])
        assert before > 0.04 and after < 0.01, (name, before, after)


@pytest.mark.parametrize("kind", [Kind.scale, Kind.plane_rotation, Kind.orthogonal])
def test_deviation_is_the_reports_measure(kind):
    from mergekit_symalign.report import step_summary

    n, k = 5, {Kind.scale: 1, Kind.plane_rotation: 2, Kind.orthogonal: 4}[kind]
    site = groups.Site("w", 0, torch.arange(n * k).view(n, 1, k))
    sym = groups.Symmetry("s", kind, (site,))
    element = groups.random_element(sym, torch.Generator().manual_seed(1))
    assert groups.deviation(element) == pytest.approx(step_summary(sym, element)["max_deviation"])
    assert groups.deviation(groups.identity_element(sym)) == 0.0

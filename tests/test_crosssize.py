"""Pruned children (mergekit_symalign.crosssize): exactness on tiny models of every supported
architecture and on the real SmolLM2, recovered index maps, refusals."""

import pytest
import torch
import transformers

from mergekit_symalign import crosssize as cs

from .support import perturbed
from .conftest import ARCH_CONFIGS, make_config, make_model

# StableLM's transformers class ignores config.head_dim (see crosssize.HEAD_DIM_FROM_HIDDEN):
# its child keeps hidden = heads x head_dim, so it is pruned on its own terms below.
PRUNABLE = [a for a in ARCH_CONFIGS if a != "stablelm"]
SIZES = dict(hidden=36, kv_heads=1, heads_per_group=2, intermediate=56, drop_layers=(2,))


def _family(arch, layers=4, seed=0):
    config = make_config(arch, num_hidden_layers=layers)
    model = make_model(arch, seed=seed, num_hidden_layers=layers)
    parent = {k: v.clone() for k, v in model.state_dict().items()}
    return config, model, parent, perturbed(model, seed=seed + 1, scale=0.05)


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _load(config, sd):
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(sd, strict=True)  # every tensor present, of the child's shape
    return model


@pytest.mark.parametrize("arch", PRUNABLE)
def test_transfer_onto_unretrained_child_equals_pruned_skill_model(arch):
    """Every axis pruned at once (residual, KV group, query head within the group, neurons, a
    layer), survivors importance-sorted: the maps matched from the weights are the true ones,
    and child + restricted tau is the skill model pruned by the same indices, weight for weight."""
    config, _, parent, skill = _family(arch)
    child, child_cfg, truth = cs.prune_state_dict(parent, config, **SIZES)
    assert not torch.equal(truth.residual, truth.residual.sort().values), "order is a no-op"
    _load(child_cfg, child)
    match = cs.match_child(parent, config, child, child_cfg)
    assert match.map == truth
    assert match.map.layers == (0, 1, 3)
    moved = cs.transfer(child, parent, skill, config, match.map)
    want = cs.restrict_state_dict(skill, config, truth)
    assert _max_diff(moved, want) < 1e-6
    # a shape-blind transfer (first rows/columns) is not that model
    blind = cs.by_position(child, parent, skill)
    assert _max_diff(blind, want) > 1e-2
    assert cs.child_warning(match) is None


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma"])
def test_scatter_is_the_restriction_s_adjoint(arch):
    """The other direction: a child's skill vector scattered into the parent restricts back to
    itself, and leaves every pruned coordinate of the parent untouched."""
    config, _, parent, skill = _family(arch)
    child, child_cfg, truth = cs.prune_state_dict(parent, config, **SIZES)
    child_skill = cs.restrict_state_dict(skill, config, truth)
    up = cs.scatter(parent, child, child_skill, config, truth)
    back = cs.restrict_state_dict(up, config, truth)
    assert _max_diff(back, child_skill) < 1e-6
    ones = cs.restrict_state_dict({k: torch.ones_like(v) for k, v in parent.items()}, config, truth)
    touched = cs.scatter({k: torch.zeros_like(v) for k, v in parent.items()},
                         {k: torch.zeros_like(v) for k, v in ones.items()}, ones, config, truth)
    kept = sum(int(v.sum()) for k, v in touched.items())
    assert kept == sum(v.numel() for k, v in ones.items()
                       if not (k.endswith("lm_head.weight") and "lm_head.weight" not in parent))
    assert _max_diff({k: v for k, v in up.items() if k.startswith("model.layers.2.")},
                     {k: v for k, v in parent.items() if k.startswith("model.layers.2.")}) == 0


def test_stablelm_child_keeping_hidden_equal_heads_times_head_dim():
    config, _, parent, skill = _family("stablelm")  # hidden 48 = 6 heads x 8
    child, child_cfg, truth = cs.prune_state_dict(parent, config, hidden=32, kv_heads=2,
                                                  heads_per_group=2, intermediate=56)
    _load(child_cfg, child)
    match = cs.match_child(parent, config, child, child_cfg)
    assert match.map == truth
    assert _max_diff(cs.transfer(child, parent, skill, config, match.map),
                     cs.restrict_state_dict(skill, config, truth)) < 1e-6
    with pytest.raises(ValueError, match="head_dim"):
        cs.prune_state_dict(parent, config, **SIZES)


@pytest.mark.parametrize("arch,kv_heads,heads_per_group", [
    ("llama", 1, 2), ("qwen2", 1, 2), ("phi3", 1, 2), ("gemma2", 1, 2), ("gemma3_text", 1, 2),
    # OLMo 2's q/k norm is one RMSNorm over all heads: removing heads changes its RMS, so there
    # the heads are only re-ordered (all kept), which is exact
    ("olmo2", 2, 3)])
def test_pruning_what_carries_nothing_keeps_the_function(arch, kv_heads, heads_per_group):
    """An independent check of the index layout: heads, neurons and a layer whose output
    weights are zero carry nothing, so pruning them (and permuting the residual stream, all
    channels kept) leaves the logits unchanged; a wrong row/column pairing would not."""
    config, model, parent, _ = _family(arch)
    g = cs.geometry_from_config(config)
    arch_ = cs.architecture_for(g.model_type)
    d = g.head_dim
    for i in range(4):
        o = parent[f"model.layers.{i}.{arch_.o}.weight"]
        down = parent[f"model.layers.{i}.{arch_.down}.weight"]
        o.view(o.shape[0], g.num_kv_heads, g.group_size, d)[:, 1] = 0  # KV group 1
        o.view(o.shape[0], g.num_kv_heads, g.group_size, d)[:, 0, 2] = 0  # head 2 of group 0
        down[:, 10 * (i + 1): 10 * (i + 1) + 24] = 0
        if i == 2:
            o.zero_()
            down.zero_()
            for name in list(parent):
                if name.startswith("model.layers.2.") and name.endswith("bias") and (
                        arch_.o in name or arch_.down in name):
                    parent[name].zero_()
    child, child_cfg, truth = cs.prune_state_dict(parent, config, kv_heads=kv_heads,
                                                  heads_per_group=heads_per_group,
                                                  intermediate=56, drop_layers=(2,))
    if kv_heads == 1:
        assert truth.per_layer[0].kv_groups.tolist() == [0]
        assert sorted(truth.per_layer[0].q_heads[0].tolist()) == [0, 1]
    else:  # all heads kept, in importance order: the zeroed ones last
        assert truth.per_layer[0].kv_groups.tolist() == [0, 1]
        assert truth.per_layer[0].q_heads[0, -1].item() == 2
    assert not torch.equal(truth.residual, torch.arange(g.hidden_size))
    ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    model.load_state_dict(parent)
    with torch.no_grad():
        want = model(ids).logits
        got = _load(child_cfg, child)(ids).logits
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


def test_retrained_child_is_still_matched_and_an_unrelated_one_is_warned():
    """A child moved by noise (a stand-in for retraining) keeps its maps; a child pruned from
    another random parent of the same shape is flagged with its match figure."""
    config, _, parent, _ = _family("llama")
    child, child_cfg, truth = cs.prune_state_dict(parent, config, **SIZES)
    drifted = {k: v + 0.3 * v.std() * torch.randn_like(v) for k, v in child.items()}
    match = cs.match_child(parent, config, drifted, child_cfg)
    assert match.map == truth
    assert cs.child_warning(match) is None
    table = cs.explained_by_layer(drifted, parent, config, match.map)
    assert [row["parent_layer"] for row in table] == [0, 1, 3, "module"]
    assert all(0.85 < row["explained"] < 0.95 for row in table)  # noise of 0.3 sd: ~0.91
    assert all(row["explained"] == 1.0 for row in cs.explained_by_layer(child, parent, config, truth))
    _, _, other_parent, _ = _family("llama", seed=40)
    stranger, stranger_cfg, _ = cs.prune_state_dict(other_parent, config, **SIZES)
    bad = cs.match_child(parent, config, stranger, stranger_cfg)
    message = cs.child_warning(bad, "parent-A", "child-of-B")
    assert message and "child-of-B" in message and f"{bad.worst():.3f}" in message
    assert bad.worst() < cs.MIN_MATCH_COSINE < match.worst()
    assert all(row["explained"] < 0 for row in cs.explained_by_layer(stranger, parent, config, bad.map))


def test_given_layer_map_is_validated_and_used():
    config, _, parent, skill = _family("llama")
    child, child_cfg, truth = cs.prune_state_dict(parent, config, **SIZES)
    assert cs.match_child(parent, config, child, child_cfg, layer_map=[0, 1, 3]).map == truth
    wrong = cs.match_child(parent, config, child, child_cfg, layer_map=[0, 1, 2])
    assert wrong.map.layers == (0, 1, 2) and wrong.worst() < cs.MIN_MATCH_COSINE
    for layer_map, message in (([0, 1], "has 2 entries but base has 3"),
                               ([0, 1, 4], r"layers \[4\]"),
                               ([0, 3, 1], "not strictly increasing")):
        with pytest.raises(ValueError, match=message):
            cs.match_child(parent, config, child, child_cfg, layer_map=layer_map)


def test_monotone_layer_map_maximises_the_summed_similarity():
    import itertools

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        sim = torch.rand(3, 6, generator=gen)
        best = max(itertools.combinations(range(6), 3),
                   key=lambda m: sum(float(sim[k, i]) for k, i in enumerate(m)))
        assert cs.monotone_layer_map(sim) == best


def test_refusals_name_the_models_and_sizes():
    config = make_config("llama")
    wider = make_config("llama", hidden_size=72, intermediate_size=40)
    with pytest.raises(ValueError, match=r"hidden_size: base 72 > reference 48.*intermediate_size: base 40 < reference 80.*neither"):
        cs.check_child(config, wider)
    with pytest.raises(ValueError, match=r"num_hidden_layers: base 3 > reference 2"):
        cs.check_child(config, make_config("llama", num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"head_dim: reference 12 vs base 16"):
        cs.check_child(config, make_config("llama", head_dim=16))
    with pytest.raises(ValueError, match=r"vocab_size: reference 96 vs base 80"):
        cs.check_child(config, make_config("llama", vocab_size=80))
    with pytest.raises(ValueError, match=r"model_type: reference llama vs base qwen2"):
        cs.check_child(config, make_config("qwen2", hidden_size=36, num_attention_heads=3,
                                           num_key_value_heads=1))
    assert cs.check_child(config, make_config("llama", intermediate_size=40)) is True
    assert cs.check_child(config, config) is False


def test_reversed_pair_is_refused_before_matching():
    config, _, parent, _ = _family("llama")
    child, child_cfg, _ = cs.prune_state_dict(parent, config, **SIZES)
    with pytest.raises(ValueError, match="wrong way round"):
        cs.match_child(child, child_cfg, parent, config)


def test_unknown_tensor_is_refused_by_name():
    config, _, parent, _ = _family("llama")
    _, _, truth = cs.prune_state_dict(parent, config, **SIZES)
    rx = cs.Restriction(config, truth)
    assert rx.parent_name("model.layers.2.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    with pytest.raises(ValueError, match="model.layers.0.mlp.extra.weight"):
        rx.restrict("model.layers.0.mlp.extra.weight", torch.zeros(3))


# --------------------------------------------------------------------------- real weights


def test_real_smollm2_pruned_child_exact_transfer():
    """SmolLM2-135M-Instruct pruned on every axis (576 -> 432 channels, 3 -> 2 KV groups,
    1536 -> 1152 neurons, 3 of 30 layers dropped) and not retrained: the maps matched from
    the weights are the true ones, and the transferred skill vector (a random small delta)
    equals the pruned skill model, weight for weight."""
    smollm = pytest.importorskip("examples.smollm")
    try:
        model, _ = smollm.load_smollm2(torch.float32)
    except smollm.SmolLM2Missing as err:
        pytest.skip(str(err))
    parent = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    skill = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=gen) for k, v in parent.items()}
    child, child_cfg, truth = cs.prune_state_dict(parent, model.config, hidden=432, kv_heads=2,
                                                  intermediate=1152, drop_layers=(9, 20, 21))
    assert child_cfg.tie_word_embeddings
    match = cs.match_child(parent, model.config, child, child_cfg)
    assert match.map == truth
    moved = cs.transfer(child, parent, skill, model.config, match.map)
    assert _max_diff(moved, cs.restrict_state_dict(skill, model.config, truth)) < 1e-6
    assert cs.child_warning(match) is None


def test_pruning_by_given_importance_keeps_the_top_scores_in_descending_order():
    """``importance=`` (e.g. Minitron's, from activations) replaces the weight norms: the
    survivors are the highest-scoring channels, KV groups (by their heads' summed score), query
    heads and neurons, most important first, and matching still recovers them."""
    config, _, parent, _ = _family("llama")
    g = torch.Generator().manual_seed(3)
    imp = cs.PruningImportance(
        residual=torch.rand(config.hidden_size, generator=g),
        heads={i: torch.rand(config.num_attention_heads, generator=g) for i in range(4)},
        neurons={i: torch.rand(config.intermediate_size, generator=g) for i in range(4)})
    child, child_cfg, truth = cs.prune_state_dict(parent, config, importance=imp, **SIZES)
    assert torch.equal(truth.residual, imp.residual.argsort(descending=True)[:SIZES["hidden"]])
    group_size = config.num_attention_heads // config.num_key_value_heads
    for k, i in enumerate(truth.layers):
        r = truth.per_layer[k]
        heads = imp.heads[i].reshape(-1, group_size)
        assert torch.equal(r.kv_groups, heads.sum(1).argsort(descending=True)[:SIZES["kv_heads"]])
        for row, j in zip(r.q_heads, r.kv_groups):
            assert torch.equal(row, heads[j].argsort(descending=True)[:SIZES["heads_per_group"]])
        assert torch.equal(r.neurons, imp.neurons[i].argsort(descending=True)[:SIZES["intermediate"]])
    weight_norm = cs.prune_state_dict(parent, config, **SIZES)[2]
    assert weight_norm.residual.tolist() != truth.residual.tolist()
    assert cs.match_child(parent, config, child, child_cfg).map == truth
    short = cs.PruningImportance(imp.residual[:-1], imp.heads, imp.neurons)
    with pytest.raises(ValueError, match=r"residual has shape \(47,\), but llama has 48"):
        cs.prune_state_dict(parent, config, importance=short, **SIZES)
    missing = cs.PruningImportance(imp.residual, imp.heads, {0: imp.neurons[0]})
    with pytest.raises(ValueError, match="neurons has no scores for layer 1"):
        cs.prune_state_dict(parent, config, importance=missing, **SIZES)

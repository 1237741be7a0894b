"""The cross-size solve's cost-saving structure (mergekit_symalign.crosssize.match_child): it
reads one layer pair at a time from a lazy mapping, skips scipy when every row's best index is
distinct, stops refining when the residual map no longer changes, and gives exactly what the
whole-model solve (both models in memory, every round run, scipy for every assignment) gives."""

import weakref
from collections.abc import Mapping

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from mergekit_symalign import crosssize as cs
from mergekit_symalign.architectures import architecture_for, geometry_from_config, split_layer_name

from .test_crosssize import SIZES, _family


def _scipy_assign(sim):
    rows, cols = linear_sum_assignment(sim.double().cpu().numpy(), maximize=True)
    out = torch.empty(sim.shape[0], dtype=torch.long)
    out[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return out


def _whole_model_solve(parent, config, child, child_cfg, refine=1):
    """The solve before it was streamed: both models whole, every refinement round run, scipy
    for every assignment (the specification the streamed solve must equal)."""
    pg, cg = geometry_from_config(config), geometry_from_config(child_cfg)
    arch = architecture_for(pg.model_type)
    _, p_layers = cs._by_layer(arch, parent)
    _, c_layers = cs._by_layer(arch, child)
    module_sim, pieces = cs.residual_similarity(arch, parent, child)
    residual, sim = _scipy_assign(module_sim), module_sim
    for round_ in range(refine + 1):
        lm = cs.monotone_layer_map(cs.layer_similarity(arch, pg, cg, p_layers, c_layers, residual))
        per_layer = [cs.match_layer(arch, pg, cg, p_layers[i], c_layers[k], residual)[0]
                     for k, i in enumerate(lm)]
        if round_ == refine:
            break
        sim, n = module_sim * pieces, pieces
        for k, i in enumerate(lm):
            r = per_layer[k]
            rows = dict(cs.head_rows(pg, r), gate=r.neurons, up=r.neurons)
            for which in ("q", "k", "v", "gate", "up"):
                sim = sim + cs.column_cosines(cs._proj(arch, cg, c_layers[k], which),
                                              cs._proj(arch, pg, p_layers[i], which)[rows[which]])
            sim = sim + cs.column_cosines(cs._proj(arch, cg, c_layers[k], "o").T,
                                          cs._proj(arch, pg, p_layers[i], "o")[:, rows["q"]].T)
            sim = sim + cs.column_cosines(cs._proj(arch, cg, c_layers[k], "down").T,
                                          cs._proj(arch, pg, p_layers[i], "down")[:, r.neurons].T)
            n += 7
        sim = sim / n
        residual = _scipy_assign(sim)
    return cs.ChildMap(residual, tuple(lm), tuple(per_layer)), cs._quality(sim, residual)


def _swapped_embedding_child(parent, config, sizes=SIZES):
    """A pruned child whose embedding (and lm_head) columns 0 and 1 are swapped: they alone
    match those two channels wrongly, and the refinement (every layer's readers and writers)
    puts them right, so the refinement's residual map changes once."""
    child, child_cfg, truth = cs.prune_state_dict(parent, config, **sizes)
    arch = architecture_for("llama")
    child = dict(child)
    for name in (arch.embed, arch.lm_head):
        if name in child:
            child[name] = child[name][:, [1, 0, *range(2, child[name].shape[1])]]
    return child, child_cfg, truth


@pytest.mark.parametrize("case", ["unretrained", "drifted", "swapped_embedding", "stranger"])
@pytest.mark.parametrize("refine", [0, 1, 2])
def test_streamed_solve_equals_the_whole_model_solve(case, refine, monkeypatch):
    config, _, parent, _ = _family("llama")
    if case == "swapped_embedding":
        child, child_cfg, truth = _swapped_embedding_child(parent, config)
        arch = architecture_for("llama")
        module_only = cs.assign(cs.residual_similarity(arch, parent, child)[0])
        assert int((module_only != truth.residual).sum()) == 2  # the refinement has work to do
    else:
        source = _family("llama", seed=40)[2] if case == "stranger" else parent
        child, child_cfg, truth = cs.prune_state_dict(source, config, **SIZES)
        if case == "drifted":
            gen = torch.Generator().manual_seed(2)
            child = {k: v + 0.3 * v.std() * torch.randn(v.shape, generator=gen) for k, v in child.items()}
    streamed = cs.match_child(parent, config, child, child_cfg, refine=refine)
    with monkeypatch.context() as m:
        m.setattr(cs, "assign", _scipy_assign)  # match_layer's assignments too
        want_map, want_quality = _whole_model_solve(parent, config, child, child_cfg, refine)
    assert streamed.map == want_map
    assert streamed.residual.cosine == pytest.approx(want_quality.cosine, abs=1e-5)
    if case != "stranger":
        assert (streamed.map == truth) == (case != "swapped_embedding" or refine > 0)


def test_assign_is_scipy_s_optimum_with_or_without_its_shortcut():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        n_child, n_parent = 30, 45
        planted = torch.randperm(n_parent, generator=gen)[:n_child]
        sim = torch.rand(n_child, n_parent, generator=gen)
        if trial % 2 == 0:  # a planted subset: rows' best indices distinct (the shortcut)
            sim[torch.arange(n_child), planted] += 1.0
        got, want = cs.assign(sim), _scipy_assign(sim)
        assert torch.unique(got).numel() == n_child  # one-to-one
        total = float(sim[torch.arange(n_child), got].sum())
        assert total == pytest.approx(float(sim[torch.arange(n_child), want].sum()), rel=1e-6)
        if trial % 2 == 0:
            assert torch.equal(got, planted)
    # colliding best indices go to scipy: the rows' maxima (both in column 0) are not a matching
    sim = torch.tensor([[1.0, 0.9, 0.0], [1.0, 0.0, 0.1]])
    assert cs.assign(sim).tolist() == [1, 0]


class _Tracked(Mapping):
    """A lazy checkpoint that hands out a fresh copy per read, knows which copies are still
    alive, and records at each read the most layers of its own alive at once."""

    def __init__(self, tensors, arch):
        self.tensors, self.arch = tensors, arch
        self.alive = {}  # id -> name
        self.reads = self.most_layers = self.most_tensors = 0

    def __getitem__(self, name):
        t = self.tensors[name].clone()
        self.alive[id(t)] = name
        weakref.finalize(t, self.alive.pop, id(t), None)
        self.reads += 1
        layers = {s[1] for s in (split_layer_name(self.arch, n) for n in self.alive.values()) if s}
        self.most_layers = max(self.most_layers, len(layers))
        self.most_tensors = max(self.most_tensors, len(self.alive))
        return t

    def __contains__(self, name):
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


def test_solve_holds_one_layer_pair_at_a_time():
    """Read through lazy mappings, the solve never holds tensors of two layers of the same
    model at once (explained_by_layer: one tensor of each), keeps nothing, and finds what it
    finds from the state dicts."""
    config, _, parent, _ = _family("llama", layers=6)
    sizes = dict(SIZES, drop_layers=(2, 4))
    child, child_cfg, truth = _swapped_embedding_child(parent, config, sizes)
    arch = architecture_for("llama")
    lazy_parent, lazy_child = _Tracked(parent, arch), _Tracked(child, arch)
    streamed = cs.match_child(lazy_parent, config, lazy_child, child_cfg, device="cpu")
    assert lazy_parent.most_layers == lazy_child.most_layers == 1
    assert streamed.map == cs.match_child(parent, config, child, child_cfg).map == truth
    # the swapped embedding made the refinement run a second pass over the layer pairs
    assert lazy_child.reads > 2 * len(child)
    assert not lazy_parent.alive and not lazy_child.alive  # nothing kept
    lazy_parent, lazy_child = _Tracked(parent, arch), _Tracked(child, arch)
    table = cs.explained_by_layer(lazy_child, lazy_parent, config, streamed.map)
    assert lazy_parent.most_tensors == lazy_child.most_tensors == 1
    assert table == cs.explained_by_layer(child, parent, config, streamed.map)


def test_device_cpu_is_the_default_solve():
    config, _, parent, _ = _family("qwen2")
    child, child_cfg, truth = cs.prune_state_dict(parent, config, **SIZES)
    on_cpu = cs.match_child(parent, config, child, child_cfg, device="cpu")
    assert on_cpu.map == cs.match_child(parent, config, child, child_cfg).map == truth
    assert all(t.device.type == "cpu" for t in (on_cpu.map.residual, on_cpu.map.per_layer[0].neurons))

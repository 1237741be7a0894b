"""Pruned children matched on activations (mergekit_symalign.crosssize_activations): the true
maps recovered on tiny models pruned by importance and not retrained, exact transfers, the
residual maps on a child whose residual stream is rotated, refusals, and the same through
mergekit (``alignment: activations`` with a pruned child as the base)."""

import logging

import pytest
import torch

from mergekit_symalign import crosssize as cs
from mergekit_symalign import crosssize_activations as csa
from mergekit_symalign.spec import Switches
from mergekit_symalign.statedict import scramble_state_dict

from .conftest import VOCAB, make_config, make_model, save, save_word_tokenizer, word_calibration
from .support import aligned_recipe, load_tensors, perturbed, run_recipe

SIZES = dict(hidden=36, kv_heads=1, heads_per_group=2, intermediate=56, drop_layers=(2,))
TA = "symmetry_aligned_task_arithmetic"
# 32 x 64 random tokens: well above the child's 56 neurons per layer
IDS = torch.randint(0, VOCAB, (32, 64), generator=torch.Generator().manual_seed(3))
# Every architecture crosssize prunes (StableLM's child needs hidden = heads x head_dim:
# tests/test_crosssize.py). OLMo 2 and Gemma 2/3 are the hard ones: their writers' post-norms
# rescale the pruned attention output to full size, so the child's own stream differs most
# from its parent's, and their neurons are told apart only on the same inputs
# (crosssize_activations.parent_on_child_inputs).
ARCHS = ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "qwen3", "olmo2", "phi3"]


def _family(arch, seed=0):
    config = make_config(arch, num_hidden_layers=4)
    model = make_model(arch, seed=seed, num_hidden_layers=4)
    parent = {k: v.clone() for k, v in model.state_dict().items()}
    return config, parent, perturbed(model, seed=seed + 1, scale=0.05)


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_match_recovers_the_pruning_and_the_transfer_is_exact(arch):
    """Every axis pruned at once (residual channels, a KV group, a query head, neurons, a
    layer), survivors importance-sorted, not retrained: the maps matched on activations are the
    true ones, and child + restricted tau is the skill model pruned by the same indices."""
    config, parent, skill = _family(arch)
    child, child_cfg, truth = cs.prune_state_dict(parent, config, **SIZES)
    assert not torch.equal(truth.residual, truth.residual.sort().values), "order is a no-op"
    match = csa.match_child_by_activations(parent, config, child, child_cfg, IDS)
    assert isinstance(match, cs.ChildMatch) and match.tokens == IDS.numel()
    assert match.map == truth
    moved = cs.transfer(child, parent, skill, config, match.map)
    want = cs.restrict_state_dict(skill, config, truth)
    assert _max_diff(moved, want) < 1e-6
    assert cs.child_warning(match) is None


def test_activation_match_is_not_the_identity_guess():
    """The matched residual map is read from the activations: the same child with its channels
    in another order gets that order back (a matcher that returned any fixed map would fail one
    of the two)."""
    config, parent, _ = _family("llama")
    child, child_cfg, truth = cs.prune_state_dict(parent, config, **SIZES)
    perm = torch.randperm(36, generator=torch.Generator().manual_seed(5))
    readers = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head", "embed_tokens")
    shuffled = {}
    for name, t in child.items():
        if "norm" in name:
            t = t[perm]
        elif any(r in name for r in readers):
            t = t[:, perm]
        elif "o_proj" in name or "down_proj" in name:
            t = t[perm]
        shuffled[name] = t
    match = csa.match_child_by_activations(parent, config, shuffled, child_cfg, IDS)
    assert torch.equal(match.map.residual, truth.residual[perm])
    assert match.map.per_layer == truth.per_layer


def test_given_layer_map_is_used():
    config, parent, _ = _family("llama")
    child, child_cfg, truth = cs.prune_state_dict(parent, config, **SIZES)
    assert csa.match_child_by_activations(parent, config, child, child_cfg, IDS, layer_map=[0, 1, 3]).map == truth
    wrong = csa.match_child_by_activations(parent, config, child, child_cfg, IDS, layer_map=[0, 1, 2])
    assert wrong.map.layers == (0, 1, 2) and wrong.map != truth
    with pytest.raises(ValueError, match="not strictly increasing"):
        csa.match_child_by_activations(parent, config, child, child_cfg, IDS, layer_map=[0, 3, 1])


def test_a_child_of_another_parent_is_warned():
    config, parent, _ = _family("llama")
    _, stranger, _ = _family("llama", seed=40)
    child, child_cfg, _ = cs.prune_state_dict(stranger, config, **SIZES)
    match = csa.match_child_by_activations(parent, config, child, child_cfg, IDS)
    assert match.worst() < cs.MIN_MATCH_COSINE
    assert "does not look like a pruned child" in cs.child_warning(match)


@pytest.mark.parametrize("fit", csa.RESIDUAL_FITS)
def test_residual_maps_undo_a_rotated_residual_stream(fit):
    """A child whose residual stream is the parent's under a random rotation (norms folded:
    the same function in other residual coordinates) is no index map of its parent; the maps
    fitted on activations are that rotation, and the mapped transfer equals the skill model
    moved by it (the skill changes no norm weight: a rotated child's folded norms cannot take
    a per-channel change). A plain index transfer does not."""
    config, parent, _ = _family("llama")
    g = torch.Generator().manual_seed(9)
    skill = {k: v if "norm" in k else v + 0.05 * v.std() * torch.randn(v.shape, generator=g)
             for k, v in parent.items()}
    kw = dict(seed=21, switches=Switches(False, False, False), residual="orthogonal")
    child, _ = scramble_state_dict(parent, config, **kw)
    want, _ = scramble_state_dict(skill, config, **kw)
    match = csa.match_child_by_activations(parent, config, child, config, IDS, residual_fit=fit, ridge=0.0)
    moved = csa.transfer_mapped(child, parent, skill, config, match)
    assert _max_diff(moved, want) < 1e-6
    # tau's largest entry is ~4e-3: an index map misplaces all of it
    assert _max_diff(cs.transfer(child, parent, skill, config, match.map), want) > 1e-3


def test_residual_maps_are_near_the_identity_on_a_permuted_child():
    """The child is its parent with the residual channels re-ordered (nothing pruned): its
    streams are the parent's, so the fitted maps are the identity in the child's order and the
    mapped transfer equals the plain one."""
    config, parent, skill = _family("llama")
    child, child_cfg, truth = cs.prune_state_dict(parent, config, hidden=48)
    match = csa.match_child_by_activations(parent, config, child, child_cfg, IDS, residual_fit="lstsq")
    assert match.map == truth
    eye = torch.eye(48, dtype=torch.float64)
    for m in match.residual_maps.writers + [r[s] for r in match.residual_maps.readers for s in ("attn", "mlp")]:
        assert float((m - eye).abs().max()) < 1e-2
    assert _max_diff(csa.transfer_mapped(child, parent, skill, config, match),
                     cs.transfer(child, parent, skill, config, truth)) < 1e-3


def test_bad_input_is_refused():
    config, parent, skill = _family("llama")
    child, child_cfg, _ = cs.prune_state_dict(parent, config, **SIZES)
    with pytest.raises(ValueError, match="at least 56 calibration tokens"):
        csa.match_child_by_activations(parent, config, child, child_cfg, IDS[:1, :40])
    with pytest.raises(ValueError, match="residual_fit must be one of"):
        csa.match_child_by_activations(parent, config, child, child_cfg, IDS, residual_fit="rotate")
    with pytest.raises(ValueError, match="wrong way round"):
        csa.match_child_by_activations(child, child_cfg, parent, config, IDS)
    match = csa.match_child_by_activations(parent, config, child, child_cfg, IDS)
    with pytest.raises(ValueError, match="needs a match solved with residual_fit"):
        csa.transfer_mapped(child, parent, skill, config, match)
    missing = {k: v for k, v in child.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match=r"base: tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
        csa.match_child_by_activations(parent, config, missing, child_cfg, IDS, layer_map=[0, 1, 3])


# --------------------------------------------------------------------------- through mergekit


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("xsact")
    config, parent, skill = _family("llama")
    child, child_cfg, truth = cs.prune_state_dict(parent, config, **SIZES)
    paths = dict(parent=save(parent, config, root / "parent"), skill=save(skill, config, root / "skill"),
                 child=save(child, child_cfg, root / "child"))
    for path in paths.values():
        save_word_tokenizer(path)
    paths["calibration"] = word_calibration(root / "calibration.txt", lines=96)
    return paths, dict(config=config, parent=parent, skill=skill, child=child, truth=truth)


def test_alignment_activations_with_a_pruned_child_through_run_merge(pair, tmp_path, caplog):
    paths, m = pair
    recipe = aligned_recipe(TA, paths["child"], paths["parent"], [paths["skill"]],
                            alignment="activations", calibration=paths["calibration"],
                            calibration_max_tokens=32)
    with caplog.at_level(logging.WARNING):
        out = run_recipe(recipe, tmp_path / "out")
    want = cs.restrict_state_dict(m["skill"], m["config"], m["truth"])
    got = load_tensors(out)
    assert set(got) == set(want)
    assert max(float((got[k].double() - want[k].double()).abs().max()) for k in want) < 1e-6
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "aligned a pruned child" in said and "matched on activations over" in said


def test_alignment_activations_with_a_child_needs_its_tokenizer(pair, tmp_path):
    import shutil

    from mergekit_symalign.errors import SymAlignConfigError

    paths, _ = pair
    bare = tmp_path / "child"
    shutil.copytree(paths["child"], bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    recipe = aligned_recipe(TA, str(bare), paths["parent"], [paths["skill"]],
                            alignment="activations", calibration=paths["calibration"])
    with pytest.raises(SymAlignConfigError, match="cannot load its tokenizer"):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_report_with_alignment_activations_and_a_pruned_child(pair, tmp_path, capsys):
    import json

    from mergekit_symalign.cli import main

    from .support import write_recipe

    paths, _ = pair
    recipe = aligned_recipe(TA, paths["child"], paths["parent"], [paths["skill"]],
                            alignment="activations", calibration=paths["calibration"],
                            calibration_max_tokens=32)
    status = main(["report", write_recipe(recipe, tmp_path / "recipe.yml"), str(tmp_path / "report"), "--quiet"])
    capsys.readouterr()
    assert status == 0
    child = json.loads((tmp_path / "report" / "report.json").read_text())["pruned_child"]
    assert child["layer_map"] == [0, 1, 3] and child["warning"] is None
    assert all(abs(r["explained"] - 1) < 1e-6 for r in child["layers"])  # the true maps: not retrained

"""The residual stream (signed permutations; rotations after norm folding) and attention-head
permutations, on plain state dicts: exact where claimed, undone by the alignment, refused
where not exact, and the identity on descendants of one base."""

import pytest
import torch

from mergekit_symalign import residual as res
from mergekit_symalign.architectures import architecture_for, geometry_from_config
from mergekit_symalign.errors import UnsupportedArchitecture
from mergekit_symalign.statedict import (
    MODULE,
    align_state_dict,
    residual_transforms,
    scramble_state_dict,
    transform_state_dict,
)

from .support import perturbed
from .conftest import ARCH_CONFIGS, make_model, scale_of

IDS = torch.randint(0, 96, (2, 23), generator=torch.Generator().manual_seed(3))
# Architectures whose residual stream may be rotated: no writer-side norms, no LayerNorm
# (Gemma is tied in its tiny config: untied here, as orthogonal needs).
ORTHOGONAL = {"llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "phi3": {},
              "gemma": {"tie_word_embeddings": False}}


def _logits(model, state_dict):
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return model(IDS).logits


def _rel(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) / (scale_of(b[k]) + 1e-12) for k in b)


def _changes_logits(model, before, after) -> float:
    a, b = _logits(model, after), _logits(model, before)
    return float((a - b).abs().max()) / float(b.abs().max())


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_residual_permutation_with_every_layer_symmetry_is_exact_and_undone(arch):
    model = make_model(arch, seed=5)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    scrambled, truth = scramble_state_dict(sd, model.config, seed=3, residual="permutation")
    assert _rel(scrambled, sd) > 0.5
    assert MODULE in truth and truth[MODULE].steps  # embeddings, final norm, lm_head moved
    assert _changes_logits(model, sd, scrambled) < 1e-5
    aligned, found = align_state_dict(sd, scrambled, model.config, residual="permutation")
    assert _rel(aligned, sd) < 1e-5


@pytest.mark.parametrize("arch", sorted(ORTHOGONAL))
def test_rotated_checkpoint_is_exact_and_aligned_back(arch):
    """A QuaRot/SliceGPT-style checkpoint (every norm folded to 1, the residual stream
    rotated), scrambled in every layer too: same logits; aligned back to the original
    parameterization (norms unfolded with the reference's weights)."""
    model = make_model(arch, seed=6, **ORTHOGONAL[arch])
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    rotated, _ = scramble_state_dict(sd, model.config, seed=4, residual="orthogonal")
    offset = res.norm_offset(architecture_for(geometry_from_config(model.config).model_type))
    norms = [k for k in rotated if k.endswith("layernorm.weight") or k == "model.norm.weight"]
    assert norms and all(torch.allclose(rotated[k] + offset, torch.ones(())) for k in norms)
    assert _changes_logits(model, sd, rotated) < 1e-5
    aligned, found = align_state_dict(sd, rotated, model.config, residual="orthogonal")
    assert _rel(aligned, sd) < 1e-5
    # permutation alone cannot undo a rotation
    partial, _ = align_state_dict(sd, rotated, model.config, residual="permutation")
    assert _rel(partial, sd) > 0.1


@pytest.mark.parametrize("arch,config,match", [
    ("gemma2", {}, "writer-side norms"),
    ("gemma3_text", {}, "writer-side norms"),
    ("olmo2", {}, "writer-side norms"),
    ("stablelm", {}, "LayerNorm subtracts the mean"),
    ("llama", {"tie_word_embeddings": True}, "untied embeddings"),
])
def test_orthogonal_is_refused_where_it_cannot_be_exact(arch, config, match):
    model = make_model(arch, seed=0, **config)
    sd = model.state_dict()
    with pytest.raises(UnsupportedArchitecture, match=match) as info:
        align_state_dict(sd, sd, model.config, residual="orthogonal")
    assert "residual: permutation" in str(info.value)  # the remedy


def test_layernorm_keeps_an_unsigned_permutation_but_not_per_coordinate_signs(monkeypatch):
    """StableLM's LayerNorm subtracts the mean: a permutation of the residual stream is exact,
    per-coordinate signs are not (so they are left out there)."""
    model = make_model("stablelm", seed=7)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config
    arch = architecture_for(geometry_from_config(config).model_type)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(config.hidden_size, generator=g)
    unsigned = res.ResidualElement("permutation", perm, None)
    moved = transform_state_dict(sd, config, residual_transforms(sd, sd, config, unsigned))
    assert _rel(moved, sd) > 0.5 and _changes_logits(model, sd, moved) < 1e-5
    assert res.random_residual(arch, config.hidden_size, "permutation", g).signs is None
    # forcing the signs in (as on an RMSNorm model) changes the function
    monkeypatch.setattr(res, "signed", lambda arch: True)
    signs = torch.where(torch.rand(config.hidden_size, generator=g) < 0.5, -1.0, 1.0).double()
    signed = res.ResidualElement("permutation", perm, signs)
    wrong = transform_state_dict(sd, config, residual_transforms(sd, sd, config, signed))
    assert _changes_logits(model, sd, wrong) > 0.05


def test_zero_norm_weight_cannot_be_folded():
    model = make_model("llama", seed=8)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    rotated, _ = scramble_state_dict(sd, model.config, seed=1, residual="orthogonal")
    broken = dict(sd)
    broken["model.layers.1.post_attention_layernorm.weight"] = sd[
        "model.layers.1.post_attention_layernorm.weight"].clone()
    broken["model.layers.1.post_attention_layernorm.weight"][5] = 0.0
    with pytest.raises(UnsupportedArchitecture, match="post_attention_layernorm has 1 zero weights"):
        align_state_dict(broken, rotated, model.config, residual="orthogonal")


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
@pytest.mark.parametrize("mode", ["permutation", "orthogonal"])
def test_descendant_of_one_base_is_left_as_it_is(arch, mode):
    """A fine-tuned sibling: the residual transform, the head and neuron permutations and
    every continuous element come out as the identity (the rotation's fit is no better than
    noise), so aligning changes nothing."""
    if mode == "orthogonal" and arch not in ORTHOGONAL:
        pytest.skip("orthogonal is refused for this architecture")
    overrides = ORTHOGONAL.get(arch, {}) if mode == "orthogonal" else {}
    model = make_model(arch, seed=9, **overrides)
    sd = model.state_dict()
    sibling = perturbed(sd, seed=2, scale=0.02)
    aligned, found = align_state_dict(sd, sibling, model.config, residual=mode)
    assert all(t.is_identity() for t in found.values()), {
        k: [s.name for s, _ in t.steps] for k, t in found.items() if not t.is_identity()}
    assert all(torch.equal(aligned[k], sibling[k]) for k in sibling)


@pytest.mark.parametrize("arch,mode", [("llama", "orthogonal"), ("qwen3", "orthogonal"),
                                       ("gemma2", "permutation"), ("stablelm", "permutation"),
                                       ("olmo2", "permutation")])
def test_activation_alignment_solves_the_residual_stream_too(arch, mode):
    """alignment: activations: the residual statistic comes from the hidden states entering
    every layer; composed with the layer solves, it undoes the whole scramble."""
    from mergekit_symalign.activations import align_by_activations

    model = make_model(arch, seed=10, **(ORTHOGONAL.get(arch, {}) if mode == "orthogonal" else {}))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    scrambled, _ = scramble_state_dict(sd, model.config, seed=5, residual=mode)
    ids = torch.randint(0, 96, (4, 64), generator=torch.Generator().manual_seed(1))
    found = align_by_activations(sd.__getitem__, {"m": scrambled.__getitem__}, model.config, ids,
                                 progress=False, residual=mode)["m"]
    assert MODULE in found
    aligned = transform_state_dict(scrambled, model.config, found)
    assert _rel(aligned, sd) < 1e-4


# --------------------------------------------------------------------------- through mergekit


@pytest.fixture(scope="module")
def rotated_family(tmp_path_factory):
    """An untied Llama reference R, a skill S, and R moved by a residual signed permutation /
    a QuaRot-style rotation (each with every layer symmetry too)."""
    from .conftest import make_config, save

    root = tmp_path_factory.mktemp("rotated")
    config = make_config("llama")
    ref = make_model("llama", seed=0)
    sd = ref.state_dict()
    out = {"config": config, "reference": save(ref, config, root / "reference"),
           "skill": save(perturbed(sd, seed=1, scale=0.05), config, root / "skill"),
           "sibling": save(perturbed(sd, seed=2, scale=0.02), config, root / "sibling"),
           "seeds": {"permutation": 21, "orthogonal": 22}}
    for mode, seed in out["seeds"].items():
        moved, _ = scramble_state_dict(sd, config, seed=seed, residual=mode)
        out[mode] = save(moved, config, root / mode)
    return out


@pytest.mark.parametrize("frame", ["base", "reference"])
@pytest.mark.parametrize("mode", ["permutation", "orthogonal"])
def test_transfer_onto_a_residual_scrambled_model_through_mergekit(rotated_family, tmp_path, mode, frame):
    """The skill vector measured on R lands exactly on T(R): the skill model itself in the
    reference's coordinates, T(skill) in the base's (the rotated checkpoint's own
    parameterization: norms folded)."""
    from .support import aligned_recipe, run_recipe

    from .conftest import assert_tensors_close, load

    fam = rotated_family
    out = run_recipe(aligned_recipe("symmetry_aligned_task_arithmetic", fam[mode], fam["reference"],
                                    [(fam["skill"], {"align": False})], residual=mode,
                                    output_frame=frame), tmp_path / "out")
    skill = load(fam["skill"])
    want = skill
    if frame == "base":
        want = scramble_state_dict(skill, fam["config"], seed=fam["seeds"][mode], residual=mode)[0]
    assert_tensors_close(load(out), want, rtol=2e-5)


@pytest.mark.parametrize("frame", ["base", "reference"])
def test_skill_of_a_rotated_model_onto_an_unrotated_target(rotated_family, tmp_path, frame):
    """The other direction: reference and skill rotated (a QuaRot-style pair T(R), T(S)), the
    target the unrotated R. The transfer computes the skill model S itself: in the rotated
    coordinates, or in R's own (the merged model's norms folded back out, R's norms kept)."""
    from .support import aligned_recipe, run_recipe

    from .conftest import assert_tensors_close, load, logits, save

    fam = rotated_family
    skill_rotated, _ = scramble_state_dict(load(fam["skill"]), fam["config"], seed=22, residual="orthogonal")
    rotated_skill = save(skill_rotated, fam["config"], tmp_path / "skill_rotated")
    out = run_recipe(aligned_recipe("symmetry_aligned_task_arithmetic", fam["reference"], fam["orthogonal"],
                                    [(rotated_skill, {"align": False})], residual="orthogonal",
                                    output_frame=frame), tmp_path / "out")
    got, want = logits(out), logits(fam["skill"])
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    merged, reference = load(out), load(fam["reference"])
    norms = [k for k in reference if k.endswith("norm.weight")]
    if frame == "base":  # R's own parameterization: its norm weights, readers carry the rest
        assert_tensors_close({k: merged[k] for k in norms}, {k: reference[k] for k in norms})
    else:  # the rotated pair's: every norm folded to 1
        assert all(torch.allclose(merged[k], torch.ones(())) for k in norms)


@pytest.mark.parametrize("mode", ["permutation", "orthogonal"])
def test_residual_on_a_same_base_sibling_changes_no_merge(rotated_family, tmp_path, mode):
    from .support import aligned_recipe, run_recipe

    from .conftest import load

    fam = rotated_family
    recipe = aligned_recipe("symmetry_aligned_ties", fam["sibling"], fam["reference"], [fam["skill"]])
    a = load(run_recipe(recipe, tmp_path / "none"))
    recipe["parameters"] = {"residual": mode}
    b = load(run_recipe(recipe, tmp_path / mode))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tied_embeddings_follow_the_config_that_holds_lm_head():
    """A multimodal config's top-level tie_word_embeddings is what transformers ties by (the
    model that holds lm_head); its text config may say otherwise. One answer everywhere."""
    import transformers

    from mergekit_symalign.architectures import tied_embeddings

    top_tied = transformers.Gemma3Config(text_config=dict(tie_word_embeddings=False))
    top_untied = transformers.Gemma3Config(tie_word_embeddings=False)
    assert top_tied.get_text_config().tie_word_embeddings is False
    assert tied_embeddings(top_tied) is True
    assert tied_embeddings(top_untied) is False
    assert tied_embeddings(transformers.LlamaConfig(tie_word_embeddings=False)) is False
    assert tied_embeddings(transformers.LlamaConfig(tie_word_embeddings=True)) is True

"""Mixtures of experts (Mixtral, Qwen3-MoE, Qwen2-MoE's shared expert): the expert
permutation, each expert's neurons and scales, attention and heads, and the residual stream,
on state dicts and through an unmodified ``mergekit-yaml`` in both checkpoint layouts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from .support import (
    aligned_recipe,
    load_tensors,
    perturbed,
    plain_transfer_recipe,
    run_mergekit_yaml,
    run_recipe,
)
from mergekit_symalign.errors import SymAlignConfigError, UnsupportedArchitecture
from mergekit_symalign.groups import Kind
from mergekit_symalign.statedict import align_state_dict, scramble_state_dict, spec_for_config

from .conftest import scale_of

VOCAB = 64
MOE_CONFIGS = {
    "mixtral": lambda **kw: transformers.MixtralConfig(**{**dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        tie_word_embeddings=False), **kw}),
    "qwen3_moe": lambda **kw: transformers.Qwen3MoeConfig(**{**dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=12,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False), **kw}),
    # a shared expert and its gate (not shipped by mergekit 0.1.5: state dicts only)
    "qwen2_moe": lambda **kw: transformers.Qwen2MoeConfig(**{**dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=12,
        shared_expert_intermediate_size=20, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        tie_word_embeddings=False), **kw}),
}
IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))


def make_moe(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = MOE_CONFIGS[arch](**overrides)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norms and biases: ones and zeros would hide bugs
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model, config


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def forward(model, sd):
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(IDS).logits


def relative(a, b):
    return float((a.double() - b.double()).abs().max()) / scale_of(b)


def max_relative(got, want):
    assert got.keys() == want.keys()
    return max(relative(got[k], want[k]) for k in want)


def steps_named(transforms, prefix):
    return [(s, e) for t in transforms.values() for s, e in t.steps if s.name.startswith(prefix)]


@pytest.mark.parametrize("residual", ["none", "permutation", "orthogonal"])
@pytest.mark.parametrize("arch", sorted(MOE_CONFIGS))
def test_random_group_element_keeps_logits_and_alignment_undoes_it(arch, residual):
    model, config = make_moe(arch)
    sd = state(model)
    before = forward(model, sd)
    scrambled, planted = scramble_state_dict(sd, config, seed=3, residual=residual)
    # every kind of symmetry was planted: experts, each expert's neurons and scales, heads
    names = {s.name.split(".")[0] + "." + s.name.split(".")[-1] for t in planted.values() for s, _ in t.steps}
    assert {"moe.experts", "moe.neurons", "moe.neuron_scale", "attn.kv_heads", "attn.q_heads"} <= names
    assert all(not bool((e == torch.arange(len(e))).all()) for _, e in steps_named(planted, "moe.experts"))
    assert max_relative(scrambled, sd) > 0.1
    assert relative(forward(model, scrambled), before) < 1e-5  # the same function
    aligned, found = align_state_dict(sd, scrambled, config, residual=residual)
    assert max_relative(aligned, sd) < 1e-5
    # the experts found are the planted ones (per layer: the inverse permutation)
    for layer in (0, 1):
        (planted_perm,) = [e for s, e in planted[layer].steps if s.name == "moe.experts"]
        (found_perm,) = [e for s, e in found[layer].steps if s.name == "moe.experts"]
        assert torch.equal(planted_perm[found_perm], torch.arange(len(found_perm)))


def test_spec_lists_the_router_and_every_expert():
    model, config = make_moe("qwen2_moe")
    spec = spec_for_config(config)
    from mergekit_symalign.spec import validate_spec

    validate_spec(spec, {k[len("model.layers.0."):]: tuple(v.shape) for k, v in model.state_dict().items()
                         if k.startswith("model.layers.0.")})
    (experts,) = [s for s in spec.symmetries() if s.name == "moe.experts"]
    assert experts.kind == Kind.permutation and experts.slots == 4
    assert {site.tensor for site in experts.sites} >= {
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"}
    assert {f"moe.expert{e}.neurons" for e in range(4)} <= {s.name for s in spec.symmetries()}
    assert "moe.shared_expert.neurons" in {s.name for s in spec.symmetries()}
    # the shared expert's gate reads the residual stream only: no layer symmetry moves it
    assert "mlp.shared_expert_gate.weight" not in spec.tensors()


# --------------------------------------------------------------------------- duplicates, ties


def upcycled(arch: str, distinct_router: bool):
    """Every expert a copy of expert 0 (an upcycled MoE at init); with ``distinct_router``
    False the router rows are copies too, so every router logit ties."""
    model, config = make_moe(arch)
    sd = state(model)
    for layer in range(config.num_hidden_layers):
        for name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            t = sd[f"model.layers.{layer}.{name}"]
            t[:] = t[0:1].clone()
        if not distinct_router:
            router = sd[f"model.layers.{layer}.mlp.gate.weight"]
            router[:] = router[0:1].clone()
    return model, config, sd


@pytest.mark.parametrize("distinct_router", [True, False])
def test_duplicate_experts_and_tied_router_give_a_deterministic_exact_answer(distinct_router):
    """Duplicates cannot be told apart by their weights: with distinct router rows the router
    tells them apart (the planted permutation is found); with tied rows too, any matching of
    the duplicates is the same model, and the alignment still returns the reference's
    tensors, the same answer on every run."""
    model, config, sd = upcycled("mixtral", distinct_router)
    before = forward(model, sd)
    scrambled, planted = scramble_state_dict(sd, config, seed=4)
    assert relative(forward(model, scrambled), before) < 1e-5
    runs = [align_state_dict(sd, scrambled, config) for _ in range(2)]
    (aligned, found), (again, found_again) = runs
    assert all(torch.equal(aligned[k], again[k]) for k in aligned)
    for layer in (0, 1):
        a = [e for s, e in found[layer].steps if s.name == "moe.experts"]
        b = [e for s, e in found_again[layer].steps if s.name == "moe.experts"]
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
        if distinct_router:
            (planted_perm,) = [e for s, e in planted[layer].steps if s.name == "moe.experts"]
            assert torch.equal(planted_perm[a[0]], torch.arange(len(a[0])))
    assert max_relative(aligned, sd) < 1e-5


# --------------------------------------------------------------------------- refusals


def test_dense_layers_among_sparse_ones_are_refused():
    _, config = make_moe("qwen3_moe", mlp_only_layers=[1])
    with pytest.raises(UnsupportedArchitecture, match="mlp_only_layers"):
        spec_for_config(config, model="m")


# --------------------------------------------------------------------------- through mergekit


def save_moe(model, sd, path: Path, layout: str) -> str:
    """``hub``: transformers' save_pretrained (per-expert tensors ``experts.N.w1`` /
    ``experts.N.gate_proj``, as on the Hub); ``fused``: the in-memory names that mergekit
    0.1.5's definitions read and write (``mlp.experts.gate_up_proj``)."""
    model.load_state_dict(sd)
    model.save_pretrained(str(path))
    if layout == "fused":
        os.remove(path / "model.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
    return str(path)


def saved_logits(path: str) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module", params=[(a, l) for a in ("mixtral", "qwen3_moe") for l in ("hub", "fused")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def moe_family(request, tmp_path_factory):
    arch, layout = request.param
    root = tmp_path_factory.mktemp(f"{arch}_{layout}")
    model, config = make_moe(arch)
    ref = state(model)
    skill = perturbed(ref, seed=1, scale=0.05)
    sibling = perturbed(ref, seed=2, scale=0.02)
    scrambled, _ = scramble_state_dict(ref, config, seed=11)
    paths = {name: save_moe(model, sd, root / name, layout) for name, sd in
             (("reference", ref), ("skill", skill), ("sibling", sibling), ("scrambled", scrambled))}
    return dict(paths, arch=arch, layout=layout, root=root, skill_state=skill)


def test_mergekit_yaml_aligned_transfer_onto_moved_moe_equals_unmoved(moe_family, tmp_path):
    """Base = the reference moved by a random element of its whole group: the aligned
    transfer (reference frame) is the skill model itself, tensor by tensor; plain
    task_arithmetic is not."""
    f = moe_family
    recipe = aligned_recipe("symmetry_aligned_task_arithmetic", f["scrambled"], f["reference"],
                            [f["skill"]], output_frame="reference")
    run_mergekit_yaml(recipe, tmp_path / "aligned.yml", tmp_path / "aligned")
    out = load_tensors(tmp_path / "aligned")
    # mergekit writes the fused layout whatever it read
    assert max_relative(out, f["skill_state"]) < 1e-5
    want = saved_logits(f["skill"])
    assert relative(saved_logits(str(tmp_path / "aligned")), want) < 1e-4
    plain = run_recipe(plain_transfer_recipe(f["scrambled"], f["reference"], f["skill"]),
                       tmp_path / "plain")
    assert relative(saved_logits(plain), want) > 1e-2


def test_same_base_moe_merge_is_plain_task_arithmetic_bit_for_bit(moe_family, tmp_path):
    """Skill and sibling merged on the reference: the alignment is the identity, so the merge
    is mergekit's own task_arithmetic, bit for bit. A transfer onto the sibling computes
    ``sibling + (skill - reference)`` where plain task_arithmetic computes ``reference +
    (skill - reference) + (sibling - reference)``: equal to float32 rounding only."""
    f = moe_family
    models = [{"model": f["skill"], "parameters": {"weight": 1.0}},
              {"model": f["sibling"], "parameters": {"weight": 0.7}}]
    aligned = run_recipe({"merge_method": "symmetry_aligned_task_arithmetic",
                          "base_model": f["reference"], "dtype": "float32",
                          "models": [{"model": f["reference"], "parameters": {"role": "reference"}}]
                          + models}, tmp_path / "aligned")
    plain = run_recipe({"merge_method": "task_arithmetic", "base_model": f["reference"],
                        "dtype": "float32", "models": models}, tmp_path / "plain")
    a, b = load_tensors(aligned), load_tensors(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    transfer = run_recipe(aligned_recipe("symmetry_aligned_task_arithmetic", f["sibling"],
                                         f["reference"], [f["skill"]]), tmp_path / "transfer")
    plain = run_recipe(plain_transfer_recipe(f["sibling"], f["reference"], f["skill"]),
                       tmp_path / "plain_transfer")
    assert max_relative(load_tensors(transfer), load_tensors(plain)) < 1e-6


def test_same_base_expert_permutation_is_the_identity(moe_family):
    f = moe_family
    model, config = make_moe(f["arch"])
    ref = state(model)
    sibling = perturbed(ref, seed=2, scale=0.02)
    _, found = align_state_dict(ref, sibling, config)
    assert all(t.is_identity() for t in found.values())


def test_activations_alignment_is_refused_for_moe(moe_family, tmp_path):
    f = moe_family
    recipe = aligned_recipe("symmetry_aligned_task_arithmetic", f["sibling"], f["reference"],
                            [f["skill"]], alignment="activations")
    with pytest.raises(SymAlignConfigError, match="alignment: activations .* not available"):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tied_router_logits_between_distinct_experts_are_where_exactness_ends():
    """torch.topk breaks a tie between router logits by expert number: with every router row
    equal (all logits tied) but distinct experts, permuting the experts changes which ones a
    token reaches. The docs state this limit; duplicates (above) are exact."""
    model, config = make_moe("mixtral")
    sd = state(model)
    for layer in range(config.num_hidden_layers):
        router = sd[f"model.layers.{layer}.mlp.gate.weight"]
        router[:] = router[0:1].clone()
    before = forward(model, sd)
    scrambled, _ = scramble_state_dict(sd, config, seed=4)
    assert relative(forward(model, scrambled), before) > 1e-3


def test_mergekit_residual_alignment_of_a_moe(tmp_path):
    """residual: permutation through mergekit: the reference moved by a residual permutation
    and signs and every layer's group; the aligned transfer is the skill model."""
    model, config = make_moe("mixtral")
    ref = state(model)
    skill = perturbed(ref, seed=1, scale=0.05)
    moved, _ = scramble_state_dict(ref, config, seed=6, residual="permutation")
    paths = {n: save_moe(model, sd, tmp_path / n, "hub") for n, sd in
             (("reference", ref), ("skill", skill), ("moved", moved))}
    out = run_recipe(aligned_recipe("symmetry_aligned_task_arithmetic", paths["moved"],
                                    paths["reference"], [paths["skill"]], residual="permutation",
                                    output_frame="reference"), tmp_path / "out")
    assert max_relative(load_tensors(out), skill) < 1e-5


@pytest.mark.parametrize("delta", [False, True])
def test_expert_blocks_equal_the_transform(delta):
    """The fused experts under a random element (and its inverse) as one gather per expert
    (``LayerTransform.gathered_blocks``: the transfer's and the model card's fast path) give
    the transform's own result, bit for bit."""
    model, config = make_moe("qwen2_moe")
    spec = spec_for_config(config)
    layer = {k[len("model.layers.0."):]: v for k, v in state(model).items()
             if k.startswith("model.layers.0.")}
    from mergekit_symalign.spec import random_transform

    planted = random_transform(spec, torch.Generator().manual_seed(1))
    for transform in (planted, planted.inverse()):
        moved = transform.apply(layer, delta=delta)
        for name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            blocks = transform.gathered_blocks(name, tuple(layer[name].shape), delta=delta)
            assert len(blocks) == config.num_experts
            out = torch.empty_like(layer[name])
            for rows, take, factor in blocks:
                part = take(layer[name]).float()
                out[rows] = part * factor if factor is not None else part
            assert torch.equal(out, moved[name])

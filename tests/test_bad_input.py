"""Bad recipes and bad checkpoints: a clear error naming model, tensor and remedy, no output."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_symalign.errors import NonFiniteTensorError, SymAlignConfigError
from mergekit_symalign.methods import PREFIX

from .support import aligned_recipe, run_recipe

from .conftest import make_config, make_model, save


def recipe(family, **params):
    return aligned_recipe(PREFIX + "task_arithmetic", family["sibling"], family["reference"],
                          [family["skill"]], **params)


def refused(rec, out: Path, error=SymAlignConfigError, match=None):
    with pytest.raises(error, match=match) as info:
        run_recipe(rec, out)
    assert not out.exists(), "no output model may be written for a refused recipe"
    return str(info.value)


def copy_model(src: str, dst: Path, edit):
    shutil.copytree(src, dst)
    tensors = load_file(f"{dst}/model.safetensors")
    edit(tensors)
    save_file(tensors, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return str(dst)


def test_no_base_model(family, tmp_path):
    rec = recipe(family)
    del rec["base_model"]
    msg = refused(rec, tmp_path / "out", match="needs base_model")
    assert "base_model: <model>" in msg


def test_two_references(family, tmp_path):
    rec = recipe(family)
    rec["models"][1]["parameters"] = {"role": "reference"}
    msg = refused(rec, tmp_path / "out", match="more than one model has role: reference")
    assert family["reference"] in msg and family["skill"] in msg


def test_unknown_role(family, tmp_path):
    rec = recipe(family)
    rec["models"][0]["parameters"]["role"] = "referense"
    refused(rec, tmp_path / "out", match="not one of skill, reference")


@pytest.mark.parametrize("where", ["global", "model"])
def test_misspelt_plugin_parameter(family, tmp_path, where):
    rec = recipe(family)
    if where == "global":
        rec["parameters"] = {"permutaton": False}
    else:
        rec["models"][1]["parameters"]["algin"] = False
    msg = refused(rec, tmp_path / "out", match="unknown parameter")
    assert "Did you mean" in msg


def test_activation_alignment_needs_tokenizers(family, tmp_path):
    with pytest.raises(ValueError, match="cannot load its tokenizer"):
        run_recipe(recipe(family, alignment="activations"), tmp_path / "out")


def test_calibration_settings_are_global(family, tmp_path):
    rec = recipe(family, alignment="activations")
    rec["models"][1]["parameters"]["calibration_samples"] = 10
    refused(rec, tmp_path / "out", match="one global setting")


def test_bad_choice_values(family, tmp_path):
    refused(recipe(family, qk_rotation="partial"), tmp_path / "out", match="qk_rotation")
    refused(recipe(family, output_frame="target"), tmp_path / "out2", match="output_frame")


def test_skill_without_weight(family, tmp_path):
    rec = recipe(family)
    rec["models"][1]["parameters"] = {}
    refused(rec, tmp_path / "out", match="has no weight")


def test_models_of_different_shapes(family, tmp_path):
    config = make_config("llama", intermediate_size=96)
    other = save(make_model("llama", seed=3, intermediate_size=96), config, tmp_path / "wide")
    rec = recipe(family)
    rec["models"][1]["model"] = other
    msg = refused(rec, tmp_path / "out", match="intermediate_size")
    assert other in msg


def test_models_of_different_architectures(family, tmp_path):
    config = make_config("qwen2")
    other = save(make_model("qwen2", seed=3), config, tmp_path / "qwen")
    rec = recipe(family)
    rec["models"][1]["model"] = other
    # mergekit refuses first; with --allow-crimes it would go on, and the plugin refuses
    with pytest.raises(RuntimeError, match="allow-crimes"):
        run_recipe(rec, tmp_path / "out")
    with pytest.raises(SymAlignConfigError, match="models have different architectures") as info:
        run_recipe(rec, tmp_path / "out", allow_crimes=True)
    assert other in str(info.value) and "qwen2" in str(info.value) and "llama" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path):
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config)
    paths = []
    for i in range(2):
        model.save_pretrained(tmp_path / f"m{i}")
        paths.append(str(tmp_path / f"m{i}"))
    rec = {"merge_method": PREFIX + "ties", "base_model": paths[0],
           "models": [{"model": paths[1], "parameters": {"weight": 1.0}}]}
    msg = refused(rec, tmp_path / "out", match="no symmetry spec")
    assert "gpt2" in msg and "llama" in msg


def test_missing_mlp_tensor(family, tmp_path):
    broken = copy_model(family["skill"], tmp_path / "broken",
                        lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    rec = recipe(family)
    rec["models"][1]["model"] = broken
    msg = refused(rec, tmp_path / "out", match="lacks tensor model.layers.1.mlp.up_proj.weight")
    assert broken in msg and "re-download" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor(family, tmp_path, bad):
    def poison(t):
        t["model.layers.0.mlp.down_proj.weight"][3, 5] = bad

    broken = copy_model(family["skill"], tmp_path / "broken", poison)
    rec = recipe(family)
    rec["models"][1]["model"] = broken
    with pytest.raises(NonFiniteTensorError) as info:
        run_recipe(rec, tmp_path / "out")
    msg = str(info.value)
    assert broken in msg and "model.layers.0.mlp.down_proj.weight" in msg and "NaN/Inf" in msg


def test_tensor_filters_that_split_a_layer_are_refused(family, tmp_path):
    rec = recipe(family)
    rec["parameters"] = {"permutation": [{"filter": "up_proj", "value": False}, {"value": True}]}
    refused(rec, tmp_path / "out", match="every tensor of a layer moves together")


def test_tensor_at_a_time_api_takes_inputs_as_aligned_and_says_so():
    """merge_tensors cannot align (one tensor): it warns and computes B + combine(S - R)."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.api import merge_tensors

    base, ref, skill = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    method = registry.get(PREFIX + "task_arithmetic")
    with pytest.warns(UserWarning, match="taken as already aligned"):
        out = merge_tensors([base, ref, skill], method, base_index=0,
                            parameters={"role": ["skill", "reference", "skill"],
                                        "weight": [None, 0.5]})
    assert torch.allclose(out, base + 0.5 * (skill - ref), atol=1e-6)
    plain = merge_tensors([base, skill], registry.get("ties"), base_index=0,
                          parameters={"weight": [1.0], "density": [0.5]})
    ours = merge_tensors([base, skill], registry.get(PREFIX + "ties"), base_index=0,
                         parameters={"weight": [1.0], "density": [0.5]})
    assert torch.equal(plain, ours)  # no reference: exactly the wrapped method


@pytest.mark.parametrize("change,field", [
    (dict(num_key_value_heads=3), "num_kv_heads"),
    (dict(head_dim=8), "head_dim"),
    (dict(rope_theta=500000.0), "rope_theta"),
])
def test_mismatched_attention_geometry(family, tmp_path, change, field):
    config = make_config("llama", **change)
    other = save(make_model("llama", seed=3, **change), config, tmp_path / "other")
    rec = recipe(family)
    rec["models"][1]["model"] = other
    msg = refused(rec, tmp_path / "out", match=field)
    assert other in msg


def test_odd_rotary_dimension_is_refused(tmp_path):
    from mergekit_symalign.architectures import UnsupportedArchitecture, geometry_from_config

    config = make_config("stablelm", partial_rotary_factor=0.375)  # head_dim 8 -> 3 rotary dims
    with pytest.raises(UnsupportedArchitecture, match="odd"):
        geometry_from_config(config, "my-model")


def test_full_qk_rotation_refused_for_qk_norm(tmp_path):
    config = make_config("qwen3")
    paths = [save(make_model("qwen3", seed=s), config, tmp_path / f"m{s}") for s in range(2)]
    rec = {"merge_method": PREFIX + "task_arithmetic", "base_model": paths[0], "dtype": "float32",
           "models": [{"model": paths[1], "parameters": {"weight": 1.0}}],
           "parameters": {"qk_rotation": "full"}}
    refused(rec, tmp_path / "out", match="qk_rotation: full .* not available for qwen3: its QK-norm")


def test_full_qk_rotation_warns_and_measures(family, tmp_path, caplog):
    rec = recipe(family, qk_rotation="full")
    with pytest.warns(UserWarning, match="NOT a symmetry"):
        with caplog.at_level("WARNING"):
            run_recipe(rec, tmp_path / "out")
    assert "relative change of attention logits" in caplog.text

"""The real parent/child pairs the cross-size recipes name, by their published configs.

The config values below are copied from the models' ``config.json`` on the Hugging Face Hub
(read 2026-12-07; only the fields the checks use). Nothing is downloaded: this pins what the
recipes' comments say about sizes, and that the plugin accepts each real pair as a pruned
child, refuses Llama-3.2-1B (another head size) and refuses a pair given the wrong way round.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig

from mergekit_symalign import crosssize as cs
from mergekit_symalign.validation import _computation

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

LLAMA3 = dict(model_type="llama", head_dim=128, vocab_size=128256, rms_norm_eps=1e-5,
              rope_theta=500000.0, hidden_act="silu", max_position_embeddings=131072)
LLAMA3_ROPE = lambda factor: {"rope_type": "llama3", "factor": factor,  # noqa: E731
                              "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                              "original_max_position_embeddings": 8192}
NEMO = dict(model_type="mistral", head_dim=128, vocab_size=131072, rms_norm_eps=1e-5,
            rope_theta=1000000.0, hidden_act="silu", sliding_window=None)

CONFIGS = {
    "meta-llama/Llama-3.1-8B": dict(LLAMA3, hidden_size=4096, intermediate_size=14336,
                                    num_attention_heads=32, num_key_value_heads=8,
                                    num_hidden_layers=32, tie_word_embeddings=False,
                                    rope_scaling=LLAMA3_ROPE(8.0)),
    "nvidia/Llama-3.1-Minitron-4B-Width-Base": dict(LLAMA3, hidden_size=3072, intermediate_size=9216,
                                                    num_attention_heads=32, num_key_value_heads=8,
                                                    num_hidden_layers=32, tie_word_embeddings=False,
                                                    rope_scaling=LLAMA3_ROPE(8.0)),
    "meta-llama/Llama-3.2-3B": dict(LLAMA3, hidden_size=3072, intermediate_size=8192,
                                    num_attention_heads=24, num_key_value_heads=8,
                                    num_hidden_layers=28, tie_word_embeddings=True,
                                    rope_scaling=LLAMA3_ROPE(32.0)),
    "meta-llama/Llama-3.2-1B": dict(LLAMA3, head_dim=64, hidden_size=2048, intermediate_size=8192,
                                    num_attention_heads=32, num_key_value_heads=8,
                                    num_hidden_layers=16, tie_word_embeddings=True,
                                    rope_scaling=LLAMA3_ROPE(32.0)),
    "mistralai/Mistral-Nemo-Base-2407": dict(NEMO, hidden_size=5120, intermediate_size=14336,
                                             num_attention_heads=32, num_key_value_heads=8,
                                             num_hidden_layers=40, tie_word_embeddings=False),
    "nvidia/Mistral-NeMo-Minitron-8B-Base": dict(NEMO, hidden_size=4096, intermediate_size=11520,
                                                 num_attention_heads=32, num_key_value_heads=8,
                                                 num_hidden_layers=40, tie_word_embeddings=False),
}


def config(name):
    values = dict(CONFIGS[name])
    return AutoConfig.for_model(values.pop("model_type"), **values)


def recipe(file):
    return yaml.safe_load((RECIPES / file).read_text()), (RECIPES / file).read_text()


def reference_of(r):
    return next(m["model"] for m in r["models"] if (m.get("parameters") or {}).get("role") == "reference")


@pytest.mark.parametrize("file, changed", [
    ("minitron_4b_width_transfer.yml", {"hidden_size": (4096, 3072), "intermediate_size": (14336, 9216)}),
    ("mistral_nemo_minitron_8b_transfer.yml", {"hidden_size": (5120, 4096), "intermediate_size": (14336, 11520)}),
    ("llama3_2_3b_depth_width_transfer.yml", {"hidden_size": (4096, 3072), "intermediate_size": (14336, 8192),
                                             "num_attention_heads": (32, 24), "query_heads_per_kv_group": (4, 3),
                                             "num_hidden_layers": (32, 28)}),
])
def test_recipe_pairs_are_pruned_children_with_the_sizes_their_comments_state(file, changed):
    r, text = recipe(file)
    parent, child = config(reference_of(r)), config(r["base_model"])
    assert cs.check_child(parent, child, "parent", "child") is True
    p, c = cs._sizes(parent), cs._sizes(child)
    assert {k: (p[k], c[k]) for k in p if p[k] != c[k]} == changed
    # every size the recipe's comment names is the published one
    for parent_size, child_size in changed.values():
        assert str(child_size) in text and str(parent_size) in text, (file, parent_size, child_size)
    for a, b in re.findall(r"(?:hidden|MLP) (\d+) vs (\d+)", text):
        assert (int(b), int(a)) in changed.values(), (file, a, b)


@pytest.mark.parametrize("parent, child", [
    ("meta-llama/Llama-3.1-8B", "nvidia/Llama-3.1-Minitron-4B-Width-Base"),
    ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.2-3B"),
    ("mistralai/Mistral-Nemo-Base-2407", "nvidia/Mistral-NeMo-Minitron-8B-Base"),
])
def test_a_real_pair_given_the_wrong_way_round_is_refused(parent, child):
    with pytest.raises(ValueError, match="wrong way round"):
        cs.check_child(config(child), config(parent), "reference", "base")


def test_llama_3_2_1b_is_refused_by_its_head_size():
    with pytest.raises(ValueError, match=r"head_dim: reference 128 vs base 64"):
        cs.check_child(config("meta-llama/Llama-3.1-8B"), config("meta-llama/Llama-3.2-1B"))


def test_llama_3_2_3b_computes_with_other_rope_scaling_and_ties_its_embeddings():
    """What the 3B recipe's comment says the plugin warns about."""
    p, c = _computation(config("meta-llama/Llama-3.1-8B")), _computation(config("meta-llama/Llama-3.2-3B"))
    differ = {k for k in p if p[k] != c[k]}
    assert differ == {"rope_parameters / rope_scaling", "tie_word_embeddings"}
    p, c = (_computation(config(n)) for n in ("meta-llama/Llama-3.1-8B", "nvidia/Llama-3.1-Minitron-4B-Width-Base"))
    assert p == c

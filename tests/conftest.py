"""Tiny random models of each supported architecture, saved like real checkpoints.

Fixtures and model builders; recipe builders, merge runners and the other helpers that are not
fixtures live in ``tests/support.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import mergekit_symalign  # noqa: E402,F401  (registers the methods)
from mergekit_symalign.statedict import scramble_state_dict  # noqa: E402

from . import support  # noqa: E402
from .support import perturbed  # noqa: E402

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
ARCH_CONFIGS = {
    "llama": (transformers.LlamaConfig, dict(head_dim=12)),
    "mistral": (transformers.MistralConfig, dict(head_dim=12, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, dict()),
    # Gemma always ties its embeddings (mergekit's gemma definitions have no lm_head)
    "gemma": (transformers.GemmaConfig, dict(head_dim=16, tie_word_embeddings=True)),
    "gemma2": (transformers.Gemma2Config, dict(head_dim=16, sliding_window=8,
                                                attn_logit_softcapping=5.0,
                                                final_logit_softcapping=3.0)),
    "gemma3_text": (transformers.Gemma3TextConfig, dict(head_dim=16, sliding_window=8,
                                                        tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16)),
    "olmo2": (transformers.Olmo2Config, dict(pad_token_id=0)),
    "phi3": (transformers.Phi3Config, dict(pad_token_id=0)),
    # partial rotary: half of each head's dims rotate, the other half keep O(d - r)
    "stablelm": (transformers.StableLmConfig, dict(partial_rotary_factor=0.5, use_qkv_bias=True)),
}


def make_config(arch: str = "llama", **overrides):
    cls, extra = ARCH_CONFIGS[arch]
    return cls(**{**COMMON, **extra, **overrides})


def make_model(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = make_config(arch, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random biases and norms: zero/one init would hide bugs
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save(model_or_sd, config, path: Path, dtype: torch.dtype = torch.float32) -> str:
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    if isinstance(model_or_sd, dict):
        model.load_state_dict(model_or_sd)
    else:
        model.load_state_dict(model_or_sd.state_dict())
    model.config.dtype = dtype
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def logits(path: str, ids=None) -> torch.Tensor:
    """The saved model's logits on ``ids`` (default: two fixed random rows of the tiny vocab)."""
    if ids is None:
        ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(7))
    return support.logits(path, ids)


def scale_of(t: torch.Tensor) -> float:
    return float(t.abs().max())


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """reference R, skill S (R + delta), sibling T (R + other delta), and scrambles."""
    root = tmp_path_factory.mktemp("family")
    config = make_config("llama")
    ref = make_model("llama", seed=0)
    skill = perturbed(ref, seed=1, scale=0.05)
    sibling = perturbed(ref, seed=2, scale=0.02)
    paths = {
        "config": config,
        "reference": save(ref, config, root / "reference"),
        "skill": save(skill, config, root / "skill"),
        "sibling": save(sibling, config, root / "sibling"),
    }
    # The scrambles' seeds are kept: tests compare merges with the scrambled merge exactly.
    paths["scramble"] = {"reference_scrambled": dict(seed=11), "skill_scrambled": dict(seed=12)}
    ref_scr, _ = scramble_state_dict(ref.state_dict(), config, seed=11)
    paths["reference_scrambled"] = save(ref_scr, config, root / "reference_scrambled")
    skill_scr, _ = scramble_state_dict(skill, config, seed=12)
    paths["skill_scrambled"] = save(skill_scr, config, root / "skill_scrambled")
    from mergekit_symalign.spec import Switches

    # Perm + rotations only: an isometry, under which the alignment is exactly equivariant.
    sib_iso, _ = scramble_state_dict(sibling, config, seed=13, switches=Switches(scaling=False))
    paths["sibling_scrambled"] = save(sib_iso, config, root / "sibling_scrambled")
    paths["scramble"]["sibling_scrambled"] = dict(seed=13, switches=Switches(scaling=False))
    paths["root"] = root
    return paths


@pytest.fixture(scope="session")
def family_with_tokenizers(family, tmp_path_factory):
    """The family, each model with a word tokenizer (for alignment: activations)."""
    import shutil

    root = tmp_path_factory.mktemp("tok_family")
    out = dict(family)
    for name in ("reference", "skill", "sibling", "reference_scrambled", "skill_scrambled",
                 "sibling_scrambled"):
        shutil.copytree(family[name], root / name)
        save_word_tokenizer(root / name)
        out[name] = str(root / name)
    return out


def save_word_tokenizer(path, vocab_size: int = VOCAB):
    """A WordLevel tokenizer over words w0..wN whose ids cover the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2}
    for i in range(vocab_size - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]",
                                               bos_token="[BOS]", eos_token="[EOS]")
    tok.save_pretrained(str(path))
    return tok


def word_calibration(path, lines: int = 64, words: int = 24, seed: int = 0, vocab_size: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size - 3, (lines, words), generator=g)
    path.write_text("\n".join(" ".join(f"w{int(i)}" for i in row) for row in ids) + "\n")
    return str(path)


def load(path: str):
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


def scrambled_like(state: Dict, family, name: str):
    """``state`` moved by the very scramble that made ``family[name]`` from its original."""
    return scramble_state_dict(state, family["config"], **family["scramble"][name])[0]


def assert_tensors_close(got: Dict, want: Dict, rtol: float = 1e-5):
    """Tensor by tensor: max |got - want| <= rtol * max |want| (float32 rounding of the
    transforms is ~1e-7 relative)."""
    assert got.keys() == want.keys()
    for name in want:
        err = float((got[name].double() - want[name].double()).abs().max())
        assert err <= rtol * scale_of(want[name]), (name, err, scale_of(want[name]))


def scrambled_pair_with_tokenizers(tmp_path: Path) -> Dict[str, str]:
    """A tiny Llama reference, a skill (reference + 5 % noise) and a base (the reference under
    a random residual-permutation element), saved with word tokenizers: the activation-path
    family of the cache tests."""
    from mergekit_symalign.statedict import scramble_state_dict

    config = make_config("llama")
    ref = make_model("llama", seed=0)
    paths = {"reference": save(ref, config, tmp_path / "reference"),
             "skill": save(perturbed(ref, seed=1, scale=0.05), config, tmp_path / "skill"),
             "base": save(scramble_state_dict(ref.state_dict(), config, seed=2, residual="permutation")[0],
                          config, tmp_path / "base")}
    for path in paths.values():
        save_word_tokenizer(path)
    return paths

"""The suites' models: SmolLM2 (real or with random weights) and synthetic Llama shapes, each
as reference, skill, target (and sibling), generated here and cached in the work folder."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tests.support import perturbed

SUITES = ("smollm2", "8b-layer", "1b", "smollm2-random")

SYNTHETIC = {  # LlamaConfig fields of the generated models
    "8b-layer": dict(hidden_size=4096, num_hidden_layers=1, intermediate_size=14336,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=512,
                     rope_theta=500000.0, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=2048,
               rope_theta=500000.0, tie_word_embeddings=True),
}


def _save(state, config, path: Path, dtype: torch.dtype, tokenizer=None) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:  # alignment: activations runs each model on calibration text
        tokenizer.save_pretrained(path)
    config.torch_dtype = dtype
    config.save_pretrained(path)
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / ".complete").write_text("")


def build_models(workdir: Path, suite: str, smollm2_dir=None):
    """reference, skill (perturbed reference), target (perturbed reference under a random
    exact symmetry) and, for SmolLM2, sibling (the same perturbed reference, not moved: the
    alignment finds the identity); cached in ``workdir/<suite>``."""
    from mergekit_symalign.statedict import scramble_state_dict

    root = workdir / suite
    names = ("reference", "skill", "target") + (("sibling",) if suite.startswith("smollm2") else ())
    paths = {n: root / n for n in names}
    if all((p / ".complete").is_file() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    if suite == "smollm2":
        from examples import smollm

        model, tokenizer = smollm.load_smollm2(torch.float32)
        config, dtype = model.config, torch.float32
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        del model
    else:
        from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        if suite == "smollm2-random":
            if smollm2_dir is None:
                from examples import smollm

                smollm2_dir = smollm.cached_smollm2_dir()
            config = AutoConfig.from_pretrained(smollm2_dir)
            dtype, tokenizer = torch.float32, AutoTokenizer.from_pretrained(smollm2_dir)
        else:
            config, dtype, tokenizer = LlamaConfig(**SYNTHETIC[suite]), torch.bfloat16, None
        config.architectures = ["LlamaForCausalLM"]
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
        g = torch.Generator().manual_seed(0)
        sd = {k: (1.0 + 0.1 * torch.randn(s, generator=g)) if "norm" in k
              else 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}
        if config.tie_word_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    skill = perturbed(sd, seed=0, scale=0.01)
    sibling = perturbed(sd, seed=2, scale=0.01)
    target, _ = scramble_state_dict(sibling, config, seed=1)
    models = {"reference": sd, "skill": skill, "target": target, "sibling": sibling}
    for name in paths:
        _save(models[name], config, paths[name], dtype, tokenizer)
    return {k: str(v) for k, v in paths.items()}


def layer_mib(paths):
    from safetensors import safe_open

    with safe_open(f"{paths['reference']}/model.safetensors", "pt") as f:
        keys = [k for k in f.keys() if ".layers.0." in k]
        total = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
        itemsize = 4 if f.get_slice(keys[0]).get_dtype() == "F32" else 2
    return total * itemsize / 2**20

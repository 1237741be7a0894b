"""State dicts of the toy Llama models: load, save, split by layer, distances, interpolation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import torch

from benchmarks import toyworld as tw
from examples.common import load_tensors


StateDict = Dict[str, torch.Tensor]


def load_state(path: Path) -> StateDict:
    return {k: v.float() for k, v in load_tensors(path).items()}


def save_state(state: StateDict, config, path: Path) -> Path:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    model.save_pretrained(str(path), safe_serialization=True)
    tw.save_tokenizer(path)
    return path


def layer_names(config) -> List[int]:
    return list(range(config.num_hidden_layers))


def split_layers(sd: Mapping[str, torch.Tensor], layers: Sequence[int]) -> Dict[int, StateDict]:
    out: Dict[int, StateDict] = {i: {} for i in layers}
    for name, t in sd.items():
        if name.startswith("model.layers."):
            index, rel = name[len("model.layers."):].split(".", 1)
            out[int(index)][rel] = t
    return out


def relative_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    num = sum(float(((b[k].double() - a[k].double()) ** 2).sum()) for k in a)
    den = sum(float((a[k].double() ** 2).sum()) for k in a)
    return math.sqrt(num / den)


def layer_distances(a, b, config) -> List[float]:
    la, lb = split_layers(a, layer_names(config)), split_layers(b, layer_names(config))
    return [relative_distance(la[i], lb[i]) for i in layer_names(config)]


def interpolate(a: StateDict, b: StateDict, alpha: float) -> StateDict:
    return {k: (1 - alpha) * a[k] + alpha * b[k] for k in a}

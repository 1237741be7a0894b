"""Fusion: the loss along the straight line between base A and base B aligned to A, its
barrier, the per-unit correlations, and which part of the model the barrier lives in."""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

from benchmarks import paper_analog as pa
from benchmarks import toyworld as tw
from benchmarks.independent_init.matching import align_variant
from benchmarks.independent_init.states import (
    StateDict,
    interpolate,
    layer_distances,
    layer_names,
    load_state,
    relative_distance,
)
from benchmarks.independent_init.variants import FUSION, PARTS_VARIANTS


CORRELATION_ROWS = 128  # calibration rows (of 64 tokens) the unit correlations are measured on


def calibration_ids(workdir: Path, world: tw.World, lines: int) -> torch.Tensor:
    """The toy world's calibration text (``paper_analog.write_calibration``), tokenized and
    packed into rows of 64 tokens as the plugin does."""
    from mergekit_symalign.calibration import load_calibration, tokenize_calibration

    workdir.mkdir(parents=True, exist_ok=True)
    path = pa.write_calibration(workdir / "calibration.txt", world, lines)
    tok = tw.save_tokenizer(workdir / "tokenizer")
    return tokenize_calibration({"toy": tok}, load_calibration(path, lines), max_tokens=64)


def eval_batches(world: tw.World, examples: int, exclude: set, batch_size: int = 64):
    """Held-out pre-training text (the bases' training mixture, its own random draw)."""
    rng = random.Random(20_250_610)
    sample = tw.mixture(pa.PRETRAINING_TASKS, world, 1 - pa.PRETRAINING_INSTRUCTIONS)
    rows = []
    while len(rows) < examples:
        ex = sample(rng)
        if ex[0] not in exclude:
            rows.append(ex)
    return [tw.batch(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def mean_loss(model, batches) -> float:
    """Token-weighted mean next-token cross-entropy on the completions."""
    total, count = 0.0, 0
    for ids, mask, labels in batches:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        keep = target != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep].float(), target[keep],
                                                         reduction="sum"))
        count += int(keep.sum())
    return total / count


def path_losses(model, a: StateDict, b: StateDict, alphas: Sequence[float], batches) -> List[float]:
    out = []
    for alpha in alphas:
        model.load_state_dict(interpolate(a, b, alpha))
        out.append(mean_loss(model, batches))
    return out


def barrier(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """The path's largest excess over the straight line between its endpoints' losses."""
    return max(l - ((1 - a) * losses[0] + a * losses[-1]) for a, l in zip(alphas, losses))


@torch.no_grad()
def unit_correlations(model, a: StateDict, b: StateDict, ids: torch.Tensor) -> Dict[str, float]:
    """Mean per-unit Pearson correlation, A vs B' on the calibration tokens, of the residual
    stream's coordinates (every layer's input and the last layer's output, before the final
    norm) and of the MLP neurons (``down_proj``'s input)."""
    def record(sd):
        model.load_state_dict(sd)
        mlp: Dict[int, List[torch.Tensor]] = {}
        hooks = [layer.mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, i=i: mlp.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
            for i, layer in enumerate(model.model.layers)]
        hidden: List[List[torch.Tensor]] = []
        try:
            for start in range(0, ids.shape[0], 16):
                out = model(input_ids=ids[start:start + 16], output_hidden_states=True)
                hidden.append([h.reshape(-1, h.shape[-1]) for h in out.hidden_states[:-1]])
        finally:
            for h in hooks:
                h.remove()
        stream = [torch.cat([rows[j] for rows in hidden]) for j in range(len(hidden[0]))]
        return stream, [torch.cat(mlp[i]) for i in sorted(mlp)]

    def corr(x, y):
        x, y = x - x.mean(0), y - y.mean(0)
        den = (x.norm(dim=0) * y.norm(dim=0)).clamp_min(1e-12)
        return float(((x * y).sum(0) / den).mean())

    (sa, ma), (sb, mb) = record(a), record(b)
    # hidden_states[0] is the embedding output; the rest are layer outputs (the next layer's
    # input); the last one (after the final norm in HF) is left out above.
    return {"residual_corr": statistics.mean(corr(x, y) for x, y in zip(sa[1:], sb[1:])),
            "embedding_corr": corr(sa[0], sb[0]),
            "mlp_corr": statistics.mean(corr(x, y) for x, y in zip(ma, mb))}


def fusion_pair(paths: Dict[str, Path], config, ids: torch.Tensor, batches, alphas,
                variants: Mapping[str, Optional[Dict]]) -> Dict[str, Dict]:
    """Every variant's path between the two bases: losses, barrier, diagnostics."""
    from transformers import LlamaForCausalLM

    a, b = load_state(paths["base"]), load_state(paths["base-other-init"])
    model = LlamaForCausalLM(config).eval()
    out: Dict[str, Dict] = {}
    for name, how in variants.items():
        t = time.perf_counter()
        trace: List[Dict] = []
        aligned = align_variant(how, a, b, config, ids, trace)
        align_s = time.perf_counter() - t
        losses = path_losses(model, a, aligned, alphas, batches)
        row = {"losses": losses, "barrier": barrier(alphas, losses), "align_s": align_s,
               "distance": relative_distance(a, aligned),
               "layer_distances": layer_distances(a, aligned, config),
               **unit_correlations(model, a, aligned, ids[:CORRELATION_ROWS])}
        if trace:
            row["trace"] = trace
        out[name] = row
        print(f"    {name:<28} barrier {row['barrier']:.3f}  loss(1/2) "
              f"{losses[len(losses) // 2]:.3f}  ends {losses[0]:.3f}/{losses[-1]:.3f}  "
              f"dist {row['distance']:.3f}  corr resid {row['residual_corr']:.2f} "
              f"mlp {row['mlp_corr']:.2f}  ({align_s:.0f} s)", flush=True)
    return out


def model_parts(config) -> Dict[str, Callable[[str], bool]]:
    """The pieces of a model that :func:`fusion_parts` interpolates one at a time."""
    parts = {"embeddings": lambda k: k == "model.embed_tokens.weight"}
    for i in layer_names(config):
        parts[f"layer {i}"] = lambda k, i=i: k.startswith(f"model.layers.{i}.")
    parts["final norm + lm_head"] = lambda k: k in ("model.norm.weight", "lm_head.weight")
    return parts


def fusion_parts(paths: Dict[str, Path], config, ids: torch.Tensor, batches,
                 names: Sequence[str] = PARTS_VARIANTS) -> Dict[str, Dict[str, float]]:
    """Where the barrier lives: model A with only one part replaced by the midpoint
    ``(A + B') / 2`` of that part; the loss above A's own, per part and variant."""
    from transformers import LlamaForCausalLM

    a, b = load_state(paths["base"]), load_state(paths["base-other-init"])
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(a)
    own = mean_loss(model, batches)
    out = {}
    for name in names:
        aligned = align_variant(FUSION[name], a, b, config, ids)
        middle = interpolate(a, aligned, 0.5)
        row = {}
        for part, inside in model_parts(config).items():
            model.load_state_dict({k: middle[k] if inside(k) else a[k] for k in a})
            row[part] = mean_loss(model, batches) - own
        out[name] = row
        print(f"    parts, {name:<26} " + "  ".join(f"{p} {v:.2f}" for p, v in row.items()),
              flush=True)
    return out

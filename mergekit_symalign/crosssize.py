"""Pruned children: a parent's skill vector restricted to its pruned, retrained child.

A width/depth-pruned child (Minitron, Sheared-LLaMA) keeps a *permuted subset* of its
parent's coordinates on every axis: residual channels, KV groups with their query heads,
MLP neurons per layer, and a monotone subset of layers (see docs/cross-size.md). With the
index maps, the parent's skill vector ``tau = skill - parent`` restricted to the child's
coordinates is added to the child; without retraining, ``child + restrict(tau)`` equals the
skill model pruned by the same indices, weight for weight.

Pure torch/scipy, no mergekit import. The pieces a merge glue needs are per layer:

* :func:`match_layer` — given the parent's and the child's layer tensors and the residual
  map, the :class:`LayerRestriction` (which parent KV groups, query heads and neurons);
* :class:`Restriction` — by child tensor name, the parent tensor's name
  (:meth:`Restriction.parent_name`) and the parent-shaped tensor restricted to the child's
  coordinates (:meth:`Restriction.restrict`).

Whole models: :func:`match_child` (maps from weights; any name -> tensor mapping, read one layer
pair at a time, so a lazy one streams), :func:`restrict_state_dict`,
:func:`transfer`, :func:`prune_state_dict` (importance-sorted pruning, for tests and
benchmarks), :func:`check_child` (refusals by shape).

Neuron and head *scales* are not fitted: pruning does not rescale, and a retrained child's
drift is not a symmetry of the parent, so the restriction uses indices only.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .architectures import (
    Architecture,
    Geometry,
    _projection,
    architecture_for,
    geometry_from_config,
    split_layer_name,
    text_config,
)

Tensors = Mapping[str, torch.Tensor]
Index = Optional[torch.Tensor]  # None: the axis is kept whole


# --------------------------------------------------------------------------- the maps


@dataclass(frozen=True)
class LayerRestriction:
    """Which parent coordinates one child layer keeps, in the child's order.

    ``kv_groups[j]``: the parent KV group of child group ``j``; ``q_heads[j, c]``: the parent
    query head (index within its parent group) of child group ``j``'s head ``c``;
    ``neurons[n]``: the parent MLP neuron of child neuron ``n``."""

    kv_groups: torch.Tensor  # [K_child]
    q_heads: torch.Tensor  # [K_child, G_child]
    neurons: torch.Tensor  # [I_child]

    def __eq__(self, other):
        return isinstance(other, LayerRestriction) and all(
            torch.equal(a, b) for a, b in ((self.kv_groups, other.kv_groups),
                                           (self.q_heads, other.q_heads),
                                           (self.neurons, other.neurons)))


@dataclass(frozen=True)
class ChildMap:
    """The child's coordinates as parent coordinates: ``residual[i]`` is the parent channel
    of child channel ``i``; ``layers[k]`` the parent layer of child layer ``k`` (increasing);
    ``per_layer[k]`` child layer ``k``'s heads and neurons."""

    residual: torch.Tensor  # [D_child]
    layers: Tuple[int, ...]
    per_layer: Tuple[LayerRestriction, ...]

    def __eq__(self, other):
        return (isinstance(other, ChildMap) and torch.equal(self.residual, other.residual)
                and self.layers == other.layers and self.per_layer == other.per_layer)

    def recovery(self, truth: "ChildMap") -> Dict[str, float]:
        """Share of this map's indices equal to ``truth``'s, per axis (layers matched by
        child index; heads and neurons compared only in layers mapped alike)."""
        def share(a, b):
            return float((a == b).double().mean()) if a.numel() else 1.0
        same = [k for k in range(len(self.layers)) if self.layers[k] == truth.layers[k]]
        out = {"residual": share(self.residual, truth.residual),
               "layers": len(same) / max(len(self.layers), 1)}
        for axis in ("kv_groups", "q_heads", "neurons"):
            vals = [share(getattr(self.per_layer[k], axis), getattr(truth.per_layer[k], axis))
                    for k in same]
            out[axis] = sum(vals) / len(vals) if vals else 0.0
        return out


# --------------------------------------------------------------------------- refusals


def _sizes(cfg) -> Dict[str, Any]:
    g = geometry_from_config(cfg)
    cfg = text_config(cfg)
    return {"model_type": g.model_type, "hidden_size": g.hidden_size,
            "num_attention_heads": g.num_heads, "num_key_value_heads": g.num_kv_heads,
            "query_heads_per_kv_group": g.group_size, "head_dim": g.head_dim,
            "rotary_dim": g.rotary_dim, "intermediate_size": g.intermediate_size,
            "num_hidden_layers": int(cfg.num_hidden_layers), "vocab_size": int(cfg.vocab_size)}


NARROWABLE = ("hidden_size", "num_key_value_heads", "query_heads_per_kv_group",
              "intermediate_size", "num_hidden_layers")
SAME = ("model_type", "head_dim", "rotary_dim", "vocab_size")


def check_child(parent_config, child_config, parent: str = "reference", child: str = "base") -> bool:
    """Refuse a ``child`` that cannot be a pruned child of ``parent`` (a ValueError naming
    both models and the mismatched sizes); True when the child is strictly smaller on some
    axis (a pruned child), False when it has the parent's shape (ordinary alignment)."""
    p, c = _sizes(parent_config), _sizes(child_config)
    same = [f"{k}: {parent} {p[k]} vs {child} {c[k]}" for k in SAME if p[k] != c[k]]
    if same:
        raise ValueError(
            f"{child} cannot be a pruned child of {parent}: pruning keeps {', '.join(SAME)}, "
            f"but they differ ({'; '.join(same)}). A cross-size transfer needs the child's "
            f"own parent (same tokenizer, head size and architecture) as the reference.")
    wider = [f"{k}: {child} {c[k]} > {parent} {p[k]}" for k in NARROWABLE if c[k] > p[k]]
    if wider:
        narrower = [f"{k}: {child} {c[k]} < {parent} {p[k]}" for k in NARROWABLE if c[k] < p[k]]
        hint = (f" It is smaller elsewhere ({'; '.join(narrower)}), so neither model can be a "
                f"pruned child of the other." if narrower else
                f" It looks like the parent of {parent}: were they given the wrong way round? "
                f"The pruned child is the base model, its parent the reference.")
        raise ValueError(f"{child} is wider than {parent} ({'; '.join(wider)}), so it cannot be "
                         f"a pruned child of it.{hint}")
    return any(c[k] < p[k] for k in NARROWABLE)


# --------------------------------------------------------------------------- tensor indices


def _layer_names(arch: Architecture, g: Geometry) -> Dict[str, str]:
    """Role of each layer tensor the restriction knows (relative names)."""
    names: Dict[str, str] = {}
    for which in ("q", "k", "v", "gate", "up"):
        base, _ = _projection(arch, which, g)
        names[f"{base}.weight"] = "reader"
        names[f"{base}.bias"] = "reader_bias"
    for which in ("o", "down"):
        base, _ = _projection(arch, which, g)
        names[f"{base}.weight"] = "writer"
        names[f"{base}.bias"] = "residual"
    norms = [n for n, _ in arch.readers if n] + [n for _, n in arch.writers if n]
    for norm in norms:
        names[f"{norm}.weight"] = "residual"
        names[f"{norm}.bias"] = "residual"
    attn = arch.q.rsplit(".", 1)[0]
    for which in "qk":
        names[f"{attn}.{which}_norm.weight"] = f"{which}_norm"
    return names


def head_rows(g: Geometry, r: LayerRestriction) -> Dict[str, torch.Tensor]:
    """Parent rows of q, k, v (each projection's own row numbering) the child keeps."""
    d = g.head_dim
    dims = torch.arange(d)
    heads = (r.kv_groups[:, None] * g.group_size + r.q_heads).reshape(-1)
    q = (heads[:, None] * d + dims).reshape(-1)
    kv = (r.kv_groups[:, None] * d + dims).reshape(-1)
    return {"q": q, "k": kv, "v": kv}


def projection_rows(arch: Architecture, g: Geometry, r: LayerRestriction) -> Dict[str, torch.Tensor]:
    """Parent rows of each projection tensor (fused ones as one index, child order)."""
    rows = head_rows(g, r)
    rows.update(gate=r.neurons, up=r.neurons)
    out: Dict[str, torch.Tensor] = {}
    for which in ("q", "k", "v", "gate", "up"):
        base, offset = _projection(arch, which, g)
        part = rows[which] + offset
        out[base] = torch.cat([out[base], part]) if base in out else part
    return out


def layer_indices(arch: Architecture, g: Geometry, r: LayerRestriction,
                  residual: torch.Tensor) -> Dict[str, Tuple[Index, Index]]:
    """``{relative name: (parent rows, parent columns)}`` of every tensor of a layer."""
    rows = projection_rows(arch, g, r)
    q_rows = head_rows(g, r)["q"]
    out: Dict[str, Tuple[Index, Index]] = {}
    for name, role in _layer_names(arch, g).items():
        base = name.rsplit(".", 1)[0]
        if role == "reader":
            out[name] = (rows[base], residual)
        elif role == "reader_bias":
            out[name] = (rows[base], None)
        elif role == "writer":
            out[name] = (residual, q_rows if base == arch.o else r.neurons)
        elif role == "residual":
            out[name] = (residual, None)
        elif arch.qk_norm == "all_heads":  # one weight per q/k row
            out[name] = (head_rows(g, r)[role[0]], None)
        else:  # per-head norm (size head_dim): head_dim is never pruned
            out[name] = (None, None)
    return out


def module_indices(arch: Architecture, residual: torch.Tensor) -> Dict[str, Tuple[Index, Index]]:
    return {arch.embed: (None, residual), arch.lm_head: (None, residual),
            f"{arch.final_norm}.weight": (residual, None), f"{arch.final_norm}.bias": (residual, None)}


def _take(t: torch.Tensor, rows: Index, cols: Index) -> torch.Tensor:
    if rows is not None:
        t = t.index_select(0, rows.to(t.device))
    if cols is not None:
        t = t.index_select(1, cols.to(t.device))
    return t


class Restriction:
    """Parent-shaped tensors to the child's coordinates, by the child's tensor names."""

    def __init__(self, parent_config, child_map: ChildMap, model: str = "reference"):
        self.geometry = geometry_from_config(parent_config, model)
        self.arch = architecture_for(self.geometry.model_type, model)
        self.map = child_map
        self.model = model
        self._layers = [layer_indices(self.arch, self.geometry, r, child_map.residual)
                        for r in child_map.per_layer]
        self._module = module_indices(self.arch, child_map.residual)

    def _split(self, child_name: str):
        split = split_layer_name(self.arch, child_name)
        if split is None:
            for rel, idx in self._module.items():
                if child_name.endswith(rel):
                    return child_name, idx
            raise ValueError(self._unknown(child_name))
        prefix, k, rel = split
        if k >= len(self.map.layers) or rel not in self._layers[k]:
            raise ValueError(self._unknown(child_name))
        parent_prefix = prefix[: len(prefix) - len(f"{k}.")] + f"{self.map.layers[k]}."
        return parent_prefix + rel, self._layers[k][rel]

    def _unknown(self, name: str) -> str:
        return (f"{name}: no restriction is known for this tensor of {self.arch.name} (child "
                f"with {len(self.map.layers)} layers), so a cross-size transfer cannot place "
                f"it. Use a supported architecture's plain checkpoint.")

    def parent_name(self, child_name: str) -> str:
        """The parent tensor whose restriction is child tensor ``child_name``."""
        return self._split(child_name)[0]

    def restrict(self, child_name: str, parent_tensor: torch.Tensor) -> torch.Tensor:
        _, (rows, cols) = self._split(child_name)
        if parent_tensor.dim() == 1:
            cols = None
        return _take(parent_tensor, rows, cols)


def restrict_state_dict(state_dict: Tensors, parent_config, child_map: ChildMap,
                        child_names: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """A parent-shaped state dict restricted to the child's coordinates, under the child's
    names (default: the parent's names of the kept layers, renumbered)."""
    rx = Restriction(parent_config, child_map)
    if child_names is None:
        child_names = _child_names(rx, state_dict)
    return {name: rx.restrict(name, state_dict[rx.parent_name(name)]) for name in child_names}


def _child_names(rx: Restriction, state_dict: Tensors) -> List[str]:
    inverse = {p: k for k, p in enumerate(rx.map.layers)}
    names = []
    for name in state_dict:
        split = split_layer_name(rx.arch, name)
        if split is None:
            names.append(name)
        elif split[1] in inverse:
            prefix, p, rel = split
            names.append(prefix[: len(prefix) - len(f"{p}.")] + f"{inverse[p]}.{rel}")
    return names


def transfer(child: Tensors, parent: Tensors, skill: Tensors, parent_config, child_map: ChildMap,
             scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """``child + scale * restrict(skill - parent)``, tensor by tensor in the child's names.
    Tied embeddings restrict alike on both sides (the child's ``lm_head``, if listed, is its
    embedding's restriction too)."""
    rx = Restriction(parent_config, child_map)
    out = {}
    for name, value in child.items():
        p = rx.parent_name(name)
        if p not in parent and p.endswith(rx.arch.lm_head):  # tied parent: lm_head is embed
            p = p[: -len(rx.arch.lm_head)] + rx.arch.embed
        tau = rx.restrict(name, skill[p]).double() - rx.restrict(name, parent[p]).double()
        out[name] = (value.double() + scale * tau).to(value.dtype)
    return out


def scatter(parent: Tensors, child: Tensors, child_skill: Tensors, parent_config,
            child_map: ChildMap, scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """The other direction: ``parent + scale * scatter(child_skill - child)``, the child's
    skill vector written into the parent's matched coordinates (zeros elsewhere)."""
    rx = Restriction(parent_config, child_map)
    out = {k: v.clone() for k, v in parent.items()}
    for name, c in child.items():
        p = rx.parent_name(name)
        if p not in out and p.endswith(rx.arch.lm_head):
            p = p[: -len(rx.arch.lm_head)] + rx.arch.embed
            if name.endswith(rx.arch.lm_head):
                continue  # tied: the embedding carries it
        _, (rows, cols) = rx._split(name)
        tau = scale * (child_skill[name].double() - c.double())
        target = out[p].double()
        if rows is not None and cols is not None and tau.dim() == 2:
            target[rows[:, None], cols[None, :]] += tau
        elif rows is not None:
            target[rows] += tau
        elif cols is not None and tau.dim() == 2:
            target[:, cols] += tau
        else:
            target += tau
        out[p] = target.to(parent[p].dtype)
    return out


# Their transformers classes derive head_dim from hidden_size / num_attention_heads, ignoring
# a config's head_dim: a child must keep that ratio.
HEAD_DIM_FROM_HIDDEN = ("stablelm",)


def child_config(parent_config, child_map: ChildMap):
    """The parent's config with the child's sizes (head_dim kept explicitly)."""
    g = geometry_from_config(parent_config)
    cfg = copy.deepcopy(parent_config)
    r = child_map.per_layer[0]
    kv, heads = r.q_heads.shape
    hidden = int(child_map.residual.numel())
    if g.model_type in HEAD_DIM_FROM_HIDDEN and hidden != kv * heads * g.head_dim:
        raise ValueError(
            f"{g.model_type}: transformers derives head_dim from hidden_size / "
            f"num_attention_heads, so a child with hidden_size {hidden} and {kv * heads} heads "
            f"would have head_dim {hidden // (kv * heads)}, not the parent's {g.head_dim}. Keep "
            f"hidden_size = heads x head_dim when pruning this architecture.")
    cfg.hidden_size = hidden
    cfg.num_key_value_heads = int(kv)
    cfg.num_attention_heads = int(kv * heads)
    cfg.intermediate_size = int(r.neurons.numel())
    cfg.num_hidden_layers = len(child_map.layers)
    cfg.head_dim = g.head_dim
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        cfg.layer_types = [types[p] for p in child_map.layers]
    return cfg


# --------------------------------------------------------------------------- pruning


def _by_layer(arch: Architecture, sd: Tensors) -> Tuple[str, Dict[int, Dict[str, torch.Tensor]]]:
    layers: Dict[int, Dict[str, torch.Tensor]] = {}
    prefix = ""
    for name, t in sd.items():
        split = split_layer_name(arch, name)
        if split is not None:
            layers.setdefault(split[1], {})[split[2]] = t
            prefix = split[0][: split[0].rindex("model.layers.")]
    return prefix, layers


def _proj(arch: Architecture, g: Geometry, tensors: Tensors, which: str) -> torch.Tensor:
    base, offset = _projection(arch, which, g)
    w = tensors[f"{base}.weight"]
    if which in ("o", "down"):
        return w
    size = {"q": g.num_heads * g.head_dim, "k": g.num_kv_heads * g.head_dim,
            "v": g.num_kv_heads * g.head_dim}.get(which, g.intermediate_size)
    return w[offset: offset + size]


def _importance_order(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Top ``keep`` by importance, most important first (Model-Optimizer's slice order)."""
    return torch.argsort(score, descending=True, stable=True)[:keep]


@dataclass(frozen=True)
class PruningImportance:
    """Importance scores measured outside (e.g. Minitron's, from activations on calibration
    text), overriding :func:`prune_state_dict`'s weight norms: per residual channel
    ``[hidden]``, and per layer index its query heads ``[num_heads]`` and neurons
    ``[intermediate]``. A KV group scores the sum of its query heads."""

    residual: torch.Tensor
    heads: Mapping[int, torch.Tensor]
    neurons: Mapping[int, torch.Tensor]


def _check_importance(importance: PruningImportance, g: Geometry, layers: Sequence[int]) -> None:
    """Scores of the model's own sizes for every kept layer, or a ValueError saying which."""
    want = [("residual", importance.residual, g.hidden_size)]
    for i in layers:
        for axis, size in (("heads", g.num_heads), ("neurons", g.intermediate_size)):
            scores = getattr(importance, axis).get(i)
            if scores is None:
                raise ValueError(f"PruningImportance.{axis} has no scores for layer {i} (kept layers: {list(layers)})")
            want.append((f"{axis}[{i}]", scores, size))
    for name, scores, size in want:
        if tuple(scores.shape) != (size,):
            raise ValueError(f"PruningImportance.{name} has shape {tuple(scores.shape)}, but "
                             f"{g.model_type} has {size} of them: one score each")


def prune_state_dict(state_dict: Tensors, config, hidden: Optional[int] = None,
                     kv_heads: Optional[int] = None, heads_per_group: Optional[int] = None,
                     intermediate: Optional[int] = None, drop_layers: Sequence[int] = (),
                     importance: Optional[PruningImportance] = None):
    """Importance-sorted structured pruning: keeps the ``hidden`` residual channels,
    ``kv_heads`` KV groups (each with ``heads_per_group`` query heads), ``intermediate``
    neurons per layer that score highest, in descending order of importance (Model-Optimizer's
    slice order), and drops ``drop_layers``. Scores are ``importance`` when given, else weight
    norms (a stand-in for Minitron's activation importance: cheap, but it can drop a neuron
    or head a real model depends on).

    Returns ``(child state dict, child config, ChildMap)`` (the true index maps)."""
    g = geometry_from_config(config)
    arch = architecture_for(g.model_type)
    _, layers = _by_layer(arch, state_dict)
    hidden = hidden or g.hidden_size
    kv_heads = kv_heads or g.num_kv_heads
    heads_per_group = heads_per_group or g.group_size
    intermediate = intermediate or g.intermediate_size
    d, G = g.head_dim, g.group_size
    # residual channels: every weight that reads or writes the stream
    def sq(t, axis):
        return t.float().pow(2).sum(axis).double()

    score = sq(state_dict[arch.embed], 0)
    if arch.lm_head in state_dict:
        score = score + sq(state_dict[arch.lm_head], 0)
    for t in layers.values():
        for which in ("q", "k", "v", "gate", "up"):
            score = score + sq(_proj(arch, g, t, which), 0)
        for which in ("o", "down"):
            score = score + sq(_proj(arch, g, t, which), 1)
    kept = [i for i in sorted(layers) if i not in set(drop_layers)]
    if importance is not None:
        _check_importance(importance, g, kept)
        score = importance.residual.double()
    residual = _importance_order(score, hidden)
    per_layer = []
    for i in kept:
        t = layers[i]
        if importance is not None:
            head_score = importance.heads[i].double().reshape(g.num_kv_heads, G)
            group_score = head_score.sum(1)
            neuron = importance.neurons[i].double()
        else:
            q = _proj(arch, g, t, "q").float().reshape(g.num_heads, d, -1).pow(2).sum((1, 2)).double().sqrt()
            o = _proj(arch, g, t, "o").float().reshape(-1, g.num_heads, d).pow(2).sum((0, 2)).double().sqrt()
            v = _proj(arch, g, t, "v").float().reshape(g.num_kv_heads, d, -1).pow(2).sum((1, 2)).double().sqrt()
            head_score = (q * o).reshape(g.num_kv_heads, G)
            group_score = head_score.sum(1) + v * o.reshape(-1, G).sum(1)
            neuron = (_proj(arch, g, t, "gate").float().norm(dim=1).double()
                      * _proj(arch, g, t, "up").float().norm(dim=1).double()
                      * _proj(arch, g, t, "down").float().norm(dim=0).double())
        groups = _importance_order(group_score, kv_heads)
        q_heads = torch.stack([_importance_order(head_score[j], heads_per_group) for j in groups])
        per_layer.append(LayerRestriction(groups, q_heads, _importance_order(neuron, intermediate)))
    child_map = ChildMap(residual, tuple(kept), tuple(per_layer))
    child = restrict_state_dict(state_dict, config, child_map)
    return child, child_config(config, child_map), child_map


# --------------------------------------------------------------------------- matching


# Similarities in float32 on the solve's device (``device=None``: where the tensors are): they
# only rank candidates (a true match has cosine 1 to ~1e-7). Only the assignment itself runs
# on the CPU (scipy).
def _on(x: torch.Tensor, device=None) -> torch.Tensor:
    return x.to(device=device, dtype=torch.float32)  # no copy when already there


def _unit_cols(x: torch.Tensor, device=None) -> torch.Tensor:
    y = _on(x, device)
    norm = y.norm(dim=0, keepdim=True).clamp_min(1e-30)
    return y.div_(norm) if y is not x else y / norm  # in place on a copy: one embedding-sized copy


def column_cosines(child: torch.Tensor, parent: torch.Tensor, device=None) -> torch.Tensor:
    """``[child columns, parent columns]`` cosine similarities (same rows)."""
    return _unit_cols(child, device).T @ _unit_cols(parent, device)


def _add_column_cosines(total: Optional[torch.Tensor], child: torch.Tensor,
                        parent: torch.Tensor, device=None) -> torch.Tensor:
    """``total + column_cosines(child, parent)``, accumulated in place on ``total``'s device
    (an 8B MLP's ``[9216, 14336]`` similarity is 0.5 GB: no temporaries of that size)."""
    if total is None:
        return column_cosines(child, parent, device)
    return total.addmm_(_unit_cols(child, total.device).T, _unit_cols(parent, total.device))


def assign(similarity: torch.Tensor) -> torch.Tensor:
    """Rectangular assignment ``[n_child, n_parent]`` (n_child <= n_parent): the parent index
    of each child index, one-to-one, maximising the summed similarity (on the CPU).

    When every child index's best parent index is a different one, that is the optimum (each
    row at its maximum), so scipy's ``linear_sum_assignment`` runs only when best indices
    collide; a true child's, even retrained, do not. (On an exact tie within a row the first
    best index is taken, an optimum as good as scipy's.)"""
    best, index = similarity.max(dim=1)
    index = index.cpu()
    if bool(torch.isfinite(best).all()) and torch.unique(index).numel() == index.numel():
        return index
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(similarity.double().cpu().numpy(), maximize=True)
    out = torch.empty(similarity.shape[0], dtype=torch.long)
    out[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return out


@dataclass
class MatchQuality:
    """How well the matched parent coordinates explain the child. ``cosine``: mean cosine of
    matched rows/columns; ``z``: how many standard deviations of the similarity matrix the
    matched mean stands above its mean (a true child: tens; unrelated: a few)."""

    cosine: float
    z: float


def _quality(sim: torch.Tensor, index: torch.Tensor) -> MatchQuality:
    matched = sim[torch.arange(sim.shape[0], device=sim.device), index.to(sim.device)]
    std = float(sim.std()) if sim.numel() > 1 else 0.0
    return MatchQuality(float(matched.mean()), float((matched.mean() - sim.mean()) / max(std, 1e-30)))


def _head_block_cos(child: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """``[n_child, n_parent]`` cosines of flattened blocks ``[n, ...]``."""
    c = child.reshape(child.shape[0], -1).float()
    p = parent.reshape(parent.shape[0], -1).float()
    c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-30)
    p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return c @ p.T


def match_layer(arch: Architecture, parent_g: Geometry, child_g: Geometry, parent: Tensors,
                child: Tensors, residual: torch.Tensor,
                device=None) -> Tuple[LayerRestriction, Dict[str, MatchQuality]]:
    """One child layer's KV groups, query heads and MLP neurons among the parent layer's,
    from the weights restricted to the matched residual channels ``residual``.

    Heads move as wholes (RoPE planes in place: head_dim is never pruned): KV groups on
    their k/v rows and on the best match of each query head (q rows, o_proj columns), then
    query heads within each matched group. Neurons: gate/up rows and down_proj columns.
    Similarities on ``device`` (None: where the tensors are); the indices come back on the CPU."""
    d, Gp, Gc = parent_g.head_dim, parent_g.group_size, child_g.group_size
    Kp, Kc = parent_g.num_kv_heads, child_g.num_kv_heads

    def proj(g, t, which):
        return _on(_proj(arch, g, t, which), device)

    residual = residual.to(device if device is not None else next(iter(parent.values())).device)

    def heads(g, t, which, cols):
        w = proj(g, t, which)
        if which == "o":
            w = w[cols] if cols is not None else w
            return w.reshape(w.shape[0], -1, d).transpose(0, 1)  # [heads, D, d]
        w = w[:, cols] if cols is not None else w
        return w.reshape(-1, d, w.shape[1])  # [heads, d, D]

    cq, co = heads(child_g, child, "q", None), heads(child_g, child, "o", None)
    pq, po = heads(parent_g, parent, "q", residual), heads(parent_g, parent, "o", residual)
    head_sim = _head_block_cos(cq, pq) + _head_block_cos(co, po)  # [Hc, Hp]
    group_sim = sum(_head_block_cos(heads(child_g, child, w, None), heads(parent_g, parent, w, residual))
                    for w in ("k", "v"))  # [Kc, Kp]
    within = head_sim.reshape(Kc, Gc, Kp, Gp).amax(3).sum(1)  # each child head's best in the group
    kv = assign(group_sim + within)
    by_group = head_sim.reshape(Kc, Gc, Kp, Gp).cpu()
    q_heads = torch.stack([assign(by_group[j, :, kv[j]]) for j in range(Kc)])
    quality = {"kv_groups": _quality(group_sim / 2, kv)}
    hs = by_group[torch.arange(Kc), :, kv]  # [Kc, Gc, Gp]
    quality["q_heads"] = _quality(hs.reshape(-1, Gp) / 2, q_heads.reshape(-1))
    neuron_sim = None
    for which in ("gate", "up"):  # rows: columns of the transposes
        neuron_sim = _add_column_cosines(neuron_sim, proj(child_g, child, which).T,
                                         proj(parent_g, parent, which)[:, residual].T)
    neuron_sim = _add_column_cosines(neuron_sim, proj(child_g, child, "down"),
                                     proj(parent_g, parent, "down")[residual])
    neurons = assign(neuron_sim)
    quality["neurons"] = _quality(neuron_sim.div_(3), neurons)
    return LayerRestriction(kv, q_heads, neurons), quality


def _layer_statistics(arch: Architecture, g: Geometry, t: Tensors, device=None) -> List[torch.Tensor]:
    """Per residual channel, statistics a layer's neuron/head pruning barely changes: column
    norms of readers, row norms of writers, norm weights (on the CPU: ``[D]`` each)."""
    feats = []
    for which in ("q", "k", "v", "gate", "up"):
        feats.append(_on(_proj(arch, g, t, which), device).norm(dim=0))
    for which in ("o", "down"):
        feats.append(_on(_proj(arch, g, t, which), device).norm(dim=1))
    norms = [n for n, _ in arch.readers if n] + [n for _, n in arch.writers if n]
    feats += [t[f"{n}.weight"].to(dtype=torch.float32, copy=True) for n in norms]  # not the layer's own
    return [f.cpu() for f in feats]


def _fingerprint(statistics: Sequence[torch.Tensor], residual: Index) -> torch.Tensor:
    """A layer's statistics restricted to ``residual`` and z-scored per statistic: the
    layer's fingerprint in residual coordinates."""
    out = []
    for f in statistics:
        f = f[residual] if residual is not None else f
        out.append((f - f.mean()) / f.std().clamp_min(1e-30))
    return torch.cat(out) / math.sqrt(len(out) * out[0].numel())


def _statistics_similarity(parent_stats: Mapping[int, Sequence[torch.Tensor]],
                           child_stats: Mapping[int, Sequence[torch.Tensor]], residual) -> torch.Tensor:
    c = torch.stack([_fingerprint(child_stats[k], None) for k in sorted(child_stats)])
    p = torch.stack([_fingerprint(parent_stats[i], residual) for i in sorted(parent_stats)])
    return c @ p.T


def layer_similarity(arch, parent_g, child_g, parent_layers, child_layers, residual) -> torch.Tensor:
    """``[child layers, parent layers]`` correlation of the layers' fingerprints."""
    return _statistics_similarity({i: _layer_statistics(arch, parent_g, t) for i, t in parent_layers.items()},
                                  {k: _layer_statistics(arch, child_g, t) for k, t in child_layers.items()},
                                  residual)


def monotone_layer_map(similarity: torch.Tensor) -> Tuple[int, ...]:
    """Strictly increasing map child layer -> parent layer maximising the summed similarity
    (dynamic programming over the ``[child, parent]`` matrix)."""
    nc, np_ = similarity.shape
    if nc > np_:
        raise ValueError(f"a child of {nc} layers cannot come from a parent of {np_}")
    sim = similarity.double()
    best = torch.full((nc, np_), -math.inf, dtype=torch.double)
    best[0] = sim[0]
    for k in range(1, nc):
        prefix = torch.cummax(best[k - 1], 0).values  # best over parents < i
        best[k, 1:] = sim[k, 1:] + prefix[:-1]
    out = [int(best[-1].argmax())]
    for k in range(nc - 1, 0, -1):
        i = out[-1]
        out.append(int(best[k - 1, :i].argmax()))
    return tuple(reversed(out))


def validate_layer_map(layer_map: Sequence[int], parent_layers: int, child_layers: int,
                       parent: str = "reference", child: str = "base") -> Tuple[int, ...]:
    lm = tuple(int(i) for i in layer_map)
    if len(lm) != child_layers:
        raise ValueError(f"layer_map has {len(lm)} entries but {child} has {child_layers} layers: "
                         f"give one {parent} layer per {child} layer")
    bad = [i for i in lm if not 0 <= i < parent_layers]
    if bad:
        raise ValueError(f"layer_map names {parent} layers {bad}, but {parent} has layers "
                         f"0..{parent_layers - 1}")
    if any(b <= a for a, b in zip(lm, lm[1:])):
        raise ValueError(f"layer_map {list(lm)} is not strictly increasing: pruning keeps the "
                         f"order of the layers it does not drop")
    return lm


@dataclass
class ChildMatch:
    map: ChildMap
    residual: MatchQuality
    layers: List[Dict[str, MatchQuality]] = field(default_factory=list)
    layer_similarity: Optional[torch.Tensor] = None

    def worst(self) -> float:
        """The lowest matched mean cosine over the residual stream and every layer's axes."""
        vals = [self.residual.cosine] + [q.cosine for layer in self.layers for q in layer.values()]
        return min(vals)


# A true child's matched columns stay close to its parent's even after retraining; an unrelated
# model's best matches are near the noise level (see docs/cross-size.md for the measured
# figures behind this limit).
MIN_MATCH_COSINE = 0.3


def child_warning(match: ChildMatch, parent: str = "reference", child: str = "base") -> Optional[str]:
    worst = match.worst()
    if worst >= MIN_MATCH_COSINE:
        return None
    return (f"{child} does not look like a pruned child of {parent}: its weakest matched "
            f"coordinates have mean cosine {worst:.3f} with the parent's (residual stream: "
            f"{match.residual.cosine:.3f}), below {MIN_MATCH_COSINE}; a child of this parent "
            f"stays far above that. The restricted skill vector would land on unrelated "
            f"coordinates.")


def residual_similarity(arch: Architecture, parent: Tensors, child: Tensors,
                        device=None) -> Tuple[torch.Tensor, int]:
    """``([child channels, parent channels] similarity, number of tensors averaged)`` from the
    columns of the token embeddings and of an untied ``lm_head`` (the same tokenizer: the same
    rows). Cosines: retraining may shrink or grow a channel; pruning flips no sign."""
    sim = column_cosines(child[arch.embed], parent[arch.embed], device)
    pieces = 1
    if arch.lm_head in child and arch.lm_head in parent:
        sim = _add_column_cosines(sim, child[arch.lm_head], parent[arch.lm_head])
        pieces = 2
    return sim.div_(pieces), pieces


def _layer_tensor_names(arch: Architecture, tensors: Tensors) -> Dict[int, Dict[str, str]]:
    """``{layer: {relative name: full name}}`` from the names alone (nothing is read)."""
    layers: Dict[int, Dict[str, str]] = {}
    for name in tensors:
        split = split_layer_name(arch, name)
        if split is not None:
            layers.setdefault(split[1], {})[split[2]] = name
    return layers


def _read_layer(tensors: Tensors, names: Mapping[str, str], device=None) -> Dict[str, torch.Tensor]:
    """One layer's tensors, read now (a lazy ``tensors`` reads them from disk), in float32 on
    ``device``."""
    return {rel: _on(tensors[name], device) for rel, name in names.items()}


def streamed_layer_statistics(arch: Architecture, g: Geometry, tensors: Tensors,
                              names: Mapping[int, Mapping[str, str]], device=None) -> Dict[int, List[torch.Tensor]]:
    """Every layer's per-channel statistics (the layer map's evidence), reading one layer at a
    time: a lazy ``tensors`` is never materialised whole."""
    return {i: _layer_statistics(arch, g, _read_layer(tensors, layer, device)) for i, layer in names.items()}


def _add_refinement(total: torch.Tensor, arch: Architecture, pg: Geometry, cg: Geometry,
                    parent: Tensors, child: Tensors, r: LayerRestriction) -> torch.Tensor:
    """``total`` plus the cosines of one matched layer pair's residual channels (``[D_child,
    D_parent]``): the reader columns (q/k/v, gate/up rows restricted to the matched heads and
    neurons) and the writer rows (o, down columns likewise); 7 terms."""
    dev = total.device
    rows = dict(head_rows(pg, r), gate=r.neurons, up=r.neurons)
    for which in ("q", "k", "v", "gate", "up"):
        total = _add_column_cosines(total, _on(_proj(arch, cg, child, which), dev),
                                    _on(_proj(arch, pg, parent, which), dev)[rows[which].to(dev)])
    q_rows = head_rows(pg, r)["q"].to(dev)
    total = _add_column_cosines(total, _on(_proj(arch, cg, child, "o"), dev).T,
                                _on(_proj(arch, pg, parent, "o"), dev)[:, q_rows].T)
    return _add_column_cosines(total, _on(_proj(arch, cg, child, "down"), dev).T,
                               _on(_proj(arch, pg, parent, "down"), dev)[:, r.neurons.to(dev)].T)


REFINEMENT_TERMS = 7  # per layer: q, k, v, gate, up columns; o, down rows


def match_child(parent: Tensors, parent_config, child: Tensors, child_cfg,
                layer_map: Optional[Sequence[int]] = None, refine: int = 1,
                parent_name: str = "reference", child_name: str = "base",
                device=None) -> ChildMatch:
    """The child's coordinates among the parent's, from the weights alone.

    Residual channels from the embedding (and untied lm_head) columns; the layer map by
    monotone dynamic programming over layer fingerprints (or ``layer_map``, validated); per
    layer the heads and neurons (:func:`match_layer`); then ``refine`` rounds that re-solve
    the residual channels with every matched layer's reader columns and writer rows added
    (a round that leaves the residual map as it was ends the refinement: every later round
    would repeat it).

    ``parent`` and ``child`` are any name -> tensor mappings: a state dict, or a lazy one that
    reads a tensor from disk when asked for (the mergekit glue's). They are read layer by
    layer and nothing is kept but per-channel statistics: at most the embeddings (and
    ``lm_head``s) or one parent layer and one child layer are held at a time, in float32 on
    ``device`` (None: where the tensors are). The assignments run on the CPU."""
    check_child(parent_config, child_cfg, parent_name, child_name)
    pg, cg = geometry_from_config(parent_config, parent_name), geometry_from_config(child_cfg, child_name)
    arch = architecture_for(pg.model_type, parent_name)
    p_names, c_names = _layer_tensor_names(arch, parent), _layer_tensor_names(arch, child)
    module_sim, pieces = residual_similarity(arch, parent, child, device)
    residual = assign(module_sim)
    sim = module_sim
    layer_sim = None
    p_stats = c_stats = None
    for round_ in range(refine + 1):
        if layer_map is not None:
            lm = validate_layer_map(layer_map, len(p_names), len(c_names), parent_name, child_name)
        else:
            if p_stats is None:  # one pass over every layer; the statistics do not depend on the map
                p_stats = streamed_layer_statistics(arch, pg, parent, p_names, device)
                c_stats = streamed_layer_statistics(arch, cg, child, c_names, device)
            layer_sim = _statistics_similarity(p_stats, c_stats, residual)
            lm = monotone_layer_map(layer_sim)
        refined = module_sim * pieces if round_ < refine else None
        per_layer, qualities = [], []
        for k, i in enumerate(lm):  # one layer pair at a time
            p_layer = _read_layer(parent, p_names[i], device)
            c_layer = _read_layer(child, c_names[k], device)
            r, q = match_layer(arch, pg, cg, p_layer, c_layer, residual)
            per_layer.append(r)
            qualities.append(q)
            if refined is not None:
                refined = _add_refinement(refined, arch, pg, cg, p_layer, c_layer, r)
            del p_layer, c_layer
        if refined is None:
            break
        sim = refined.div_(pieces + REFINEMENT_TERMS * len(lm))
        refined_residual = assign(sim)
        if torch.equal(refined_residual, residual):
            break
        residual = refined_residual
    return ChildMatch(ChildMap(residual, tuple(lm), tuple(per_layer)), _quality(sim, residual),
                      qualities, layer_sim)


def explained(child: Tensors, parent: Tensors, parent_config, child_map: ChildMap) -> Dict[str, float]:
    """Per child tensor, the share of the child's squared norm that the restricted parent
    explains: ``1 - ||child - restrict(parent)||^2 / ||child||^2`` (1: an unretrained child;
    0 or below: nothing in common)."""
    rx = Restriction(parent_config, child_map)
    out = {}
    for name, c in child.items():
        p = rx.parent_name(name)
        if p not in parent and p.endswith(rx.arch.lm_head):
            p = p[: -len(rx.arch.lm_head)] + rx.arch.embed
        r = rx.restrict(name, parent[p]).double()
        out[name] = 1.0 - float((c.double() - r).pow(2).sum() / c.double().pow(2).sum().clamp_min(1e-30))
    return out


def explained_by_layer(child: Tensors, parent: Tensors, parent_config,
                       child_map: ChildMap, device=None) -> List[Dict[str, Any]]:
    """Per child layer (and ``"module"``: embeddings, final norm, lm_head): the parent layer it
    is matched to, and the share of the child's squared norm the restricted parent explains
    over the layer's weight matrices together (what a report shows before merging). Norm
    weights and biases are left out: norm weights sit near 1 in every model, so they would
    make any two models look alike. One child tensor and its parent tensor are read at a
    time (lazy mappings stream); differences in float32 on ``device``, sums in float64."""
    rx = Restriction(parent_config, child_map)
    sums: Dict[Any, List[float]] = {}
    for name in child:
        c = _on(child[name], device)
        if c.dim() >= 2:
            split = split_layer_name(rx.arch, name)
            key = "module" if split is None else split[1]
            p = rx.parent_name(name)
            if p not in parent and p.endswith(rx.arch.lm_head):
                p = p[: -len(rx.arch.lm_head)] + rx.arch.embed
            r = _on(rx.restrict(name, parent[p].to(c.device)), device)
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0] += float((c - r).pow(2).sum(dtype=torch.float64))
            acc[1] += float(c.pow(2).sum(dtype=torch.float64))
            del r
        del c  # before the next read: one tensor of each model at a time
    out = []
    for key in sorted(k for k in sums if k != "module") + (["module"] if "module" in sums else []):
        residual_sq, norm_sq = sums[key]
        out.append({"child_layer": key,
                    "parent_layer": "module" if key == "module" else child_map.layers[key],
                    "explained": 1.0 - residual_sq / max(norm_sq, 1e-30)})
    return out


def by_position(child: Tensors, parent: Tensors, skill: Tensors, scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """What a shape-blind tool would do: ``child + tau[:rows, :cols]`` under the same names
    (child layer k takes parent layer k). For comparison only."""
    out = {}
    for name, c in child.items():
        tau = (skill[name].double() - parent[name].double())[tuple(slice(0, n) for n in c.shape)]
        out[name] = (c.double() + scale * tau).to(c.dtype)
    return out


__all__ = [
    "ChildMap", "ChildMatch", "LayerRestriction", "MatchQuality", "PruningImportance", "Restriction", "assign",
    "by_position", "check_child", "child_config", "child_warning", "explained", "explained_by_layer", "layer_indices",
    "layer_similarity", "match_child", "match_layer", "module_indices", "monotone_layer_map",
    "prune_state_dict", "residual_similarity", "restrict_state_dict", "scatter", "transfer", "validate_layer_map",
]

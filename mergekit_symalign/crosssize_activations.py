"""Pruned children matched on activations (``alignment: activations`` for a child).

The same maps as :func:`.crosssize.match_child` (a :class:`.crosssize.ChildMatch` whose
:class:`.crosssize.ChildMap` :class:`.crosssize.Restriction` and :func:`.crosssize.transfer`
use unchanged), solved from what the parent and the child compute on the *same* calibration
tokens instead of from their weights. Each model runs on its own hidden states, streamed layer
by layer (:class:`.activations.LayerStreamer`: one decoder layer of each model resident):

* **residual channels**: the Pearson correlation over the tokens, child channel against
  parent channel, of the residual stream at the embedding output (weight 1/2) and at every
  matched layer's output (together 1/2); one rectangular assignment at the end;
* **KV groups and query heads**: per head, the correlation of its ``[head_dim, tokens]`` block
  (pre-RoPE queries and the attention output entering ``o_proj`` per query head; keys and
  values per KV group), then the same two-level assignment as the weight path (groups on their
  k/v blocks plus each child head's best match in the group; heads within each matched group);
  ``head_dim`` is never pruned, so a head's dims correspond one to one;
* **MLP neurons**: the correlation of the gate pre-activation plus that of the post-activation
  value ``h = act(gate) * up`` (the input of ``down_proj``);
* **layers**: ``layer_map`` (validated) or the weight path's monotone map (layer fingerprints
  on the weights: a layer must be paired before its activations can be compared).

Two kinds of evidence per layer: each model on its *own* hidden states, and the parent layer's
q/k/v, gate and ``h`` on the *child's* inputs (:func:`parent_on_child_inputs`, weighted
:data:`SAME_INPUT_WEIGHT`). A pruned child's own stream differs from its parent's (fewer
channels, heads and neurons wrote it), so on own streams alone a neuron of an unretrained
child is often not told apart (SmolLM2-135M pruned by a quarter: 22 % of the neurons
recovered, all but 6 of 31104 with both kinds; benchmarks/cross_size_drift.py --smollm2); on
the same inputs a kept neuron reproduces the child's own values exactly.

Correlations, not raw inner products: a retrained child may shrink or grow a channel; pruning
flips no sign, so they are signed.

Optionally (``residual_fit``), the same pass fits linear maps between the parent's residual
stream restricted to the matched channels and the child's (least squares or orthogonal
Procrustes), which :func:`transfer_mapped` applies to the skill vector's residual-side axes
(a research option for a retrained child's drift, see docs/cross-size.md; not the default).

Pure torch/scipy/transformers, no mergekit import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import crosssize as cs
from .activations import LayerStreamer, activation_plan
from .architectures import (
    Architecture,
    Geometry,
    _projection,
    architecture_for,
    geometry_from_config,
    split_layer_name,
    text_config,
)
from .calibration import check_enough_tokens

Tensors = Mapping[str, torch.Tensor]

RESIDUAL_FITS = ("lstsq", "procrustes")
#: Weight of the same-input correlations against the own-stream ones: 2 recovers every index
#: of the tests' tiny pruned children of every architecture, 1 misses OLMo 2 neurons
#: (benchmarks/cross_size_drift.py --tiny).
SAME_INPUT_WEIGHT = 2.0
#: Ridge of the least-squares maps, relative to the mean eigenvalue of the regressor's second
#: moment (a residual stream has a few huge channels and near-null directions).
RIDGE = 1e-3


# --------------------------------------------------------------------------- statistics


def _centered_unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``[n, ..., tokens]`` centered over the tokens, flattened, unit norm
    (float32: the correlations only rank candidates)."""
    x = x.float()
    x = x - x.mean(-1, keepdim=True)
    x = x.reshape(x.shape[0], -1)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def correlation(child: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """``[n_child, n_parent]`` Pearson correlations of rows (``[n, tokens]``) or of blocks
    (``[n, features, tokens]``: each feature centered over the tokens, the block flattened)."""
    return (_centered_unit_rows(child) @ _centered_unit_rows(parent).T).cpu()


def _quality(sim: torch.Tensor, index: torch.Tensor) -> cs.MatchQuality:
    matched = sim[torch.arange(sim.shape[0]), index]
    std = float(sim.std()) if sim.numel() > 1 else 0.0
    return cs.MatchQuality(float(matched.mean()), float((matched.mean() - sim.mean()) / max(std, 1e-30)))


# --------------------------------------------------------------------------- what is recorded


@dataclass(frozen=True)
class _Keys:
    """Recorder keys of the activations one layer's matching reads, and row offsets."""

    modules: Dict[str, str]  # q/k/v/gate/up -> module (fused ones share one)
    offsets: Dict[str, int]  # their row offsets in that module's output
    o_in: str
    h: str  # "<down>:in"
    attn_in: str  # what q/k/v read (after the input norm)
    mlp_in: str  # what gate/up read
    out: str = ":out"  # the decoder layer's own output (module "" is the layer)

    def record(self, fit: bool) -> Tuple[str, ...]:
        keys = [f"{self.modules[w]}:out" for w in ("q", "k", "v", "gate")]
        keys += [self.o_in, self.h, self.out]
        if fit:
            keys += [self.attn_in, self.mlp_in]
        return tuple(dict.fromkeys(keys))

    @staticmethod
    def of(arch: Architecture, g: Geometry) -> "_Keys":
        modules, offsets = {}, {}
        for which in ("q", "k", "v", "gate", "up"):
            modules[which], offsets[which] = _projection(arch, which, g)
        return _Keys(modules=modules, offsets=offsets, o_in=f"{arch.o}:in", h=f"{arch.down}:in",
                     attn_in=f"{modules['q']}:in", mlp_in=f"{modules['gate']}:in")


def _rows(acts: Mapping[str, torch.Tensor], keys: _Keys, which: str, size: int) -> torch.Tensor:
    module = keys.modules[which]
    offset = keys.offsets[which]
    return acts[f"{module}:out"][offset: offset + size]


def parent_on_child_inputs(arch: Architecture, g: Geometry, config, layer: Mapping[str, torch.Tensor],
                           child: Mapping[str, torch.Tensor], keys_child: _Keys,
                           residual: torch.Tensor, norms: Dict[str, Tuple]) -> Dict[str, torch.Tensor]:
    """The parent layer's q/k/v outputs, gate pre-activations and ``act(gate) * up`` computed on
    the *child's* normalized inputs, placed in the parent's channels by ``residual`` (zeros
    elsewhere) with the parent's norm gains in place of the child's: both layers then see the
    same inputs, so a kept head or neuron of an unretrained child gives exactly the child's own
    values (a parent-side activation record, under the child's recorder keys' names for the
    parent's modules). ``layer``: the parent layer's tensors by relative name; ``norms[site]``:
    ``((parent gain, parent bias), (child gain, child bias))`` of the attention / MLP input."""
    from transformers.activations import ACT2FN

    out = {}
    for site, key, projections in (("attn", keys_child.attn_in, ("q", "k", "v")),
                                   ("mlp", keys_child.mlp_in, ("gate", "up"))):
        x = child[key].float()
        (gp, bp), (gc, bc) = ((t.to(x.device, torch.float32) for t in pair) for pair in norms[site])
        x = (x - bc[:, None]) / gc[:, None]  # the child's normalized stream
        wide = x.new_zeros(g.hidden_size, x.shape[1])
        index = residual.to(x.device)
        wide[index] = x * gp[index][:, None] + bp[index][:, None]
        for which in projections:
            out[which] = cs._proj(arch, g, layer, which).to(x.device, torch.float32) @ wide
    cfg = text_config(config)
    act = ACT2FN[getattr(cfg, "hidden_activation", None) or cfg.hidden_act]
    out["h"] = act(out["gate"]) * out["up"]
    return out


def match_layer_activations(g_parent: Geometry, g_child: Geometry, keys_parent: _Keys, keys_child: _Keys,
                            parent: Mapping[str, torch.Tensor], child: Mapping[str, torch.Tensor],
                            same_input: Optional[Mapping[str, torch.Tensor]] = None
                            ) -> Tuple[cs.LayerRestriction, Dict[str, cs.MatchQuality]]:
    """One child layer's KV groups, query heads and neurons among its parent layer's, from the
    two layers' activations on the same tokens (each ``[features, tokens]``), each model on its
    own hidden states, plus (``same_input``, from :func:`parent_on_child_inputs`) the parent
    layer's q/k/v, gate and ``h`` on the child's inputs."""
    d = g_parent.head_dim
    Kp, Kc, Gp, Gc = g_parent.num_kv_heads, g_child.num_kv_heads, g_parent.group_size, g_child.group_size

    def heads(acts, g, k, which):
        if which == "o":
            x = acts[k.o_in]
        else:
            n = (g.num_heads if which == "q" else g.num_kv_heads) * d
            x = _rows(acts, k, which, n)
        return x.reshape(-1, d, x.shape[-1])  # [heads, d, tokens]

    def same(which):
        return same_input[which].reshape(-1, d, same_input[which].shape[-1])

    pairs_h = [(heads(child, g_child, keys_child, w), heads(parent, g_parent, keys_parent, w)) for w in ("q", "o")]
    pairs_g = [(heads(child, g_child, keys_child, w), heads(parent, g_parent, keys_parent, w)) for w in ("k", "v")]
    pairs_n = [(_rows(child, keys_child, "gate", g_child.intermediate_size),
                _rows(parent, keys_parent, "gate", g_parent.intermediate_size)),
               (child[keys_child.h], parent[keys_parent.h])]
    if same_input is not None:
        pairs_h.append((heads(child, g_child, keys_child, "q"), same("q")))
        pairs_g += [(heads(child, g_child, keys_child, w), same(w)) for w in ("k", "v")]
        pairs_n += [(_rows(child, keys_child, "gate", g_child.intermediate_size), same_input["gate"]),
                    (child[keys_child.h], same_input["h"])]
    w = SAME_INPUT_WEIGHT if same_input is not None else 1.0
    head_sim = sum(correlation(c, p) * (w if i >= 2 else 1.0) for i, (c, p) in enumerate(pairs_h))  # [Hc, Hp]
    group_sim = sum(correlation(c, p) * (w if i >= 2 else 1.0) for i, (c, p) in enumerate(pairs_g))  # [Kc, Kp]
    per_group = head_sim.reshape(Kc, Gc, Kp, Gp)
    kv = cs.assign(group_sim + per_group.amax(3).sum(1))
    q_heads = torch.stack([cs.assign(per_group[j, :, kv[j]]) for j in range(Kc)])
    total = lambda pairs: 2 + (len(pairs) - 2) * w  # noqa: E731  (the weights' sum)
    quality = {"kv_groups": _quality(group_sim / total(pairs_g), kv)}
    hs = per_group[torch.arange(Kc), :, kv]  # [Kc, Gc, Gp]
    quality["q_heads"] = _quality(hs.reshape(-1, Gp) / total(pairs_h), q_heads.reshape(-1))
    neuron_sim = sum(correlation(c, p) * (w if i >= 2 else 1.0) for i, (c, p) in enumerate(pairs_n))
    neurons = cs.assign(neuron_sim)
    quality["neurons"] = _quality(neuron_sim / total(pairs_n), neurons)
    return cs.LayerRestriction(kv, q_heads, neurons), quality


# --------------------------------------------------------------------------- residual maps


class _Moments:
    """Uncentered second moments of a (child, parent) activation pair, summed over tokens."""

    def __init__(self):
        self.cc = self.cp = self.pp = None

    def add(self, child: torch.Tensor, parent: torch.Tensor) -> None:
        c, p = child.double(), parent.double()
        parts = (c @ c.T, c @ p.T, p @ p.T)
        if self.cc is None:
            self.cc, self.cp, self.pp = parts
        else:
            self.cc += parts[0]
            self.cp += parts[1]
            self.pp += parts[2]


def _ridge(m: torch.Tensor, ridge: float) -> torch.Tensor:
    return m + ridge * float(torch.diagonal(m).mean().clamp_min(1e-30)) * torch.eye(m.shape[0], dtype=m.dtype)


@dataclass
class ResidualMaps:
    """Linear maps between the parent's residual stream, restricted to the matched channels,
    and the child's, fitted on the calibration activations (all ``[D_child, D_child]``).

    ``writers[k]``: child stream ≈ ``writers[k] @`` parent stream (restricted) around child
    layer ``k`` (its output): applied to the rows of ``o``/``down`` (what a layer writes);
    ``readers[k]``: ``{"attn": A, "mlp": A}``, parent input (restricted) ≈ ``A @`` child input
    of the q/k/v and gate/up projections: applied to their columns (``tau @ A``);
    ``embed``: child embedding output ≈ ``embed @`` parent's (``tau_E @ embed.T``);
    ``lm_head``: as a reader of the final normed stream (``tau @ lm_head``)."""

    kind: str
    writers: List[torch.Tensor] = field(default_factory=list)
    readers: List[Dict[str, torch.Tensor]] = field(default_factory=list)
    embed: Optional[torch.Tensor] = None
    lm_head: Optional[torch.Tensor] = None


def _fit(moments: _Moments, residual: torch.Tensor, kind: str, child_from_parent: bool,
         ridge: float = RIDGE) -> torch.Tensor:
    """The map of one site: child ≈ M parent_r (``child_from_parent``) or parent_r ≈ M child."""
    cp = moments.cp[:, residual]  # [Dc, Dc]: sum child x parent_r^T
    if kind == "procrustes":
        u, _, vh = torch.linalg.svd(cp)
        q = u @ vh  # child ≈ q parent_r
        return q if child_from_parent else q.T
    if child_from_parent:
        pp = moments.pp[residual][:, residual]
        return torch.linalg.solve(_ridge(pp, ridge), cp.T).T
    return torch.linalg.solve(_ridge(moments.cc, ridge), cp).T


def _norm_gain(arch: Architecture, weight: torch.Tensor) -> torch.Tensor:
    """A norm's per-channel gain (Gemma's RMSNorm multiplies by ``1 + w``); near-zero gains
    kept away from 0, since the fit divides by them."""
    gain = weight.double() + (1.0 if arch.norm == "rms_offset" else 0.0)
    return torch.where(gain.abs() < 1e-6, torch.full_like(gain, 1e-6), gain)


def _layer_tensors(arch: Architecture, g: Geometry, tensors: Tensors, layer: int) -> Dict[str, torch.Tensor]:
    """The q/k/v and gate/up weights of ``layer`` by relative name (what cs._proj reads)."""
    names = {f"{_projection(arch, w, g)[0]}.weight" for w in ("q", "k", "v", "gate", "up")}
    return {n: tensors[f"model.layers.{layer}.{n}"] for n in names}


def _reader_bias(arch: Architecture, tensors: Tensors, layer: int, site: str) -> torch.Tensor:
    """The bias of the norm in front of a layer's readers (LayerNorm's; zeros for RMSNorm)."""
    norm = dict((("attn" if "q" in projections else "mlp"), n) for n, projections in arch.readers)[site]
    bias = tensors.get(f"model.layers.{layer}.{norm}.bias") if norm is not None else None
    if bias is None:
        return torch.zeros(tensors[arch.embed].shape[1], dtype=torch.float64)
    return bias.double()


def _reader_gain(arch: Architecture, tensors: Tensors, layer: int, site: str) -> torch.Tensor:
    """The gain of the norm in front of a layer's attention ("attn") or MLP ("mlp") readers
    (ones where they read the stream directly, as OLMo 2's do)."""
    norm = dict((("attn" if "q" in projections else "mlp"), n) for n, projections in arch.readers)[site]
    if norm is None:
        width = tensors[arch.embed].shape[1]
        return torch.ones(width, dtype=torch.float64)
    return _norm_gain(arch, tensors[f"model.layers.{layer}.{norm}.weight"])


# --------------------------------------------------------------------------- the matcher


def _getter(tensors: Tensors, name: str):
    def get(key):
        try:
            return tensors[key]
        except KeyError:
            raise ValueError(f"{name}: tensor {key!r} is missing from the checkpoint") from None
    return get


def _weight_layer_map(arch, pg, cg, parent: Tensors, child: Tensors) -> Tuple[Tuple[int, ...], torch.Tensor]:
    """The weight path's layer map: residual channels from the embedding (and lm_head)
    columns, then the monotone map over the layers' fingerprints."""
    residual = cs.assign(cs.residual_similarity(arch, parent, child)[0])
    p_stats = cs.streamed_layer_statistics(arch, pg, parent, cs._layer_tensor_names(arch, parent))
    c_stats = cs.streamed_layer_statistics(arch, cg, child, cs._layer_tensor_names(arch, child))
    sim = cs._statistics_similarity(p_stats, c_stats, residual)
    return cs.monotone_layer_map(sim), sim


@dataclass
class ActivationChildMatch(cs.ChildMatch):
    """A :class:`.crosssize.ChildMatch` solved on activations, with the residual maps when
    asked for and the number of calibration tokens used."""

    tokens: int = 0
    residual_maps: Optional[ResidualMaps] = None


class _ResidualFit:
    """The second moments the :class:`ResidualMaps` are fitted from, gathered layer by layer."""

    def __init__(self, arch: Architecture, parent: Tensors, child: Tensors):
        self.arch, self.parent, self.child = arch, parent, child
        self.moments: Dict = {"embed": _Moments()}
        self.gains: Dict = {}

    def add_layer(self, k: int, i: int, pa, ca, pk: _Keys, ck: _Keys) -> None:
        self.moments[(k, "out")] = _Moments()
        self.moments[(k, "out")].add(ca[ck.out], pa[pk.out])
        for site, ckey, pkey in (("attn", ck.attn_in, pk.attn_in), ("mlp", ck.mlp_in, pk.mlp_in)):
            # the normalized stream (the norm's gain divided out): a rotation of the child's
            # stream is a rotation of it, which Procrustes can then fit; the gains go back on
            # in the map (readers read gain * normalized stream)
            gp, gc = _reader_gain(self.arch, self.parent, i, site), _reader_gain(self.arch, self.child, k, site)
            self.gains[(k, site)] = (gp, gc)
            self.moments[(k, site)] = _Moments()
            self.moments[(k, site)].add(ca[ckey] / gc[:, None].float(), pa[pkey] / gp[:, None].float())

    def maps(self, residual: torch.Tensor, kind: str, ridge: float, layers: int) -> ResidualMaps:
        m, arch = self.moments, self.arch
        maps = ResidualMaps(kind, embed=_fit(m["embed"], residual, kind, True, ridge))
        for k in range(layers):
            maps.writers.append(_fit(m[(k, "out")], residual, kind, True, ridge))
            readers = {}
            for site in ("attn", "mlp"):
                gp, gc = self.gains[(k, site)]
                readers[site] = gp[residual][:, None] * _fit(m[(k, site)], residual, kind, False, ridge) / gc[None, :]
            maps.readers.append(readers)
        # lm_head reads the final norm's output: the last layer's map, between the norms
        last = _fit(m[(layers - 1, "out")], residual, kind, False, ridge)
        gp = _norm_gain(arch, self.parent[f"{arch.final_norm}.weight"])[residual]
        gc = _norm_gain(arch, self.child[f"{arch.final_norm}.weight"])
        maps.lm_head = gp[:, None] * last / gc[None, :]
        return maps


def _match_pair(arch, pg, cg, parent_config, parent: Tensors, child: Tensors, i: int, k: int,
                pa, ca, pk: _Keys, ck: _Keys, provisional: torch.Tensor):
    """Child layer ``k`` against parent layer ``i``: own streams and the same inputs."""
    norms = {site: ((_reader_gain(arch, parent, i, site), _reader_bias(arch, parent, i, site)),
                    (_reader_gain(arch, child, k, site), _reader_bias(arch, child, k, site)))
             for site in ("attn", "mlp")}
    same = parent_on_child_inputs(arch, pg, parent_config, _layer_tensors(arch, pg, parent, i),
                                  ca, ck, provisional, norms)
    return match_layer_activations(pg, cg, pk, ck, pa, ca, same)


def _layer_map(arch, pg, cg, parent: Tensors, child: Tensors, layer_map, parent_config, child_config,
               parent_name: str, child_name: str):
    if layer_map is None:
        return _weight_layer_map(arch, pg, cg, parent, child)
    p_layers = int(text_config(parent_config).num_hidden_layers)
    c_layers = int(text_config(child_config).num_hidden_layers)
    return cs.validate_layer_map(layer_map, p_layers, c_layers, parent_name, child_name), None


def match_child_by_activations(parent: Tensors, parent_config, child: Tensors, child_config,
                               token_ids: torch.Tensor, layer_map: Optional[Sequence[int]] = None,
                               residual_fit: Optional[str] = None, ridge: float = RIDGE, device="cpu",
                               dtype: torch.dtype = torch.float32, batch_size: int = 8,
                               parent_name: str = "reference", child_name: str = "base"
                               ) -> ActivationChildMatch:
    """The child's coordinates among the parent's, from both models' activations on
    ``token_ids`` (``[rows, tokens]``, the same ids for both: one tokenizer).

    ``parent`` and ``child`` map HF tensor names to weights (a state dict, or any lazy
    mapping). ``layer_map``: one parent layer per child layer (validated); None: the weight
    path's solved map. ``residual_fit`` (``"lstsq"`` / ``"procrustes"``): also fit the
    :class:`ResidualMaps` for :func:`transfer_mapped` (``ridge``: of the least-squares fits,
    relative to the regressor's mean eigenvalue)."""
    cs.check_child(parent_config, child_config, parent_name, child_name)
    if residual_fit is not None and residual_fit not in RESIDUAL_FITS:
        raise ValueError(f"residual_fit must be one of {', '.join(RESIDUAL_FITS)} (or None), "
                         f"not {residual_fit!r}")
    pg, cg = geometry_from_config(parent_config, parent_name), geometry_from_config(child_config, child_name)
    arch = architecture_for(pg.model_type, parent_name)
    token_ids = torch.as_tensor(token_ids)
    # a neuron's correlation over fewer tokens than the child has neurons cannot single it out
    check_enough_tokens(int(token_ids.numel()), cg.intermediate_size,
                        f"matching {child_name}'s {cg.intermediate_size} MLP neurons per layer")
    lm, layer_sim = _layer_map(arch, pg, cg, parent, child, layer_map, parent_config, child_config,
                               parent_name, child_name)
    kw = dict(device=device, dtype=dtype, batch_size=batch_size)
    ps = LayerStreamer(parent_config, _getter(parent, parent_name), token_ids, name=parent_name, **kw)
    chs = LayerStreamer(child_config, _getter(child, child_name), token_ids, name=child_name, **kw)
    p_plan, c_plan = activation_plan(parent_config, model=parent_name), activation_plan(child_config, model=child_name)
    pk, ck = _Keys.of(arch, pg), _Keys.of(arch, cg)
    fit = _ResidualFit(arch, parent, child) if residual_fit is not None else None
    p_embed = torch.cat([h.reshape(-1, pg.hidden_size) for h in ps.hidden]).T  # [D, tokens]
    c_embed = torch.cat([h.reshape(-1, cg.hidden_size) for h in chs.hidden]).T
    embed_sim = correlation(c_embed, p_embed)
    if fit is not None:
        fit.moments["embed"].add(c_embed, p_embed)
    del p_embed, c_embed
    provisional = cs.assign(embed_sim)  # the child's inputs among the parent's channels, per layer
    layer_res_sim = torch.zeros_like(embed_sim)
    per_layer, qualities = [], []
    for k, i in enumerate(lm):
        while ps.next_layer < i:
            ps.step()  # a layer the child dropped: run, record nothing
        pa, ca = ps.step(p_plan, pk.record(True)), chs.step(c_plan, ck.record(True))
        r, q = _match_pair(arch, pg, cg, parent_config, parent, child, i, k, pa, ca, pk, ck, provisional)
        per_layer.append(r)
        qualities.append(q)
        layer_res_sim += correlation(ca[ck.out], pa[pk.out])
        if fit is not None:
            fit.add_layer(k, i, pa, ca, pk, ck)
    # the embedding outputs weigh as much as all layer outputs together: they are the child's
    # own stream before any pruned head or neuron has changed it
    res_sim = (embed_sim + layer_res_sim / len(lm)) / 2
    residual = cs.assign(res_sim)
    maps = fit.maps(residual, residual_fit, ridge, len(lm)) if fit is not None else None
    return ActivationChildMatch(cs.ChildMap(residual, tuple(lm), tuple(per_layer)), _quality(res_sim, residual),
                                qualities, layer_sim, tokens=int(token_ids.numel()), residual_maps=maps)


# --------------------------------------------------------------------------- mapped transfer


def _role(arch: Architecture, g: Geometry, rel: str) -> Optional[Tuple[str, str]]:
    """(side, site) of a layer tensor the residual maps move: ("reader", "attn"/"mlp") for the
    weight columns of q/k/v and gate/up, ("writer", "") for o/down weights and biases."""
    for which, site in (("q", "attn"), ("k", "attn"), ("v", "attn"), ("gate", "mlp"), ("up", "mlp")):
        if rel == f"{_projection(arch, which, g)[0]}.weight":
            return "reader", site
    for which in ("o", "down"):
        base = getattr(arch, which)
        if rel in (f"{base}.weight", f"{base}.bias"):
            return "writer", ""
    return None


def transfer_mapped(child: Tensors, parent: Tensors, skill: Tensors, parent_config,
                    match: ActivationChildMatch, scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """``child + scale * map(restrict(skill - parent))``: :func:`.crosssize.transfer` with the
    fitted :class:`ResidualMaps` applied to the restricted skill vector's residual-side axes
    (readers' columns, writers' rows, the embedding's columns, lm_head's columns). Norm weights
    and every head/neuron axis are restricted by index only. A tied child takes the
    embedding's map for its one matrix."""
    maps = match.residual_maps
    if maps is None:
        raise ValueError("transfer_mapped needs a match solved with residual_fit "
                         "(match_child_by_activations(..., residual_fit='lstsq'))")
    rx = cs.Restriction(parent_config, match.map)
    arch, g = rx.arch, rx.geometry
    out = {}
    for name, value in child.items():
        p = rx.parent_name(name)
        if p not in parent and p.endswith(arch.lm_head):  # tied parent: lm_head is embed
            p = p[: -len(arch.lm_head)] + arch.embed
        tau = rx.restrict(name, skill[p]).double() - rx.restrict(name, parent[p]).double()
        split = split_layer_name(arch, name)
        if split is not None:
            role = _role(arch, g, split[2])
            if role is not None and role[0] == "reader":
                tau = tau @ maps.readers[split[1]][role[1]]
            elif role is not None:
                tau = maps.writers[split[1]] @ tau
        elif name.endswith(arch.embed) or (p.endswith(arch.embed) and name.endswith(arch.lm_head)):
            tau = tau @ maps.embed.T
        elif name.endswith(arch.lm_head):
            tau = tau @ maps.lm_head
        out[name] = (value.double() + scale * tau).to(value.dtype)
    return out


__all__ = ["ActivationChildMatch", "RESIDUAL_FITS", "ResidualMaps", "correlation",
           "match_child_by_activations", "match_layer_activations", "transfer_mapped"]

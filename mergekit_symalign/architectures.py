"""Per-architecture symmetry specs, as data.

An :class:`Architecture` names a decoder layer's projections; :func:`layer_spec` turns it
plus a model's :class:`Geometry` (read from its HF config) into the :class:`LayerSpec` that
the generic solver and apply read. Adding an architecture whose layer is a plain
GQA-attention + gated-MLP block is one entry in ``ARCHITECTURES``; anything that shrinks the
group (QK-norm, fused projections, ...) must be declared and handled here, never ignored.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

import torch

from .errors import UnsupportedArchitecture
from .groups import Kind, Site, Symmetry, slot_index
from .spec import Block, LayerSpec

QK_ROTATIONS = ("rope", "full")


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: Tuple[str, ...]
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    activation: str = "SwiGLU"
    # HF's rotate_half pairs dims (i, i + r/2); GPT-J / GLM interleave (2i, 2i + 1).
    rope_layout: str = "rotate_half"
    # RMSNorm on q and k before RoPE: "per_head" (weight of size head_dim, Qwen3, Gemma 3) or
    # "all_heads" (one norm over all heads, OLMo 2). It shrinks the Q/K group, see below.
    qk_norm: str = "none"
    # Fused projections (Phi-3): row blocks [q | k | v] and [gate | up] of one tensor.
    fused_qkv: Optional[str] = None
    fused_gate_up: Optional[str] = None
    # Config flags whose variant we have not proven exact -> reason to refuse.
    refuse_if: Tuple[Tuple[str, str], ...] = ()
    # --- the residual stream (see residual.py) ---
    # "rms": RMSNorm(x) * w; "rms_offset": RMSNorm(x) * (1 + w) (Gemma); "layernorm": with
    # mean subtraction and a bias (StableLM).
    norm: str = "rms"
    # Reader-side norms, each with the projections that read its output (None: the
    # projections read the residual stream directly, as OLMo 2's do).
    readers: Tuple[Tuple[Optional[str], Tuple[str, ...]], ...] = (
        ("input_layernorm", ("q", "k", "v")), ("post_attention_layernorm", ("gate", "up")))
    # Writers, each with the norm applied to its output before the residual add ("sandwich"
    # norms of Gemma 2/3 and OLMo 2), or None.
    writers: Tuple[Tuple[str, Optional[str]], ...] = (("o", None), ("down", None))
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head.weight"
    # Decoder-layer tensors in a plain state dict (HF names, optionally nested as in a
    # multimodal checkpoint's ``language_model.``); a vision tower's ``encoder.layers.N`` is not.
    layer_pattern: str = r"^(?P<prefix>(?:.+\.)?model\.layers\.(?P<index>\d+)\.)(?P<name>.+)$"


GEMMA2_READERS = (("input_layernorm", ("q", "k", "v")), ("pre_feedforward_layernorm", ("gate", "up")))
GEMMA2_WRITERS = (("o", "post_attention_layernorm"), ("down", "post_feedforward_layernorm"))

ARCHITECTURES: Dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("llama", ("llama",)),
        Architecture("mistral", ("mistral",)),
        Architecture("qwen2", ("qwen2",)),  # q/k/v biases are sites of their rows
        Architecture("gemma", ("gemma",), activation="GeGLU", norm="rms_offset"),
        # soft-capping and sliding windows act on attention scores / logits: no change
        Architecture("gemma2", ("gemma2",), activation="GeGLU", norm="rms_offset",
                     readers=GEMMA2_READERS, writers=GEMMA2_WRITERS),
        Architecture("gemma3", ("gemma3_text", "gemma3"), activation="GeGLU", qk_norm="per_head",
                     norm="rms_offset", readers=GEMMA2_READERS, writers=GEMMA2_WRITERS),
        Architecture("qwen3", ("qwen3",), qk_norm="per_head"),
        # OLMo 2 normalizes after each sublayer only: readers see the raw residual stream
        Architecture("olmo2", ("olmo2",), qk_norm="all_heads",
                     readers=((None, ("q", "k", "v")), (None, ("gate", "up"))),
                     writers=GEMMA2_WRITERS),
        Architecture("phi3", ("phi3",), fused_qkv="self_attn.qkv_proj",
                     fused_gate_up="mlp.gate_up_proj"),
        # partial rotary (25 % by default): the non-rotated dims keep the full O(d - r)
        Architecture("stablelm", ("stablelm",), norm="layernorm", refuse_if=(
            ("qk_layernorm", "its per-head LayerNorm on q/k (with bias and mean subtraction) "
                             "leaves no proven Q/K symmetry"),
        )),
    )
}


def supported_model_types() -> List[str]:
    return sorted(t for a in ARCHITECTURES.values() for t in a.model_types)


def architecture_for(model_type: str, model: str = "model") -> Architecture:
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    raise UnsupportedArchitecture(
        f"{model}: architecture {model_type!r} has no symmetry spec in mergekit-symalign, so "
        f"its symmetries are not proven exact and it cannot be aligned. Supported model types: "
        f"{', '.join(supported_model_types())}. Use mergekit's plain method instead, or add a "
        f"spec (mergekit_symalign/architectures.py) together with an exactness test."
    )


@dataclass(frozen=True)
class Geometry:
    """The shapes a layer's symmetry group depends on, read from an HF config."""

    model_type: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rotary_dim: int
    rope_theta: Optional[float] = None  # None: per-layer-type settings (e.g. Gemma 3)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def describe(self) -> str:
        return (
            f"hidden={self.hidden_size}, heads={self.num_heads}/{self.num_kv_heads}, "
            f"head_dim={self.head_dim}, mlp={self.intermediate_size}, rotary_dim={self.rotary_dim}, "
            f"rope_theta={self.rope_theta}"
        )


def _rope_parameters(cfg: Any) -> Dict[str, Any]:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # per-layer-type rope settings (e.g. Gemma 3): require one consistent factor
        factors = {v.get("partial_rotary_factor", 1.0) for v in params.values()}
        if len(factors) != 1:
            raise UnsupportedArchitecture(f"per-layer partial rotary factors {factors}")
        thetas = {v.get("rope_theta") for v in params.values()}
        theta = thetas.pop() if len(thetas) == 1 else None
        return {"partial_rotary_factor": factors.pop(), "rope_theta": theta}
    return params if isinstance(params, dict) else {}


def text_config(config: Any) -> Any:
    """The language model's config: a multimodal config's text part, else the config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def tied_embeddings(config: Any) -> bool:
    """Does ``lm_head`` share the embeddings' weight? The model's own config says so where it
    sets ``tie_word_embeddings`` (a multimodal model's top-level config: transformers ties by
    the config of the model that holds ``lm_head``), else its text config."""
    if getattr(config, "tie_word_embeddings", None) is not None:
        return bool(config.tie_word_embeddings)
    return bool(getattr(text_config(config), "tie_word_embeddings", False))


def geometry_from_config(cfg: Any, model: str = "model") -> Geometry:
    cfg = text_config(cfg)
    model_type = getattr(cfg, "model_type", None)
    arch = architecture_for(model_type, model)
    for flag, reason in arch.refuse_if:
        if getattr(cfg, flag, False):
            raise UnsupportedArchitecture(
                f"{model}: {model_type} with {flag}=True is not supported: {reason}."
            )
    try:
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        hidden = int(cfg.hidden_size)
        head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
        factor = _rope_parameters(cfg).get("partial_rotary_factor")
        if factor is None:
            factor = getattr(cfg, "partial_rotary_factor", 1.0)
        rotary_dim = int(head_dim * float(factor))
        geometry = Geometry(
            model_type=model_type,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(cfg.intermediate_size),
            rotary_dim=rotary_dim,
            rope_theta=_rope_parameters(cfg).get("rope_theta", getattr(cfg, "rope_theta", None)),
        )
    except (AttributeError, TypeError) as err:
        raise UnsupportedArchitecture(f"{model}: cannot read layer geometry from config: {err}")
    if heads % kv_heads:
        raise UnsupportedArchitecture(
            f"{model}: {heads} query heads are not a multiple of {kv_heads} KV heads"
        )
    if rotary_dim % 2:
        raise UnsupportedArchitecture(
            f"{model}: rotary dimension {rotary_dim} is odd, so RoPE planes are undefined"
        )
    return geometry


def split_layer_name(arch: Architecture, name: str) -> Optional[Tuple[str, int, str]]:
    """``model.layers.3.mlp.up_proj.weight`` -> (``model.layers.3.``, 3, ``mlp.up_proj.weight``)."""
    m = re.match(arch.layer_pattern, name)
    if not m:
        return None
    return m.group("prefix"), int(m.group("index")), m.group("name")


# --------------------------------------------------------------------------- index layouts


def _heads(kv_groups: int, copies: int, head_dim: int, within: torch.Tensor) -> torch.Tensor:
    """Index ``[kv_groups * m, copies, k]`` of dims ``within[m, k]`` of each group's heads.

    Head ``h = j * copies + c`` of group ``j`` occupies rows ``h * head_dim + ...``.
    """
    head = torch.arange(kv_groups)[:, None] * copies + torch.arange(copies)[None, :]
    idx = (head * head_dim)[:, None, :, None] + within[None, :, None, :]  # [K, m, c, k]
    return idx.reshape(kv_groups * within.shape[0], copies, within.shape[1])


def _rope_planes(rotary_dim: int, layout: str) -> torch.Tensor:
    half = rotary_dim // 2
    p = torch.arange(half)
    if layout == "rotate_half":
        return torch.stack([p, p + half], -1)
    if layout == "interleaved":
        return torch.stack([2 * p, 2 * p + 1], -1)
    raise UnsupportedArchitecture(f"unknown RoPE layout {layout!r}")


def _as_scale(index: torch.Tensor) -> torch.Tensor:
    """One scalar per slot acting on every coordinate of every copy."""
    n, c, k = index.shape
    return index.reshape(n, c * k, 1)


def _projection(arch: Architecture, which: str, g: Geometry) -> Tuple[str, int]:
    """(tensor base name, row offset) of a projection, fused or not."""
    if which in "qkv" and arch.fused_qkv:
        q_rows, kv_rows = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
        return arch.fused_qkv, {"q": 0, "k": q_rows, "v": q_rows + kv_rows}[which]
    if which in ("gate", "up") and arch.fused_gate_up:
        return arch.fused_gate_up, {"gate": 0, "up": g.intermediate_size}[which]
    return getattr(arch, which), 0


def _rows(arch, which, g, index, contragredient=False) -> List[Site]:
    """Output rows of a projection at ``index`` (and the same rows of its optional bias)."""
    name, offset = _projection(arch, which, g)
    index = index + offset
    return [
        Site(f"{name}.weight", 0, index, contragredient),
        Site(f"{name}.bias", 0, index, contragredient, optional=True),
    ]


def _columns(arch, which, g, index, contragredient=False) -> List[Site]:
    name, _ = _projection(arch, which, g)
    return [Site(f"{name}.weight", 1, index, contragredient)]


def _mlp_block(arch: Architecture, g: Geometry) -> Block:
    neurons = slot_index(g.intermediate_size, 1, 1)
    perm = Symmetry(
        "mlp.neurons",
        Kind.permutation,
        tuple(_rows(arch, "gate", g, neurons) + _rows(arch, "up", g, neurons)
              + _columns(arch, "down", g, neurons)),
    )
    # Only the up branch is linear in its pre-activation, so only it can carry a scale;
    # a negative scale is fine there (the gate keeps its sign).
    scale = Symmetry(
        "mlp.neuron_scale",
        Kind.scale,
        tuple(_rows(arch, "up", g, neurons) + _columns(arch, "down", g, neurons, True)),
        signed=True,
    )
    return Block("mlp", perm, scale)


def _vo_block(arch: Architecture, g: Geometry) -> Block:
    dims = torch.arange(g.head_dim)[None, :]
    value = _heads(g.num_kv_heads, 1, g.head_dim, dims)
    output = _heads(g.num_kv_heads, g.group_size, g.head_dim, dims)
    rotation = Symmetry(
        "attn.vo_rotation",
        Kind.orthogonal,
        tuple(_rows(arch, "v", g, value) + _columns(arch, "o", g, output)),
    )
    # O(d) already holds -1, so the group scale is positive.
    scale = Symmetry(
        "attn.vo_scale",
        Kind.scale,
        tuple(_rows(arch, "v", g, _as_scale(value))
              + _columns(arch, "o", g, _as_scale(output), True)),
        signed=False,
    )
    return Block("attn.vo", rotation, scale)


def _qk_block(name: str, arch: Architecture, g: Geometry, within: torch.Tensor, kind: Kind) -> Block:
    query = _heads(g.num_kv_heads, g.group_size, g.head_dim, within)
    key = _heads(g.num_kv_heads, 1, g.head_dim, within)
    # q.k is kept by q -> R q, k -> R k (R orthogonal) and by q -> s q, k -> k / s.
    rotation = Symmetry(f"{name}_rotation", kind, tuple(_rows(arch, "q", g, query) + _rows(arch, "k", g, key)))
    scale = Symmetry(
        f"{name}_scale",
        Kind.scale,
        tuple(_rows(arch, "q", g, _as_scale(query)) + _rows(arch, "k", g, _as_scale(key), True)),
        signed=False,  # -1 is a rotation by pi, already in the group
    )
    return Block(name, rotation, scale)


def _qk_norm_blocks(arch: Architecture, g: Geometry) -> List[Block]:
    """What survives of the Q/K group when q and k pass through RMSNorm(weight) first.

    A transform of q's rows must commute with the norm's diagonal weight (generic: only
    per-dim signs) and with RoPE (only both signs of a plane together): a half-turn per
    plane, shared by the KV group's query heads and its key head. The cross scale q*s, k/s
    does not survive the norm. The norm would make each normalised block's own scale free,
    but only up to its epsilon (rsqrt(mean(q^2) + eps)), so that scale is not exact and is
    not used.
    """
    if g.rotary_dim != g.head_dim:
        raise UnsupportedArchitecture(f"{arch.name}: QK-norm with partial rotary is not proven")
    planes = _rope_planes(g.rotary_dim, arch.rope_layout)
    query = _heads(g.num_kv_heads, g.group_size, g.head_dim, planes)
    key = _heads(g.num_kv_heads, 1, g.head_dim, planes)
    half_turns = Symmetry("attn.qk_plane_half_turn", Kind.sign,
                          tuple(_rows(arch, "q", g, query) + _rows(arch, "k", g, key)))
    return [Block("attn.qk_planes", half_turns, None)]


def _dim_groups(arch: Architecture, g: Geometry, qk_rotation: str) -> List[torch.Tensor]:
    """The sets of a q/k head's dims that the Q/K symmetries mix among themselves (each RoPE
    plane; the non-rotated dims; or the whole head under ``qk_rotation: full``)."""
    d, r = g.head_dim, g.rotary_dim
    if qk_rotation == "full" and arch.qk_norm == "none":
        return [torch.arange(d)]
    groups = list(_rope_planes(r, arch.rope_layout)) if r else []
    if r < d:
        groups.append(torch.arange(r, d))
    return groups


def _head_blocks(arch: Architecture, g: Geometry, qk_rotation: str) -> List[Block]:
    """Attention-head permutations, applied before the within-head symmetries.

    Every head sees the same rotary embedding, so permuting whole heads is exact: the KV
    heads together with their blocks of query heads (q rows, k and v rows, o_proj columns,
    biases, and a QK-norm over the whole width, whose weight has a row per q/k row), and
    the query heads inside each block (q rows, o_proj columns). Heads are matched on Gram
    matrices of their rows (:func:`groups.gram_similarity`), which none of the within-head
    transforms (V/O rotation and scale, Q/K plane rotations and scales, half-turns) change.
    """
    K, G, d = g.num_kv_heads, g.group_size, g.head_dim
    dims = _dim_groups(arch, g, qk_rotation)
    blocks = []

    def rows_norm(which, index):
        sites = _rows(arch, which, g, index)
        if arch.qk_norm == "all_heads" and which in "qk":
            sites.append(Site(f"{arch.q.rsplit('.', 1)[0]}.{which}_norm.weight", 0, index))
        return sites

    def feature(which, index, axis=0):
        if axis == 1:
            return tuple(_columns(arch, which, g, index))
        return tuple(_rows(arch, which, g, index))

    def per_group(heads_per_slot, slots, index_dims):
        """[slots, 1, heads_per_slot * m]: the rows ``index_dims`` of each slot's heads."""
        head = torch.arange(slots)[:, None] * heads_per_slot + torch.arange(heads_per_slot)[None, :]
        return (head[:, :, None] * d + index_dims[None, None, :]).reshape(slots, 1, -1)

    if K > 1:
        whole_kv = per_group(1, K, torch.arange(d)).reshape(K, d, 1)
        whole_q = per_group(G, K, torch.arange(d)).reshape(K, G * d, 1)
        features = [feature("v", per_group(1, K, torch.arange(d))),
                    feature("o", per_group(G, K, torch.arange(d)), axis=1)]
        for which, copies in (("k", 1), ("q", G)):
            planes = [per_group(copies, K, group) for group in dims if len(group) == 2]
            if planes:
                features.append(feature(which, torch.cat(planes, dim=1)))
            for group in dims:
                if len(group) != 2:
                    features.append(feature(which, per_group(copies, K, group)))
        kv = Symmetry(
            "attn.kv_heads",
            Kind.permutation,
            tuple(rows_norm("q", whole_q) + rows_norm("k", whole_kv) + _rows(arch, "v", g, whole_kv)
                  + _columns(arch, "o", g, whole_q)),
            features=tuple(features),
        )
        blocks.append(Block("attn.kv_heads", kv, outer=True))
    if G > 1:
        H = g.num_heads
        whole = per_group(1, H, torch.arange(d)).reshape(H, d, 1)
        features = [feature("o", per_group(1, H, torch.arange(d)), axis=1)]
        planes = [per_group(1, H, group) for group in dims if len(group) == 2]
        if planes:
            features.append(feature("q", torch.cat(planes, dim=1)))
        for group in dims:
            if len(group) != 2:
                features.append(feature("q", per_group(1, H, group)))
        q = Symmetry(
            "attn.q_heads",
            Kind.permutation,
            tuple(rows_norm("q", whole) + _columns(arch, "o", g, whole)),
            block_size=G,
            features=tuple(features),
        )
        blocks.append(Block("attn.q_heads", q, outer=True))
    return blocks


@lru_cache(maxsize=64)
def layer_spec(arch_name: str, geometry: Geometry, qk_rotation: str = "rope") -> LayerSpec:
    arch = ARCHITECTURES[arch_name]
    if qk_rotation not in QK_ROTATIONS:
        raise ValueError(f"qk_rotation must be one of {QK_ROTATIONS}, not {qk_rotation!r}")
    blocks = _head_blocks(arch, geometry, qk_rotation)
    blocks += [_mlp_block(arch, geometry), _vo_block(arch, geometry)]
    d, r = geometry.head_dim, geometry.rotary_dim
    if arch.qk_norm != "none":
        if qk_rotation == "full":
            raise UnsupportedArchitecture(
                f"qk_rotation: full is not available for {arch.name}: its QK-norm does not "
                f"commute with a d x d rotation of q/k, so the transform would not even "
                f"approximately preserve the model. Use qk_rotation: rope (the default)."
            )
        blocks += _qk_norm_blocks(arch, geometry)
    elif qk_rotation == "full":
        # The seed papers' transform space: one d x d rotation per KV group. Not exact
        # under RoPE (see docs); callers must warn.
        blocks.append(_qk_block("attn.qk_full", arch, geometry, torch.arange(d)[None, :], Kind.orthogonal))
    else:
        if r:
            planes = _rope_planes(r, arch.rope_layout)
            blocks.append(_qk_block("attn.qk_planes", arch, geometry, planes, Kind.plane_rotation))
        if r < d:
            # Non-rotated dims (partial rotary) keep the full orthogonal group.
            rest = torch.arange(r, d)[None, :]
            blocks.append(_qk_block("attn.qk_nonrotary", arch, geometry, rest, Kind.orthogonal))
    return LayerSpec(architecture=arch.name, blocks=tuple(blocks))


def full_qk_warning(model: str) -> None:
    warnings.warn(
        f"qk_rotation: full aligns {model} with a full d x d rotation of each KV group's "
        f"query/key heads (as the seed papers do). On a RoPE model this is NOT a symmetry: "
        f"the aligned model computes a different function. Use qk_rotation: rope for the "
        f"exact, rotary-safe alignment.",
        stacklevel=2,
    )

"""How much a Q/K transform changes RoPE attention logits (for the inexact `qk_rotation: full`).

Pure torch. Probe inputs are random residual vectors; the logits ``q_m . RoPE(n - m) k_n`` of
every query head against its KV head are compared before and after the transform at several
relative positions. An exact (rotary-safe) transform gives 0 at every position.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch

from .architectures import Architecture, Geometry, _projection

DEFAULT_POSITIONS = (0, 1, 16, 256, 4096)


def _project(tensors: Mapping[str, torch.Tensor], arch: Architecture, which: str,
             g: Geometry, x: torch.Tensor) -> torch.Tensor:
    name, offset = _projection(arch, which, g)
    heads = g.num_heads if which == "q" else g.num_kv_heads
    rows = slice(offset, offset + heads * g.head_dim)
    w = tensors[f"{name}.weight"][rows].double()
    out = x @ w.T
    bias = tensors.get(f"{name}.bias")
    if bias is not None:
        out = out + bias[rows].double()
    return out.reshape(x.shape[0], heads, g.head_dim)


def _rotate(v: torch.Tensor, angle: torch.Tensor, rotary_dim: int, layout: str) -> torch.Tensor:
    """Rotate the rotary dims of ``v [..., d]`` plane by plane by ``angle [r/2]``."""
    half = rotary_dim // 2
    if layout == "rotate_half":
        x, y = v[..., :half], v[..., half:rotary_dim]
    else:
        x, y = v[..., 0:rotary_dim:2], v[..., 1:rotary_dim:2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    rx, ry = x * cos - y * sin, x * sin + y * cos
    out = v.clone()
    if layout == "rotate_half":
        out[..., :half], out[..., half:rotary_dim] = rx, ry
    else:
        out[..., 0:rotary_dim:2], out[..., 1:rotary_dim:2] = rx, ry
    return out


def attention_logit_change(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    arch: Architecture,
    g: Geometry,
    rope_theta: float = 10000.0,
    positions: Sequence[int] = DEFAULT_POSITIONS,
    probes: int = 64,
    seed: int = 0,
) -> Dict[int, float]:
    """``{relative position: ||L_after - L_before|| / ||L_before||}`` for one layer."""
    gen = torch.Generator().manual_seed(seed)
    xq = torch.randn(probes, g.hidden_size, generator=gen, dtype=torch.float64)
    xk = torch.randn(probes, g.hidden_size, generator=gen, dtype=torch.float64)
    r = g.rotary_dim
    inv_freq = rope_theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    group = torch.arange(g.num_heads) // g.group_size
    result = {}
    logits: Dict[str, Optional[torch.Tensor]] = {}
    for delta in positions:
        for label, tensors in (("before", before), ("after", after)):
            q = _project(tensors, arch, "q", g, xq)
            k = _project(tensors, arch, "k", g, xk)[:, group]  # each query head's KV head
            q = _rotate(q, -delta * inv_freq, r, arch.rope_layout)  # q at m, k at m + delta
            logits[label] = torch.einsum("phd,qhd->pqh", q, k)
        den = float(logits["before"].norm())
        result[delta] = float((logits["after"] - logits["before"]).norm()) / max(den, 1e-30)
    return result

"""The transfer's tensor arithmetic, pure torch (no mergekit import): skill deltas, the
single-skill task-arithmetic shortcut, and ``aligned(B) + delta`` in either frame.

:mod:`.tasks.inputs` and :mod:`.tasks.transfer` call these from mergekit's task graph; every
function here takes and returns tensors only.
"""

from __future__ import annotations

from typing import Optional

import torch

from .groups import rows_per_chunk
from .spec import LayerTransform


def widened_difference(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``tensor - reference`` in at least float32: exact for bfloat16/float16 inputs. A float32
    input is one pass. A narrower one is widened a block of rows at a time into the result:
    the widened block is still in cache when it is subtracted, where widening the whole tensor
    first writes and reads back a tensor-sized float32 copy."""
    work = torch.promote_types(tensor.dtype, torch.float32)
    if tensor.dtype == work:
        return torch.sub(tensor, reference)
    if tensor.dim() == 0 or tensor.shape != reference.shape or \
            torch.promote_types(work, reference.dtype) != work:
        return tensor.to(work).sub_(reference)
    out = torch.empty(tensor.shape, dtype=work, device=tensor.device)
    step = rows_per_chunk(tensor[0].numel())
    for start in range(0, tensor.shape[0], step):
        rows = slice(start, start + step)
        torch.sub(tensor[rows].to(work), reference[rows], out=out[rows])
    return out


def weighted_single_delta(delta: torch.Tensor, weight: float, normalize: bool,
                          scale: float) -> torch.Tensor:
    """mergekit's ``task_arithmetic`` kernel for one skill's float32 delta on a zero base, in
    place: ``delta * weight``, then ``/ weight`` when ``normalize`` (``1`` below 1e-8, as
    the kernel does), then ``* scale`` (its ``lambda``) when it is not 1 — the kernel's own
    float32 operations in its order, so its result bit for bit (on the zero base its
    ``x - 0`` and ``0 + x`` are exact). tests/test_merge.py compares the two on random
    inputs for every option."""
    weights = torch.tensor(weight, dtype=delta.dtype, device=delta.device)
    if weight != 1.0:
        delta.mul_(weights)
    if normalize:
        delta /= torch.where(weights.abs() < 1e-8, torch.ones_like(weights), weights)
    if scale != 1:
        delta *= scale
    return delta


def transfer_by_blocks(merged, reference, base, blocks, out_dtype) -> torch.Tensor:
    """``base + factor * (merged - reference)[index]`` for a transform that only permutes and
    rescales positions (``LayerTransform.gathered_blocks``), a block of rows at a time,
    written straight into the output dtype: the same float32 arithmetic as the general path
    (subtract, scale, permute, add the base, round once) without its three tensor-sized
    float32 temporaries."""
    out = None
    for rows, take, factor in blocks:
        part = take(merged).to(torch.float32)  # a fresh tensor (take gathers)
        if reference is not None:  # merged = R + delta (else merged is the delta)
            part.sub_(take(reference))
        if factor is not None:
            part.mul_(factor.to(part.device))
        part.add_(base[rows])
        if len(blocks) == 1 and out_dtype == torch.float32:
            return part  # the whole tensor, in its dtype already: no copy
        if out is None:
            out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
        out[rows] = part
    return out


def unfold_step(norm: str) -> str:
    """The name of the residual step that unfolds ``norm`` (``<name>.weight``)."""
    return f"residual.unfold.{norm[:-len('.weight')]}"


def refolded(transform: LayerTransform, name: str, norm: str, base_w, delta, norm_merged,
             norm_base, work) -> torch.Tensor:
    """The merged model (reference's coordinates) mapped into the base's with its own
    merged norm folded in: the base's transform reversed, except that the step which
    unfolded the reference's norm now unfolds the merged one. Exact for the merged
    function, whatever the deltas did to the norm (a linear map of the deltas is not:
    the rotation does not commute with a change of the norm's weights)."""
    merged_norm = transform.apply_one(norm, norm_base.to(work)) + norm_merged.to(work)
    unfold = unfold_step(norm)
    offset = next(site.offset for s, _ in transform.steps if s.name == unfold for site in s.sites)
    steps = tuple((s, (merged_norm.double() + offset) if s.name == unfold else e)
                  for s, e in transform.steps)
    full = transform.apply_one(name, base_w) + delta
    return LayerTransform(steps).inverse().apply_one(name, full)


def transferred(merged: torch.Tensor, base: torch.Tensor, reference: torch.Tensor,
                transform: Optional[LayerTransform], name: Optional[str], *, merged_is_delta: bool,
                output_frame: str, owned: bool, fold_norm: Optional[str] = None,
                norm_merged: Optional[torch.Tensor] = None,
                norm_base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``aligned(B) + delta`` (``output_frame`` reference) or ``B + inverse_B(delta)`` (base),
    where ``delta`` is ``merged`` (``merged_is_delta``) or ``merged - reference``; ``owned``:
    ``merged`` is the caller's alone and may be written in place. ``fold_norm`` /
    ``norm_merged`` / ``norm_base``: :func:`refolded` (``residual: orthogonal``, base frame)."""
    out_dtype = base.dtype
    work = torch.promote_types(base.dtype, torch.float32)
    if transform is None or not transform.touches(name):  # one pass per operation
        delta = merged.to(work) if merged_is_delta else merged.to(work) - reference
        if delta is not merged or owned:  # no fresh tensor-sized output: add in place
            return delta.add_(base).to(out_dtype)
        return torch.add(delta, base).to(out_dtype)
    if output_frame == "base" and work == torch.float32 and fold_norm is None:
        blocks = transform.inverse().gathered_blocks(name, tuple(base.shape), delta=True)
        if blocks is not None:
            return transfer_by_blocks(merged, None if merged_is_delta else reference, base,
                                      blocks, out_dtype)
    # In place on this call's own temporaries: at 8B shapes every extra tensor-sized float32
    # copy is 224 MiB of fresh memory (a bf16 operand is widened exactly).
    delta = merged.to(work, copy=not owned)
    if not merged_is_delta:
        delta.sub_(reference)
    if output_frame == "base" and norm_merged is not None and \
            any(s.name == unfold_step(fold_norm) for s, _ in transform.steps):
        out = refolded(transform, name, fold_norm, base.to(work), delta, norm_merged, norm_base, work)
    elif output_frame == "base":
        out = transform.inverse().apply_one(name, delta, delta=True, inplace=True).add_(base)
    else:
        base_w = base.to(work)
        out = transform.apply_one(name, base_w, inplace=base_w is not base).add_(delta)
    return out.to(out_dtype)

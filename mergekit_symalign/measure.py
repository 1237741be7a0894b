"""Measurement of solved alignments (no mergekit import): how far a transform is from the
identity, step by step, and a layer's distance to the reference before and after.

:func:`summarize_transform` is generic over :class:`~.spec.LayerTransform` steps (a model-level
residual transform is summarised by the same function); :func:`layer_record` adds the layer's
distances. The alignment tasks of a merge feed these records to a per-merge collector
(:mod:`.collect`); the model card (:mod:`.card`) and the report (:mod:`.report`) read them.

Identity: a layer's transform is the identity when every permutation maps each slot to itself,
every sign is +1, every scale satisfies ``|s - 1| <= tol`` and every rotation or orthogonal
matrix ``||R - I||_F / sqrt(k) <= tol`` (``tol`` = :data:`IDENTITY_TOLERANCE` unless given).
Such an alignment changes no weight, so the aligned merge is the plain method's merge.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .groups import Kind, _working, rows_per_chunk, slot_deviations  # the solver's working dtype and chunks: the distances see what it sees

IDENTITY_TOLERANCE = 1e-6


# --------------------------------------------------------------------------- one transform


def _kind_name(symmetry) -> str:
    kind = getattr(symmetry, "kind", None)
    return str(getattr(kind, "value", kind))


def step_summary(symmetry, element: torch.Tensor, tol: float = IDENTITY_TOLERANCE) -> Dict[str, Any]:
    """How far one step ``(symmetry, element)`` is from the identity.

    Read from the element's shape, so it covers every kind (and kinds added later): an integer
    ``[n]`` is a permutation of ``n`` slots, a float ``[n]`` one scalar per slot (scale or
    sign), a float ``[n, k, k]`` one matrix per slot (orthogonal or plane rotation).
    """
    element = element.detach().cpu()
    out: Dict[str, Any] = {"name": getattr(symmetry, "name", "?"), "kind": _kind_name(symmetry),
                           "slots": int(element.shape[0]) if element.dim() else 1}
    if not element.is_floating_point() and element.dim() == 1:  # a permutation
        moved = element != torch.arange(element.shape[0])
        out["moved"] = int(moved.sum())
    elif element.dim() == 1:  # a scalar per slot (scale or sign)
        value = element.double()
        deviation = slot_deviations(value)
        out["moved"] = int((deviation > tol).sum())
        out["max_deviation"] = float(deviation.max()) if value.numel() else 0.0
        if value.numel():
            out["min"], out["max"] = float(value.min()), float(value.max())
            out["negative"] = int((value < 0).sum())
            magnitude = value.abs().clamp_min(1e-300)
            out["max_abs_log"] = float(magnitude.log().abs().max())  # spread: e^x-fold at most
    elif element.dim() == 3 and element.shape[-1] == element.shape[-2]:  # a matrix per slot
        matrix = element.double()
        deviation = slot_deviations(matrix)
        out["moved"] = int((deviation > tol).sum())
        out["max_deviation"] = float(deviation.max()) if matrix.shape[0] else 0.0
        if matrix.shape[0]:
            # principal angles: |arg| of the eigenvalues (a reflection shows as 180 degrees)
            angles = torch.linalg.eigvals(matrix).angle().abs().amax(dim=-1).rad2deg()
            out["max_angle_deg"] = float(angles.max())
            out["mean_angle_deg"] = float(angles.mean())
            out["reflections"] = int((torch.linalg.det(matrix) < 0).sum())
    else:  # unknown layout: say so rather than guess
        out["moved"] = None
    if out["moved"] is not None:
        out["moved_fraction"] = out["moved"] / out["slots"] if out["slots"] else 0.0
    return out


def summarize_transform(transform, tol: float = IDENTITY_TOLERANCE) -> Dict[str, Any]:
    """``{"identity": bool, "symmetries": [step summaries]}`` of a transform's steps (any
    object with ``steps = ((symmetry, element), ...)``, e.g. a :class:`~.spec.LayerTransform`).
    A step whose movement cannot be read counts as moved."""
    steps = [step_summary(symmetry, element, tol) for symmetry, element in transform.steps]
    return {"identity": all(s["moved"] == 0 for s in steps), "symmetries": steps}


def distances_before_after(reference: Mapping[str, torch.Tensor],
                           model: Mapping[str, torch.Tensor], transform,
                           working=None) -> Tuple[float, float]:
    """``||model - reference|| / ||reference||`` before and after ``transform`` moves the model,
    over the tensors the reference holds. In blocks of rows, in at least float32 (as the
    merge moves them), float32 norms: no float64 copy and no second copy of the layer (at 8B
    shapes whole-tensor temporaries are fresh memory, most of such a record's cost).

    ``working`` (a :class:`~.spec.WorkingCopy` that the solve of ``transform`` left): the
    distance after is measured on its tensors moved by its pending steps alone (at most a
    rescale of whole positions), instead of moving ``model`` by the whole transform again
    (o_proj's whole-tensor rotation and down_proj's column gather were most of this record
    at 8B shapes)."""
    ref2 = before2 = after2 = 0.0
    for name, a in reference.items():
        t = model.get(name)
        if t is None:
            continue
        t = t.to(a.device)
        step = _block_rows(a)
        norm2, before = _norm_and_distance(a, t, step)
        ref2 += norm2
        before2 += before
        if not transform.touches(name):
            after2 += before
        elif working is not None and _exact_in_working_copy(name, transform, working):
            after2 += _distance_after(name, a, working.tensors[name].to(a.device), working.pending, step)
        else:
            after2 += _distance_after(name, a, t, transform, step)
    if ref2 <= 0:
        return 0.0, 0.0
    return math.sqrt(before2 / ref2), math.sqrt(after2 / ref2)


def _exact_in_working_copy(name: str, transform, working) -> bool:
    """Whether the solve's working copy of ``name`` holds the moved tensor as the record's own
    float32 move would: the copy is at least float32, or only permutations and sign flips
    (exact in any dtype) were applied to it. A bf16 copy is rounded back to bf16 after each
    rotation or scale, which on an exactly scrambled layer reads as a 10 % larger distance
    after (8B shapes: 0.175 % against 0.159 %)."""
    tensor = working.tensors.get(name)
    if tensor is None:
        return False
    if tensor.dtype in (torch.float32, torch.float64):
        return True
    pending = {id(element) for _, element in working.pending.steps}
    return all(symmetry.kind in (Kind.permutation, Kind.sign)
               for symmetry, element in transform.steps
               if name in symmetry.tensors and id(element) not in pending)


def _distance_after(name: str, a: torch.Tensor, t: torch.Tensor, transform, step: int) -> float:
    """``||transform(t) - a||^2`` for one tensor, without a moved copy where the transform
    only permutes or rescales whole positions."""
    if not transform.touches(name):
        return _squared_distance(t, a, step)
    blocks = transform.gathered_blocks(name, tuple(t.shape), views=True) if a.dim() else None
    if blocks is None:  # rotations: moved a block at a time along an axis no step acts on
        free = transform.free_axis(name, tuple(t.shape))
        if free is None:  # the tensor is moved whole (attention tensors: smaller)
            moved = _working(t)
            return _squared_distance(transform.apply_one(name, moved, inplace=moved is not t), a, step)
        width = rows_per_chunk(t.numel() // max(t.shape[free], 1))
        total = 0.0
        for start in range(0, t.shape[free], width):
            part = t.narrow(free, start, min(width, t.shape[free] - start))
            moved = _working(part)
            moved = transform.apply_one(name, moved, inplace=moved is not part)
            total += float(torch.linalg.vector_norm(moved - a.narrow(free, start, part.shape[free]))) ** 2
        return total
    total = 0.0
    for rows, take, factor in blocks:
        part = _working(take(t))
        if factor is not None:
            part = part * factor.to(part.device)
        total += float(torch.linalg.vector_norm(part - a[rows])) ** 2
    return total


def _block_rows(a: torch.Tensor) -> int:
    return rows_per_chunk(a.numel() // max(a.shape[0], 1)) if a.dim() else 1


def _squared_distance(x: torch.Tensor, a: torch.Tensor, step: int) -> float:
    """``||x - a||^2`` in blocks of ``step`` rows, at least float32."""
    if not x.dim():
        return float((_working(x) - _working(a)).square())
    return sum(float(torch.linalg.vector_norm(_working(x[s:s + step]) - a[s:s + step])) ** 2
               for s in range(0, x.shape[0], step))


def _norm_and_distance(a: torch.Tensor, x: torch.Tensor, step: int) -> Tuple[float, float]:
    """``(||a||^2, ||x - a||^2)`` in one pass of blocks of ``step`` rows, at least float32
    (each block of ``a`` converted once for both)."""
    if not a.dim():
        a, x = _working(a), _working(x)
        return float(a.square()), float((x - a).square())
    norm2 = distance2 = 0.0
    for s in range(0, a.shape[0], step):
        block = _working(a[s:s + step])
        norm2 += float(torch.linalg.vector_norm(block)) ** 2
        distance2 += float(torch.linalg.vector_norm(_working(x[s:s + step]) - block)) ** 2
    return norm2, distance2


def layer_record(model: str, reference: str, layer: int, prefix: str, transform,
                 reference_tensors: Mapping[str, torch.Tensor],
                 model_tensors: Mapping[str, torch.Tensor],
                 seconds: Optional[float] = None, tol: float = IDENTITY_TOLERANCE,
                 cache_folder: Optional[str] = None, working=None) -> Dict[str, Any]:
    """What one (model, layer) alignment did: distances before and after, and its summary.
    With ``cache_folder`` and a transform solved under an alignment-cache key, the distances
    are read from (or saved to) that entry's record instead of measured again. ``working``:
    the solve's :class:`~.spec.WorkingCopy` (see :func:`distances_before_after`)."""
    summary = summarize_transform(transform, tol)
    store = key = saved = None
    if cache_folder and getattr(transform, "cache_key", None):
        from .cache import AlignmentCache

        store, key = AlignmentCache(cache_folder), transform.cache_key
        saved = store.load_record(key)
    if saved is not None:
        before, after = saved["distance_before"], saved["distance_after"]
    else:
        before, after = distances_before_after(reference_tensors, model_tensors, transform, working)
        if store is not None:
            store.save_record(key, {"distance_before": before, "distance_after": after})
    # continuous elements that were fitted but no better than fitting noise (kept identity)
    fits = [{"symmetry": f.symmetry, "explained": f.explained, "snapped": f.snapped}
            for f in getattr(transform, "fits", ())]
    return {"model": model, "reference": reference, "layer": int(layer), "prefix": prefix,
            "distance_before": before, "distance_after": after, "identity": summary["identity"],
            "seconds": seconds, "symmetries": summary["symmetries"], "fits": fits}


__all__ = ["IDENTITY_TOLERANCE", "distances_before_after", "layer_record", "step_summary",
           "summarize_transform"]

"""The per-merge collector: what each alignment task solved, for the model card and the report.

The hook, in one place: when a merge has a collector, :class:`.alignments.Alignments`
builds its alignment tasks through :func:`collected`, which returns a subclass of the task
that, after solving, appends one :func:`.measure.layer_record` (the transform's summary and the
layer's distance to the reference before and after) to the collector. Nothing is recomputed:
the record is made from the tensors and the transform the task already holds.

A collector belongs to one merge and is found by the ``MergeConfiguration`` object the merge
was planned with (``run_merge`` hands that very object to the planner and to
``generate_card``): :func:`for_planning` starts a fresh one when the merge will write a
model card, or uses the one the report registered for its config. Tasks carry only the collector's key
(a string), so the task graph stays hashable and comparable.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from mergekit.common import ModelReference

from .measure import IDENTITY_TOLERANCE, layer_record
from .spec import WorkingCopy
from .tasks import LayerAlignmentTask, NamedLoads, PickLayerTransform

_KEEP = 16  # collectors of merges that never asked for theirs back (a merge that failed)
_LOCK = threading.Lock()
_COLLECTORS: "OrderedDict[str, Collector]" = OrderedDict()


@dataclass
class Collector:
    owner: Any  # the MergeConfiguration being planned (matched by identity)
    key: str
    tolerance: float = IDENTITY_TOLERANCE
    for_report: bool = False  # registered by the report before planning (reused by the planner)
    records: List[Dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, record: Dict[str, Any]) -> None:
        with self.lock:
            self.records.append(record)


def register(owner, tolerance: float = IDENTITY_TOLERANCE, for_report: bool = False) -> str:
    """Start a collector for the merge planned from ``owner``; returns its key."""
    key = uuid.uuid4().hex
    with _LOCK:
        _COLLECTORS[key] = Collector(owner, key, tolerance, for_report)
        while len(_COLLECTORS) > _KEEP:
            _COLLECTORS.popitem(last=False)
    return key


def get(key: Optional[str]) -> Optional[Collector]:
    with _LOCK:
        return _COLLECTORS.get(key) if key else None


def find(owner) -> Optional[Collector]:
    """The newest collector registered for this very object."""
    with _LOCK:
        for collector in reversed(_COLLECTORS.values()):
            if collector.owner is owner:
                return collector
    return None


def release(key: str) -> None:
    with _LOCK:
        _COLLECTORS.pop(key, None)


def for_planning(planner) -> Optional[str]:
    """The collector key for an aligned merge being planned, or None (nothing collected)."""
    existing = find(planner.config)
    if existing is not None and existing.for_report:
        return existing.key
    if getattr(planner.options, "write_model_card", False):
        return register(planner.config)
    return None


def _split(tensors: Mapping[str, Any]):
    """The ``model:<rel>`` / ``reference:<rel>`` arguments of an alignment task, as dicts."""
    sides: Dict[str, Dict[str, Any]] = {"model": {}, "reference": {}}
    for key, value in tensors.items():
        side, _, rel = key.partition(":")
        if side in sides and rel and value is not None:
            sides[side][rel] = value
    return sides["reference"], sides["model"]


def _record(key: str, model, reference, layer: int, prefix: str, transform,
            tensors: Mapping[str, Any], seconds: Optional[float],
            cache_folder: Optional[str] = None, working: Optional[WorkingCopy] = None) -> None:
    collector = get(key)
    if collector is None:  # released (or another process): nothing to report to
        return
    reference_tensors, model_tensors = _split(tensors)
    collector.add(layer_record(str(model), str(reference), layer, prefix, transform,
                               reference_tensors, model_tensors, seconds, collector.tolerance,
                               cache_folder=cache_folder, working=working))


class CollectedLayerAlignment(LayerAlignmentTask):
    """A :class:`.tasks.LayerAlignmentTask` that reports what it solved."""

    collector: str
    layer: int  # the model's own layer index

    def execute(self, residual=None, **kwargs):
        start = time.perf_counter()
        working = WorkingCopy()  # the record measures the aligned layer on the solve's copy
        transform = self.solve(residual, working=working, **kwargs)
        seconds = time.perf_counter() - start
        _record(self.collector, self.model, self.reference, self.layer, self.layer_prefix,
                transform, kwargs, seconds, self.settings.alignment_cache or None,
                working if working.tensors else None)
        return transform


class CollectedPick(PickLayerTransform):
    """A :class:`.tasks.PickLayerTransform` (activation alignment) that reports the layer's
    transform; it also takes the layer's loads (shared with the merge) to measure distances."""

    collector: str
    reference: ModelReference
    layer_prefix: str
    model_tensors: NamedLoads
    reference_tensors: NamedLoads

    def arguments(self):
        args = dict(super().arguments())
        args.update({f"model:{rel}": load for rel, load in self.model_tensors})
        args.update({f"reference:{rel}": load for rel, load in self.reference_tensors})
        return args

    def execute(self, transforms, **tensors):
        transform = super().execute(transforms)
        _record(self.collector, self.model, self.reference, self.layer, self.layer_prefix,
                transform, tensors, None)  # solved for all layers at once: no time per layer
        return transform


COLLECTING = (CollectedLayerAlignment, CollectedPick)


def collected(key: Optional[str], task, layer: Optional[int] = None, reference=None,
              prefix: str = "", loads=None):
    """``task`` itself without a collector; otherwise its collecting subclass.

    A :class:`LayerAlignmentTask` needs ``layer`` (the model's index); a
    :class:`PickLayerTransform` needs the ``reference``, the model's layer ``prefix`` and the
    layer's ``loads`` (``(model_loads, reference_loads)`` as ``Alignments._pair_loads``).
    """
    if key is None:
        return task
    fields = {name: getattr(task, name) for name in type(task).model_fields}
    if isinstance(task, LayerAlignmentTask):
        return CollectedLayerAlignment(**fields, collector=key, layer=layer)
    model_loads, reference_loads = loads
    return CollectedPick(**fields, collector=key, reference=reference, layer_prefix=prefix,
                         model_tensors=model_loads, reference_tensors=reference_loads)

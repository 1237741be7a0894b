"""The output task of a cross-size transfer (a pruned child as the base):
``child + restrict(combined delta)``, in the child's coordinates and dtype.

The restriction (index maps solved once per merge at plan time, :mod:`..crosssize_planning`)
is not a task field: tasks must stay hashable and small, so they carry the key of the merge's
:class:`..crosssize.Restriction` in a per-process registry (as :mod:`..collect` does for its
collectors)."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from typing import Any, Dict, Optional

import torch

from mergekit.common import ModelReference
from mergekit.graph import Task

from ..validation import check_finite

_KEEP = 16  # restrictions of merges planned and never run
_LOCK = threading.Lock()
_RESTRICTIONS: "OrderedDict[str, Any]" = OrderedDict()


def register_restriction(restriction) -> str:
    key = uuid.uuid4().hex
    with _LOCK:
        _RESTRICTIONS[key] = restriction
        while len(_RESTRICTIONS) > _KEEP:
            _RESTRICTIONS.popitem(last=False)
    return key


def restriction_for(key: str):
    with _LOCK:
        return _RESTRICTIONS[key]


class RestrictedTransferTask(Task[torch.Tensor]):
    """``child + restrict(merged)``: ``merged`` is the wrapped method's combined delta of the
    skills (parent-shaped, on a zero base), ``child`` the base's own tensor ``name``."""

    merged: Task
    child: Task
    child_model: ModelReference
    name: str  # the child's (output) tensor name
    restriction: str  # key of the merge's Restriction

    def arguments(self) -> Dict[str, Task]:
        return {"merged": self.merged, "child": self.child}

    def group_label(self) -> Optional[str]:
        return self.merged.group_label()

    def priority(self) -> int:
        return self.merged.priority() + 1

    def execute(self, merged: torch.Tensor, child: torch.Tensor) -> torch.Tensor:
        check_finite(child, self.child_model, self.name)
        delta = restriction_for(self.restriction).restrict(self.name, merged)
        if delta.shape != child.shape:  # a child whose tensors disagree with its config
            raise ValueError(
                f"{self.child_model} {self.name}: the restricted skill vector has shape "
                f"{tuple(delta.shape)} but the child's tensor has {tuple(child.shape)}; its "
                f"config.json does not describe its weights.")
        return (child.to(torch.float32) + delta.to(device=child.device, dtype=torch.float32)).to(child.dtype)


__all__ = ["RestrictedTransferTask", "register_restriction", "restriction_for"]

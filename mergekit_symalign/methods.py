"""The ``symmetry_aligned_<method>`` merge methods, as data over mergekit's GTA methods.

Each aligned method wraps one of mergekit's generalized-task-arithmetic methods: its
parameters are the wrapped method's (``weight`` becomes optional, since the reference model
carries none) plus the plugin's own. Through ``mergekit-yaml`` / ``run_merge`` the planner
hook (:mod:`mergekit_symalign.planner`) aligns the inputs layer by layer and runs the wrapped
kernel on them. A tensor-at-a-time caller (``merge_tensors`` / ``merge_state_dicts``) cannot
be aligned by a kernel that sees one tensor: there the kernel takes its inputs as already
aligned (e.g. by :func:`mergekit_symalign.statedict.align_state_dict`), says so once, and
computes ``base + combine(skill_i - reference)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional, Tuple

import warnings

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorEntry,
    TensorGroup,
)

from .settings import GLOBAL, LAYER, MODEL, PARAMETERS, resolve_roles

PREFIX = "symmetry_aligned_"
PAPER_URL = "https://arxiv.org/abs/2511.10850"  # the symmetries' paper (method spec, model card)
WRAPPED_METHODS = (
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
)

SCOPES = {GLOBAL: ParameterScope.SHARED, LAYER: ParameterScope.SHARED, MODEL: ParameterScope.INPUT}


@dataclass(frozen=True)
class SymmetryAlignedMerge(GroupMergeMethod):
    wrapped: str

    @property
    def inner(self):
        return registry.get(self.wrapped)

    @cached_property
    def spec(self) -> MergeMethodSpec:
        params = []
        for p in self.inner.spec.parameters:
            if p.name == "weight":  # the reference model has no weight
                p = ParameterSpec("weight", Optional[float], p.scope, default=None,
                                  description="skill-vector weight (skill models only)")
            params.append(p)
        for p in PARAMETERS:
            params.append(ParameterSpec(p.name, p.type, SCOPES[p.where],
                                        default=p.default, description=p.help))
        inner = self.inner.spec
        return MergeMethodSpec(
            name=PREFIX + self.wrapped,
            pretty_name=f"Symmetry-aligned {inner.pretty_name or self.wrapped}",
            reference_url=PAPER_URL,
            parameters=tuple(params),
            contract=InputContract(base=BasePolicy.REQUIRED),
            optional_tensor_policy=inner.optional_tensor_policy,
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any):
        if self.spec.name not in _WARNED:
            _WARNED.add(self.spec.name)
            warnings.warn(
                f"{self.spec.name} called tensor by tensor (outside mergekit's planner): a "
                f"kernel that sees one tensor cannot align models, so the inputs are taken as "
                f"already aligned. Align state dicts first with "
                f"mergekit_symalign.statedict.align_state_dict, or merge with mergekit-yaml.",
                stacklevel=2,
            )
        by_id = {e.id: e for e in group.entries}
        per_model = {e.id: {"role": parameters["role"][e.id], "align": True,
                            "weight": None if e.is_base else parameters["weight"][e.id]}
                     for e in group.entries}
        roles = resolve_roles(list(by_id), group.base.id, per_model, self.spec.name,
                              group.metadata.name)
        base, reference = by_id[roles.base], by_id[roles.reference]
        skills = [by_id[m] for m in roles.skills]
        inner_group = TensorGroup(
            entries=(TensorEntry(reference.id, reference.tensor, is_base=True),
                     *(TensorEntry(e.id, e.tensor) for e in skills)),
            metadata=group.metadata,
        )
        inner_parameters = {}
        for p in self.inner.spec.parameters:
            value = parameters[p.name]
            if p.scope != ParameterScope.SHARED:
                inputs = inner_group.non_base if p.scope == ParameterScope.NON_BASE else inner_group.entries
                value = PerInputValues([(e.id, value[e.id]) for e in inputs])
            inner_parameters[p.name] = value
        merged = self.inner.merge_group(inner_group, **inner_parameters)
        if reference is base:
            return merged
        work = torch.promote_types(base.tensor.dtype, torch.float32)
        return (base.tensor.to(work) + merged.to(work) - reference.tensor.to(work)).to(base.tensor.dtype)


_WARNED: set = set()


def all_methods() -> Tuple[SymmetryAlignedMerge, ...]:
    return tuple(SymmetryAlignedMerge(name) for name in WRAPPED_METHODS)

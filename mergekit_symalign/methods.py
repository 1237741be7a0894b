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

import difflib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Dict, Optional, Tuple

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

PREFIX = "symmetry_aligned_"
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

ROLES = ("skill", "reference")
ALIGNMENTS = ("weights", "activations")
OUTPUT_FRAMES = ("base", "reference")

# name -> (type, scope, default, help)
PLUGIN_PARAMETERS: Dict[str, Tuple[Any, ParameterScope, Any, str]] = {
    "alignment": (str, ParameterScope.SHARED, "weights",
                  "what the alignment matches: weights, or activations on calibration text"),
    "permutation": (bool, ParameterScope.SHARED, True, "use MLP neuron permutations"),
    "rotation": (bool, ParameterScope.SHARED, True, "use V/O and Q/K rotations"),
    "scaling": (bool, ParameterScope.SHARED, True, "use MLP, V/O and Q/K scales"),
    "qk_rotation": (str, ParameterScope.SHARED, "rope",
                    "rope: exact per-plane Q/K rotations; full: the papers' d x d rotation (inexact under RoPE)"),
    "output_frame": (str, ParameterScope.SHARED, "base",
                     "base: result in the base model's coordinates; reference: in the reference's"),
    "calibration": (str, ParameterScope.SHARED, "",
                    "activations only: calibration prompts (.txt, one per line, or .jsonl); empty = shipped set"),
    "calibration_samples": (int, ParameterScope.SHARED, 256, "activations only: number of prompts used"),
    "calibration_max_tokens": (int, ParameterScope.SHARED, 128,
                               "activations only: tokens per packed calibration row"),
    "role": (str, ParameterScope.INPUT, "skill", "skill (default) or reference"),
    "align": (bool, ParameterScope.INPUT, True, "align this model to the reference first"),
}
CHOICES = {
    "alignment": ALIGNMENTS,
    "qk_rotation": ("rope", "full"),
    "output_frame": OUTPUT_FRAMES,
    "role": ROLES,
}


class SymAlignConfigError(ValueError):
    """A recipe that the plugin refuses, with the reason and the remedy."""


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
        for name, (kind, scope, default, help_text) in PLUGIN_PARAMETERS.items():
            params.append(ParameterSpec(name, kind, scope, default=default, description=help_text))
        inner = self.inner.spec
        return MergeMethodSpec(
            name=PREFIX + self.wrapped,
            pretty_name=f"Symmetry-aligned {inner.pretty_name or self.wrapped}",
            reference_url="https://arxiv.org/abs/2511.10850",
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
        roles = parameters["role"]
        base = group.base
        references = [e for e in group.entries if roles[e.id] == "reference" and not e.is_base]
        if len(references) > 1:
            raise SymAlignConfigError(
                f"{self.spec.name}: more than one input has role: reference "
                f"({', '.join(str(e.id) for e in references)})"
            )
        reference = references[0] if references else base
        skills = [e for e in group.entries if e is not base and e is not reference]
        for entry in skills:
            if parameters["weight"][entry.id] is None:
                raise SymAlignConfigError(
                    f"{self.spec.name}: skill input {entry.id} has no weight "
                    f"(tensor {group.metadata.name})"
                )
        inner_group = TensorGroup(
            entries=(TensorEntry(reference.id, reference.tensor, is_base=True),
                     *(TensorEntry(e.id, e.tensor) for e in skills)),
            metadata=group.metadata,
        )
        inner_parameters = {}
        for p in self.inner.spec.parameters:
            value = parameters[p.name]
            if p.scope != ParameterScope.SHARED:
                entries = inner_group.non_base if p.scope == ParameterScope.NON_BASE else inner_group.entries
                value = PerInputValues([(e.id, value[e.id]) for e in entries])
            inner_parameters[p.name] = value
        merged = self.inner.merge_group(inner_group, **inner_parameters)
        if reference is base:
            return merged
        work = torch.promote_types(base.tensor.dtype, torch.float32)
        return (base.tensor.to(work) + merged.to(work) - reference.tensor.to(work)).to(base.tensor.dtype)


_WARNED: set = set()


def check_parameter_names(method: SymmetryAlignedMerge, where: str, names) -> None:
    """mergekit ignores unknown parameters; a typo in ours must not silently do nothing."""
    known = [p.name for p in method.spec.parameters]
    for name in names or ():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise SymAlignConfigError(
                f"unknown parameter {name!r} in {where} for merge method {method.spec.name}."
                f"{hint} Known parameters: {', '.join(sorted(known))}."
            )


def check_choice(name: str, value: Any, where: str) -> None:
    choices = CHOICES.get(name)
    if choices is not None and value not in choices:
        raise SymAlignConfigError(
            f"parameter {name}: {value!r} in {where} is not one of {', '.join(choices)}."
        )


def all_methods() -> Tuple[SymmetryAlignedMerge, ...]:
    return tuple(SymmetryAlignedMerge(name) for name in WRAPPED_METHODS)

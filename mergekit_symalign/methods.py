"""The ``symmetry_aligned_<method>`` merge methods, as data over mergekit's GTA methods.

Each aligned method wraps one of mergekit's generalized-task-arithmetic methods: its
parameters are the wrapped method's (``weight`` becomes optional, since the reference model
carries none) plus the plugin's own. The method object is a spec for the planner hook
(:mod:`mergekit_symalign.planner`), which builds the aligned task graph and runs the wrapped
method's kernel on aligned inputs; the object's own kernel is never meant to run.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Dict, Optional, Tuple

from mergekit.merge_methods import registry
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
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

    @property
    def inner_parameter_names(self) -> Tuple[str, ...]:
        return tuple(p.name for p in self.inner.spec.parameters)

    def merge_group(self, group: TensorGroup, /, **parameters: Any):
        raise RuntimeError(
            f"{self.spec.name} was executed without mergekit-symalign's planner: its inputs "
            f"would not be aligned. Run it through mergekit-yaml / mergekit.merge.run_merge "
            f"with mergekit-symalign installed (it hooks the planner on import)."
        )


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

"""The plugin's parameters, listed once, and what they resolve to (no mergekit import).

:data:`PARAMETERS` is the single list: :mod:`.methods` turns it into mergekit
``ParameterSpec``s, :mod:`.validation` checks recipes against it, and
:func:`resolve_settings` / :func:`resolve_roles` turn the values mergekit resolved for one
tensor into typed, frozen objects that the planner and the tasks carry.

Roles, everywhere in the project:

* **reference** — the model every other model is aligned to (its coordinates are the common
  frame) and from which skill vectors are measured;
* **base** — the model the skills are put into (the recipe's ``base_model``); without a
  ``role: reference`` model the base is also the reference (plain fusion);
* **skill** models — the others; each contributes ``aligned(skill) - reference``.

The pure mathematics (:mod:`.groups`, :mod:`.spec`) calls the two sides of an alignment
``reference`` and ``model`` (the one being moved).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Hashable, Mapping, Optional, Sequence, Tuple

from pydantic import BaseModel, ConfigDict

from .architectures import QK_ROTATIONS
from .residual import MODES as RESIDUAL_MODES
from .errors import SymAlignConfigError
from .spec import Switches

ALIGNMENTS = ("weights", "activations")
OUTPUT_FRAMES = ("base", "reference")
ROLES = ("skill", "reference")

# Where a parameter may be set in a recipe.
GLOBAL = "global"  # the recipe's top-level `parameters` only, one plain value
LAYER = "layer"  # global, module or slice parameters (may vary by layer), not per model
MODEL = "model"  # under a model (or a slice source)


@dataclass(frozen=True)
class Parameter:
    name: str
    type: type  # bool, int or str
    where: str  # GLOBAL, LAYER or MODEL
    default: Any
    help: str
    choices: Tuple[str, ...] = ()
    scalar: bool = False  # a single value: no per-layer list, no tensor filter


PARAMETERS: Tuple[Parameter, ...] = (
    Parameter("alignment", str, GLOBAL, "weights",
              "what the alignment matches: weights, or activations on calibration text",
              ALIGNMENTS, scalar=True),
    Parameter("permutation", bool, LAYER, True, "use MLP neuron permutations"),
    Parameter("rotation", bool, LAYER, True, "use V/O and Q/K rotations"),
    Parameter("scaling", bool, LAYER, True, "use MLP, V/O and Q/K scales"),
    Parameter("qk_rotation", str, LAYER, "rope",
              "rope: exact per-plane Q/K rotations; full: the papers' d x d rotation "
              "(inexact under RoPE)", QK_ROTATIONS, scalar=True),
    Parameter("residual", str, GLOBAL, "none",
              "none; permutation: a signed permutation of the residual stream; orthogonal: "
              "any rotation of it (norms folded into their readers, then unfolded)",
              RESIDUAL_MODES, scalar=True),
    Parameter("output_frame", str, GLOBAL, "base",
              "base: result in the base model's coordinates; reference: in the reference's",
              OUTPUT_FRAMES, scalar=True),
    Parameter("calibration", str, GLOBAL, "",
              "activations only: calibration prompts (.txt, one per line, or .jsonl); "
              "empty = shipped set", scalar=True),
    Parameter("calibration_samples", int, GLOBAL, 0,
              "activations only: number of prompts used; 0 = as many as the model needs "
              "(2 x intermediate_size tokens, at least 4096)", scalar=True),
    Parameter("calibration_max_tokens", int, GLOBAL, 128,
              "activations only: tokens per packed calibration row", scalar=True),
    Parameter("alignment_cache", str, GLOBAL, "",
              "a folder for solved alignments: a later merge of the same models with the same "
              "settings reuses them (entries keyed by a hash of every tensor they were solved "
              "from); empty = no cache", scalar=True),
    Parameter("layer_map", str, GLOBAL, "",
              "a pruned child as the base: its parent (reference) layer per child layer, "
              "comma-separated and increasing, e.g. \"0, 1, 2, 4\"; empty = solved from the "
              "weights", scalar=True),
    Parameter("role", str, MODEL, "skill", "skill (default) or reference", ROLES, scalar=True),
    Parameter("align", bool, MODEL, True, "align this model to the reference first"),
)
BY_NAME: Dict[str, Parameter] = {p.name: p for p in PARAMETERS}
CALIBRATION_PARAMETERS = ("calibration", "calibration_samples", "calibration_max_tokens")


def recipe_setting(parameters: Optional[Mapping[str, Any]], name: str) -> Any:
    """A global parameter's value in a recipe's top-level ``parameters`` (None or a mapping),
    or its default: the one way to read ``alignment``, ``residual`` and the like before
    mergekit resolves per-tensor values."""
    return (parameters or {}).get(name, BY_NAME[name].default)


class AlignSettings(BaseModel):
    """What an alignment solves with: equal for every tensor of a layer (a task field)."""

    model_config = ConfigDict(frozen=True)

    alignment: str = "weights"
    switches: Switches = Switches()
    qk_rotation: str = "rope"
    residual: str = "none"
    calibration: str = ""
    calibration_samples: int = 0
    calibration_max_tokens: int = 128
    alignment_cache: str = ""  # where solved alignments are saved (no effect on results)


class TensorSettings(BaseModel):
    """Everything the plugin resolved for one output tensor."""

    model_config = ConfigDict(frozen=True)

    align: AlignSettings
    output_frame: str = "base"


def resolve_settings(shared: Mapping[str, Any]) -> TensorSettings:
    """Typed settings from the shared (non per-model) values mergekit resolved for a tensor."""
    return TensorSettings(
        align=AlignSettings(
            alignment=shared["alignment"],
            switches=Switches(bool(shared["permutation"]), bool(shared["rotation"]),
                              bool(shared["scaling"])),
            qk_rotation=shared["qk_rotation"],
            residual=shared["residual"],
            calibration=shared["calibration"] or "",
            calibration_samples=shared["calibration_samples"],
            calibration_max_tokens=shared["calibration_max_tokens"],
            alignment_cache=shared["alignment_cache"] or "",
        ),
        output_frame=shared["output_frame"],
    )


@dataclass(frozen=True)
class Roles:
    """Who is who for one output tensor (models are any hashable keys)."""

    base: Hashable
    reference: Hashable
    skills: Tuple[Hashable, ...]
    aligned: Tuple[Hashable, ...]  # models moved into the reference's frame (never the reference)

    @property
    def transfer(self) -> bool:
        """Is the skill measured from a reference other than the base?"""
        return self.reference != self.base

    @property
    def merged(self) -> Tuple[Hashable, ...]:
        """The wrapped method's inputs: the reference (its base) and the skills."""
        return (self.reference, *self.skills)


def resolve_roles(
    models: Sequence[Hashable],
    base: Hashable,
    per_model: Mapping[Hashable, Mapping[str, Any]],
    method: str = "symmetry_aligned",
    tensor: str = "",
) -> Roles:
    """Roles from each model's resolved ``role``, ``align`` and ``weight``."""
    references = [m for m in models if per_model[m]["role"] == "reference" and m != base]
    if len(references) > 1:
        raise SymAlignConfigError(
            f"{method}: more than one model has role: reference "
            f"({', '.join(map(str, references))}). Skill vectors are measured from exactly "
            f"one reference; mark only one."
        )
    reference = references[0] if references else base
    skills = tuple(m for m in models if m not in (base, reference))
    for m in skills:
        if per_model[m].get("weight") is None:
            raise SymAlignConfigError(
                f"model {m} is a skill model but has no weight"
                f"{f' (tensor {tensor})' if tensor else ''}. Give it `weight:` or mark it "
                f"`role: reference`."
            )
    if not skills:
        raise SymAlignConfigError(
            f"{method}: no skill model contributes{f' to {tensor}' if tensor else ''}; the "
            f"recipe needs at least one model besides the base and the reference."
        )
    aligned = tuple(m for m in models if m != reference and bool(per_model[m]["align"]))
    return Roles(base=base, reference=reference, skills=skills, aligned=aligned)


__all__ = [
    "AlignSettings", "BY_NAME", "CALIBRATION_PARAMETERS", "GLOBAL", "LAYER", "MODEL",
    "PARAMETERS", "Parameter", "Roles", "TensorSettings", "recipe_setting", "resolve_roles",
    "resolve_settings",
]

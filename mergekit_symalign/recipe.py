"""Static checks of a recipe that uses an aligned method (no model is opened or downloaded).

mergekit silently ignores parameters a method does not declare; for ours a typo would
silently switch a symmetry back on, so every parameter name and choice is checked here.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

from mergekit.config import MergeConfiguration

from .methods import SymAlignConfigError, SymmetryAlignedMerge, check_choice, check_parameter_names

SINGLE_STRINGS = ("role", "alignment", "qk_rotation", "output_frame", "calibration")


def parameter_scopes(cfg: MergeConfiguration) -> Iterator[Tuple[str, Optional[dict], object]]:
    """(where, parameters, model or None) for every parameter dict in the recipe."""
    yield "parameters", cfg.parameters, None
    for model in cfg.models or ():
        yield f"models[{model.model}]", model.parameters, model.model
    slices = list(cfg.slices or ())
    for name, module in (cfg.modules or {}).items():
        yield f"modules.{name}", module.parameters, None
        for model in module.models or ():
            yield f"modules.{name}.models[{model.model}]", model.parameters, model.model
        slices += module.slices or ()
    for i, out_slice in enumerate(slices):
        yield f"slices[{i}]", out_slice.parameters, None
        for source in out_slice.sources:
            yield f"slices[{i}].sources[{source.model}]", source.parameters, source.model


def check_recipe(cfg: MergeConfiguration, method: SymmetryAlignedMerge) -> None:
    name = method.spec.name
    if cfg.base_model is None and not (cfg.slices and all(s.base_model for s in cfg.slices)):
        raise SymAlignConfigError(
            f"{name} needs base_model: the model the skill is transferred onto (or, for "
            f"plain fusion, the model every other model is aligned to). Add "
            f"`base_model: <model>` to the recipe."
        )
    references = set()
    for where, params, model in parameter_scopes(cfg):
        check_parameter_names(method, where, params)
        for key, value in (params or {}).items():
            if key in SINGLE_STRINGS:
                if not isinstance(value, str):
                    raise SymAlignConfigError(
                        f"parameter {key} in {where} must be a single string (it cannot "
                        f"vary by layer or tensor), got {value!r}."
                    )
                check_choice(key, value, where)
            if key == "alignment" and model is not None:
                raise SymAlignConfigError(f"alignment is global; move it out of {where}.")
            if key == "role" and model is None:
                raise SymAlignConfigError(
                    f"role is a per-model parameter; set it under the model, not in {where}."
                )
            if key == "role" and value == "reference":
                references.add(model)
            if key in ("calibration", "calibration_samples", "calibration_max_tokens") and (
                model is not None or isinstance(value, (list, dict))
            ):
                raise SymAlignConfigError(
                    f"{key} (in {where}) must be one global value: every model runs on the "
                    f"same calibration tokens."
                )
    bases = {cfg.base_model} | {s.base_model for s in cfg.slices or () if s.base_model}
    references -= bases  # role: reference on the base = plain fusion (the default)
    if len(references) > 1:
        raise SymAlignConfigError(
            f"{name}: more than one model has role: reference "
            f"({', '.join(sorted(map(str, references)))}). Skill vectors are measured from "
            f"exactly one reference; mark only one."
        )

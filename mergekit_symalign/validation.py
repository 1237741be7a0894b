"""Every check of a recipe that uses an aligned method, run at plan time.

The planner calls these before it builds any task, so a refused merge writes nothing (the
output folder is created only when the graph executes). Static checks read the recipe alone;
the model checks read each model's ``config.json`` (through mergekit's ``ModelReference``)
and, per layer, which tensors its checkpoint holds. mergekit silently ignores parameters a
method does not declare, so for our methods a typo would silently switch a symmetry back on:
every parameter name, place, type and choice is checked here.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Hashable, Iterable, Iterator, List, Mapping, Optional, Tuple

from .architectures import Architecture, Geometry, architecture_for, geometry_from_config
from .errors import SymAlignConfigError, UnsupportedArchitecture
from .settings import BY_NAME, CALIBRATION_PARAMETERS, GLOBAL, LAYER, MODEL, Parameter

# --------------------------------------------------------------------------- the recipe


def parameter_scopes(cfg) -> Iterator[Tuple[str, Optional[dict], object, bool]]:
    """``(where, parameters, model or None, is_top_level)`` for every parameter dict."""
    yield "parameters", cfg.parameters, None, True
    for model in cfg.models or ():
        yield f"models[{model.model}]", model.parameters, model.model, False
    slices = list(cfg.slices or ())
    for name, module in (cfg.modules or {}).items():
        yield f"modules.{name}", module.parameters, None, False
        for model in module.models or ():
            yield f"modules.{name}.models[{model.model}]", model.parameters, model.model, False
        slices += module.slices or ()
    for i, out_slice in enumerate(slices):
        yield f"slices[{i}]", out_slice.parameters, None, False
        for source in out_slice.sources:
            yield f"slices[{i}].sources[{source.model}]", source.parameters, source.model, False


def _leaves(value: Any) -> List[Any]:
    """The plain values of a parameter setting (scalar, per-layer list, tensor filters)."""
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    inner = getattr(value, "value", None)  # mergekit's ConditionalParameter
    if inner is not None or hasattr(value, "filter"):
        return _leaves(inner)
    if isinstance(value, dict) and "value" in value:
        return _leaves(value["value"])
    return [value]


def _is_plain(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _check_value(p: Parameter, value: Any, where: str) -> None:
    if p.scalar and not _is_plain(value):
        raise SymAlignConfigError(
            f"parameter {p.name} in {where} must be a single {p.type.__name__} (it cannot "
            f"vary by layer or tensor), got {value!r}."
        )
    for leaf in _leaves(value):
        ok = isinstance(leaf, p.type) and (p.type is bool or not isinstance(leaf, bool))
        if not ok:
            expect = {bool: "true or false", int: "an integer", str: "a string"}[p.type]
            raise SymAlignConfigError(
                f"parameter {p.name} in {where} must be {expect}, got {leaf!r}"
                f"{f' (one of: {chr(44).join(p.choices)})' if p.choices else ''}."
            )
        if p.choices and leaf not in p.choices:
            raise SymAlignConfigError(
                f"parameter {p.name}: {leaf!r} in {where} is not one of {', '.join(p.choices)}."
            )


def _check_place(p: Parameter, where: str, model, top: bool) -> None:
    if p.where == GLOBAL and not top:
        raise SymAlignConfigError(
            f"{p.name} is one global setting (it applies to the whole merge); move it from "
            f"{where} to the recipe's top-level `parameters`."
        )
    if p.where == LAYER and model is not None:
        raise SymAlignConfigError(
            f"{p.name} is not a per-model parameter (every model of a layer is aligned "
            f"alike); set it in the top-level `parameters` or a slice's, not in {where}."
        )
    if p.where == MODEL and model is None:
        raise SymAlignConfigError(
            f"{p.name} is a per-model parameter; set it under the model, not in {where}."
        )


def check_recipe(cfg, method) -> None:
    """Static checks: no model is opened."""
    name = method.spec.name
    known = [p.name for p in method.spec.parameters]
    if cfg.base_model is None and not (cfg.slices and all(s.base_model for s in cfg.slices)):
        raise SymAlignConfigError(
            f"{name} needs base_model: the model the skill is transferred onto (or, for "
            f"plain fusion, the model every other model is aligned to). Add "
            f"`base_model: <model>` to the recipe."
        )
    references = set()
    for where, params, model, top in parameter_scopes(cfg):
        for key, value in (params or {}).items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise SymAlignConfigError(
                    f"unknown parameter {key!r} in {where} for merge method {name}.{hint} "
                    f"Known parameters: {', '.join(sorted(known))}."
                )
            p = BY_NAME.get(key)
            if p is None:  # the wrapped method's own parameter: mergekit checks it
                continue
            _check_place(p, where, model, top)
            _check_value(p, value, where)
            if key == "role" and value == "reference":
                references.add(model)
    top = cfg.parameters or {}
    if top.get("alignment", "weights") != "activations":
        stray = [k for k in CALIBRATION_PARAMETERS if k in top]
        if stray:
            raise SymAlignConfigError(
                f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} only used by "
                f"alignment: activations, but the recipe aligns weights. Add "
                f"`alignment: activations`, or remove {', '.join(stray)}."
            )
    bases = {cfg.base_model} | {s.base_model for s in cfg.slices or () if s.base_model}
    references -= bases  # role: reference on the base = plain fusion (the default)
    if len(references) > 1:
        raise SymAlignConfigError(
            f"{name}: more than one model has role: reference "
            f"({', '.join(sorted(map(str, references)))}). Skill vectors are measured from "
            f"exactly one reference; mark only one."
        )


def check_options(options, method) -> None:
    if getattr(options, "unsafe_truncate_embeddings", False):
        raise SymAlignConfigError(
            f"{method.spec.name} does not support --unsafe-truncate-embeddings; use a tokenizer "
            f"section (tokenizer: {{source: base}}) to reconcile vocabularies instead."
        )


def check_calibration(top_parameters: Mapping[str, Any]) -> None:
    """With ``alignment: activations``, the calibration file is read (and refused) now."""
    if (top_parameters or {}).get("alignment") != "activations":
        return
    from .calibration import load_calibration

    try:
        load_calibration(top_parameters.get("calibration") or None,
                         top_parameters.get("calibration_samples", 256))
    except ValueError as err:
        raise SymAlignConfigError(str(err)) from None


# --------------------------------------------------------------------------- the models


def check_models(method_name: str, configs: Mapping[Hashable, Any]) -> Tuple[Architecture, Geometry]:
    """All models supported, of one architecture and one layer geometry."""
    if len(configs) < 2:
        raise SymAlignConfigError(f"{method_name}: the recipe has no model to transfer from.")
    geometries: Dict[str, Geometry] = {}
    for model, config in configs.items():
        try:
            geometries[str(model)] = geometry_from_config(config, str(model))
        except UnsupportedArchitecture as err:
            raise SymAlignConfigError(str(err)) from None
    archs = {m: architecture_for(g.model_type).name for m, g in geometries.items()}
    if len(set(archs.values())) > 1:
        raise SymAlignConfigError(
            f"{method_name}: models have different architectures "
            f"({', '.join(f'{m}: {g.model_type}' for m, g in geometries.items())}); "
            f"symmetry alignment needs one architecture."
        )
    items = list(geometries.items())
    first, g0 = items[0]
    for model, g in items[1:]:
        for field in ("hidden_size", "num_heads", "num_kv_heads", "head_dim",
                      "intermediate_size", "rotary_dim", "rope_theta"):
            if getattr(g, field) != getattr(g0, field):
                raise SymAlignConfigError(
                    f"{method_name}: models {first} and {model} differ in {field} "
                    f"({getattr(g0, field)} vs {getattr(g, field)}): symmetry alignment needs "
                    f"models of one architecture and size ({g0.describe()} vs {g.describe()}). "
                    f"Merge models of the same base family."
                )
    return architecture_for(g0.model_type), g0


def check_architecture_settings(cfg, arch: Architecture) -> None:
    """Settings that an architecture cannot honour exactly (or even approximately)."""
    for where, params, _model, _top in parameter_scopes(cfg):
        if (params or {}).get("qk_rotation") == "full" and arch.qk_norm != "none":
            raise SymAlignConfigError(
                f"qk_rotation: full (in {where}) is not available for {arch.name}: its QK-norm "
                f"does not commute with a d x d rotation of q/k, so the transform would not "
                f"even approximately preserve the model. Use qk_rotation: rope (the default)."
            )


def check_residual(cfg, arch: Architecture, configs: Mapping[Hashable, Any], modules: int,
                   method_name: str) -> Optional[str]:
    """``residual``: exact for every model (tied or not), one decoder module, and (aligned
    by weights) vocabularies whose rows are the same tokens. Returns the mode."""
    from .residual import check_supported
    from .statedict import tied_embeddings

    top = cfg.parameters or {}
    mode = top.get("residual", "none")
    if mode == "none":
        return mode
    if modules > 1:
        raise SymAlignConfigError(
            f"{method_name}: residual: {mode} is not supported for multimodal checkpoints: "
            f"their vision projector writes into the text model's residual stream. Use "
            f"residual: none."
        )
    vocab = {}
    for model, config in configs.items():
        try:
            check_supported(arch, mode, tied_embeddings(config), config, str(model))
        except UnsupportedArchitecture as err:
            raise SymAlignConfigError(str(err)) from None
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab[model] = getattr(text, "vocab_size", None)
    if top.get("alignment", "weights") == "weights" and len(set(vocab.values())) > 1:
        sizes = ", ".join(f"{m}: {v}" for m, v in vocab.items())
        raise SymAlignConfigError(
            f"{method_name}: residual: {mode} with alignment: weights matches the residual "
            f"stream through the embedding rows of the same tokens, but the models' "
            f"vocabularies differ in size ({sizes}). Use alignment: activations (every model "
            f"reads the same calibration tokens), or residual: none."
        )
    return mode


def check_layer_tensors(
    names: Iterable[str],
    optional: Iterable[str],
    model,
    prefix: str,
    present: Callable[[str], bool],
    listed: Callable[[str], bool],
    architecture_name: str,
    spec_name: str,
) -> Tuple[str, ...]:
    """Which of a layer's aligned tensors ``names`` (relative to ``prefix``) ``model`` holds.

    Refused: a required tensor that is missing, and one that is present but that mergekit's
    architecture definition does not list (the merged model would silently lose it).
    """
    optional = set(optional)
    found = []
    for rel in names:
        here = present(rel)
        if here and not listed(rel):
            raise SymAlignConfigError(
                f"model {model} has tensor {prefix + rel}, but mergekit's architecture "
                f"definition for {architecture_name} does not list it, so the merged model "
                f"would silently lose it (this happens to plain mergekit merges too). Use a "
                f"checkpoint without it, or an architecture definition that lists it."
            )
        if not here and rel not in optional:
            raise SymAlignConfigError(
                f"model {model} lacks tensor {prefix + rel}, which the {spec_name} symmetry "
                f"spec moves together with the rest of the layer. The checkpoint is incomplete "
                f"or not a standard {spec_name} model: re-download it, or check its "
                f"config.json (model_type)."
            )
        if here:
            found.append(rel)
    return tuple(found)


def check_same_optional_tensors(model, reference, prefix: str, a: Iterable[str], b: Iterable[str]) -> None:
    diff = set(a) ^ set(b)
    if diff:
        raise SymAlignConfigError(
            f"models {model} and {reference} differ in which optional tensors they carry in "
            f"{prefix}* ({', '.join(sorted(diff))}): they are not the same architecture "
            f"variant and cannot be aligned."
        )


def check_activation_layers(model, reference, prefixes, indices) -> None:
    if indices[model] != indices[reference]:
        raise SymAlignConfigError(
            f"alignment: activations pairs layers by index while streaming, but output layer "
            f"{prefixes[reference]}* takes layer {indices[model]} of {model} and layer "
            f"{indices[reference]} of the reference {reference}. Use equal layer ranges, or "
            f"alignment: weights."
        )


class LayerConsistency:
    """Every tensor of a layer moves together: what it was aligned with must agree."""

    def __init__(self):
        self._seen: Dict[Tuple, Any] = {}

    def check(self, key: Tuple, value: Any, what: str) -> None:
        seen = self._seen.setdefault(key, value)
        if seen != value:
            raise SymAlignConfigError(
                f"{what} resolves differently for different tensors ({seen} vs {value}): "
                f"every tensor of a layer moves together, so set it per model or per layer "
                f"(no tensor filters)."
            )


def never_aligned(cfg) -> set:
    """Models whose ``align`` is a plain false everywhere in the recipe."""
    seen: Dict[Any, set] = {}
    for _where, params, model, _top in parameter_scopes(cfg):
        if model is not None and params and "align" in params:
            seen.setdefault(model, set()).add(params["align"] is False)
    return {m for m, flags in seen.items() if flags == {True}}


__all__ = [
    "LayerConsistency", "check_activation_layers", "check_architecture_settings", "check_residual",
    "check_calibration", "check_layer_tensors",
    "check_models", "check_options", "check_recipe", "check_same_optional_tensors",
    "never_aligned", "parameter_scopes",
]

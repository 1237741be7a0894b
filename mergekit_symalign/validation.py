"""Every check of a recipe that uses an aligned method, run at plan time, and the one
check that can only run as tensors load (NaN/Inf).

The planner calls these before it builds any task, so a refused merge writes nothing (the
output folder is created only when the graph executes). Static checks read the recipe alone;
the model checks read each model's ``config.json`` (through mergekit's ``ModelReference``)
and, per layer, which tensors its checkpoint holds; with ``alignment: activations`` the
calibration text is read and tokenized with every model's tokenizer. mergekit silently
ignores parameters a method does not declare, so for our methods a typo would silently
switch a symmetry back on: every parameter name, place, type and choice is checked here.

During execution, :func:`check_finite` is applied to every tensor the merge reads (as it
loads; no second pass over the checkpoints). A failure then removes the output folder if
this merge created it (:mod:`.plugin`, :class:`.output.OutputFolder`).

:func:`check_aligned_merge` runs every plan-time check in order and returns what they found
(:class:`MergeFacts`) for the planner.
"""

from __future__ import annotations

import difflib
import os
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from .architectures import (
    Architecture,
    Geometry,
    architecture_for,
    geometry_from_config,
    text_config,
    tied_embeddings,
)
import logging

from .errors import NonFiniteTensorError, SymAlignConfigError, UnsupportedArchitecture
from .settings import BY_NAME, CALIBRATION_PARAMETERS, GLOBAL, LAYER, MODEL, Parameter, recipe_setting

LOG = logging.getLogger(__name__)

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
    if recipe_setting(top, "alignment") != "activations":
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


def calibration_settings(top_parameters: Mapping[str, Any]) -> Tuple[Optional[str], int, int]:
    """(file or None for the shipped set, samples, tokens per row) of a recipe."""
    top = top_parameters or {}
    return (top.get("calibration") or None, top.get("calibration_samples", BY_NAME["calibration_samples"].default),
            top.get("calibration_max_tokens", BY_NAME["calibration_max_tokens"].default))


def _maybe_enabled(cfg, name: str) -> bool:
    """May symmetry switch ``name`` be on for some layer? (unset at the top = default on)"""
    values = [leaf for _w, params, _m, _t in parameter_scopes(cfg)
              for leaf in _leaves((params or {}).get(name, False))]
    return name not in (cfg.parameters or {}) or any(v is True for v in values)


def check_calibration(cfg, tokenize: Callable[[Optional[str], int, int], "torch.Tensor"],
                      geometry: Optional[Geometry] = None, vocab_size: Optional[int] = None):
    """With ``alignment: activations``: read the calibration file, tokenize it with every
    model's tokenizer (``tokenize(file, samples, max_tokens)``, which refuses differing
    tokenizers and text that is mostly unknown tokens) and check that it has enough tokens
    for the statistics the enabled symmetries use. Returns the token ids (or None)."""
    top = cfg.parameters or {}
    if recipe_setting(top, "alignment") != "activations":
        return None
    from .calibration import load_calibration

    path, samples, max_tokens = calibration_settings(top)
    if samples < 0:
        raise SymAlignConfigError(
            f"calibration_samples must be a positive integer (or 0, the default: as many "
            f"prompts as the model needs), got {samples}.")
    if max_tokens < 1:
        raise SymAlignConfigError(
            f"calibration_max_tokens must be a positive integer, got {max_tokens}: prompts are "
            f"packed into rows of this many tokens (128, the default, suits most models).")
    try:
        load_calibration(path, samples)
        token_ids = tokenize(path, samples, max_tokens)
    except ValueError as err:
        raise SymAlignConfigError(str(err)) from None
    if vocab_size is not None and int(token_ids.max()) >= vocab_size:
        raise SymAlignConfigError(
            f"the calibration text tokenizes to token id {int(token_ids.max())}, but the models' "
            f"vocabulary has {vocab_size} entries: their tokenizer does not match their "
            f"embeddings. Fix the tokenizer files, or use alignment: weights."
        )
    if geometry is not None:
        from .calibration import check_enough_tokens

        needs = []
        if _maybe_enabled(cfg, "permutation") or _maybe_enabled(cfg, "scaling"):
            needs.append((geometry.intermediate_size, f"the MLP neuron correlation "
                          f"({geometry.intermediate_size} neurons per layer)"))
        if _maybe_enabled(cfg, "rotation"):
            needs.append((geometry.head_dim, f"the attention head statistics (head_dim {geometry.head_dim})"))
        for needed, what in needs:
            try:
                check_enough_tokens(int(token_ids.numel()), needed, what)
            except ValueError as err:
                raise SymAlignConfigError(str(err)) from None
    return token_ids


# --------------------------------------------------------------------------- paths

# What the Hub accepts as a repo id; anything else can only be a local folder.
_REPO_ID = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)?")


def _local_looking(path: str) -> bool:
    return (not _REPO_ID.fullmatch(path) or path.startswith((".", "-")) or ".." in path
            or "--" in path)


def check_model_paths(models: Sequence[Any], method_name: str) -> None:
    """A model given as a local path must exist (mergekit would otherwise ask the Hub for it
    and fail with "Repo id must be in the form ...")."""
    for model in models:
        for what, ref in (("model", model.model), ("LoRA", getattr(model, "lora", None))):
            if ref is None or os.path.exists(ref.path) or not _local_looking(ref.path):
                continue
            parent = os.path.dirname(os.path.abspath(ref.path))
            hint = ("" if os.path.isdir(parent) else
                    f" (its parent folder {parent} does not exist either)")
            raise SymAlignConfigError(
                f"{method_name}: the {what} folder {ref.path} does not exist{hint}. Check the "
                f"path in the recipe (a relative path is resolved from the current directory, "
                f"{os.getcwd()})."
            )


def _model_folders(model) -> List[str]:
    return [ref.path for ref in (model.model, getattr(model, "lora", None))
            if ref is not None and os.path.isdir(ref.path)]


def check_output_path(out_path: str, models: Iterable[Any], method_name: str) -> None:
    """The output folder must not be, or be inside, an input model's folder: mergekit would
    write the merged shards and config.json over that model."""
    out = os.path.realpath(out_path)
    for model in models:
        for folder in _model_folders(model):
            real = os.path.realpath(folder)
            if out == real or out.startswith(real.rstrip(os.sep) + os.sep):
                where = "is the folder of" if out == real else "is inside the folder of"
                raise SymAlignConfigError(
                    f"{method_name}: the output path {out_path} {where} input model {model}; "
                    f"mergekit would write the merged weights and config.json over that model. "
                    f"Choose an output folder outside every input model's folder."
                )


# --------------------------------------------------------------------------- tensors


def _count_non_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> int:
    flat = tensor.reshape(-1)
    return sum(int((~torch.isfinite(flat[i:i + chunk])).sum()) for i in range(0, flat.numel(), chunk))


# Tensors that passed check_finite, by id (a weak reference: a tensor is forgotten when freed).
# One load is often the input of several tasks (the reference's layer tensors go to every
# aligned model's layer alignment): it is summed once.
_PASSED: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def check_finite(tensor: Optional[torch.Tensor], model, name: str) -> None:
    """Refuse a NaN/Inf weight. One reduction over the tensor (no copy): any NaN or Inf makes
    the sum non-finite; only then (or when a half-precision sum overflows) are the values
    counted. A tensor object that passed already is not summed again."""
    if tensor is None or not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if _PASSED.get(id(tensor)) is tensor:
        return
    _check_values(tensor, model, name)
    _PASSED[id(tensor)] = tensor


def _check_values(tensor: torch.Tensor, model, name: str) -> None:
    if bool(torch.isfinite(tensor.sum())):
        return
    bad = _count_non_finite(tensor)
    if bad:
        raise NonFiniteTensorError(
            f"model {model}: tensor {name} has {bad} NaN/Inf value{'s' if bad > 1 else ''} "
            f"(of {tensor.numel()}), which would poison the merge. The checkpoint is corrupt or "
            f"overflowed in its dtype: re-download or re-export it, or load it in a wider dtype "
            f"(dtype: float32)."
        )


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


def _computation(config) -> Dict[str, Any]:
    """The config values that change what a layer (or the head) computes, beyond the layer
    geometry that :func:`check_models` compares: activation, norm epsilon, RoPE parameters
    and scaling, soft-capping, attention scaling, sliding windows, biases, tied embeddings."""
    cfg = text_config(config)
    get = lambda name: getattr(cfg, name, None)  # noqa: E731
    out = {
        "hidden activation": get("hidden_activation") or get("hidden_act"),
        "norm epsilon": get("rms_norm_eps") if get("rms_norm_eps") is not None else get("layer_norm_eps"),
        "rope_parameters / rope_scaling": get("rope_parameters") or get("rope_scaling"),
        "attn_logit_softcapping": get("attn_logit_softcapping"),
        "final_logit_softcapping": get("final_logit_softcapping"),
        "query_pre_attn_scalar": get("query_pre_attn_scalar"),
        "layer_types": get("layer_types"),
        "attention_bias": get("attention_bias"),
        "mlp_bias": get("mlp_bias"),
        "use_qkv_bias": get("use_qkv_bias"),
        "qk_layernorm": get("qk_layernorm"),
        "tie_word_embeddings": get("tie_word_embeddings"),
    }
    layer_types = get("layer_types")
    sliding = get("use_sliding_window") is not False and (
        layer_types is None or any("sliding" in str(t) for t in layer_types))
    out["sliding_window"] = get("sliding_window") if sliding else None
    rope = out["rope_parameters / rope_scaling"] or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope", "yarn"):
        out["max_position_embeddings"] = get("max_position_embeddings")
    return out


def check_same_computation(method_name: str, configs: Mapping[Hashable, Any], refuse: bool = True) -> None:
    """Models whose configs differ where it changes the computation. Activation alignment
    runs each model with its own config and compares what they compute: refused there.
    Aligned by weights, the symmetries do not depend on these settings and mergekit merges
    such models too (the merged model computes with the base's config): a warning names the
    difference, since a skill measured under one setting is transferred into another."""
    items = [(m, _computation(c)) for m, c in configs.items()]
    first, c0 = items[0]
    for model, c in items[1:]:
        for field, value in c0.items():
            if c.get(field) != value:
                message = (
                    f"{method_name}: models {first} and {model} differ in {field} ({value!r} vs "
                    f"{c.get(field)!r}) in config.json, which changes what the model computes; "
                    f"the merged model computes with the base's config, so a skill measured "
                    f"under the other is transferred into a model that computes differently."
                )
                if refuse:
                    raise SymAlignConfigError(
                        f"{message} alignment: activations compares what the models compute: "
                        f"merge models that share one configuration (or make the config.json "
                        f"files agree, if the difference is a mistake), or use alignment: weights."
                    )
                LOG.warning(message)


def check_vocabularies(method_name: str, configs: Mapping[Hashable, Any], base, has_tokenizer: bool) -> None:
    """Without a tokenizer section, every model must have the base's vocabulary size."""
    if has_tokenizer:
        return
    sizes = {m: getattr(text_config(c), "vocab_size", None) for m, c in configs.items()}
    want = sizes.get(base)
    for model, size in sizes.items():
        if want is not None and size is not None and size != want:
            raise SymAlignConfigError(
                f"{method_name}: vocabulary size mismatch: model {model} has {size} tokens, but "
                f"the base model {base} has {want}, so embed_tokens and lm_head cannot be merged "
                f"row by row. Add a tokenizer section (tokenizer: {{source: base}}) so mergekit "
                f"maps every model's embeddings onto the base's vocabulary."
            )


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

    top = cfg.parameters or {}
    mode = recipe_setting(top, "residual")
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
        vocab[model] = getattr(text_config(config), "vocab_size", None)
    if recipe_setting(top, "alignment") == "weights" and len(set(vocab.values())) > 1:
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


def recipe_reference(cfg):
    """The model skill vectors are measured from: the ``role: reference`` model, else the
    base (after :func:`check_recipe`, at most one)."""
    bases = {cfg.base_model} | {s.base_model for s in cfg.slices or () if s.base_model}
    for _where, params, model, _top in parameter_scopes(cfg):
        if model is not None and model not in bases and (params or {}).get("role") == "reference":
            return model
    return cfg.base_model


def never_aligned(cfg) -> set:
    """Models whose ``align`` is a plain false everywhere in the recipe."""
    seen: Dict[Any, set] = {}
    for _where, params, model, _top in parameter_scopes(cfg):
        if model is not None and params and "align" in params:
            seen.setdefault(model, set()).add(params["align"] is False)
    return {m for m, flags in seen.items() if flags == {True}}


def activation_models(cfg, reference) -> Tuple[Any, ...]:
    """The models an activation alignment streams besides the reference (sorted)."""
    never = never_aligned(cfg)
    return tuple(sorted((m for m in cfg.referenced_models() if m != reference and m not in never),
                        key=str))


@dataclass(frozen=True)
class MergeFacts:
    """What the plan-time checks established about an aligned merge."""

    arch: Architecture
    geometry: Geometry
    module: str  # the text decoder's module in mergekit's architecture definition
    residual: str
    tied: bool


def check_aligned_merge(planner, method, out_path: Optional[str]) -> MergeFacts:
    """Every recipe check of an aligned merge, in order, before mergekit normalizes the config
    or builds a task (``planner``: mergekit's ``MergePlanner``; ``out_path``: where the merge
    will be written, None when planned in memory)."""
    from .calibration import calibration_tokens
    from .layout import decoder_module

    cfg, options, name = planner.config, planner.options, method.spec.name
    check_recipe(cfg, method)
    check_options(options, method)
    models = cfg.referenced_models()  # (hooked: a missing local folder is refused)
    if out_path is not None:
        check_output_path(out_path, models, name)
    configs = {m: m.config(trust_remote_code=options.trust_remote_code) for m in models}
    arch, geometry = check_models(name, configs)
    check_same_computation(name, configs,
                           refuse=recipe_setting(cfg.parameters, "alignment") == "activations")
    check_vocabularies(name, configs, cfg.base_model,
                       has_tokenizer=cfg.tokenizer is not None or cfg.tokenizer_source is not None)
    check_architecture_settings(cfg, arch)
    reference = recipe_reference(cfg)
    check_calibration(
        cfg,
        lambda path, samples, max_tokens: calibration_tokens(
            reference, activation_models(cfg, reference), path, samples, max_tokens,
            options.trust_remote_code),
        geometry=geometry,
        vocab_size=getattr(text_config(configs[reference]), "vocab_size", None),
    )
    module = decoder_module(planner.arch_info, arch, name)
    residual = check_residual(cfg, arch, configs, len(planner.arch_info.modules), name)
    tied = {m: tied_embeddings(c) for m, c in configs.items()}
    if residual != "none" and len(set(tied.values())) > 1:
        raise SymAlignConfigError(
            f"{name}: residual: {residual} needs all models tied or all untied "
            f"(tie_word_embeddings: {', '.join(f'{m}: {t}' for m, t in tied.items())})."
        )
    return MergeFacts(arch, geometry, module, residual, next(iter(tied.values())))


__all__ = [
    "LayerConsistency", "MergeFacts", "activation_models", "check_aligned_merge", "calibration_settings", "check_activation_layers",
    "check_architecture_settings", "check_calibration", "check_finite", "check_layer_tensors",
    "check_model_paths", "check_models", "check_options", "check_output_path", "check_recipe",
    "check_residual", "check_same_computation", "check_same_optional_tensors",
    "check_vocabularies", "never_aligned", "parameter_scopes", "recipe_reference",
]

"""A pruned child as the base: the cross-size half of the aligned planning (mergekit glue).

When a ``symmetry_aligned_*`` recipe's ``base_model`` is narrower and/or shallower than its
``role: reference`` model (same architecture, head size and vocabulary), the base is taken as
a pruned child of the reference (docs/cross-size.md). :func:`detect` says so (or refuses a
base that cannot be a child, naming the sizes) before any other check, and
:class:`CrossSizePlanning` then plans the merge instead of the same-size path:

* **checks**: the recipe's own checks, then what a cross-size transfer does not define
  (``output_frame: reference``, ``residual:``, a tokenizer section, ``slices:``), the
  skills' shapes (the reference's), ``layer_map``; with ``alignment: activations`` the
  calibration text, tokenized with the child's and the reference's tokenizers;
* **one solve per merge, at plan time**: :func:`.crosssize.match_child` on the reference's
  and the child's weights (read through mergekit's loaders; with ``alignment: activations``
  :func:`.crosssize_activations.match_child_by_activations` on both models' activations over
  the calibration tokens), logged, with a warning when the child does not look like the
  reference's (:func:`.crosssize.child_warning`);
* **planning in the child's layer numbering**: mergekit 0.1.5 lists every model's layers as
  one slice ``[0, num_layers)`` and refuses a slice whose sources differ in length, so the
  sources are cut to the child's length and every output tensor's parent tensor is picked by
  the layer map (:meth:`.crosssize.Restriction.parent_name`), not by mergekit's index;
* per output tensor: ``SkillDeltas(S_i - R)`` of the *parent's* tensor on a zero base, the
  wrapped method's combined delta, then :class:`.tasks.crosssize.RestrictedTransferTask`
  ``child + restrict(delta)``.

Memory: the solve reads the reference and the child through mergekit's lazy loaders one layer
pair at a time (:class:`LazyCheckpoint`; the embeddings first), in float32 on mergekit's device;
the merge itself streams tensor by tensor as a plain one does.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

from mergekit.architecture import WeightInfo
from mergekit.common import ImmutableMap, ModelReference
from mergekit.config import InputSliceDefinition
from mergekit.io.tasks import GatherTensors, LoaderCache
from mergekit.parameter_resolver import resolve_parameters

from . import crosssize as cs
from .architectures import geometry_from_config, text_config
from .calibration import calibration_tokens
from .crosssize_activations import match_child_by_activations
from .errors import SymAlignConfigError, UnsupportedArchitecture
from .settings import recipe_setting, resolve_roles
from .tasks import SkillDeltas
from .tasks.crosssize import RestrictedTransferTask, register_restriction
from .tensor_inputs import method_task
from .validation import (
    check_calibration,
    check_models,
    check_options,
    check_output_path,
    check_recipe,
    check_same_computation,
    recipe_reference,
)

LOG = logging.getLogger(__name__)

# card text of planned cross-size merges, by the MergeConfiguration object (identity)
_CARDS: Dict[int, str] = {}


def _sizes(config) -> Optional[Dict[str, Any]]:
    try:
        return cs._sizes(config)
    except (UnsupportedArchitecture, AttributeError, TypeError):
        return None  # the same-size checks name an unsupported architecture


def detect(planner, method) -> Optional["CrossSizePlanning"]:
    """A :class:`CrossSizePlanning` when the recipe's base differs in size from its reference
    (refused here, naming both models and the sizes, when it cannot be a pruned child of
    it); None for a same-size recipe."""
    cfg = planner.config
    base, reference = cfg.base_model, recipe_reference(cfg)
    if base is None or reference is None or reference == base:
        return None
    trust = planner.options.trust_remote_code
    base_cfg, ref_cfg = base.config(trust_remote_code=trust), reference.config(trust_remote_code=trust)
    sb, sr = _sizes(base_cfg), _sizes(ref_cfg)
    if sb is None or sr is None or all(sb[k] == sr[k] for k in cs.NARROWABLE):
        return None  # the same width and depth: the same-size checks (a vocabulary, ...)
    try:
        smaller = cs.check_child(ref_cfg, base_cfg, parent=str(reference), child=str(base))
    except ValueError as err:
        raise SymAlignConfigError(f"{method.spec.name}: {err}") from None
    if not smaller:
        return None  # differs elsewhere: the same-size checks name it
    return CrossSizePlanning(planner, method, base, reference, base_cfg, ref_cfg)


def check_architectures(cfg, method: str, trust_remote_code: bool = False) -> None:
    """A base of another architecture than its reference, named before mergekit reads every
    model's architecture (its own refusal, "Must specify --allow-crimes", names no model)."""
    base, reference = cfg.base_model, recipe_reference(cfg)
    if base is None or reference is None or reference == base:
        return
    types = {m: getattr(m.config(trust_remote_code=trust_remote_code), "model_type", None)
             for m in (base, reference)}
    if types[base] != types[reference]:
        raise SymAlignConfigError(
            f"{method}: base {base} ({types[base]}) and reference {reference} "
            f"({types[reference]}) are different architectures: a skill vector measured on "
            f"the reference can only be moved onto a model of the same architecture (the same "
            f"model or a pruned child of it). Use the base's own parent as the reference.")


def check_child_settings(cfg, method: str, base, reference) -> None:
    """What a cross-size transfer does not define, refused with the reason (static: no model
    is opened)."""
    top = cfg.parameters or {}
    what = (f"{method}: base {base} is a pruned child of the reference {reference} "
            f"(narrower and/or shallower)")
    if recipe_setting(top, "output_frame") == "reference":
        raise SymAlignConfigError(
            f"{what}; output_frame: reference is not defined for it: the reference's frame "
            f"is wider than the child, so the merged model is written in the child's "
            f"coordinates and shape. Remove output_frame (or set output_frame: base).")
    if recipe_setting(top, "residual") != "none":
        raise SymAlignConfigError(
            f"{what}; residual: {recipe_setting(top, 'residual')} moves a model's residual "
            f"stream within its own width, but a child's residual channels are already "
            f"matched to the reference's (a subset, in the child's order) by the pruned-child "
            f"alignment. Remove residual.")
    if cfg.tokenizer is not None or cfg.tokenizer_source is not None:
        raise SymAlignConfigError(
            f"{what}; a tokenizer section is not supported with it: a pruned child keeps "
            f"its parent's vocabulary. Remove tokenizer / tokenizer_source.")
    if cfg.slices or cfg.modules:
        raise SymAlignConfigError(
            f"{what}; give the models as `models:`, not `slices:` / `modules:`: the layers "
            f"are paired by the layer map (solved, or the layer_map parameter), not by "
            f"layer ranges.")
    if recipe_setting(top, "alignment_cache"):
        LOG.warning("%s; alignment_cache is not used for it (the child's maps are solved "
                    "again by every merge).", what)


def parse_layer_map(value: str, method: str) -> Optional[List[int]]:
    """``layer_map: "0, 1, 3"`` (one parent layer per child layer) as a list; "" = solved."""
    if value is None or str(value).strip() == "":
        return None
    try:
        return [int(x) for x in str(value).replace("[", "").replace("]", "").split(",")]
    except ValueError:
        raise SymAlignConfigError(
            f"{method}: layer_map {value!r} is not a comma-separated list of parent layer "
            f"indices (one per child layer, increasing), e.g. layer_map: \"0, 1, 2, 4\"."
        ) from None


class LazyCheckpoint(Mapping):
    """A checkpoint's tensors by name through mergekit's lazy loader: each read from disk when
    asked for and not kept, so the solve holds what it is working on (embeddings, or one layer
    pair), not two whole models."""

    def __init__(self, model: ModelReference):
        self.loader = LoaderCache().get(model)

    def __getitem__(self, name: str):
        if name not in self.loader.index.tensor_paths:
            raise KeyError(name)
        return self.loader.get_tensor(name, device="cpu")

    def __contains__(self, name) -> bool:  # without reading the tensor
        return name in self.loader.index.tensor_paths

    def __iter__(self):
        return iter(self.loader.index.tensor_paths)

    def __len__(self) -> int:
        return len(self.loader.index.tensor_paths)


class CrossSizePlanning:
    """Per-merge state of a cross-size transfer's planning."""

    def __init__(self, planner, method, base: ModelReference, reference: ModelReference, base_cfg, ref_cfg):
        self.planner, self.method = planner, method
        self.base, self.reference = base, reference
        self.base_cfg, self.ref_cfg = base_cfg, ref_cfg
        self.match: Optional[cs.ChildMatch] = None
        self.restriction: Optional[cs.Restriction] = None
        self.key: Optional[str] = None

    # ------------------------------------------------------------------ checks

    def check(self, out_path: Optional[str]) -> None:
        cfg, name = self.planner.config, self.method.spec.name
        check_recipe(cfg, self.method)
        check_options(self.planner.options, self.method)
        models = cfg.referenced_models()
        if out_path is not None:
            check_output_path(out_path, models, name)
        check_child_settings(cfg, name, self.base, self.reference)
        check_same_computation(name, {self.base: self.base_cfg, self.reference: self.ref_cfg}, refuse=False)
        trust = self.planner.options.trust_remote_code
        others = {m: m.config(trust_remote_code=trust) for m in models if m != self.base}
        check_models(name, others)  # skills: the reference's architecture and shape
        ref_layers = text_config(self.ref_cfg).num_hidden_layers
        for m, c in others.items():
            if text_config(c).num_hidden_layers != ref_layers:
                raise SymAlignConfigError(
                    f"{name}: skill model {m} has {text_config(c).num_hidden_layers} layers but "
                    f"the reference {self.reference} has {ref_layers}: a skill vector is "
                    f"measured from the model it was fine-tuned from; give that as the reference.")
        layer_map = parse_layer_map(recipe_setting(cfg.parameters, "layer_map"), name)
        if layer_map is not None:
            try:
                cs.validate_layer_map(layer_map, ref_layers, text_config(self.base_cfg).num_hidden_layers,
                                      str(self.reference), str(self.base))
            except ValueError as err:
                raise SymAlignConfigError(f"{name}: {err}") from None
        self.layer_map = layer_map
        self.token_ids = None
        if recipe_setting(cfg.parameters, "alignment") == "activations":
            self.token_ids = check_calibration(
                cfg, lambda path, samples, max_tokens: calibration_tokens(
                    self.reference, [self.base], path, samples, max_tokens, trust),
                geometry=geometry_from_config(self.base_cfg, str(self.base)),
                vocab_size=getattr(text_config(self.ref_cfg), "vocab_size", None))

    # ------------------------------------------------------------------ solve

    def solve(self) -> None:
        """The child's coordinates among the reference's, from the weights (one solve), read
        layer by layer through mergekit's lazy loaders, the similarities on mergekit's device
        (``--cuda``)."""
        parent, child = LazyCheckpoint(self.reference), LazyCheckpoint(self.base)
        device = self.planner.options.device
        try:
            if self.token_ids is not None:  # alignment: activations (crosssize_activations)
                self.match = match_child_by_activations(
                    parent, self.ref_cfg, child, self.base_cfg, self.token_ids, layer_map=self.layer_map,
                    device=device, parent_name=str(self.reference), child_name=str(self.base))
            else:
                self.match = cs.match_child(parent, self.ref_cfg, child, self.base_cfg, layer_map=self.layer_map,
                                            parent_name=str(self.reference), child_name=str(self.base),
                                            device=device)
            self.explained = cs.explained_by_layer(child, parent, self.ref_cfg, self.match.map, device=device)
        except ValueError as err:
            raise SymAlignConfigError(f"{self.method.spec.name}: {err}") from None
        self.restriction = cs.Restriction(self.ref_cfg, self.match.map, model=str(self.reference))
        self.key = register_restriction(self.restriction)
        summary = self.summary()
        LOG.warning("%s", summary)  # mergekit-yaml shows warnings, not info
        warning = cs.child_warning(self.match, str(self.reference), str(self.base))
        if warning:
            LOG.warning("%s", warning)
        _CARDS[id(self.planner.config)] = self.card(warning)

    def summary(self) -> str:
        m = self.match
        pb, pr = cs._sizes(self.base_cfg), cs._sizes(self.ref_cfg)
        sizes = ", ".join(f"{k} {pr[k]} -> {pb[k]}" for k in cs.NARROWABLE if pb[k] != pr[k])
        return (f"aligned a pruned child: base {self.base} taken as a pruned child of the reference "
                f"{self.reference} ({sizes}); layer map "
                f"{'given' if self.layer_map is not None else 'solved'} {list(m.map.layers)}; "
                f"{self._how()}"
                f"weakest matched cosine {m.worst():.3f} (residual stream {m.residual.cosine:.3f}); "
                f"the skill vectors are restricted to the child's coordinates.")

    def _how(self) -> str:
        if self.token_ids is None:
            return ""
        return (f"residual channels, heads and neurons matched on activations over "
                f"{self.token_ids.numel()} calibration tokens; ")

    def card(self, warning: Optional[str]) -> str:
        lines = ["### Pruned child", "", self.summary(), ""]
        if warning:
            lines += [f"**Warning:** {warning}", ""]
        lines += ["| child layer | parent layer | share of the child explained |", "|---:|---:|---:|"]
        lines += [f"| {r['child_layer']} | {r['parent_layer']} | {r['explained']:.3f} |" for r in self.explained]
        return "\n".join(lines) + "\n"

    def report_entry(self) -> Dict[str, Any]:
        """What ``mergekit-symalign report`` shows of the solve (report.json's ``pruned_child``)."""
        m = self.match
        return {"model": str(self.base), "reference": str(self.reference),
                "layer_map": list(m.map.layers), "layer_map_given": self.layer_map is not None,
                "residual_cosine": m.residual.cosine, "weakest_cosine": m.worst(),
                "warning": cs.child_warning(m, str(self.reference), str(self.base)),
                "layers": [dict(r) for r in self.explained]}

    # ------------------------------------------------------------------ planning

    def normalize(self) -> None:
        """mergekit's own normalization, then every source cut to the child's length (the
        parent layer of child layer ``k`` is picked by the layer map in :meth:`plan_tensor`)."""
        self.planner.normalize_config()
        for module in self.planner.config.modules.values():
            for out_slice in module.slices:
                child = next(s for s in out_slice.sources if s.model == self.base)
                out_slice.sources = [
                    s if s.model == self.base else InputSliceDefinition(
                        model=s.model, layer_range=list(child.layer_range), parameters=s.parameters)
                    for s in out_slice.sources]

    def _load(self, model: ModelReference, info: WeightInfo):
        gather = GatherTensors(
            weight_info=ImmutableMap(data={model: info}), dtype=self.planner.config.dtype,
            device=self.planner.options.device if self.planner.options.read_to_gpu else None)
        (load,) = gather.arguments().values()
        return load

    def _parent_info(self, weight: WeightInfo) -> WeightInfo:
        name = self.restriction.parent_name(weight.name)
        arch = self.restriction.arch
        index = LoaderCache().get(self.reference).index.tensor_paths
        if name not in index and name.endswith(arch.lm_head):  # a tied parent: its embedding
            name = name[: -len(arch.lm_head)] + arch.embed
        return WeightInfo(name=name)

    def plan_tensor(self, weight: WeightInfo, weights_in: Sequence[WeightInfo],
                    models: Sequence[ModelReference], cfg_reader) -> None:
        by_model = dict(zip(models, weights_in))
        base_info = by_model[self.base]
        index = LoaderCache().get(self.base).index.tensor_paths
        if not any(n in index for n in [base_info.name, *(base_info.aliases or ())]):
            if weight.optional:  # the output has the child's tensors (a tied child: no lm_head)
                LOG.info("Skipping %s: the child %s has none", weight.name, self.base)
                return
        shared, per_input = resolve_parameters(
            self.method.spec, tensor_name=weight.name, inputs={m: w.name for m, w in by_model.items()},
            sources=cfg_reader.parameter_sources, base_model=cfg_reader.base_model, t=cfg_reader.t)
        roles = resolve_roles(list(models), self.base, per_input, self.method.spec.name, weight.name)
        parent = self._parent_info(weight)
        deltas = SkillDeltas(
            tensors=ImmutableMap(data={m: self._load(m, parent) for m in (roles.reference, *roles.skills)}),
            check=ImmutableMap(data={m: parent.name for m in (roles.reference, *roles.skills)}),
            reference_model=roles.reference)
        merged = method_task(self.method, parent, roles, shared, per_input, deltas)
        final = RestrictedTransferTask(merged=merged, child=self._load(self.base, base_info),
                                       child_model=self.base, name=weight.name, restriction=self.key)
        self.planner._tensors.append((weight, final))


# Below this share of a child layer explained by its matched parent slice, the child has
# moved far from the coordinates the skill vector was measured in (a judgement, not a proof:
# docs/cross-size.md).
FAR_EXPLAINED = 0.5


def child_verdict(entry: Mapping[str, Any]) -> List[str]:
    """The report's lines for a pruned child: one per child layer, then the verdict."""
    lines = [f"child layer {r['child_layer']} <- parent layer {r['parent_layer']}: "
             f"{r['explained']:.3f} of the child explained" for r in entry["layers"]]
    layers = [r for r in entry["layers"] if r["child_layer"] != "module"]
    worst = min(layers, key=lambda r: r["explained"]) if layers else None
    head = (f"{entry['model']} is aligned as a pruned child of {entry['reference']} (layer map "
            f"{entry['layer_map']}, weakest matched cosine {entry['weakest_cosine']:.3f})")
    if entry["warning"]:
        lines.append(f"{head}, but it does not look like a child of it: {entry['warning']}")
    elif worst is None or worst["explained"] >= FAR_EXPLAINED:
        lines.append(f"{head}: every layer is at least {FAR_EXPLAINED} explained by its matched "
                     f"parent slice, so the restricted skill vector lands on coordinates the "
                     f"child still shares with its parent.")
    else:
        lines.append(f"{head}; child layer {worst['child_layer']} is only "
                     f"{worst['explained']:.3f} explained by parent layer {worst['parent_layer']}: "
                     f"the child has moved far from its parent there, and a skill vector "
                     f"measured on the parent may not carry over (docs/cross-size.md).")
    return lines


def card_section(config) -> Optional[str]:
    """The model card's pruned-child section of the merge planned from ``config`` (taken)."""
    return _CARDS.pop(id(config), None)


__all__ = ["CrossSizePlanning", "LazyCheckpoint", "card_section", "check_architectures", "check_child_settings", "child_verdict", "detect", "parse_layer_map"]

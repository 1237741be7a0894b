"""The residual stream's symmetries: one transform per model, shared by every layer.

Pure torch/scipy (no mergekit import). Everything the residual stream touches, per
architecture (:class:`.architectures.Architecture`'s ``readers``, ``writers``, ``embed``,
``final_norm``, ``lm_head``, ``norm``):

* written by the token embeddings (columns), every writer's rows (``o_proj``, ``down_proj``),
  through a writer-side ("sandwich") norm where the architecture has one;
* read by every reader's columns (q/k/v, gate/up, fused or not) through a reader-side norm
  (or directly, as in OLMo 2), and by ``lm_head``'s columns through the final norm.

Two groups act on it exactly:

* ``permutation``: ``x -> S P x`` (``S`` diagonal +-1). ``rms(SPx) = rms(x)``, so with each
  norm's weight permuted (not signed), ``RMSNorm(SPx; Pw) = S P RMSNorm(x; w)``: readers
  ``W -> W P^T S``, writers and embeddings ``S P``, every norm weight ``P``. Exact for RMSNorm
  models, tied or not, Gemma's ``(1 + w)`` norms and writer-side norms included. A LayerNorm
  subtracts the mean, which only an unsigned permutation (or one global sign) keeps: there
  the signs are left out.
* ``orthogonal``: ``x -> Q x``. ``RMSNorm(Qx; w) = Q RMSNorm(x; w)`` only for a uniform
  ``w``, so each reader-side norm weight is first folded into the projections that read it
  (the norm-scale symmetry ``w -> w / f``, readers ``-> readers * f``, at ``f = w``: the
  norm becomes 1), then ``Q`` acts, then the norm is unfolded again with the *reference's*
  weight (``f = 1 / w_ref``): the aligned model keeps the reference's parameterization. Not
  exact with writer-side norms (nothing to fold them into) or with tied embeddings (folding
  the final norm into ``lm_head`` unties it): refused there, as are LayerNorm models.

Each transform is expressed as :class:`.spec.LayerTransform` steps over the same
:class:`.groups.Symmetry` machinery as the layer groups, per layer (its readers, writers and
norms) and for the module-level tensors (embeddings, final norm, ``lm_head``), so it is
applied, inverted and cached exactly like them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from .architectures import Architecture, Geometry, _projection
from .errors import UnsupportedArchitecture
from .groups import Kind, Site, Symmetry, noise_limit, random_element, small_linalg
from .spec import Fit, LayerTransform

MODES = ("none", "permutation", "orthogonal")


# --------------------------------------------------------------------------- what is exact


def check_supported(arch: Architecture, mode: str, tied_embeddings: bool, config=None,
                    model: str = "model") -> None:
    """Refuse a residual mode that is not exact for this architecture (with the remedy)."""
    if mode not in MODES:
        raise ValueError(f"residual must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "none":
        return
    if config is not None and getattr(config, "use_parallel_residual", False):
        raise UnsupportedArchitecture(
            f"{model}: residual alignment of a {arch.name} model with use_parallel_residual is "
            f"not proven here. Use residual: none."
        )
    if mode == "orthogonal":
        if arch.norm == "layernorm":
            raise UnsupportedArchitecture(
                f"{model}: residual: orthogonal is not exact for {arch.name}: its LayerNorm "
                f"subtracts the mean, which a rotation of the residual stream does not keep. "
                f"Use residual: permutation (unsigned here), or residual: none."
            )
        sandwich = [norm for _, norm in arch.writers if norm]
        if sandwich:
            raise UnsupportedArchitecture(
                f"{model}: residual: orthogonal is not exact for {arch.name}: its writer-side "
                f"norms ({', '.join(sandwich)}) act on the residual stream with nothing after "
                f"them to fold their weights into. Use residual: permutation (exact here), or "
                f"residual: none."
            )
        if tied_embeddings:
            raise UnsupportedArchitecture(
                f"{model}: residual: orthogonal needs untied embeddings: the final norm's weight "
                f"is folded into lm_head, which would untie it from the token embeddings. Untie "
                f"the checkpoints (save lm_head.weight as its own tensor and set "
                f"tie_word_embeddings: false), or use residual: permutation."
            )


def signed(arch: Architecture) -> bool:
    """May residual coordinates change sign? Not through a LayerNorm's mean subtraction."""
    return arch.norm != "layernorm"


def norm_offset(arch: Architecture) -> float:
    return 1.0 if arch.norm == "rms_offset" else 0.0


# --------------------------------------------------------------------------- elements


@dataclass(frozen=True, eq=False)
class ResidualElement:
    """One model's residual transform: a signed permutation, or a rotation."""

    mode: str  # "permutation" or "orthogonal"
    permutation: Optional[torch.Tensor] = None  # [D]: new coordinate i = old perm[i]
    signs: Optional[torch.Tensor] = None  # [D] of +-1 (None: unsigned)
    rotation: Optional[torch.Tensor] = None  # [D, D] orthogonal
    fit: Optional[Fit] = None  # rotation vs the best signed permutation

    @property
    def dim(self) -> int:
        return len(self.permutation) if self.rotation is None else self.rotation.shape[0]

    def is_identity(self) -> bool:
        if self.mode == "orthogonal":
            return False
        identity = bool((self.permutation == torch.arange(self.dim)).all())
        return identity and (self.signs is None or bool((self.signs > 0).all()))

    @staticmethod
    def identity(dim: int) -> "ResidualElement":
        return ResidualElement("permutation", torch.arange(dim), torch.ones(dim, dtype=torch.float64))


def random_residual(arch: Architecture, dim: int, mode: str, generator: torch.Generator) -> ResidualElement:
    """A random element (for scrambling models in tests and benchmarks)."""
    if mode == "orthogonal":
        probe = Symmetry("probe", Kind.orthogonal, (Site("x", 0, torch.arange(dim).reshape(1, 1, dim)),))
        return ResidualElement("orthogonal", rotation=random_element(probe, generator)[0])
    perm = torch.randperm(dim, generator=generator)
    signs = None
    if signed(arch):
        signs = torch.where(torch.rand(dim, generator=generator) < 0.5, -1.0, 1.0).double()
    return ResidualElement("permutation", perm, signs)


# --------------------------------------------------------------------------- sites


def _unique(names):
    return tuple(dict.fromkeys(names))


def _moe_tensors(arch: Architecture, which: str, reader: bool) -> Optional[Tuple[str, ...]]:
    """A mixture of experts' readers and writers (``experts``: the fused experts, ``router``,
    the shared expert and its gate), or None for a projection of the dense layer."""
    experts = arch.experts
    if experts is None:
        return None
    if which == "experts":
        return (experts.gate_up if reader else experts.down,)
    if which == "router":
        return (experts.router,)
    if which == "shared_gate":
        return (experts.shared_gate,)
    if which == "shared_expert":
        parts = ("gate_proj", "up_proj") if reader else ("down_proj",)
        return tuple(f"{experts.shared}.{p}.weight" for p in parts)
    return None


def _reader_tensors(arch: Architecture, g: Geometry, which: Tuple[str, ...]) -> Tuple[str, ...]:
    return _unique(t for w in which
                   for t in _moe_tensors(arch, w, True) or (f"{_projection(arch, w, g)[0]}.weight",))


def _writer_tensors(arch: Architecture, g: Geometry, which: str) -> Tuple[str, ...]:
    return _moe_tensors(arch, which, False) or (f"{_projection(arch, which, g)[0]}.weight",)


def _stacked(arch: Architecture, tensor: str) -> bool:
    """A fused experts tensor (``[experts, rows, columns]``): its residual axis is one later."""
    return arch.experts is not None and tensor in (arch.experts.gate_up, arch.experts.down)


def _reader_sites(arch: Architecture, readers, index: torch.Tensor) -> List[Site]:
    return [Site(t, 2 if _stacked(arch, t) else 1, index, contragredient=True) for t in readers]


def _writer_sites(arch: Architecture, writers, index: torch.Tensor) -> List[Site]:
    sites = [Site(t, 1 if _stacked(arch, t) else 0, index) for t in writers]
    return sites + [Site(t[:-len(".weight")] + ".bias", 0, index, optional=True)
                    for t in writers if t.endswith(".weight")]


def _norm_sites(arch: Architecture, norm: str, index: torch.Tensor, with_bias: bool = True) -> List[Site]:
    sites = [Site(f"{norm}.weight", 0, index, offset=norm_offset(arch))]
    if with_bias and arch.norm == "layernorm":
        sites.append(Site(f"{norm}.bias", 0, index, optional=True))
    return sites


@dataclass(frozen=True)
class ResidualSites:
    """Where the residual stream is read and written in one layer (or the module level)."""

    readers: Tuple[Tuple[Optional[str], Tuple[str, ...]], ...]  # (norm, reader tensors)
    writers: Tuple[str, ...]  # tensors whose rows write it (embeddings: columns, see below)
    writer_norms: Tuple[str, ...]  # sandwich norms
    embedding_columns: Tuple[str, ...] = ()  # token embeddings: the residual is axis 1

    def tensors(self) -> Tuple[str, ...]:
        names = [t for _, ts in self.readers for t in ts] + list(self.writers) + list(self.embedding_columns)
        for norm in [n for n, _ in self.readers if n] + list(self.writer_norms):
            names.append(f"{norm}.weight")
        return _unique(names)

    def norms(self) -> Tuple[str, ...]:
        return _unique([n for n, _ in self.readers if n] + list(self.writer_norms))


def layer_sites(arch: Architecture, g: Geometry) -> ResidualSites:
    return ResidualSites(
        readers=tuple((norm, _reader_tensors(arch, g, which)) for norm, which in arch.readers),
        writers=_unique(t for w, _ in arch.writers for t in _writer_tensors(arch, g, w)),
        writer_norms=_unique(n for _, n in arch.writers if n),
    )


def module_sites(arch: Architecture, tied_embeddings: bool) -> ResidualSites:
    """Embeddings, final norm and ``lm_head``. Tied, ``lm_head`` is the embedding matrix (a
    state dict may list it under both names): it moves like the embeddings' columns, and the
    final norm moves with no reader of its own (permutations only: orthogonal is refused)."""
    if tied_embeddings:
        return ResidualSites(readers=(), writers=(), writer_norms=(arch.final_norm,),
                             embedding_columns=(arch.embed, arch.lm_head))
    return ResidualSites(readers=((arch.final_norm, (arch.lm_head,)),), writers=(),
                         writer_norms=(), embedding_columns=(arch.embed,))


def _symmetries_permutation(arch: Architecture, sites: ResidualSites,
                            dim: int) -> Tuple[Symmetry, Optional[Symmetry]]:
    index = torch.arange(dim).reshape(dim, 1, 1)
    moved: List[Site] = []
    for norm, readers in sites.readers:
        moved += _reader_sites(arch, readers, index)
    moved += _writer_sites(arch, sites.writers, index)
    moved += [Site(t, 1, index) for t in sites.embedding_columns]
    norms: List[Site] = []
    for norm in sites.norms():
        norms += _norm_sites(arch, norm, index)
    permutation = Symmetry("residual.permutation", Kind.permutation, tuple(moved + norms))
    sign = Symmetry("residual.sign", Kind.sign, tuple(moved)) if signed(arch) else None
    return permutation, sign


def _fold(arch: Architecture, norm: str, readers: Tuple[str, ...], dim: int, label: str) -> Symmetry:
    """The norm-scale symmetry: norm weight ``* f``, its readers' columns ``/ f``."""
    index = torch.arange(dim).reshape(dim, 1, 1)
    sites = _norm_sites(arch, norm, index, with_bias=False)
    sites += _reader_sites(arch, readers, index)
    return Symmetry(f"residual.{label}.{norm}", Kind.scale, tuple(sites))


def _rotation(arch: Architecture, sites: ResidualSites, dim: int) -> Symmetry:
    index = torch.arange(dim).reshape(1, 1, dim)
    moved = [s for _, ts in sites.readers for s in _reader_sites(arch, ts, index)]
    moved += _writer_sites(arch, sites.writers, index)
    moved += [Site(t, 1, index) for t in sites.embedding_columns]
    return Symmetry("residual.rotation", Kind.orthogonal, tuple(moved))


def _effective(arch: Architecture, weight: torch.Tensor) -> torch.Tensor:
    return weight.double() + norm_offset(arch)


def transform(arch: Architecture, sites: ResidualSites, element: ResidualElement,
              model_norms: Mapping[str, torch.Tensor], reference_norms: Mapping[str, torch.Tensor],
              model: str = "model") -> LayerTransform:
    """The steps that move one layer's (or the module level's) tensors by ``element``.

    ``model_norms`` / ``reference_norms``: the reader-side norm weights (``<norm>.weight``)
    of the two models, needed by ``orthogonal`` (fold with the model's, unfold with the
    reference's).
    """
    dim = element.dim
    if element.mode == "permutation":
        permutation, sign = _symmetries_permutation(arch, sites, dim)
        steps = [(permutation, element.permutation)]
        if sign is not None and element.signs is not None:
            steps.append((sign, element.signs))
        return LayerTransform(tuple(steps))
    fold, unfold = [], []
    for norm, readers in sites.readers:
        if norm is None:
            continue
        model_weights = _effective(arch, model_norms[f"{norm}.weight"])
        reference_weights = _effective(arch, reference_norms[f"{norm}.weight"])
        for which, weights in (("model", model_weights), ("reference", reference_weights)):
            if bool((weights == 0).any()):
                raise UnsupportedArchitecture(
                    f"{model if which == 'model' else 'the reference'}: norm {norm} has "
                    f"{int((weights == 0).sum())} zero weights, so it cannot be folded into "
                    f"its readers (residual: orthogonal). Use residual: permutation."
                )
        fold.append((_fold(arch, norm, readers, dim, "fold"), 1.0 / model_weights))
        unfold.append((_fold(arch, norm, readers, dim, "unfold"), reference_weights))
    rotation = (_rotation(arch, sites, dim), element.rotation[None])
    return LayerTransform(tuple(fold + [rotation] + unfold))


MODULE = "module"  # key of the module-level transform (embeddings, final norm, lm_head)
NormGetter = Callable[[Optional[int], str], torch.Tensor]  # (layer or None, norm) -> weight


def model_transforms(arch: Architecture, geometry: Geometry, element: ResidualElement,
                     model_norm: NormGetter, reference_norm: NormGetter, layers: Iterable[int],
                     tied_embeddings: bool, model: str = "model") -> Dict[Union[int, str], LayerTransform]:
    """``element``'s steps for each of ``layers`` and for the module level (:data:`MODULE`).

    The norm getters return a norm's weight (``layer`` None: the module's final norm); they
    are called only for ``orthogonal`` (folding), so permutations need no weights at all."""
    def norms(sites: ResidualSites, layer: Optional[int], getter: NormGetter):
        if element.mode != "orthogonal":
            return {}
        return {f"{n}.weight": getter(layer, n) for n, _ in sites.readers if n}

    lsites = layer_sites(arch, geometry)
    out: Dict[Union[int, str], LayerTransform] = {}
    for index in layers:
        out[index] = transform(arch, lsites, element, norms(lsites, index, model_norm),
                               norms(lsites, index, reference_norm), model)
    msites = module_sites(arch, tied_embeddings)
    out[MODULE] = transform(arch, msites, element, norms(msites, None, model_norm),
                            norms(msites, None, reference_norm), model)
    return out


# --------------------------------------------------------------------------- statistics


class ResidualStatistic:
    """``C = sum_rows a b^T`` (``[D, D]``) and per-coordinate energies, accumulated in chunks:
    rows of the reference (``a``) and of the model (``b``) that carry the same thing (the
    same token's embedding; the same token's hidden state)."""

    def __init__(self, dim: int):
        self.cross = torch.zeros(dim, dim, dtype=torch.float64)
        self.reference_sq = torch.zeros(dim, dtype=torch.float64)
        self.model_sq = torch.zeros(dim, dtype=torch.float64)
        self.entries = 0

    def add(self, reference_rows: torch.Tensor, model_rows: torch.Tensor, chunk: int = 8192) -> None:
        for start in range(0, reference_rows.shape[0], chunk):
            a = reference_rows[start:start + chunk].float()
            b = model_rows[start:start + chunk].to(a.device).float()
            self.cross += (a.T @ b).double().cpu()
            self.reference_sq += (a * a).sum(0).double().cpu()
            self.model_sq += (b * b).sum(0).double().cpu()
            self.entries += a.numel()


def _signed_permutation(cross: torch.Tensor, ref_sq: torch.Tensor, model_sq: torch.Tensor,
                        with_signs: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    from .groups import assign

    scale = (ref_sq[:, None] * model_sq[None, :]).sqrt().clamp_min(1e-300)
    cosine = cross / scale  # match coordinates by correlation, not by their energy
    probe = Symmetry("residual.permutation", Kind.permutation,
                     (Site("x", 0, torch.arange(len(cross)).reshape(-1, 1, 1)),))
    perm = assign(cosine.abs() if with_signs else cosine, probe)
    if not with_signs:
        return perm, None
    matched = cross[torch.arange(len(perm)), perm]
    return perm, torch.where(matched < 0, -1.0, 1.0).double()


def solve(arch: Architecture, mode: str, statistic: ResidualStatistic) -> ResidualElement:
    """The residual transform that best maps the model's coordinates onto the reference's.

    ``orthogonal`` keeps its rotation only if it explains clearly more than the best signed
    permutation does, beyond what fitting a rotation's ``D (D - 1) / 2`` parameters to noise
    would (:func:`groups.noise_limit`); otherwise the signed permutation, exact
    without folding any norm, is used (so descendants of one base are left untouched).
    """
    if mode not in ("permutation", "orthogonal"):
        raise ValueError(f"no residual transform for mode {mode!r}")
    c, aa, bb = statistic.cross, statistic.reference_sq, statistic.model_sq
    perm, signs = _signed_permutation(c, aa, bb, signed(arch))
    permuted = ResidualElement("permutation", perm, signs)
    if mode == "permutation":
        return permuted
    with small_linalg(len(c)):
        u, _s, vh = torch.linalg.svd(c)
    rotation = u @ vh
    total = float(aa.sum() + bb.sum())
    matched = c[torch.arange(len(perm)), perm]
    objective_p = total - 2 * float((matched * (signs if signs is not None else 1)).sum())
    objective_q = total - 2 * float((rotation * c).sum())
    gain = objective_p - objective_q
    dim = len(perm)
    entries = max(statistic.entries, 1)
    threshold = noise_limit(dim * (dim - 1) // 2, entries)
    snapped = not (objective_p > 0 and gain / objective_p > threshold)
    fit = Fit("residual.rotation", gain, objective_p, statistic.entries, snapped)
    if snapped:
        return ResidualElement("permutation", perm, signs, fit=fit)
    return ResidualElement("orthogonal", rotation=rotation, fit=fit)


def input_names(arch: Architecture, tied_embeddings: bool) -> Tuple[str, ...]:
    """The module-level tensors a weight-based residual solve reads."""
    names = (arch.embed, f"{arch.final_norm}.weight")
    return names if tied_embeddings else names + (arch.lm_head,)


def embedding_statistic(reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor],
                        arch: Architecture, tied_embeddings: bool,
                        rows: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> ResidualStatistic:
    """Weight evidence: the same tokens' embedding rows (and ``lm_head`` rows, through each
    model's own final norm, when untied) in both models. ``rows``: (reference ids, model
    ids) of the tokens both vocabularies share, when they differ."""
    embed_r, embed_m = reference[arch.embed], model[arch.embed]
    stat = ResidualStatistic(embed_r.shape[1])
    pairs = [(embed_r, embed_m)]
    if not tied_embeddings and arch.lm_head in reference and arch.lm_head in model:
        norm = f"{arch.final_norm}.weight"
        head_r = reference[arch.lm_head] * _effective(arch, reference[norm]).to(reference[arch.lm_head].dtype)
        head_m = model[arch.lm_head] * _effective(arch, model[norm]).to(model[arch.lm_head].dtype)
        pairs.append((head_r, head_m))
    for a, b in pairs:
        if rows is not None:
            a, b = a[rows[0]], b[rows[1]]
        if a.shape != b.shape:
            raise ValueError(
                f"embedding rows differ in number ({a.shape[0]} vs {b.shape[0]}): the residual "
                f"stream is matched token by token"
            )
        stat.add(a, b)
    return stat


__all__ = [
    "MODES", "MODULE", "ResidualElement", "input_names", "model_transforms", "ResidualSites", "ResidualStatistic", "check_supported",
    "embedding_statistic", "layer_sites", "module_sites", "random_residual",
    "signed", "solve", "transform",
]

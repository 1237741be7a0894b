"""Activation-based alignment (the paper's ``act.align``): same groups, same solvers,
statistics taken from what the models compute on calibration tokens.

Pure torch + transformers (no mergekit import). Three parts:

* :class:`LayerStreamer` runs one model's decoder *layer by layer* on the calibration
  tokens, fetching weights lazily by name through a ``get_tensor(name)`` callable and
  keeping only one decoder layer's weights resident (like GPTQ). The model skeleton is built
  on the ``meta`` device; only the embedding-side modules and one decoder layer at a time
  are materialized. The keyword arguments that the HF model passes to each decoder layer
  (causal or sliding-window masks per ``config.layer_types``, rotary position embeddings,
  per-layer-type rotary tables of Gemma 3, ...) are not rebuilt by hand: one pass of the
  model's own forward with *catcher* modules in place of the layers records them, so every
  layer sees exactly what it would see inside the full model.

* An *activation spec* mirrors the weight spec of :func:`architectures.layer_spec`
  symmetry by symmetry (same names, kinds and slot layouts). Each weight site becomes a site
  on an activation tensor ``[features, tokens]``:

  - output rows of a projection -> rows of that projection's output (``"<module>:out"``,
    biases included; for QK-norm architectures the q/k output *after* its norm,
    ``"<module>:normed"``), with the same covariant / contragredient flag;
  - input columns of a projection -> rows of its input (``"<module>:in"``), always
    covariant: if ``W -> W M^-1`` then ``x -> M x`` (permutations, rotations and scales
    alike). So the MLP permutation sees gate/up outputs and ``h = act(gate x) * (up x)``,
    the V/O rotation sees the values (one copy per KV head) and the attention output
    entering ``o_proj`` (one copy per query head of the group), the Q/K rotations see the
    pre-RoPE queries (copies = the group's query heads) and keys.

  Fused Phi-3 projections need no splitting: the fused output rows carry the same row
  offsets as the fused weight rows. The MLP and V/O scales end up with covariant sites only
  (their ``1/s`` side sits in the next projection's weights, not in any activation): that
  is the "free scale" case of :func:`groups.solve_continuous`,
  ``s = <X, X_a> / ||X||^2``. The Q/K scale keeps its ``s`` (queries) / ``1/s`` (keys)
  pair and uses the same quartic solver as the weight path.

* :func:`align_by_activations` streams the reference and every model in lockstep, solves
  each model's layer against the reference's with the :mod:`groups` solvers, and maps each
  solved element onto the weight spec's symmetry of the same name: the result is a
  weight-space :class:`spec.LayerTransform` per model and layer, applied exactly like the
  weight path's. The symmetries leave every layer's function unchanged, so each model keeps
  running on its own original weights.

Handled: every architecture of :mod:`architectures` (Llama, Mistral, Qwen2 with biases,
Gemma / Gemma 2 (GeGLU, sliding windows, soft-capping) / Gemma 3, Qwen3 and OLMo 2 (QK-norm),
Phi-3 (fused), StableLM (partial rotary)). Refused: architectures without a spec (their
symmetries are not proven), a fused QKV projection together with QK-norm (no such model
yet), models whose decoder is not a ``layers`` list of the base model, calibration token
ids outside the vocabulary, and fewer calibration tokens than a full-rank statistic needs.
Names passed to ``get_tensor`` are those of the text-only HF causal LM
(``model.embed_tokens.weight``, ``model.layers.3.mlp.up_proj.weight``, ...); a caller
whose checkpoint nests them (e.g. a multimodal Gemma 3) maps the names.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .architectures import (
    Architecture,
    Geometry,
    UnsupportedArchitecture,
    _projection,
    architecture_for,
    full_qk_warning,
    geometry_from_config,
    layer_spec,
    text_config,
    tied_embeddings,
)
from . import residual as res
from .calibration import check_enough_tokens
from .errors import UndeterminedAlignment
from .groups import Kind, Site, Symmetry, cross_products, gather, slot_index
from .spec import Block, LayerSpec, LayerTransform, Switches, align_layer

LOG = logging.getLogger(__name__)

GetTensor = Callable[[str], torch.Tensor]
Activations = Dict[str, torch.Tensor]  # key -> [features, tokens]

__all__ = [
    "ActivationPlan",
    "FitQuality",
    "LayerStreamer",
    "activation_plan",
    "align_by_activations",
    "full_forward_statistics",
    "solve_layer_with_quality",
    "stream_statistics",
]


# --------------------------------------------------------------------------- activation spec


@dataclass(frozen=True, eq=False)
class ActivationPlan:
    """What to record in each layer and how the records map onto the weight spec."""

    arch: Architecture
    geometry: Geometry
    weight_spec: LayerSpec
    spec: LayerSpec  # the activation mirror: same block / symmetry names, kinds and slots
    keys: Tuple[str, ...]  # activation tensors to record: "<module>:out" / ":in" / ":normed"
    gate: Site  # gate pre-activations [F] (for the MLP matching)
    hidden: Site  # h = act(gate) * up, the input of down_proj [F]

    def weight_symmetry(self, name: str) -> Symmetry:
        for symmetry in self.weight_spec.symmetries():
            if symmetry.name == name:
                return symmetry
        raise KeyError(name)


def _activation_site(arch: Architecture, site: Site) -> Optional[Site]:
    module, param = site.tensor.rsplit(".", 1)
    if param != "weight" or module.endswith("_norm"):
        # a bias (or a QK-norm weight) moves with its rows, which the recorded output
        # activation already reflects
        return None
    if site.axis == 0:
        if arch.qk_norm != "none" and module in (arch.q, arch.k):
            return Site(f"{module}:normed", 0, site.index, site.contragredient)
        return Site(f"{module}:out", 0, site.index, site.contragredient)
    if site.axis == 1:
        return Site(f"{module}:in", 0, site.index, False)
    raise UnsupportedArchitecture(f"{site.tensor}: no activation for a site on axis {site.axis}")


def activation_plan(config: Any, qk_rotation: str = "rope", model: str = "model") -> ActivationPlan:
    """The weight spec of ``config`` and its activation mirror."""
    geometry = geometry_from_config(config, model)
    arch = architecture_for(geometry.model_type, model)
    if arch.qk_norm != "none" and arch.fused_qkv:
        raise UnsupportedArchitecture(
            f"{model}: activation alignment of a fused QKV projection with QK-norm is not "
            f"implemented; use weight alignment (alignment: weights)."
        )
    weight_spec = layer_spec(arch.name, geometry, qk_rotation)
    blocks = []
    for block in weight_spec.blocks:
        mirrored = []
        for symmetry in (block.main, block.scale):
            if symmetry is None:
                mirrored.append(None)
                continue
            def mirror(sites):
                return tuple(s for s in (_activation_site(arch, x) for x in sites) if s)

            mirrored.append(Symmetry(
                symmetry.name, symmetry.kind, mirror(symmetry.sites), signed=symmetry.signed,
                block_size=symmetry.block_size,
                features=tuple(f for f in map(mirror, symmetry.features) if f),
            ))
        blocks.append(Block(block.name, *mirrored, outer=block.outer))
    spec = LayerSpec(weight_spec.architecture, tuple(blocks))
    neurons = slot_index(geometry.intermediate_size, 1, 1)
    gate_name, gate_offset = _projection(arch, "gate", geometry)
    gate = Site(f"{gate_name}:out", 0, neurons + gate_offset)
    hidden = Site(f"{arch.down}:in", 0, neurons)
    keys = tuple(dict.fromkeys(
        [site.tensor for s in spec.symmetries() for site in s.sites] + [gate.tensor, hidden.tensor]
    ))
    return ActivationPlan(arch, geometry, weight_spec, spec, keys, gate, hidden)


# --------------------------------------------------------------------------- recording


def _feature_major_linear(linear: nn.Linear):
    """A forward for ``linear`` that returns its usual ``[..., out]`` result as a view of a
    feature-major ``[out, tokens]`` product (``W x^T``, the same multiply-adds; in the tests
    and on SmolLM2 the same bits). The recorder stores activations as ``[features, tokens]``:
    recorded this way, the MLP's gate and up outputs, and ``act(gate) * up`` computed from
    them elementwise (torch keeps its inputs' layout), need no transposing copy (most of an
    activation merge's transposes otherwise). Only for the
    MLP's input projections, whose consumers are elementwise ops and down_proj's matmul;
    attention projections feed kernels that want the head dimension contiguous."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if linear.bias is None:
            out = torch.mm(linear.weight, flat.T)
        else:
            out = torch.addmm(linear.bias[:, None], linear.weight, flat.T)
        return out.T.reshape(*x.shape[:-1], out.shape[0])
    return forward


class _Recorder:
    """Forward hooks on one decoder layer that record the plan's activation tensors."""

    def __init__(self, layer: nn.Module, plan: ActivationPlan, keys: Optional[Sequence[str]] = None):
        self.plan = plan
        self.chunks: Dict[str, List[torch.Tensor]] = {k: [] for k in (keys or plan.keys)}
        self.handles = []
        wanted: Dict[str, set] = {}
        for key in self.chunks:
            module, what = key.rsplit(":", 1)
            wanted.setdefault(module, set()).add(what)
        for module, whats in wanted.items():
            try:
                sub = layer.get_submodule(module)
            except AttributeError:
                raise UnsupportedArchitecture(
                    f"{plan.arch.name}: decoder layer has no module {module!r} "
                    f"({type(layer).__name__}); its modeling code differs from the spec"
                ) from None
            if "in" in whats:
                self.handles.append(sub.register_forward_pre_hook(self._pre_hook(module)))
            if whats & {"out", "normed"}:
                norm = None
                if "normed" in whats:
                    norm_name = module.rsplit(".", 1)[0] + (".q_norm" if module == plan.arch.q else ".k_norm")
                    try:
                        norm = layer.get_submodule(norm_name)
                    except AttributeError:
                        raise UnsupportedArchitecture(
                            f"{plan.arch.name}: decoder layer has no QK-norm module {norm_name!r}"
                        ) from None
                self.handles.append(sub.register_forward_hook(self._hook(module, whats, norm)))
        # The MLP's input projections compute their outputs feature-major (see
        # _feature_major_linear): their records, and down_proj's input computed from them
        # elementwise, then need no transposing copy in result().
        self.patched: List[nn.Module] = []
        for module in (plan.arch.gate, plan.arch.up, plan.arch.fused_gate_up):
            sub = None
            if module is not None and "out" in wanted.get(module, ()):
                sub = layer.get_submodule(module)
            if isinstance(sub, nn.Linear) and "forward" not in vars(sub):
                sub.forward = _feature_major_linear(sub)
                self.patched.append(sub)

    def _store(self, key: str, x: torch.Tensor) -> None:
        x = x.detach()
        self.chunks[key].append(
            x.reshape(-1, x.shape[-1]).to(torch.promote_types(x.dtype, torch.float32))
        )

    def _pre_hook(self, module: str):
        def hook(_mod, args, kwargs=None):
            self._store(f"{module}:in", args[0])
        return hook

    def _hook(self, module: str, whats, norm: Optional[nn.Module]):
        head_dim, per_head = self.plan.geometry.head_dim, self.plan.arch.qk_norm == "per_head"

        def hook(_mod, _args, out):
            out = out[0] if isinstance(out, tuple) else out
            if "out" in whats:
                self._store(f"{module}:out", out)
            if "normed" in whats:
                # The layer's own norm module, applied to the projection's output: the same
                # computation the attention performs before RoPE, independent of whether the
                # modeling code normalizes before or after moving the head axis.
                if per_head:
                    normed = norm(out.reshape(*out.shape[:-1], -1, head_dim)).reshape(out.shape)
                else:
                    normed = norm(out)
                self._store(f"{module}:normed", normed)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for sub in self.patched:
            del sub.forward  # the class's own forward again
        self.patched = []

    def result(self) -> Activations:
        out = {}
        for key in list(self.chunks):
            parts = self.chunks.pop(key)
            if not parts:
                raise RuntimeError(f"activation {key!r} was never computed by the layer")
            # [features, tokens], filled chunk by chunk (one copy, no cat + transpose)
            total = sum(part.shape[0] for part in parts)
            value = parts[0].new_empty(parts[0].shape[1], total)
            column = 0
            while parts:
                part = parts.pop(0)
                value[:, column:column + part.shape[0]].copy_(part.T)
                column += part.shape[0]
            out[key] = value
        return out


# --------------------------------------------------------------------------- streaming


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer ``index``; records what the model passes to it."""

    def __init__(self, index: int, real: nn.Module, calls: List, last: bool):
        super().__init__()
        self.index, self.calls, self.last = index, calls, last
        for attr in ("attention_type", "layer_idx", "is_sliding", "sliding_window"):
            if hasattr(real, attr):
                setattr(self, attr, getattr(real, attr))

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


def _check_token_ids(token_ids: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    token_ids = torch.as_tensor(token_ids)
    if token_ids.dim() == 1:
        token_ids = token_ids[None]
    if token_ids.dim() != 2 or token_ids.numel() == 0:
        raise ValueError(f"calibration token ids must be a non-empty [rows, tokens] tensor, got "
                         f"shape {tuple(token_ids.shape)}")
    if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
        raise ValueError(f"calibration token ids must be integers, got {token_ids.dtype}")
    token_ids = token_ids.long()
    low, high = int(token_ids.min()), int(token_ids.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise ValueError(
            f"calibration token ids span [{low}, {high}] but the model's vocabulary has "
            f"{vocab_size} entries: tokenize the calibration text with the models' own tokenizer"
        )
    return token_ids


class LayerStreamer:
    """One model's forward on calibration tokens, one decoder layer resident at a time.

    ``get_tensor(name)`` returns a weight by its HF causal-LM name. Call :meth:`step` once
    per layer, in order: it materializes layer ``l``, runs it on every chunk of hidden
    states (recording activations through hooks), replaces the hidden states by the layer's
    output and frees the layer again.
    """

    def __init__(
        self,
        config: Any,
        get_tensor: GetTensor,
        token_ids: torch.Tensor,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
        name: str = "model",
    ):
        import transformers

        self.name, self.get_tensor = name, get_tensor
        self.device, self.dtype = torch.device(device), dtype
        cfg = copy.deepcopy(text_config(config))
        cfg.use_cache = False
        with torch.device("meta"):
            self.model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        self.base = self.model.base_model
        layers = getattr(self.base, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise UnsupportedArchitecture(
                f"{name}: {type(self.base).__name__} keeps no `layers` list of decoder layers; "
                f"layer-by-layer streaming does not know this model"
            )
        self.layers = layers
        self.num_layers = len(layers)
        self._names = {module: qual for qual, module in self.model.named_modules()}
        token_ids = _check_token_ids(token_ids, getattr(cfg, "vocab_size", None))
        self.tokens = token_ids.shape[0] * token_ids.shape[1]
        self.next_layer = 0
        self.hidden: List[torch.Tensor] = []
        self._layer_kwargs: Dict[int, List[Tuple[tuple, dict]]] = {}
        top = [m for n, m in self.base.named_children() if m is not self.layers]
        with torch.no_grad():
            for module in top:
                self._materialize(module)
            try:
                step = max(1, int(batch_size))
                for start in range(0, token_ids.shape[0], step):
                    self._capture(token_ids[start:start + step].to(self.device))
            finally:
                for module in top:  # only the hidden states are needed from here on
                    module.to_empty(device="meta")

    # -- weights -------------------------------------------------------------------------

    def _fetch(self, name: str, like: torch.Tensor) -> torch.Tensor:
        try:
            tensor = self.get_tensor(name)
        except KeyError:
            raise ValueError(f"{self.name}: tensor {name!r} is missing from the checkpoint") from None
        if tensor is None:
            raise ValueError(f"{self.name}: tensor {name!r} is missing from the checkpoint")
        if tuple(tensor.shape) != tuple(like.shape):
            raise ValueError(
                f"{self.name}: tensor {name!r} has shape {tuple(tensor.shape)} but the config "
                f"expects {tuple(like.shape)}"
            )
        return tensor

    def _materialize(self, module: nn.Module) -> None:
        """Allocate ``module`` on the device and fill it from the checkpoint."""
        module.to_empty(device=self.device)
        prefix = self._names[module]
        prefix = prefix + "." if prefix else ""
        params = dict(module.named_parameters())
        # Non-persistent buffers (rotary inv_freq, Gemma's embedding scale) are not in the
        # checkpoint: let the model's own initializer compute them, parameters untouched.
        buffers = dict(module.named_buffers())
        for buffer in buffers.values():  # NaN until computed or loaded: checked below
            if buffer.is_floating_point():
                buffer.fill_(float("nan"))
        for sub in module.modules():
            if next(sub.buffers(recurse=False), None) is not None:
                for p in sub.parameters(recurse=False):
                    p._is_hf_initialized = True
                self.model._init_weights(sub)
        for rel, param in params.items():
            param.data.copy_(self._fetch(prefix + rel, param))
        persistent = set(module.state_dict(keep_vars=True)) - set(params)
        for rel in persistent:
            if rel in buffers:
                buffers[rel].data.copy_(self._fetch(prefix + rel, buffers[rel]))
        for rel, buffer in buffers.items():
            if buffer.is_floating_point() and torch.isnan(buffer).any():
                raise UnsupportedArchitecture(
                    f"{self.name}: buffer {prefix + rel!r} is neither in the checkpoint nor "
                    f"computed by the model's initializer; layer-by-layer streaming cannot "
                    f"rebuild it"
                )

    # -- forward -------------------------------------------------------------------------

    def _capture(self, ids: torch.Tensor) -> None:
        """Embed ``ids`` and record every layer's call arguments with the model's forward."""
        calls: List = []
        catchers = nn.ModuleList(
            _Catcher(i, layer, calls, i == self.num_layers - 1) for i, layer in enumerate(self.layers)
        )
        self.base.layers = catchers
        try:
            self.base(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            self.base.layers = self.layers
        if len(calls) != self.num_layers:
            raise UnsupportedArchitecture(
                f"{self.name}: the model called {len(calls)} of its {self.num_layers} decoder "
                f"layers; layer-by-layer streaming does not know this model"
            )
        self.hidden.append(calls[0][0])
        rows = ids.shape[0]
        if rows not in self._layer_kwargs:  # masks / positions depend only on the shape
            self._layer_kwargs[rows] = [(args, kwargs) for _h, args, kwargs in calls]

    @torch.no_grad()
    def step(self, plan: Optional[ActivationPlan] = None, keys: Optional[Sequence[str]] = None) -> Activations:
        """Run the next layer on all hidden states; return its recorded activations."""
        index = self.next_layer
        if index >= self.num_layers:
            raise RuntimeError(f"{self.name}: all {self.num_layers} layers were already streamed")
        layer = self.layers[index]
        self._materialize(layer)
        recorder = _Recorder(layer, plan, keys) if plan is not None else None
        try:
            for c, hidden in enumerate(self.hidden):
                args, kwargs = self._layer_kwargs[hidden.shape[0]][index]
                out = layer(hidden, *args, **kwargs)
                self.hidden[c] = out[0] if isinstance(out, tuple) else out
        finally:
            if recorder is not None:
                recorder.remove()
            layer.to_empty(device="meta")
        self.next_layer += 1
        if self.next_layer == self.num_layers:
            self.hidden = []
        return recorder.result() if recorder is not None else {}


def stream_statistics(
    config: Any,
    get_tensor: GetTensor,
    token_ids: torch.Tensor,
    qk_rotation: str = "rope",
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
):
    """Yield ``(layer index, activations)`` of one model, streamed layer by layer."""
    plan = activation_plan(config, qk_rotation)
    streamer = LayerStreamer(config, get_tensor, token_ids, device, dtype, batch_size)
    for index in range(streamer.num_layers):
        yield index, streamer.step(plan)


@torch.no_grad()
def full_forward_statistics(
    model: nn.Module,
    token_ids: torch.Tensor,
    qk_rotation: str = "rope",
    batch_size: int = 8,
) -> Dict[int, Activations]:
    """The same activations, recorded by hooks on a full in-memory HF model (for tests)."""
    plan = activation_plan(model.config, qk_rotation)
    base = model.base_model
    token_ids = _check_token_ids(token_ids, getattr(text_config(model.config), "vocab_size", None))
    device = next(model.parameters()).device
    recorders = [_Recorder(layer, plan) for layer in base.layers]
    try:
        for start in range(0, token_ids.shape[0], batch_size):
            base(input_ids=token_ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        for recorder in recorders:
            recorder.remove()
    return {i: recorder.result() for i, recorder in enumerate(recorders)}


# --------------------------------------------------------------------------- solving


#: Sketch dimensions of the large-n activation matching. Neurons' activations correlate far
#: more than their weights (cosines of ~0.5 between distinct neurons over the same tokens),
#: so the weight path's 64 dimensions leave too many rows uncertain (a SmolLM2 layer then
#: goes to the dense path); 128 leave few, scored exactly against every neuron.
ACTIVATION_SKETCH_DIM = 128


def _inverse_row_norms(x: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """``factor / |x_i|`` per row of ``x`` ``[n, ...]`` (float32; an all-zero row gets a
    finite factor, so its cosines are 0)."""
    norms = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1, dtype=torch.float32)
    return factor / norms.clamp_min(torch.finfo(torch.float32).tiny ** 0.5)


def _solve_mlp_permutation(plan: ActivationPlan, reference: Activations, model: Activations,
                            margins: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
    """Match the model's MLP neurons to the reference's, robust to per-neuron signed scales.

    The similarity of reference neuron ``i`` and model neuron ``j`` is
    ``cos(gate_a[i], gate_t[j]) + |cos(h_a[i], h_t[j])|`` over the calibration tokens:

    * the gate pre-activation is untouched by the neuron's scale symmetry (only the linear up
      branch carries it), so its plain cosine is a direct, signed match;
    * ``h = act(gate) * up`` carries the neuron's scale ``s`` (any sign, any size), which a
      raw inner product would turn into a similarity ``s * <h, h>``: a neuron scaled by -3
      would repel its own twin. ``|cos|`` is invariant under ``h -> s h`` for every
      ``s != 0``, so it compares the neurons' *shape* over the tokens (the scale itself is
      solved afterwards, in closed form);
    * cosines (not raw inner products) put both terms in ``[-1, 1]``, so neither dominates
      just because its activations are larger.

    For an exact copy of the reference (scrambled by the group) the true match scores the
    maximum, 2, in every row. Dead neurons (all-zero rows) score 0 against everything.

    Solved by :func:`assignment.match`, the weight path's matcher, on twice this objective:
    the gate rows as a plain term weighted by ``sqrt(2) / |row|`` (``2 cos``) and the ``h``
    rows, weighted by ``1 / |row|``, as both its scaled terms (``2 sqrt(cos^2) = 2 |cos|``).
    Up to :data:`assignment.DENSE_BELOW` neurons that is the dense similarity and scipy's
    assignment; above, sketches of the token dimension find each neuron's candidates and
    only those pairs are scored exactly (the dense ``n x n x tokens`` cosines are ~24 TFLOP
    per layer at Llama-3.1-8B's 14336 neurons and default token budget).

    ``margins`` (when given) receives, per reference neuron, its matched score minus the
    best score of any other model neuron scored in its row (every neuron on the dense path;
    every one the sketch could not rule out on the large-n path, which includes any close
    enough to tie): how clearly the data tells the match apart (about 0 for neurons the
    calibration activations cannot distinguish).
    """
    return match_neurons(gather(reference[plan.gate.tensor], plan.gate),
                         gather(model[plan.gate.tensor], plan.gate),
                         gather(reference[plan.hidden.tensor], plan.hidden),
                         gather(model[plan.hidden.tensor], plan.hidden), margins)


def match_neurons(gate_a: torch.Tensor, gate_t: torch.Tensor, h_a: torch.Tensor, h_t: torch.Tensor,
                  margins: Optional[List[torch.Tensor]] = None, **options) -> torch.Tensor:
    """:func:`_solve_mlp_permutation` on the neurons' gate pre-activations and ``h`` rows
    (``[n, ...]`` each, reference ``_a`` and model ``_t``); ``options`` go to
    :func:`assignment.match` (e.g. ``dense_below``)."""
    from .assignment import CONTRAGREDIENT, COVARIANT, PLAIN, match

    n = gate_a.shape[0]
    gate_w = (_inverse_row_norms(gate_a, math.sqrt(2.0)), _inverse_row_norms(gate_t, math.sqrt(2.0)))
    h_w = (_inverse_row_norms(h_a), _inverse_row_norms(h_t))
    terms = [(gate_a, gate_t, PLAIN, gate_w), (h_a, h_t, COVARIANT, h_w), (h_a, h_t, CONTRAGREDIENT, h_w)]
    doubled: Optional[List[torch.Tensor]] = [] if margins is not None else None
    try:
        perm = match(terms, n, name="mlp.neurons", margins=doubled, **{
            "sketch_dim": ACTIVATION_SKETCH_DIM, "search_dim": ACTIVATION_SKETCH_DIM, **options})
    except FloatingPointError:
        raise FloatingPointError("mlp.neurons: non-finite activation similarity") from None
    if margins is not None:
        margins.append(doubled[0] / 2)
    return perm.cpu()


# Fit-quality thresholds (see FitQuality). Float32 activations put rounding noise at about
# 1e-7 relative; degenerate calibration text measures 1e-9 .. 1e-8 where real text measures
# 1e-4 .. 1e-1 (SmolLM2-135M on the shipped set).
UNDETERMINED = 1e-6  # a rotation's sigma_min / sigma_max, or a plane's relative signal
TIE = 1e-5  # an MLP neuron whose match beats its runner-up by less is a tie
TIE_LIMIT = 0.01  # refuse a layer where more than this fraction of the neurons tie
REMEDY = (
    "The calibration activations do not determine this transform (too few distinct tokens "
    "or contexts: repeated lines, very short or very uniform text, or text the tokenizer "
    "does not know), so the merge would be silently wrong. Use a larger and more varied "
    "calibration set (leave calibration unset for the shipped set, raise "
    "calibration_samples), or alignment: weights."
)


@dataclass
class FitQuality:
    """How well the calibration activations determine one (model, layer) solve, and how well
    the solved element fits them.

    * ``conditioning``: per rotation symmetry, the worst slot's ``lambda_min / lambda_max``
      of either model's own activation covariance on the calibration tokens (the
      Procrustes solution is unique only where the data spans every direction); for 2-D
      plane rotations and half-turns, the worst plane's energy relative to the mean plane.
      Below :data:`UNDETERMINED` the solve is arbitrary in the directions the data does not
      span.
    * ``neuron_margin`` / ``tied_neurons``: the MLP matching's smallest gap between a
      neuron's match and its runner-up (scores in [-1, 2]; above
      :data:`assignment.DENSE_BELOW` neurons the best competitor the sketch could not rule
      out, which any competitor close enough to tie is) and how many neurons tie (gap
      below :data:`TIE`): the data cannot tell them apart.
    * ``empty_scale_slots``: per scale symmetry, slots whose activations are all ~0 (their
      scale falls back to 1, whatever the truth).
    * ``residual``: per block (``mlp``, ``self_attn``, ...), ``||A - g.T|| / ||A||`` over
      the block's recorded activations after the fit: ~1e-7 for an exact copy, larger the
      more the models differ (not a sign of a bad calibration set by itself).
    """

    model: str
    layer: int
    residual: Dict[str, float] = field(default_factory=dict)
    conditioning: Dict[str, float] = field(default_factory=dict)
    neuron_margin: Optional[float] = None
    tied_neurons: int = 0
    neurons: int = 0
    empty_scale_slots: Dict[str, int] = field(default_factory=dict)

    def problems(self) -> List[str]:
        out = [f"{name}: conditioning {value:.1e} (below {UNDETERMINED:.0e}: the calibration "
               f"activations span too few directions)"
               for name, value in self.conditioning.items() if not value >= UNDETERMINED]
        if self.neurons and self.tied_neurons > TIE_LIMIT * self.neurons:
            out.append(f"mlp.neurons: {self.tied_neurons} of {self.neurons} neurons cannot be "
                       f"told apart from another one on the calibration activations")
        out += [f"{name}: {count} slots without any calibration signal"
                for name, count in self.empty_scale_slots.items() if count]
        return out

    def describe(self) -> str:
        parts = [f"layer {self.layer} of {self.model}:"]
        if self.residual:
            parts.append("residual " + ", ".join(f"{k} {v:.2e}" for k, v in self.residual.items()))
        if self.neuron_margin is not None:
            parts.append(f"neuron margin {self.neuron_margin:.3g} ({self.tied_neurons} tied)")
        if self.conditioning:
            parts.append("conditioning " + ", ".join(f"{k} {v:.2e}" for k, v in self.conditioning.items()))
        return " ".join(parts)


def _conditioning(symmetry: Symmetry, reference: Activations, model: Activations) -> float:
    """How well the data determines a rotation-like symmetry (see :class:`FitQuality`),
    from each side's own activation covariance (not the cross-covariance: two models of
    different initializations may correlate weakly in some direction although the data
    spans it; that is a model difference, reported by the residual, not a calibration
    defect)."""
    worst = float("inf")
    for side in (reference, model):
        c = cross_products(symmetry, side, side)  # [slots, k, k], symmetric PSD
        if symmetry.kind == Kind.orthogonal:
            eig = torch.linalg.eigvalsh(c).clamp_min(0)
            top = eig[:, -1]
            ratio = torch.where(top > 0, eig[:, 0] / top.clamp_min(1e-300), torch.zeros_like(top))
        else:  # 2-D planes / half-turns: any signal in the plane determines them
            energy = torch.diagonal(c, dim1=-2, dim2=-1).sum(-1)
            ratio = energy / energy.mean().clamp_min(1e-300)
        worst = min(worst, float(ratio.min()))
    return worst


def _empty_slots(symmetry: Symmetry, model: Activations) -> int:
    n = symmetry.slots
    energy = torch.zeros(n, dtype=torch.float64)
    for site in symmetry.sites:
        value = model.get(site.tensor)
        if value is not None:  # [features, tokens]: energy per feature row, then per slot
            rows = torch.linalg.vector_norm(value, dim=1).double().pow(2).cpu()
            energy += rows[site.index.reshape(n, -1)].sum(-1)
    tiny = max(1e-30, 1e-20 * float(energy.max())) if n else 1e-30
    return int((energy <= tiny).sum())


def _residuals(reference: Activations, moved: Activations, chunk: int = 1024) -> Dict[str, float]:
    """Relative residual per block between the reference's activations and the model's
    ``moved`` by the solved transform (as :func:`spec.align_layer` leaves them), compared in
    row chunks (bounded memory at 8B widths)."""
    sums: Dict[str, List[float]] = {}
    for key, ref in reference.items():
        if key not in moved:
            continue
        model = moved[key]
        acc = sums.setdefault(key.split(".", 1)[0], [0.0, 0.0])
        for i in range(0, ref.shape[0], chunk):
            a = ref[i:i + chunk]
            acc[0] += float(torch.linalg.vector_norm(a - model[i:i + chunk].to(a.dtype)).double() ** 2)
            acc[1] += float(torch.linalg.vector_norm(a).double() ** 2)
    return {block: math.sqrt(num / den) if den > 0 else 0.0 for block, (num, den) in sums.items()}


def solve_layer_with_quality(
    plan: ActivationPlan,
    reference: Activations,
    model: Activations,
    switches: Switches = Switches(),
    label: str = "model",
    layer: int = 0,
) -> Tuple[LayerTransform, FitQuality]:
    """The weight-space element that maps ``model``'s layer onto ``reference``'s, and the
    :class:`FitQuality` of the solve: :func:`spec.align_layer` on the activation mirror of
    the weight spec (same solvers and order; the MLP neurons matched by
    :func:`_solve_mlp_permutation`), then each solved element re-attached to the weight
    spec's symmetry of the same name."""
    margins: List[torch.Tensor] = []

    def mlp_neurons(_symmetry, reference, model):
        return _solve_mlp_permutation(plan, reference, model, margins)

    moved: Activations = {}
    try:
        solved = align_layer(plan.spec, reference, model, switches, label=label,
                             solvers={"mlp.neurons": mlp_neurons}, moved=moved)
    except ValueError as err:
        raise ValueError(f"(activations of {label}) {err}") from None
    quality = FitQuality(model=label, layer=layer)
    quality.residual = _residuals(reference, moved)
    del moved  # a moved copy of the layer's activations
    for symmetry in plan.spec.symmetries():
        if not switches.enabled(symmetry):
            continue
        if symmetry.kind in (Kind.orthogonal, Kind.plane_rotation, Kind.sign):
            quality.conditioning[symmetry.name] = _conditioning(symmetry, reference, model)
        elif symmetry.kind == Kind.scale:
            quality.empty_scale_slots[symmetry.name] = _empty_slots(symmetry, model)
    if margins:
        quality.neuron_margin = float(margins[0].abs().min())
        quality.tied_neurons = int((margins[0].abs() < TIE).sum())
        quality.neurons = int(margins[0].numel())
    transform = LayerTransform(tuple((plan.weight_symmetry(symmetry.name), element.detach().cpu())
                                     for symmetry, element in solved.steps))
    return transform, quality


def required_tokens(plan: ActivationPlan, switches: Switches = Switches()) -> List[Tuple[int, str]]:
    """``(tokens needed, what)`` for each full-rank statistic the enabled symmetries use."""
    g = plan.geometry
    needs = []
    if switches.permutation or switches.scaling:
        needs.append((g.intermediate_size,
                      f"the MLP neuron correlation ({g.intermediate_size} neurons per layer)"))
    if switches.rotation:
        needs.append((g.head_dim, f"the attention head statistics (head_dim {g.head_dim})"))
    return needs


#: Above this many floating-point operations of forward passes on a CPU, the activation
#: alignment warns before it starts (100 TFLOP: ~17 minutes at 100 GFLOP/s, about what a
#: few CPU cores sustain in float32; SmolLM2's default run is 1.7 TFLOP, Llama-3.1-8B's
#: ~800 TFLOP per model and reference).
CPU_FORWARD_WARN_FLOP = 1e14


def forward_flop(geometry: Geometry, num_layers: int, tokens: int, runs: int) -> float:
    """Floating-point operations of the linear projections in ``runs`` forward passes
    (reference and models) of ``num_layers`` decoder layers over ``tokens`` tokens: q, k, v,
    o and a gated MLP's three projections, ``2`` per multiply-add. Attention scores, norms
    and the LM head are left out (the streamer never runs the head)."""
    g = geometry
    attention = g.hidden_size * (2 * g.num_heads + 2 * g.num_kv_heads) * g.head_dim
    mlp = 3 * g.hidden_size * g.intermediate_size
    return 2.0 * (attention + mlp) * tokens * num_layers * runs


def _announce_cost(geometry: Geometry, num_layers: int, tokens: int, runs: int, device: Any) -> None:
    flop = forward_flop(geometry, num_layers, tokens, runs)
    message = (f"alignment: activations runs {runs} models (the reference included) over {tokens} "
               f"calibration tokens: ~{flop / 1e12:.1f} TFLOP of forward passes on {device}")
    if torch.device(device).type == "cpu" and flop > CPU_FORWARD_WARN_FLOP:
        LOG.warning("%s, about %.0f minutes at 100 GFLOP/s (a few CPU cores in float32). Run "
                    "mergekit-yaml with --cuda, or lower calibration_samples (the fit-quality "
                    "check refuses a set too small to determine the transforms).", message,
                    flop / 100e9 / 60)
    else:
        LOG.info("%s.", message)


def align_by_activations(
    reference: GetTensor,
    models: Mapping[str, GetTensor],
    config: Any,
    token_ids: torch.Tensor,
    switches: Switches = Switches(),
    qk_rotation: str = "rope",
    device: Any = "cpu",
    progress: bool = True,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    model_configs: Optional[Mapping[str, Any]] = None,
    fit_report: Optional[List[FitQuality]] = None,
    refuse_undetermined: bool = True,
    residual: str = "none",
    compose: bool = True,
) -> Dict[str, Dict[Any, LayerTransform]]:
    """Align every model to ``reference`` on activations: ``{model: {layer: transform}}``.

    ``reference`` and ``models[key]`` return weights by HF name. All models share
    ``config``'s architecture and layer geometry and run on the same ``token_ids``
    ``[rows, tokens]``; each runs its forward pass with its own config
    (``model_configs[key]``, default ``config``: the reference's). The models are streamed
    in lockstep: for each layer, the reference's layer runs on its own hidden states, then
    each model's, each solved against the reference's activations and discarded. Resident
    at any time: one decoder layer's weights, every model's hidden states, and two models'
    activations of one layer.

    Each solve's :class:`FitQuality` is logged (INFO) and appended to ``fit_report``; a
    solve the calibration activations do not determine raises :class:`UndeterminedAlignment`
    naming the layer, the model and the remedy (``refuse_undetermined=False``: a warning).

    ``residual`` (``permutation`` / ``orthogonal``): the residual stream itself, the hidden
    states entering every layer, gives one ``[D, D]`` statistic per model, accumulated layer
    by layer; its transform is composed with every layer's (the layer solves do not depend on
    it: they see activations inside the layer) and the module level's is added under
    :data:`residual.MODULE`. ``compose=False`` returns ``(layer transforms, residual
    elements)`` uncomposed instead (see :func:`compose_residual`; what a cache stores).
    """
    from tqdm.auto import tqdm

    plan = activation_plan(config, qk_rotation, "reference")
    token_ids = _check_token_ids(token_ids, getattr(text_config(config), "vocab_size", None))
    for needed, what in required_tokens(plan, switches):
        check_enough_tokens(token_ids.numel(), needed, what)
    if qk_rotation == "full" and switches.rotation:
        for key in models:
            full_qk_warning(key)
    results: Dict[str, Dict[Any, LayerTransform]] = {key: {} for key in models}
    if not models:
        return results if compose else (results, {})
    tied = tied_embeddings(config)
    if residual != "none":
        res.check_supported(plan.arch, residual, tied, text_config(config))
    kw = dict(device=device, dtype=dtype, batch_size=batch_size)
    _announce_cost(plan.geometry, int(text_config(config).num_hidden_layers), token_ids.numel(),
                   1 + len(models), device)
    reference_streamer = LayerStreamer(config, reference, token_ids, name="reference", **kw)
    model_configs = model_configs or {}
    streamers = {key: LayerStreamer(model_configs.get(key, config), get_tensor, token_ids,
                                    name=str(key), **kw)
                 for key, get_tensor in models.items()}
    width = plan.geometry.hidden_size
    stats = {key: res.ResidualStatistic(width) for key in models} if residual != "none" else {}
    bar = tqdm(range(reference_streamer.num_layers), desc="activation alignment", unit="layer",
               disable=not progress)
    for index in bar:
        for key, statistic in stats.items():  # the residual stream entering this layer
            for a, b in zip(reference_streamer.hidden, streamers[key].hidden):
                statistic.add(a.reshape(-1, width), b.reshape(-1, width))
        reference_acts = reference_streamer.step(plan)
        for key, streamer in streamers.items():
            acts = streamer.step(plan)
            try:
                results[key][index], quality = solve_layer_with_quality(
                    plan, reference_acts, acts, switches, label=key, layer=index)
            except ValueError as err:
                raise ValueError(f"layer {index}: {err}") from None
            del acts
            _report(quality, fit_report, refuse_undetermined)
        del reference_acts
    elements = {key: res.solve(plan.arch, residual, statistic) for key, statistic in stats.items()}
    if not compose:
        return results, elements
    return compose_residual(config, results, elements, models, reference)


def compose_residual(config: Any, results: Dict[str, Dict[Any, LayerTransform]],
                     elements: Mapping[str, Any], models: Mapping[str, GetTensor],
                     reference: GetTensor) -> Dict[str, Dict[Any, LayerTransform]]:
    """Every model's layer transforms preceded by its residual element's steps (which need the
    norm weights: fetched by HF name), and the module level's added (:data:`residual.MODULE`)."""
    if not elements:
        return results
    geometry = geometry_from_config(config)
    arch = architecture_for(geometry.model_type)
    tied = tied_embeddings(config)
    out = dict(results)
    for key, element in elements.items():
        parts = res.model_transforms(arch, geometry, element, _norm_getter(models[key]),
                                     _norm_getter(reference), sorted(results[key]), tied, str(key))
        out[key] = {i: parts[i].then(results[key][i]) if i in results[key] else parts[i]
                    for i in parts}
    return out


def _norm_getter(get_tensor: GetTensor):
    """A norm's weight by HF name (``layer`` None: the module level's final norm)."""
    def norm(layer, name):
        return get_tensor(f"{name}.weight" if layer is None else f"model.layers.{layer}.{name}.weight")
    return norm


def _report(quality: FitQuality, fit_report: Optional[List[FitQuality]], refuse: bool) -> None:
    LOG.info("activation alignment fit: %s", quality.describe())
    if fit_report is not None:
        fit_report.append(quality)
    problems = quality.problems()
    if not problems:
        return
    message = (f"alignment: activations, layer {quality.layer} of {quality.model}: "
               f"{'; '.join(problems)}. {REMEDY}")
    if refuse:
        raise UndeterminedAlignment(message)
    LOG.warning(message)

"""Independently initialised models (issue 10): linear-path fusion and cross-init skill transfer.

    .venv/bin/python benchmarks/independent_init.py [--seeds 3] [--widths 128 256] [--quick]

Per width and seed it trains (``paper_analog.build_family``'s recipes, cached under
``--workdir``) two bases from different random initialisations on the same data mixture
(different draws of it); at the transfer widths (``--transfer-widths``, default 128: exactly
the paper analog's family) also the rest of the family: reference and skill from the first
base, targets from both.

* **Fusion**: the loss along the straight line ``(1 - a) A + a B'`` between base A and base
  B aligned to A (``B' = g . B`` for an exact symmetry ``g``: same function as B), on
  held-out pre-training text, for plain (``B' = B``) and each alignment variant; the
  *barrier* is the path's largest excess over the straight line between the endpoints'
  losses. Variants: the layer groups without and with attention-head permutations, the
  residual stream as a signed permutation or a rotation (after folding the norms), by
  weights or by activations, and *iterative weight matching* (implemented here, on the
  package's public pieces): coordinate descent between the residual transform (re-solved
  from every layer's reader columns and writer rows, in the layer-aligned coordinates, plus
  the embeddings) and the layer groups.
* **Transfer**: ``tau = skill - reference`` (init A) put into the target of init B (its own
  instruction-tuned model) with mergekit's plain ``task_arithmetic`` and with
  ``symmetry_aligned_task_arithmetic`` (``residual: permutation / orthogonal``, weights and
  activations), against the same-base transfer (the paper analog's setting) on the same
  seeds; the iterative alignment's transfer is built on state dicts (same formula).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the benchmarks' modules, and the repo's examples/
import paper_analog as pa  # noqa: E402
import report  # noqa: E402
import toyworld as tw  # noqa: E402
from examples.common import mean_kl, run_recipe  # noqa: E402

from mergekit_symalign import residual as res  # noqa: E402
from mergekit_symalign.activations import align_by_activations  # noqa: E402
from mergekit_symalign.architectures import architecture_for, geometry_from_config  # noqa: E402
from mergekit_symalign.spec import LayerSpec, LayerTransform, Switches, align_layer  # noqa: E402
from mergekit_symalign.statedict import (  # noqa: E402
    residual_transforms,
    spec_for_config,
    transform_state_dict,
)

StateDict = Dict[str, torch.Tensor]
BASES = ("base", "base-other-init")
TRANSFER_MODELS = ("base", "reference", "skill", "target", "base-other-init", "target-other-init")
CORRELATION_ROWS = 128  # calibration rows (of 64 tokens) the unit correlations are measured on
RESULTS_VERSION = 1  # bump when a measurement changes: invalidates cached results
ROUNDS = 5  # iterative weight matching: residual re-solves after the first pass

# name -> how B is aligned to A (None: plain). "weights": this file's weight matching (with
# rounds=0 and heads it is exactly the package's align_state_dict); "activations": the
# package's align_by_activations on the calibration tokens.
FUSION = {
    "plain": None,
    "layers, no heads": {"how": "weights", "residual": "none", "heads": False},
    "layers + heads": {"how": "weights", "residual": "none"},
    "+ residual permutation": {"how": "weights", "residual": "permutation"},
    "+ residual orthogonal": {"how": "weights", "residual": "orthogonal"},
    "iterative, permutation": {"how": "weights", "residual": "permutation", "rounds": ROUNDS},
    "iterative, orthogonal": {"how": "weights", "residual": "orthogonal", "rounds": ROUNDS},
    "act: layers + heads": {"how": "activations", "residual": "none"},
    "act: + residual permutation": {"how": "activations", "residual": "permutation"},
    "act: + residual orthogonal": {"how": "activations", "residual": "orthogonal"},
}

# Transfer rows: name -> (folder, mergekit parameters (None: plain task arithmetic), or
# "iterative" for the state-dict transfer after iterative weight matching).
TRANSFER = {
    "target + τ (plain task arithmetic)": ("plain", None),
    "target(w.align) + τ": ("weights", {}),
    "target(w.align, residual permutation) + τ": ("weights-rperm", {"residual": "permutation"}),
    "target(w.align, residual orthogonal) + τ": ("weights-rorth", {"residual": "orthogonal"}),
    "target(iterative w.align, orthogonal) + τ": ("iterative-rorth", "iterative"),
    "target(act.align, residual permutation) + τ": (
        "act-rperm", {"alignment": "activations", "residual": "permutation"}),
    "target(act.align, residual orthogonal) + τ": (
        "act-rorth", {"alignment": "activations", "residual": "orthogonal"}),
}
SAME_BASE = ("target + τ (plain task arithmetic)", "target(w.align) + τ",
             "target(w.align, residual orthogonal) + τ")


def config_for(width: int):
    return tw.model_config(hidden=width, intermediate=3 * width)


# --------------------------------------------------------------------------- state dicts


def load_state(path: Path) -> StateDict:
    from examples.common import load_tensors

    return {k: v.float() for k, v in load_tensors(path).items()}


def layer_names(config) -> List[int]:
    return list(range(config.num_hidden_layers))


def split_layers(sd: Mapping[str, torch.Tensor], layers: Sequence[int]) -> Dict[int, StateDict]:
    out: Dict[int, StateDict] = {i: {} for i in layers}
    for name, t in sd.items():
        if name.startswith("model.layers."):
            index, rel = name[len("model.layers."):].split(".", 1)
            out[int(index)][rel] = t
    return out


def relative_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    num = sum(float(((b[k].double() - a[k].double()) ** 2).sum()) for k in a)
    den = sum(float((a[k].double() ** 2).sum()) for k in a)
    return math.sqrt(num / den)


def layer_distances(a, b, config) -> List[float]:
    la, lb = split_layers(a, layer_names(config)), split_layers(b, layer_names(config))
    return [relative_distance(la[i], lb[i]) for i in layer_names(config)]


# --------------------------------------------------------------------------- weight matching


def _folded_readers(sd: Mapping[str, torch.Tensor], sites: res.ResidualSites, prefix: str):
    """Each reader's rows with its norm's weight folded into the columns (the form in which a
    residual transform, signed permutation or rotation, acts on them)."""
    for norm, readers in sites.readers:
        scale = sd[f"{prefix}{norm}.weight"].float() if norm else None
        for name in readers:
            w = sd[prefix + name].float()
            yield w * scale[None, :] if scale is not None else w


def residual_evidence(reference: StateDict, model: StateDict, config, arch, geometry,
                      layers: bool = True) -> res.ResidualStatistic:
    """The ``[D, D]`` statistic of the residual stream from weights: the same tokens'
    embedding and lm_head rows (the package's :func:`residual.embedding_statistic`) and, with
    ``layers``, every layer's reader rows (norms folded) and writer columns, with the layer
    groups already applied to ``model`` (so the rows and columns of the two models are the
    same neurons and heads)."""
    module = {n: reference[n] for n in (arch.embed, f"{arch.final_norm}.weight", arch.lm_head)}
    stat = res.embedding_statistic(module, {n: model[n] for n in module}, arch, False)
    if not layers:
        return stat
    sites = res.layer_sites(arch, geometry)
    for i in layer_names(config):
        prefix = f"model.layers.{i}."
        for a, b in zip(_folded_readers(reference, sites, prefix),
                        _folded_readers(model, sites, prefix)):
            stat.add(a, b)
        for name in sites.writers:
            stat.add(reference[prefix + name].float().T, model[prefix + name].float().T)
    return stat


def weight_matching(reference: StateDict, model: StateDict, config, residual: str = "none",
                    heads: bool = True, rounds: int = 0, switches: Switches = Switches(),
                    trace: Optional[List[Dict]] = None) -> Tuple[StateDict, Dict[Any, LayerTransform]]:
    """Align ``model`` to ``reference`` by weights: the residual stream first (embedding and
    lm_head rows), then every layer's group; then ``rounds`` times: re-solve the residual
    transform from all the evidence (:func:`residual_evidence`, in the coordinates the
    layer groups found) and the layer groups again in the new residual frame.

    ``rounds=0`` with ``heads`` is the package's :func:`statedict.align_state_dict`.
    ``heads=False`` leaves the attention-head permutations (outer blocks) out.
    ``trace``: a list that receives, per pass, the relative distance to the reference.
    """
    geometry = geometry_from_config(config)
    arch = architecture_for(geometry.model_type)
    spec = spec_for_config(config)
    if not heads:
        spec = LayerSpec(spec.architecture, tuple(b for b in spec.blocks if not b.outer))
    layers = layer_names(config)
    element = None
    if residual != "none":
        res.check_supported(arch, residual, False, config)
        element = res.solve(arch, residual, residual_evidence(reference, model, config, arch,
                                                              geometry, layers=False))
    reference_layers = split_layers(reference, layers)
    for step in range(rounds + 1):
        transforms: Dict[Any, LayerTransform] = {}
        current = model
        if element is not None:
            transforms = residual_transforms(model, reference, config, element)
            current = transform_state_dict(model, config, transforms)
        current_layers = split_layers(current, layers)
        layer_steps = {i: align_layer(spec, reference_layers[i], current_layers[i], switches)
                       for i in layers}
        for i in layers:
            transforms[i] = transforms[i].then(layer_steps[i]) if i in transforms else layer_steps[i]
        aligned = transform_state_dict(model, config, transforms)
        if trace is not None:
            trace.append({"round": step, "distance": relative_distance(reference, aligned),
                          "residual": "none" if element is None else element.mode})
        if step == rounds or element is None:
            break
        # The layer groups act on the other axes than the residual transform (rows of the
        # readers, columns of the writers), so they commute: apply them alone to the model
        # in its own residual frame, and re-solve the residual transform from everything.
        layered = transform_state_dict(model, config, layer_steps)
        element = res.solve(arch, residual, residual_evidence(reference, layered, config, arch,
                                                              geometry))
    return aligned, transforms


def residual_fit(paths: Dict[str, Path], config) -> Dict[str, Any]:
    """The one-pass weight-based ``residual: orthogonal`` decision (the package's
    :func:`residual.solve` on the embedding and lm_head rows, as in ``+ residual orthogonal``):
    the rotation's share of the best signed permutation's objective that it removes, against
    the noise limit it must beat (``groups.noise_limit`` for ``D (D - 1) / 2`` parameters over
    ``2 V D`` entries); below it the package keeps the signed permutation ("snapped")."""
    from mergekit_symalign.groups import noise_limit

    a, b = load_state(paths["base"]), load_state(paths["base-other-init"])
    geometry = geometry_from_config(config)
    arch = architecture_for(geometry.model_type)
    stat = residual_evidence(a, b, config, arch, geometry, layers=False)
    element = res.solve(arch, "orthogonal", stat)
    dim = config.hidden_size
    fit = element.fit
    return {"mode": element.mode, "entries": stat.entries, "vocab": config.vocab_size,
            "gain_share": fit.gain / fit.baseline if fit.baseline > 0 else 0.0,
            "threshold": noise_limit(dim * (dim - 1) // 2, max(stat.entries, 1))}


# --------------------------------------------------------------------------- activations


def calibration_ids(workdir: Path, world: tw.World, lines: int) -> torch.Tensor:
    """The toy world's calibration text (``paper_analog.write_calibration``), tokenized and
    packed into rows of 64 tokens as the plugin does."""
    from mergekit_symalign.calibration import load_calibration, tokenize_calibration

    workdir.mkdir(parents=True, exist_ok=True)
    path = pa.write_calibration(workdir / "calibration.txt", world, lines)
    tok = tw.save_tokenizer(workdir / "tokenizer")
    return tokenize_calibration({"toy": tok}, load_calibration(path, lines), max_tokens=64)


def activation_matching(reference: StateDict, model: StateDict, config, ids: torch.Tensor,
                        residual: str) -> StateDict:
    found = align_by_activations(reference.__getitem__, {"model": model.__getitem__}, config,
                                 ids, residual=residual, progress=False)
    return transform_state_dict(model, config, found["model"])


# --------------------------------------------------------------------------- losses


def eval_batches(world: tw.World, examples: int, exclude: set, batch_size: int = 64):
    """Held-out pre-training text (the bases' training mixture, its own random draw)."""
    rng = random.Random(20_250_610)
    sample = tw.mixture(pa.PRETRAINING_TASKS, world, 1 - pa.PRETRAINING_INSTRUCTIONS)
    rows = []
    while len(rows) < examples:
        ex = sample(rng)
        if ex[0] not in exclude:
            rows.append(ex)
    return [tw.batch(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def mean_loss(model, batches) -> float:
    """Token-weighted mean next-token cross-entropy on the completions."""
    total, count = 0.0, 0
    for ids, mask, labels in batches:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        keep = target != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep].float(), target[keep],
                                                         reduction="sum"))
        count += int(keep.sum())
    return total / count


def interpolate(a: StateDict, b: StateDict, alpha: float) -> StateDict:
    return {k: (1 - alpha) * a[k] + alpha * b[k] for k in a}


def path_losses(model, a: StateDict, b: StateDict, alphas: Sequence[float], batches) -> List[float]:
    out = []
    for alpha in alphas:
        model.load_state_dict(interpolate(a, b, alpha))
        out.append(mean_loss(model, batches))
    return out


def barrier(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """The path's largest excess over the straight line between its endpoints' losses."""
    return max(l - ((1 - a) * losses[0] + a * losses[-1]) for a, l in zip(alphas, losses))


@torch.no_grad()
def unit_correlations(model, a: StateDict, b: StateDict, ids: torch.Tensor) -> Dict[str, float]:
    """Mean per-unit Pearson correlation, A vs B' on the calibration tokens, of the residual
    stream's coordinates (every layer's input and the last layer's output, before the final
    norm) and of the MLP neurons (``down_proj``'s input)."""
    def record(sd):
        model.load_state_dict(sd)
        mlp: Dict[int, List[torch.Tensor]] = {}
        hooks = [layer.mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, i=i: mlp.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
            for i, layer in enumerate(model.model.layers)]
        hidden: List[List[torch.Tensor]] = []
        try:
            for start in range(0, ids.shape[0], 16):
                out = model(input_ids=ids[start:start + 16], output_hidden_states=True)
                hidden.append([h.reshape(-1, h.shape[-1]) for h in out.hidden_states[:-1]])
        finally:
            for h in hooks:
                h.remove()
        stream = [torch.cat([rows[j] for rows in hidden]) for j in range(len(hidden[0]))]
        return stream, [torch.cat(mlp[i]) for i in sorted(mlp)]

    def corr(x, y):
        x, y = x - x.mean(0), y - y.mean(0)
        den = (x.norm(dim=0) * y.norm(dim=0)).clamp_min(1e-12)
        return float(((x * y).sum(0) / den).mean())

    (sa, ma), (sb, mb) = record(a), record(b)
    # hidden_states[0] is the embedding output; the rest are layer outputs (the next layer's
    # input); the last one (after the final norm in HF) is left out above.
    return {"residual_corr": statistics.mean(corr(x, y) for x, y in zip(sa[1:], sb[1:])),
            "embedding_corr": corr(sa[0], sb[0]),
            "mlp_corr": statistics.mean(corr(x, y) for x, y in zip(ma, mb))}


# --------------------------------------------------------------------------- fusion


def fusion_pair(paths: Dict[str, Path], config, ids: torch.Tensor, batches, alphas,
                variants: Mapping[str, Optional[Dict]]) -> Dict[str, Dict]:
    """Every variant's path between the two bases: losses, barrier, diagnostics."""
    from transformers import LlamaForCausalLM

    a, b = load_state(paths["base"]), load_state(paths["base-other-init"])
    model = LlamaForCausalLM(config).eval()
    out: Dict[str, Dict] = {}
    for name, how in variants.items():
        t = time.perf_counter()
        trace: List[Dict] = []
        if how is None:
            aligned = b
        elif how["how"] == "weights":
            aligned, _ = weight_matching(a, b, config, how["residual"], how.get("heads", True),
                                         how.get("rounds", 0), trace=trace)
        else:
            aligned = activation_matching(a, b, config, ids, how["residual"])
        align_s = time.perf_counter() - t
        losses = path_losses(model, a, aligned, alphas, batches)
        row = {"losses": losses, "barrier": barrier(alphas, losses), "align_s": align_s,
               "distance": relative_distance(a, aligned),
               "layer_distances": layer_distances(a, aligned, config),
               **unit_correlations(model, a, aligned, ids[:CORRELATION_ROWS])}
        if trace:
            row["trace"] = trace
        out[name] = row
        print(f"    {name:<28} barrier {row['barrier']:.3f}  loss(1/2) "
              f"{losses[len(losses) // 2]:.3f}  ends {losses[0]:.3f}/{losses[-1]:.3f}  "
              f"dist {row['distance']:.3f}  corr resid {row['residual_corr']:.2f} "
              f"mlp {row['mlp_corr']:.2f}  ({align_s:.0f} s)", flush=True)
    return out


PARTS_VARIANTS = ("plain", "iterative, orthogonal", "act: layers + heads",
                  "act: + residual orthogonal")


def model_parts(config) -> Dict[str, Callable[[str], bool]]:
    """The pieces of a model that :func:`fusion_parts` interpolates one at a time."""
    parts = {"embeddings": lambda k: k == "model.embed_tokens.weight"}
    for i in layer_names(config):
        parts[f"layer {i}"] = lambda k, i=i: k.startswith(f"model.layers.{i}.")
    parts["final norm + lm_head"] = lambda k: k in ("model.norm.weight", "lm_head.weight")
    return parts


def fusion_parts(paths: Dict[str, Path], config, ids: torch.Tensor, batches,
                 names: Sequence[str] = PARTS_VARIANTS) -> Dict[str, Dict[str, float]]:
    """Where the barrier lives: model A with only one part replaced by the midpoint
    ``(A + B') / 2`` of that part; the loss above A's own, per part and variant."""
    from transformers import LlamaForCausalLM

    a, b = load_state(paths["base"]), load_state(paths["base-other-init"])
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(a)
    own = mean_loss(model, batches)
    out = {}
    for name in names:
        how = FUSION[name]
        if how is None:
            aligned = b
        elif how["how"] == "weights":
            aligned, _ = weight_matching(a, b, config, how["residual"], how.get("heads", True),
                                         how.get("rounds", 0))
        else:
            aligned = activation_matching(a, b, config, ids, how["residual"])
        middle = interpolate(a, aligned, 0.5)
        row = {}
        for part, inside in model_parts(config).items():
            model.load_state_dict({k: middle[k] if inside(k) else a[k] for k in a})
            row[part] = mean_loss(model, batches) - own
        out[name] = row
        print(f"    parts, {name:<26} " + "  ".join(f"{p} {v:.2f}" for p, v in row.items()),
              flush=True)
    return out


# --------------------------------------------------------------------------- transfer


def save_state(state: StateDict, config, path: Path) -> Path:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    model.save_pretrained(str(path), safe_serialization=True)
    tw.save_tokenizer(path)
    return path


def transfer_seed(root: Path, paths: Dict[str, Path], config, problems, calibration: Path,
                  variants: Mapping[str, Tuple[str, Any]], seed: int) -> List[Dict]:
    from transformers import LlamaForCausalLM

    def logp(name, tasks):
        model = LlamaForCausalLM.from_pretrained(str(paths[name]), dtype=torch.float32).eval()
        return tw.completion_logprobs(model, [ex for t in tasks for ex in problems[t]])

    reference, skill = load_state(paths["reference"]), load_state(paths["skill"])
    tau_norm = relative_distance(reference, skill)
    skill_logp = logp("skill", ["add"])
    rows = [{"seed": seed, "setting": "models", "variant": n,
             **pa.score(paths[n], problems, skill_logp, None)} for n in ("reference", "skill")]
    settings = {"same base": "target", "other init": "target-other-init"}
    for setting, target in settings.items():
        target_logp = logp(target, pa.OWN_TASKS)
        target_sd = load_state(paths[target])
        rows.append({"seed": seed, "setting": setting, "variant": "target",
                     "distance_to_reference": relative_distance(reference, target_sd),
                     "tau": tau_norm, **pa.score(paths[target], problems, skill_logp, target_logp)})
        for variant, (folder, params) in variants.items():
            if setting == "same base" and variant not in SAME_BASE:
                continue
            out = root / "merges" / f"{target}--{folder}"
            t = time.perf_counter()
            extra: Dict[str, float] = {}
            if params == "iterative":
                trace: List[Dict] = []
                aligned, _ = weight_matching(reference, target_sd, config, "orthogonal",
                                             rounds=ROUNDS, trace=trace)
                merged = {k: aligned[k] + skill[k] - reference[k] for k in aligned}
                save_state(merged, config, out)
                extra["distance_to_reference"] = trace[-1]["distance"]
            else:
                run_recipe(pa.recipe(params, paths[target], paths["reference"], paths["skill"],
                                     calibration), out, lazy_unpickle=False)
                if params is not None:  # how far the aligned target is from the reference
                    merged = load_state(out)
                    how = ("activations" if params.get("alignment") == "activations"
                           else "weights")
                    if how == "weights":
                        aligned, _ = weight_matching(reference, target_sd, config,
                                                     params.get("residual", "none"))
                        extra["distance_to_reference"] = relative_distance(reference, aligned)
                        # the merge through mergekit computes what the state-dict formula
                        # computes (its output frame differs; its function must not)
                        check = {k: aligned[k] + skill[k] - reference[k] for k in aligned}
                        extra["statedict_check_kl"] = check_same_function(out, check, config,
                                                                          problems)
            wall = time.perf_counter() - t
            row = {"seed": seed, "setting": setting, "variant": variant, "merge_s": wall,
                   **extra, **pa.score(Path(out), problems, skill_logp, target_logp)}
            rows.append(row)
            print(f"  seed {seed} {setting:>10} | {variant:<44} skill {row['skill']:.2f} "
                  f"own {row['own']:.2f} shared {row['shared']:.2f} KL(skill) "
                  f"{row['kl_skill']:.3f} KL(target) {row['kl_target']:.3f}", flush=True)
    return rows


@torch.no_grad()
def check_same_function(folder: Path, state: StateDict, config, problems) -> float:
    """KL between the merged checkpoint and ``state`` (same formula, maybe another frame)."""
    from transformers import LlamaForCausalLM

    merged = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    mine = LlamaForCausalLM(config).eval()
    mine.load_state_dict(state)
    examples = [ex for t in tw.TASKS for ex in problems[t][:20]]
    return mean_kl(tw.completion_logprobs(merged, examples), tw.completion_logprobs(mine, examples))


# --------------------------------------------------------------------------- report


def mean_se(values: Sequence[float], digits: int = 2, percent: bool = False) -> str:
    values = [v * 100 if percent else v for v in values]
    m = statistics.mean(values)
    unit = " %" if percent else ""
    fmt = f"{{:.{0 if percent else digits}f}}"
    if len(values) < 2:
        return fmt.format(m) + unit
    se = statistics.stdev(values) / math.sqrt(len(values))
    return f"{fmt.format(m)} ± {fmt.format(se)}{unit}"


def se(values: Sequence[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def fusion_table(pairs: List[Dict], width: int) -> str:
    sel = [p for p in pairs if p["width"] == width]
    lines = [f"**Width {width}** ({len(sel)} seed pair{'s' if len(sel) != 1 else ''}; "
             f"endpoint losses {mean_se([p['variants']['plain']['losses'][0] for p in sel])} / "
             f"{mean_se([p['variants']['plain']['losses'][-1] for p in sel])} nats):", "",
             "| variant | barrier (nats) | barrier / plain | loss at α = ½ | distance to A | "
             "residual corr. | MLP corr. | align (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in FUSION:
        rows = [p["variants"][name] for p in sel if name in p["variants"]]
        if not rows:
            continue
        plain = [p["variants"]["plain"]["barrier"] for p in sel if name in p["variants"]]
        mid = [r["losses"][len(r["losses"]) // 2] for r in rows]
        ratio = [r["barrier"] / b for r, b in zip(rows, plain)]
        lines.append(
            f"| {name} | {mean_se([r['barrier'] for r in rows])} | "
            f"{'' if name == 'plain' else mean_se(ratio, percent=True)} | {mean_se(mid)} | "
            f"{mean_se([r['distance'] for r in rows])} | {mean_se([r['residual_corr'] for r in rows])} | "
            f"{mean_se([r['mlp_corr'] for r in rows])} | {statistics.mean(r['align_s'] for r in rows):.1f} |")
    return "\n".join(lines)


def ratio_table(pairs: List[Dict], widths: Sequence[int]) -> str:
    head = "| variant | " + " | ".join(f"width {w}" for w in widths) + " |"
    lines = [head, "|---|" + "---:|" * len(widths)]
    for name in FUSION:
        if name == "plain":
            cells = [mean_se([p["variants"]["plain"]["barrier"] for p in pairs if p["width"] == w])
                     + " nats" for w in widths]
            lines.append("| plain barrier | " + " | ".join(cells) + " |")
            continue
        cells = []
        for w in widths:
            vals = [p["variants"][name]["barrier"] / p["variants"]["plain"]["barrier"]
                    for p in pairs if p["width"] == w and name in p["variants"]]
            cells.append(mean_se(vals, percent=True) if vals else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def iterative_table(pairs: List[Dict], widths: Sequence[int]) -> str:
    lines = ["| width | residual | distance to A, one pass | after each re-solve | barrier, one pass "
             "→ iterative |", "|---:|---|---:|---|---|"]
    for w in widths:
        sel = [p for p in pairs if p["width"] == w]
        for mode, once in (("permutation", "+ residual permutation"),
                           ("orthogonal", "+ residual orthogonal")):
            name = f"iterative, {mode}"
            traces = [p["variants"][name]["trace"] for p in sel if name in p["variants"]]
            if not traces:
                continue
            steps = min(len(t) for t in traces)
            by_round = [statistics.mean(t[r]["distance"] for t in traces) for r in range(steps)]
            b1 = [p["variants"][once]["barrier"] for p in sel]
            b2 = [p["variants"][name]["barrier"] for p in sel]
            lines.append(f"| {w} | {mode} | {by_round[0]:.3f} | "
                         + " → ".join(f"{d:.3f}" for d in by_round[1:])
                         + f" | {mean_se(b1)} → {mean_se(b2)} |")
    return "\n".join(lines)


def parts_table(pairs: List[Dict], widths: Sequence[int]) -> str:
    names = [n for n in PARTS_VARIANTS]
    parts = list(pairs[0]["parts"][names[0]])
    lines = ["| width | variant | whole model at ½ | " + " | ".join(parts) + " |",
             "|---:|---|---:|" + "---:|" * len(parts)]
    for w in widths:
        sel = [p for p in pairs if p["width"] == w and "parts" in p]
        for name in names:
            whole = [p["variants"][name]["losses"][len(p["variants"][name]["losses"]) // 2]
                     - p["variants"][name]["losses"][0] for p in sel]
            cells = [mean_se([p["parts"][name][part] for p in sel]) for part in parts]
            lines.append(f"| {w} | {name} | {mean_se(whole)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def transfer_table(rows: List[Dict], setting: str, width: int) -> str:
    lines = ["| model | skill: add | target's own: rev, sort | shared: copy, next | "
             "KL(skill ‖ ·) on add | KL(target ‖ ·) on own | distance to reference |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    order = ["reference", "skill", "target", *TRANSFER]
    for variant in order:
        sel = [r for r in rows if r["width"] == width and r["variant"] == variant
               and (r["setting"] == setting or (r["setting"] == "models" and setting == "same base"))]
        if not sel:
            continue
        cells = [mean_se([r[k] for r in sel]) if k in sel[0] else "" for k in
                 ("skill", "own", "shared", "kl_skill", "kl_target", "distance_to_reference")]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def snap_note(pairs: List[Dict], widths: Sequence[int]) -> str:
    """Whether the one-pass weight-based rotation was kept, per width (from ``residual_fit``)."""
    lines = ["| width | rotation kept (pairs) | its gain, share of the permutation's objective "
             "| noise limit it must beat | entries (2 × vocab × width) |",
             "|---:|---:|---:|---:|---:|"]
    for w in widths:
        fits = [p["residual_fit"] for p in pairs if p["width"] == w and "residual_fit" in p]
        if not fits:
            continue
        kept = sum(f["mode"] == "orthogonal" for f in fits)
        lines.append(f"| {w} | {kept} / {len(fits)} | {mean_se([f['gain_share'] for f in fits])} "
                     f"| {statistics.mean(f['threshold'] for f in fits):.2f} | "
                     f"{fits[0]['entries']} |")
    return "\n".join(lines)


def fusion_verdict(pairs: List[Dict], widths: Sequence[int]) -> str:
    """The goal (aligned barrier <= 30 % of plain at the widest width), per width's best."""
    out = []
    for w in widths:
        sel = [p for p in pairs if p["width"] == w]
        ratios = {name: [p["variants"][name]["barrier"] / p["variants"]["plain"]["barrier"]
                         for p in sel if name in p["variants"]] for name in FUSION if name != "plain"}
        best = min((n for n in ratios if ratios[n]), key=lambda n: statistics.mean(ratios[n]))
        out.append(f"width {w}: plain {mean_se([p['variants']['plain']['barrier'] for p in sel])} "
                   f"nats, best variant *{best}* {mean_se([p['variants'][best]['barrier'] for p in sel])}"
                   f" nats = {mean_se(ratios[best], percent=True)} of plain")
    w = max(widths)
    sel = [p for p in pairs if p["width"] == w]
    means = {n: statistics.mean(p["variants"][n]["barrier"] / p["variants"]["plain"]["barrier"]
                                for p in sel) for n in FUSION if n != "plain"}
    met = min(means.values()) <= 0.30
    return ("**Goal 1, barrier ≤ 30 % of plain at the widest width ("
            f"{w}): {'met' if met else 'not met'}.** Best variant per width (chosen after the "
            "fact among all variants, so optimistic): " + "; ".join(out) + ".")


def transfer_verdict(rows: List[Dict], width: int) -> str:
    """The goal (cross-init skill gain >= half the same-base transfer's), per variant."""
    seeds = sorted({r["seed"] for r in rows if r["width"] == width})

    def get(setting, variant, seed):
        for r in rows:
            if (r["width"], r["setting"], r["variant"], r["seed"]) == (width, setting, variant, seed):
                return r
        return None

    def gains(setting, variant):
        return [get(setting, variant, s)["skill"] - get(setting, "target", s)["skill"]
                for s in seeds if get(setting, variant, s)]

    def own(setting, variant):
        return [get(setting, variant, s)["own"] - get(setting, "target", s)["own"]
                for s in seeds if get(setting, variant, s)]

    same = gains("same base", "target + τ (plain task arithmetic)")
    lines = ["| setting | model | skill gain over its target | own-task change |",
             "|---|---|---:|---:|"]
    for setting, variants in (("same base", SAME_BASE), ("other init", list(TRANSFER))):
        for v in variants:
            g = gains(setting, v)
            if g:
                lines.append(f"| {setting} | {v} | {mean_se(g)} | {mean_se(own(setting, v))} |")
    other = {v: statistics.mean(gains("other init", v)) for v in TRANSFER if gains("other init", v)}
    best = max(other, key=other.get)
    half = statistics.mean(same) / 2
    met = other[best] >= half and statistics.mean(same) > 0
    return "\n".join([
        f"**Goal 2, cross-init skill gain ≥ ½ of the same-base transfer's (width {width}): "
        f"{'met' if met else 'not met'}.** Same-base plain task arithmetic raises the skill "
        f"by {mean_se(same)} over its target (half: {half:.2f}); the best cross-init variant, "
        f"*{best}*, by {other[best]:.3f}. Gains and own-task changes are per seed against the "
        "target the vector was added to (mean ± SE):", "", *lines])


def plot_paths(pairs: List[Dict], widths: Sequence[int], alphas) -> str:
    plt = report.pyplot()
    shown = ["plain", "layers + heads", "+ residual permutation", "+ residual orthogonal",
             "iterative, orthogonal", "act: + residual orthogonal"]
    fig, axes = plt.subplots(1, len(widths), figsize=(5.2 * len(widths), 4.2), squeeze=False)
    for ax, w in zip(axes[0], widths):
        sel = [p for p in pairs if p["width"] == w]
        for name in shown:
            curves = [p["variants"][name]["losses"] for p in sel if name in p["variants"]]
            if not curves:
                continue
            mean = [statistics.mean(c[i] for c in curves) for i in range(len(alphas))]
            err = [se([c[i] for c in curves]) for i in range(len(alphas))]
            line, = ax.plot(alphas, mean, marker=".", label=name)
            ax.fill_between(alphas, [m - e for m, e in zip(mean, err)],
                            [m + e for m, e in zip(mean, err)], color=line.get_color(), alpha=0.15)
        ax.set_title(f"width {w} ({len(sel)} pairs)", fontsize=10)
        ax.set_xlabel("α  (0: model A, 1: model B aligned to A)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out loss (nats/token), mean ± SE")
    axes[0][0].legend(fontsize=8)
    return report.save_figure(fig, "independent_init_paths.png")


def plot_ratios(pairs: List[Dict], widths: Sequence[int]) -> str:
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for name in FUSION:
        if name == "plain":
            continue
        xs, ms, es = [], [], []
        for w in widths:
            vals = [p["variants"][name]["barrier"] / p["variants"]["plain"]["barrier"] * 100
                    for p in pairs if p["width"] == w and name in p["variants"]]
            if vals:
                xs.append(w), ms.append(statistics.mean(vals)), es.append(se(vals))
        style = "--" if name.startswith("act") else "-"
        ax.errorbar(xs, ms, yerr=es, marker="o", ls=style, capsize=3, label=name)
    ax.axhline(30, color="k", lw=1, ls=":", label="goal: 30 % of plain")
    ax.axhline(100, color="grey", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(widths))
    ax.set_xticklabels([str(w) for w in widths])
    ax.set_xlabel("hidden width (MLP 3×, 4 layers)")
    ax.set_ylabel("barrier / plain barrier (%), mean ± SE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return report.save_figure(fig, "independent_init_barrier_ratio.png")


def plot_transfer(rows: List[Dict], width: int) -> str:
    plt = report.pyplot()
    bars = [("same base", "target + τ (plain task arithmetic)", "same base: plain TA"),
            ("same base", "target(w.align) + τ", "same base: w.align")]
    bars += [("other init", "target", "other init: target")]
    bars += [("other init", v, "other init: " + v.replace("target", "").replace(" + τ", "")
              .replace("(plain task arithmetic)", "plain TA").strip()) for v in TRANSFER]
    fig, ax = plt.subplots(figsize=(11, 4.6))
    width_bar = 0.38
    for k, (key, label, colour) in enumerate((("skill", "skill (add)", "tab:blue"),
                                              ("own", "target's own (rev, sort)", "tab:orange"))):
        ms, es = [], []
        for setting, variant, _ in bars:
            vals = [r[key] for r in rows if r["width"] == width and r["setting"] == setting
                    and r["variant"] == variant]
            ms.append(statistics.mean(vals) if vals else 0), es.append(se(vals) if vals else 0)
        ax.bar([i + (k - 0.5) * width_bar for i in range(len(bars))], ms, width_bar, yerr=es,
               capsize=3, label=label, color=colour)
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([b[2] for b in bars], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("exact-match accuracy (mean ± SE)")
    ax.set_title(f"skill vector of init A onto a target of init B (width {width})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return report.save_figure(fig, f"independent_init_transfer_w{width}.png")


# --------------------------------------------------------------------------- main


def parse_widths(items: Sequence[str], seeds: int) -> List[Tuple[int, int]]:
    """``128 256 512:2`` -> [(128, seeds), (256, seeds), (512, 2)]."""
    out = []
    for item in items:
        width, _, n = str(item).partition(":")
        out.append((int(width), int(n) if n else seeds))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--widths", nargs="+", default=["128", "256"],
                    help="hidden widths of the fusion sweep; WIDTH:N runs N seeds at that width")
    ap.add_argument("--transfer-widths", nargs="*", type=int, default=[128],
                    help="widths at which the whole family is trained and the transfer measured")
    ap.add_argument("--points", type=int, default=21, help="points on the linear path")
    ap.add_argument("--eval-examples", type=int, default=128,
                    help="held-out pre-training examples the path's loss is measured on")
    ap.add_argument("--calibration", type=int, default=600,
                    help="calibration lines for activation matching and the correlations")
    ap.add_argument("--problems", type=int, default=200, help="held-out problems per task")
    ap.add_argument("--workdir", default="bench-output/independent-init")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: widths 32 and 48, 1 seed, tiny schedules, few points")
    ap.add_argument("--no-docs", action="store_true", help="print only; don't rewrite docs/")
    ap.add_argument("--from-results", action="store_true",
                    help="don't train or measure: report the workdir's saved results.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    scale = 1.0
    if args.quick:  # smaller defaults; what is given explicitly stays
        scale = 0.02
        quick = {"points": 5, "eval_examples": 32, "problems": 5, "calibration": 200,
                 "widths": ["32", "48"], "transfer_widths": [32], "seeds": 1}
        for key, value in quick.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    widths = parse_widths(args.widths, args.seeds)
    workdir = Path(args.workdir).resolve()
    world = tw.World()
    problems = {t: tw.held_out(t, args.problems) for t in tw.TASKS}
    exclude = {p for exs in problems.values() for p, _ in exs}
    alphas = [i / (args.points - 1) for i in range(args.points)]
    start = time.perf_counter()
    if args.from_results:
        saved = json.loads((workdir / "results.json").read_text())
    else:
        batches = eval_batches(world, args.eval_examples, exclude)
        ids = calibration_ids(workdir, world, args.calibration)
        calibration = pa.write_calibration(workdir / "calibration-transfer.txt", world)
        pairs, transfer_rows, timings = [], [], {}
        fusion_key = {"version": RESULTS_VERSION, "points": args.points,
                      "eval_examples": args.eval_examples, "calibration": args.calibration,
                      "variants": list(FUSION), "scale": scale}
        transfer_key = {"version": RESULTS_VERSION, "problems": args.problems,
                        "variants": list(TRANSFER), "scale": scale}
        for width, seeds in widths:
            config = config_for(width)
            for seed in range(seeds):
                root = workdir / f"w{width}" / f"seed{seed}"
                family = TRANSFER_MODELS if width in args.transfer_widths else BASES
                t = time.perf_counter()
                paths = pa.build_family(root, seed, scale, world, exclude, config=config,
                                        models=family)
                trained = time.perf_counter() - t
                if trained > 5:  # something was trained (not just reused): keep its time
                    log = root / "train_s.json"
                    before = json.loads(log.read_text()) if log.is_file() else 0.0
                    log.write_text(json.dumps(before + trained))
                timings[f"w{width}-seed{seed}-train"] = (
                    json.loads((root / "train_s.json").read_text())
                    if (root / "train_s.json").is_file() else None)
                pair = cached_result(root / "fusion.json", fusion_key)
                if pair is None:
                    print(f"width {width} seed {seed}: fusion of base and base-other-init",
                          flush=True)
                    t = time.perf_counter()
                    pair = {"width": width, "seed": seed,
                            "variants": fusion_pair(paths, config, ids, batches, alphas, FUSION),
                            "wall_s": time.perf_counter() - t}
                    store_result(root / "fusion.json", fusion_key, pair)
                if "residual_fit" not in pair:  # cheap: embedding rows only
                    pair["residual_fit"] = residual_fit(paths, config)
                    store_result(root / "fusion.json", fusion_key, pair)
                if "parts" not in pair:
                    t = time.perf_counter()
                    pair["parts"] = fusion_parts(paths, config, ids, batches)
                    pair["wall_s"] += time.perf_counter() - t
                    store_result(root / "fusion.json", fusion_key, pair)
                pairs.append(pair)
                timings[f"w{width}-seed{seed}-fusion"] = pair["wall_s"]
                if width in args.transfer_widths:
                    rows = cached_result(root / "transfer.json", transfer_key)
                    if rows is None:
                        t = time.perf_counter()
                        rows = [{"width": width, **row} for row in transfer_seed(
                            root, paths, config, problems, calibration, TRANSFER, seed)]
                        rows[0]["wall_s"] = time.perf_counter() - t
                        store_result(root / "transfer.json", transfer_key, rows)
                    transfer_rows += rows
                    timings[f"w{width}-seed{seed}-transfer"] = rows[0]["wall_s"]
        saved = {"pairs": pairs, "transfer": transfer_rows, "alphas": alphas,
                 "wall_s": time.perf_counter() - start, "timings": timings,
                 "args": vars(args), "date": datetime.date.today().isoformat(),
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                            f"torch {torch.__version__}, {args.threads} thread(s)"}
        (workdir / "results.json").write_text(json.dumps(saved, indent=1))
    text = render(saved)
    print(text)
    if not args.no_docs:
        images = plots(saved)
        report.update_page("independent-init.md", "independent_init",
                           text + "\n\n" + "\n\n".join(images))
        print("wrote docs/independent-init.md and its", len(images), "plots under docs/img/")
    return 0


def cached_result(path: Path, key: Dict):
    """A result saved by an earlier run with the same settings (None otherwise)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["result"] if saved.get("key") == key else None


def store_result(path: Path, key: Dict, result) -> None:
    path.write_text(json.dumps({"key": key, "result": result}, indent=1))


def timing_note(saved: Dict) -> str:
    """Where the time went (summed over seeds; cached steps count with the time they took)."""
    t = saved.get("timings", {})

    def total(kind):
        vals = [v for k, v in t.items() if k.endswith(kind) and v]
        return sum(vals) / 60

    return (f"Compute (1 thread, on a machine shared with other jobs): training "
            f"{total('-train'):.0f} min where recorded, fusion measurements "
            f"{total('-fusion'):.0f} min, transfers {total('-transfer'):.0f} min; this "
            f"invocation {saved['wall_s'] / 60:.0f} min (everything already in the workdir is "
            f"reused).")


def command(saved: Dict) -> str:
    a = saved["args"]
    parts = [".venv/bin/python benchmarks/independent_init.py", f"--seeds {a['seeds']}",
             "--widths " + " ".join(a["widths"])]
    if a["transfer_widths"] != [128]:
        parts.append("--transfer-widths " + " ".join(map(str, a["transfer_widths"])))
    return " ".join(parts)


def render(saved: Dict) -> str:
    pairs, rows, alphas = saved["pairs"], saved["transfer"], saved["alphas"]
    widths = sorted({p["width"] for p in pairs})
    a = saved["args"]
    cfg = config_for(widths[0])
    text = [
        f"Llama, {cfg.num_hidden_layers} layers, GQA {cfg.num_attention_heads}/"
        f"{cfg.num_key_value_heads} heads (head_dim = width / 4), MLP 3 × width, untied "
        f"embeddings; bases trained as the paper analog's (800 steps, batch 32). Linear path: "
        f"{len(alphas)} points, loss on {a['eval_examples']} held-out pre-training examples; "
        f"activation matching and correlations on {a['calibration']} calibration lines. "
        f"Regenerate: `{command(saved)}` ({saved['date']}; {saved['machine']}). "
        + timing_note(saved),
        "",
        "**Barrier / plain barrier against width** (mean ± SE over seed pairs; the goal is "
        "30 %):", "", ratio_table(pairs, widths), "",
    ]
    text += [fusion_verdict(pairs, widths), ""]
    if any("residual_fit" in p for p in pairs):
        text += ["**Was the weight-based rotation kept?** `+ residual orthogonal` is the "
                 "package's one-pass solve from the embedding and lm_head rows of the toy "
                 "vocabulary only; the package keeps a rotation only where it removes a larger "
                 "share of the signed permutation's objective than a fit of its D (D − 1) / 2 "
                 "parameters would remove from noise, and otherwise uses the signed "
                 "permutation (then the row equals `+ residual permutation`):", "",
                 snap_note(pairs, widths), ""]
    for w in widths:
        text += [fusion_table(pairs, w), ""]
    text += ["**Iterative weight matching** (mean relative distance ‖B' − A‖ / ‖A‖ over all "
             f"tensors after the first pass and after each of {ROUNDS} residual re-solves; "
             "barrier mean ± SE):", "", iterative_table(pairs, widths), ""]
    if all("parts" in p for p in pairs):
        text += ["**Where the barrier is**: model A with one part replaced by the midpoint "
                 "(A + B') / 2 of that part, loss above A's own (nats; mean ± SE). The first "
                 "column is the whole midpoint's excess over A:", "",
                 parts_table(pairs, widths), ""]
    for w in sorted({r["width"] for r in rows}):
        n = len({r["seed"] for r in rows if r["width"] == w})
        text += [f"**Transfer at width {w}** ({n} seeds; {a['problems']} held-out problems per "
                 "task). Target from the reference's own base (the paper analog's setting):", "",
                 transfer_table(rows, "same base", w), "",
                 "Target from the other random initialisation:", "",
                 transfer_table(rows, "other init", w), "",
                 transfer_verdict(rows, w), ""]
    return "\n".join(text).strip()


def plots(saved: Dict) -> List[str]:
    pairs = saved["pairs"]
    widths = sorted({p["width"] for p in pairs})
    images = [f"![loss along the linear path]({plot_paths(pairs, widths, saved['alphas'])})",
              f"![barrier ratio against width]({plot_ratios(pairs, widths)})"]
    for w in sorted({r["width"] for r in saved["transfer"]}):
        images.append(f"![transfer accuracy]({plot_transfer(saved['transfer'], w)})")
    return images


if __name__ == "__main__":
    sys.exit(main())

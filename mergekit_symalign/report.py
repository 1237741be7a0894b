"""The alignment report: what alignment did, per (model, reference) pair and layer.

The measurement (how far a transform is from the identity, a layer's distances before and
after) is :mod:`.measure`'s; this module is the report itself: :func:`run_report` plans a
recipe with mergekit's own planner (so it refuses exactly what the merge refuses, and streams
layers through mergekit's lazy loaders), executes only the alignment tasks, and
:func:`write_report` writes ``report.json``, ``report.md`` and PNG plots.
``mergekit-symalign report`` (:mod:`.cli`) is the command.

Identity: a layer's transform is the identity when every permutation maps each slot to itself,
every sign is +1, every scale satisfies ``|s - 1| <= tol`` and every rotation or orthogonal
matrix ``||R - I||_F / sqrt(k) <= tol`` (``tol`` = :data:`IDENTITY_TOLERANCE` unless given).
Such an alignment changes no weight, so the aligned merge is the plain method's merge.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .measure import (  # noqa: F401  (the measurement, re-exported for the report's callers)
    IDENTITY_TOLERANCE,
    distances_before_after,
    layer_record,
    step_summary,
    summarize_transform,
)

# A pair whose alignment moves weights but brings no layer closer to the reference by more than
# this fraction is reported as "already in the reference's coordinates" (what moved fits noise).
NOISE_REDUCTION = 0.1
TOLERANCE_TEXT = (
    "a layer's alignment is the identity when every permutation maps each slot to itself, "
    "every sign is +1, every scale has |s - 1| <= {tol:g} and every rotation "
    "||R - I||_F / sqrt(k) <= {tol:g}"
)


# --------------------------------------------------------------------------- the document


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def build_report(records: Iterable[Mapping[str, Any]], *, method: str, wrapped: str,
                 alignment: str = "weights", tol: float = IDENTITY_TOLERANCE,
                 not_aligned: Sequence[str] = (), recipe: Optional[str] = None,
                 seconds: Optional[float] = None, versions: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """The report document (``report.json``) from the collected layer records."""
    pairs: Dict[Tuple[str, str], List[Mapping[str, Any]]] = {}
    for record in records:
        pairs.setdefault((record["model"], record["reference"]), []).append(record)
    out_pairs = []
    for (model, reference), layers in pairs.items():
        layers = sorted(layers, key=lambda r: (r["layer"], r["prefix"]))
        before = [r["distance_before"] for r in layers]
        after = [r["distance_after"] for r in layers]
        timed = [r["seconds"] for r in layers if r.get("seconds") is not None]
        out_pairs.append({
            "model": model,
            "reference": reference,
            "identity": all(r["identity"] for r in layers),
            "layers_moved": sum(not r["identity"] for r in layers),
            "layers_total": len(layers),
            "distance_before_median": _median(before),
            "distance_after_median": _median(after),
            "distance_before_max": max(before, default=0.0),
            "distance_after_max": max(after, default=0.0),
            "seconds": sum(timed) if timed else None,
            # the model-level residual-stream transform (the same in every layer's steps)
            "residual": next(([x for x in r["symmetries"] if x["name"].startswith("residual.")]
                              for r in layers if any(x["name"].startswith("residual.")
                                                     for x in r["symmetries"])), None),
            "layers": [dict(r) for r in layers],
        })
    report = {
        "method": method,
        "wrapped": wrapped,
        "alignment": alignment,
        "recipe": recipe,
        "tolerance": tol,
        "identity_definition": TOLERANCE_TEXT.format(tol=tol),
        "identity": all(p["identity"] for p in out_pairs),
        "pairs": out_pairs,
        "not_aligned": list(not_aligned),
        "seconds": seconds,
        "versions": dict(versions or {}),
    }
    report["verdict"] = verdict(report)
    return report


def pair_kind(pair: Mapping[str, Any]) -> str:
    """``identity``, ``noise`` (moves, but no layer gets more than :data:`NOISE_REDUCTION`
    closer to the reference) or ``aligned``."""
    if pair["identity"]:
        return "identity"
    if all(r["distance_after"] >= (1 - NOISE_REDUCTION) * r["distance_before"]
           for r in pair["layers"]):
        return "noise"
    return "aligned"


def _biggest_change(pair: Mapping[str, Any]) -> Mapping[str, Any]:
    return max(pair["layers"], key=lambda r: r["distance_before"] - r["distance_after"])


def pair_line(pair: Mapping[str, Any], tol: float) -> str:
    kind = pair_kind(pair)
    name = f"{pair['model']} -> {pair['reference']}"
    before, after = pair["distance_before_median"], pair["distance_after_median"]
    if kind == "identity":
        return (f"{name}: alignment is the identity in all {pair['layers_total']} layers "
                f"(tolerance {tol:g}): nothing moves (distance {before:.4g}).")
    moved = f"{pair['layers_moved']} of {pair['layers_total']} layers move"
    if kind == "noise":
        lower = 1 - after / before if before else 0.0
        return (f"{name}: {moved}, but the distance to the reference only goes from "
                f"{before:.4g} to {after:.4g} (median over layers, {lower:.1%} lower): the "
                f"coordinates already agree; what moves "
                f"is fitted to the models' differences, not a symmetry between them.")
    big = _biggest_change(pair)
    return (f"{name}: {moved}; distance to the reference {before:.4g} -> {after:.4g} "
            f"(median over layers; largest change at layer {big['layer']}: "
            f"{big['distance_before']:.4g} -> {big['distance_after']:.4g}).")


def verdict(report: Mapping[str, Any]) -> List[str]:
    """The printed verdict: one line per pair, then the conclusion."""
    tol, wrapped = report["tolerance"], report["wrapped"]
    pairs = report["pairs"]
    lines = [pair_line(p, tol) for p in pairs]
    if not pairs:
        lines.append(f"no model is aligned by this recipe (align: false everywhere): the merge "
                     f"is plain {wrapped}.")
    elif all(p["identity"] for p in pairs):
        lines.append(f"alignment is the identity for every layer: plain {wrapped} gives the "
                     f"same merge.")
    else:
        kinds = [pair_kind(p) for p in pairs]
        moved = sum(p["layers_moved"] for p in pairs)
        total = sum(p["layers_total"] for p in pairs)
        of = f"{moved} of the {total} aligned layers ({len(pairs)} model{'s' * (len(pairs) > 1)})"
        if "aligned" in kinds:
            lines.append(f"alignment moves {of} and brings them closer to the reference: the "
                         f"models' coordinates differ, and the aligned merge differs from plain "
                         f"{wrapped}.")
        else:
            lines.append(f"alignment moves {of} but barely changes their distance to the "
                         f"reference: the models already share coordinates, and plain {wrapped} "
                         f"gives nearly the same merge.")
    return lines


# --------------------------------------------------------------------------- markdown and plots


def fmt(x: Optional[float]) -> str:
    """A distance or time, short: 3 significant digits, exponent outside [1e-3, 1e4)."""
    if x is None:
        return ""
    if x == 0:
        return "0"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def moved_text(record: Mapping[str, Any]) -> str:
    """``mlp.neurons 79/80, attn.vo_rotation 2/2 (max 171°), ...`` for a layer record."""
    parts = []
    for s in record["symmetries"]:
        if s["moved"] == 0:
            continue
        if s["moved"] is None:
            parts.append(f"{s['name']} (?)")
            continue
        detail = ""
        if "max_angle_deg" in s:
            detail = f" (max {s['max_angle_deg']:.3g}°)"
        elif "min" in s and s["kind"] != "sign":
            detail = f" ({fmt(s['min'])}..{fmt(s['max'])})"
        parts.append(f"{s['name']} {s['moved']}/{s['slots']}{detail}")
    return ", ".join(parts) or "nothing"


def markdown(report: Mapping[str, Any], images: Sequence[Tuple[str, str]] = (),
             note: str = "") -> str:
    """``report.md``: verdict, a table per pair and per layer, the plots."""
    versions = report.get("versions") or {}
    lines = ["# Alignment report", ""]
    what = f"`{report['method']}` (plain method: `{report['wrapped']}`), alignment: {report['alignment']}"
    if report.get("recipe"):
        what = f"Recipe `{report['recipe']}`: " + what
    if versions:
        what += "; " + ", ".join(f"{k} {v}" for k, v in versions.items())
    lines += [what + ".", ""]
    lines += ["**Verdict**", ""] + [f"* {line}" for line in report["verdict"]] + [""]
    if report["pairs"]:
        lines += ["| model | reference | identity | layers moved | distance before (median / max) "
                  "| after (median / max) | align time (s) |",
                  "|---|---|---|---|---|---|---|"]
        for p in report["pairs"]:
            lines.append(
                f"| `{p['model']}` | `{p['reference']}` | {'yes' if p['identity'] else 'no'} "
                f"| {p['layers_moved']} / {p['layers_total']} "
                f"| {fmt(p['distance_before_median'])} / {fmt(p['distance_before_max'])} "
                f"| {fmt(p['distance_after_median'])} / {fmt(p['distance_after_max'])} "
                f"| {fmt(p['seconds'])} |")
        lines.append("")
    if report.get("not_aligned"):
        lines += ["Used as they are (`align: false`): "
                  + ", ".join(f"`{m}`" for m in report["not_aligned"]) + ".", ""]
    lines += [f"Distance: ||model − reference|| / ||reference|| over the layer's tensors that the "
              f"symmetries move. Identity: {report['identity_definition']}.", ""]
    child_images = [(alt, path) for alt, path in images if path == "child.png"]
    for alt, path in images:
        if (alt, path) not in child_images:
            lines += [f"![{alt}]({path})", ""]
    if note:
        lines += [note, ""]
    child = report.get("pruned_child")
    if child:
        lines += [f"## Pruned child `{child['model']}` → `{child['reference']}`", "",
                  "Share explained: 1 − ‖child − restrict(parent)‖² / ‖child‖² over the layer's "
                  "weight matrices (1: the parent's slice unchanged; 0 or below: nothing in common).", "",
                  "| child layer | parent layer | share explained |", "|---:|---:|---:|"]
        lines += [f"| {r['child_layer']} | {r['parent_layer']} | {r['explained']:.3f} |"
                  for r in child["layers"]]
        lines.append("")
        lines += [line for alt, path in child_images for line in (f"![{alt}]({path})", "")]
    for p in report["pairs"]:
        lines += [f"## `{p['model']}` → `{p['reference']}`", "",
                  "| layer | distance before | after | what moved | time (s) |",
                  "|---:|---:|---:|---|---:|"]
        for r in p["layers"]:
            lines.append(f"| {r['layer']} | {fmt(r['distance_before'])} | "
                         f"{fmt(r['distance_after'])} | {moved_text(r)} | {fmt(r['seconds'])} |")
        lines.append("")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# What the plots need, as a line that works before the package is on PyPI (its `report` extra
# is the same pin).
PLOTS_NEED = "pip install 'matplotlib>=3.8'"


def _layer_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")


def _short(name: str, width: int = 40) -> str:
    """One trimmed label: the start and end of a long name, never a bare truncated path."""
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: keep // 3] + "…" + name[-(keep - keep // 3):]


def short_names(names: Sequence[str], width: int = 40) -> Dict[str, str]:
    """Legend labels: each model by its last path component (a Hub id's repository name, a
    local folder's name), with as many parent components as it takes to tell them apart."""
    parts = {n: [p for p in n.replace("\\", "/").split("/") if p] or [n] for n in names}
    depth = dict.fromkeys(names, 1)
    while True:
        labels = {n: "/".join(parts[n][-depth[n]:]) for n in names}
        clashing = [n for n in names if list(labels.values()).count(labels[n]) > 1
                    and depth[n] < len(parts[n])]
        if not clashing:
            return {n: _short(label, width) for n, label in labels.items()}
        for n in clashing:
            depth[n] += 1


def _plot_distances(plt, pairs, labels, path: Path) -> None:
    """How far each layer is from the reference, before (solid) and after (dashed)."""
    floor = 1e-12  # log scale: an exact recovery or identical weights sit at the floor
    fig, ax = plt.subplots(figsize=(8, 3.6), layout="constrained")
    for i, p in enumerate(pairs):
        layers = [r["layer"] for r in p["layers"]]
        color = f"C{i % 10}"
        ax.plot(layers, [max(r["distance_before"], floor) for r in p["layers"]], marker="o",
                markersize=3, color=color, label=f"{labels[p['model']]}: before")
        ax.plot(layers, [max(r["distance_after"], floor) for r in p["layers"]], marker="x",
                markersize=5, linestyle="--", color=color,
                label=f"{labels[p['model']]}: after" + (" (= before)" if p["identity"] else ""))
    ax.set_yscale("log")
    drawn = [max(r[k], floor) for p in pairs for r in p["layers"]
             for k in ("distance_before", "distance_after")]
    if drawn and max(drawn) < 10 * min(drawn):  # under a decade: widen to a decade's tick
        ax.set_ylim(min(drawn) / 3, max(drawn) * 3)
    _layer_axis(ax)
    ax.set_ylabel("‖model − ref‖ / ‖ref‖")
    at_floor = any(r["distance_after"] < floor for p in pairs for r in p["layers"])
    ax.set_title(f"distance to the reference ({labels[pairs[0]['reference']]}) per layer"
                 + (f" (below {floor:g} drawn at {floor:g})" if at_floor else ""), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    # beside the axes, never over the data
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _moved_grid(pair) -> Tuple[List[str], List[int], List[List[float]]]:
    """Symmetry names, layers, and [symmetry][layer] fractions moved (NaN: not recorded)."""
    names = list(dict.fromkeys(s["name"] for r in pair["layers"] for s in r["symmetries"]))
    layers = [r["layer"] for r in pair["layers"]]
    grid = []
    for name in names:
        row = []
        for r in pair["layers"]:
            s = next((s for s in r["symmetries"] if s["name"] == name), None)
            fraction = 0.0 if s is None else s.get("moved_fraction")
            row.append(float("nan") if fraction is None else float(fraction))
        grid.append(row)
    return names, layers, grid


def _plot_moved(plt, pairs, labels, path: Path) -> None:
    """What moved: per pair, a symmetry × layer grid of the fraction of slots moved; the pairs
    whose alignment is the identity are named in one sentence instead of empty grids."""
    grids = {p["model"]: _moved_grid(p) for p in pairs}
    moved = [p for p in pairs if any(v > 0 for row in grids[p["model"]][2] for v in row)]
    still = [p for p in pairs if p not in moved]
    heights = [1.0 + 0.3 * len(grids[p["model"]][0]) for p in moved] + ([0.5] if still else [])
    fig, axes = plt.subplots(len(heights), 1, figsize=(8, sum(heights) + 0.3), squeeze=False,
                             height_ratios=heights, layout="constrained")
    image = None
    for ax, p in zip(axes[:, 0], moved):
        names, layers, grid = grids[p["model"]]
        # grey: a symmetry whose moved fraction was not recorded
        cmap = plt.get_cmap("Blues").with_extremes(bad="lightgrey")
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0,
                          interpolation="nearest",
                          extent=(layers[0] - 0.5, layers[-1] + 0.5, len(names) - 0.5, -0.5))
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
        ax.set_title(f"{labels[p['model']]}: {p['layers_moved']} of {p['layers_total']} layers "
                     f"moved", fontsize=9)
        _layer_axis(ax)
    if still:
        ax = axes[-1, 0]
        ax.axis("off")
        names = ", ".join(labels[p["model"]] for p in still)
        ax.text(0.0, 0.5, f"Nothing moved in any layer (the alignment is the identity): {names}.",
                fontsize=9, va="center", ha="left", wrap=True, transform=ax.transAxes)
    if image is not None:
        fig.colorbar(image, ax=list(axes[: len(moved), 0]), fraction=0.03, pad=0.02,
                     label="fraction of slots moved")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_child(plt, child, path: Path) -> None:
    """A pruned child: per child layer, the share of it explained by its matched parent layer
    (the parent layer's index written on the bar); the layers below the verdict's threshold in
    a warning colour."""
    from .crosssize_planning import FAR_EXPLAINED

    rows = child["layers"]
    ticks = ["embed,\nnorm,\nhead" if r["child_layer"] == "module" else str(r["child_layer"])
             for r in rows]
    shares = [float(r["explained"]) for r in rows]
    low = min(0.0, min(shares, default=0.0))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.3 * len(rows) + 2.5), 3.8), layout="constrained")
    colors = ["C3" if v < FAR_EXPLAINED else "C0" for v in shares]
    bars = ax.bar(range(len(rows)), shares, color=colors, width=0.7)
    ax.axhline(FAR_EXPLAINED, color="grey", linestyle=":", linewidth=1,
               label=f"{FAR_EXPLAINED}: below it (red), the child layer is far from its parent")
    fig.legend(fontsize=7, loc="outside lower right", frameon=False)  # never over the bars
    for bar, r in zip(bars, rows):
        if r["parent_layer"] == "module":
            continue
        # above the bar, or at the axis for a share at or below zero
        ax.text(bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 0.0) + 0.02,
                str(r["parent_layer"]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(ticks, fontsize=7)
    ax.set_xlabel("child layer (number on the bar: the parent layer it was matched to)")
    ax.set_ylabel("share explained")
    ax.set_ylim(low - 0.05 if low < 0 else 0.0, 1.12)
    labels = short_names([child["model"], child["reference"]])
    ax.set_title(f"pruned child {labels[child['model']]} ← parent {labels[child['reference']]}\n"
                 f"share of each child layer explained: 1 − ‖child − restrict(parent)‖² / ‖child‖²",
                 fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(report: Mapping[str, Any], out_dir: Path) -> List[Tuple[str, str]]:
    """``distance.png`` (how far each layer is from the reference, before and after) and
    ``moved.png`` (what each symmetry moved, per layer), or for a pruned child ``child.png``
    (per child layer, its matched parent layer and the share of the child it explains);
    ``[(caption, file name)]``, empty without matplotlib (then the terminal is told how to
    install it)."""
    pairs = report["pairs"]
    child = report.get("pruned_child")
    if not pairs and not child:
        return []
    plt = pyplot()
    if plt is None:
        print(f"Plots skipped: matplotlib is not installed ({PLOTS_NEED}).", file=sys.stderr)
        return []
    images = []
    if pairs:
        labels = short_names(list(dict.fromkeys(
            [p["model"] for p in pairs] + [p["reference"] for p in pairs])))
        _plot_distances(plt, pairs, labels, out_dir / "distance.png")
        _plot_moved(plt, pairs, labels, out_dir / "moved.png")
        images += [("distance to the reference per layer, before and after alignment",
                    "distance.png"),
                   ("fraction of each symmetry's slots (neurons, KV groups, RoPE planes) moved, "
                    "per layer", "moved.png")]
    if child:
        _plot_child(plt, child, out_dir / "child.png")
        images.append(("share of each child layer explained by its matched parent layer",
                       "child.png"))
    return images


def write_report(report: Mapping[str, Any], out_dir) -> Dict[str, str]:
    """Write ``report.json``, the plots and ``report.md`` into ``out_dir`` (created here)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out_dir / "report.json"), "markdown": str(out_dir / "report.md")}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    images = write_plots(report, out_dir)
    note = "" if images or not (report["pairs"] or report.get("pruned_child")) else (
        f"(Plots skipped: matplotlib is not installed; `{PLOTS_NEED}`.)")
    (out_dir / "report.md").write_text(markdown(report, images, note))
    for _caption, name in images:
        paths[Path(name).stem] = str(out_dir / name)
    return paths


# --------------------------------------------------------------------------- running it


def versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    out = {"mergekit-symalign": __version__}
    try:
        out["mergekit"] = version("mergekit")
    except PackageNotFoundError:
        pass
    return out


def alignment_tasks(targets) -> List[Any]:
    """The collecting alignment tasks reachable from ``targets`` (a planned graph)."""
    from .collect import COLLECTING

    found, seen, stack = [], set(), list(targets)
    while stack:
        task = stack.pop()
        if id(task) in seen:
            continue
        seen.add(id(task))
        if isinstance(task, COLLECTING):
            found.append(task)
            continue
        stack.extend(task.arguments().values())
    return found


def run_report(config, options=None, recipe: Optional[str] = None,
               tol: float = IDENTITY_TOLERANCE) -> Dict[str, Any]:
    """Align what ``config`` (a ``MergeConfiguration`` of a ``symmetry_aligned_*`` method)
    would align, without merging; returns the report document (nothing is written).

    Runs what ``mergekit.merge.run_merge`` runs up to execution (its checks, the loader
    cache, mergekit's planner with the plugin's plan-time checks), then executes only the
    alignment tasks of the planned graph (and the loads they need) with mergekit's executor.
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import MergeOptions, _model_out_config
    from mergekit.merge_methods import registry
    from mergekit.plan import MergePlanner

    from . import collect
    from .errors import SymAlignConfigError
    from .methods import SymmetryAlignedMerge
    from .settings import recipe_setting

    options = options or MergeOptions()
    method = registry.get(config.merge_method)
    if not isinstance(method, SymmetryAlignedMerge):
        raise SymAlignConfigError(
            f"the report describes what a symmetry_aligned_* merge aligns; this recipe's "
            f"merge_method is {config.merge_method}. Set merge_method: symmetry_aligned_"
            f"{config.merge_method} to see what alignment would do to it."
        )
    if not config.models and not config.slices and not config.modules:
        raise RuntimeError("No output requested")  # as run_merge
    start = time.perf_counter()
    arch_info = get_architecture_info(config, options)
    loader_cache = LoaderCache()
    loader_cache.setup(options=options)
    cfg_out = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    for model in config.referenced_models():
        loader_cache.get(model)
    models = [str(m) for m in config.referenced_models()]
    alignment = recipe_setting(config.parameters, "alignment")
    key = collect.register(config, tol, for_report=True)
    try:
        planner = MergePlanner(config, arch_info, options=options, out_model_config=cfg_out)
        planner._plan()  # the hooked planner: the plugin's checks, then mergekit's planning
        if planner.__dict__["_symalign_planning"].cross_size is not None:  # a pruned child:
            return _child_report(planner, method, config, recipe, tol, start)  # solved in _plan
        tasks = alignment_tasks(task for _weight, task in planner._tensors)
        executor = Executor(tasks, math_device=options.device,
                            storage_device=options.device if options.low_cpu_memory else "cpu")
        for _task, _transform in executor.run(quiet=options.quiet, desc="Aligning"):
            pass
        records = collect.get(key).records
    finally:
        collect.release(key)
    involved = {r["model"] for r in records} | {r["reference"] for r in records}
    return build_report(
        records, method=method.spec.name, wrapped=method.wrapped, alignment=alignment, tol=tol,
        not_aligned=[m for m in models if m not in involved],
        recipe=recipe, seconds=time.perf_counter() - start, versions=versions(),
    )


def _child_report(planner, method, config, recipe, tol, start) -> Dict[str, Any]:
    cross_size = planner.__dict__["_symalign_planning"].cross_size
    from .crosssize_planning import card_section, child_verdict
    from .settings import recipe_setting

    card_section(config)  # planned for the report, not a card
    document = build_report([], method=method.spec.name, wrapped=method.wrapped,
                            alignment=recipe_setting(config.parameters, "alignment"), tol=tol,
                            recipe=recipe, seconds=time.perf_counter() - start, versions=versions())
    document["pruned_child"] = cross_size.report_entry()
    document["verdict"] = child_verdict(document["pruned_child"])
    return document


__all__ = [
    "IDENTITY_TOLERANCE", "build_report", "distances_before_after", "layer_record", "markdown",
    "run_report", "step_summary", "summarize_transform", "verdict", "write_plots", "write_report",
]

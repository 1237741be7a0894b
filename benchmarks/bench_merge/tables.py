"""What the benchmark writes to docs/performance.md: the merge table, its chart and the
8B-shaped layer's table."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Dict, List, NamedTuple, Optional

import torch

from benchmarks import docs_pages

PAGE = "performance.md"


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}")


def merge_table(rows: List[dict], lb: float, gpu_columns: bool = False,
                distance_column: bool = False) -> str:
    """Markdown of a suite's rows (medians and ranges; memory also in layers of ``lb`` MiB),
    each against the first row (plain). ``gpu_columns``: the CUDA caching allocator's peak
    (``torch.cuda.max_memory_allocated`` in each merge's process, --cuda).
    ``distance_column``: the model card's median distance after alignment ("—" for plain)."""
    t0, m0, a0, g0 = rows[0]["t"], rows[0]["rss"], rows[0]["anon"], rows[0]["gpu"]
    lines = ["| method | wall time (s) | time vs plain | time vs plain, run by run | "
             "peak anonymous memory (MiB) | anonymous vs plain | peak RSS (MiB) | RSS vs plain |"
             + (" peak GPU memory (MiB) | GPU vs plain |" if gpu_columns else "")
             + (" distance after |" if distance_column else ""),
             "|---|---:|---:|---:|---:|---|---:|---|" + ("---:|---|" if gpu_columns else "")
             + ("---:|" if distance_column else "")]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['t']:.1f} ({r['t_min']:.1f}–{r['t_max']:.1f}) | {r['t'] / t0:.2f}x | "
            f"{r['paired']:.2f}x ({r['paired_min']:.2f}–{r['paired_max']:.2f}) | "
            f"{r['anon']:.0f} ({r['anon_min']:.0f}–{r['anon_max']:.0f}) | "
            f"{r['anon'] - a0:+.0f} MiB = {(r['anon'] - a0) / lb:+.1f} layers | "
            f"{r['rss']:.0f} ({r['rss_min']:.0f}–{r['rss_max']:.0f}) | "
            f"{r['rss'] - m0:+.0f} MiB = {(r['rss'] - m0) / lb:+.1f} layers |"
            + (f" {r['gpu']:.0f} ({r['gpu_min']:.0f}–{r['gpu_max']:.0f}) | "
               f"{r['gpu'] - g0:+.0f} MiB = {(r['gpu'] - g0) / lb:+.1f} layers |"
               if gpu_columns else "")
            + (f" {_distance(r.get('distance_after'))} |" if distance_column else ""))
    return "\n".join(lines)


def _distance(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.3g}"


def cost_plot(rows, title, name) -> str:
    """Two panels: wall time and peak anonymous memory of each method relative to plain
    task_arithmetic."""
    plt = docs_pages.pyplot()
    _, t0, m0 = rows[0]
    methods = [r[0] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    panels = (("wall time vs plain (x)", [t / t0 for _, t, _ in rows], [f"{t:.1f} s" for _, t, _ in rows]),
              ("peak anonymous memory vs plain (x)", [m / m0 for _, _, m in rows],
               [f"{m:.0f} MiB" for _, _, m in rows]))
    ys = list(range(len(methods)))
    for ax, (label, ratios, absolute) in zip(axes, panels):
        ax.barh(ys, ratios, color=[plt.get_cmap("tab10")(i) for i in ys])
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        for y, r, a in zip(ys, ratios, absolute):
            ax.text(r, y, f" {r:.2f}x ({a})", va="center", fontsize=8)
        ax.set_xlim(0, max(ratios) * 1.45)
        ax.set_xlabel(label)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels(methods)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    return docs_pages.save_figure(fig, name)


class LayerResult(NamedTuple):
    """One dtype's figures of the 8B-shaped layer (medians of the repeats)."""

    dtype: str
    timings: Dict[str, float]  # per symmetry
    total: float  # wall time of align_layer
    err: float  # recovery, max |aligned - anchor| / max |anchor|
    record: float  # the card/report record
    totals: List[float]  # every run's total


def layer_table(where: str, results: List[LayerResult]) -> str:
    """Markdown for one device's per-symmetry alignment times of the 8B-shaped layer, one
    column per dtype."""
    unit = "CPU" if where.startswith("cpu") else "CUDA"
    lines = [f"On {where}, torch {torch.__version__}, median of {len(results[0].totals)} runs; "
             f"recovery, max |aligned − anchor| / max |anchor| over the layer's tensors after all "
             f"symmetries: " + ", ".join(f"{r.err:.1e} ({r.dtype})" for r in results) + ".", "",
             "| symmetry | " + " | ".join(f"{unit} time, {r.dtype} (s)" for r in results) + " |",
             "|---|" + "---:|" * len(results)]
    for name in results[0].timings:
        lines.append(f"| {name} | " + " | ".join(f"{r.timings[name]:.2f}" for r in results) + " |")
    lines.append("| **total** (runs) | " + " | ".join(
        f"**{r.total:.2f}** ({', '.join(f'{x:.2f}' for x in r.totals)})" for r in results) + " |")
    lines.append("| card/report record (distances before and after) | " + " | ".join(
        f"{r.record:.2f} ({100 * r.record / r.total:.0f} % of the solve)" for r in results) + " |")
    return "\n".join(lines)

"""The plots of docs/independent-init.md (under docs/img/)."""

from __future__ import annotations

import statistics
from typing import Dict, List, Sequence

from benchmarks import docs_pages
from benchmarks.independent_init.tables import se
from benchmarks.independent_init.variants import FUSION, TRANSFER


def plot_paths(pairs: List[Dict], widths: Sequence[int], alphas) -> str:
    plt = docs_pages.pyplot()
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
    return docs_pages.save_figure(fig, "independent_init_paths.png")


def plot_ratios(pairs: List[Dict], widths: Sequence[int]) -> str:
    plt = docs_pages.pyplot()
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
    return docs_pages.save_figure(fig, "independent_init_barrier_ratio.png")


def plot_transfer(rows: List[Dict], width: int) -> str:
    plt = docs_pages.pyplot()
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
    return docs_pages.save_figure(fig, f"independent_init_transfer_w{width}.png")


def plots(saved: Dict) -> List[str]:
    pairs = saved["pairs"]
    widths = sorted({p["width"] for p in pairs})
    images = [f"![loss along the linear path]({plot_paths(pairs, widths, saved['alphas'])})",
              f"![barrier ratio against width]({plot_ratios(pairs, widths)})"]
    for w in sorted({r["width"] for r in saved["transfer"]}):
        images.append(f"![transfer accuracy]({plot_transfer(saved['transfer'], w)})")
    return images

"""Per-layer relative distance to the anchor, before and after alignment, on the real model.

    .venv/bin/python -m benchmarks.layer_distances [--sibling demo-output/models/sibling] [--no-docs]

Anchor: SmolLM2-135M-Instruct. Targets: the anchor under a random exact symmetry, and a
fine-tuned sibling (the demo's, when given; otherwise a copy perturbed by 1 % noise) under
another one. Distance = ||T - A|| / ||A|| over the tensors the symmetries move; time = the
weight alignment of that layer (CPU, this process's threads). The table and a per-layer plot
go to docs/layer-distances.md (region `layer_distances`) unless --no-docs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks import docs_pages
from examples import smollm
from mergekit_symalign.architectures import split_layer_name, ARCHITECTURES
from mergekit_symalign.spec import align_layer, layer_distance
from mergekit_symalign.statedict import scramble_state_dict, spec_for_config
from tests.support import perturbed


def by_layer(sd):
    arch = ARCHITECTURES["llama"]
    layers = {}
    for name, t in sd.items():
        split = split_layer_name(arch, name)
        if split:
            layers.setdefault(split[1], {})[split[2]] = t
    return layers


def distance_plot(per_layer, label) -> str:
    plt = docs_pages.pyplot()
    fig, axes = plt.subplots(1, len(per_layer), figsize=(4 * len(per_layer), 3.8), sharey=True)
    for ax, (name, (before, after)) in zip(axes, per_layer.items()):
        layers = range(len(before))
        ax.plot(layers, before, marker="o", markersize=3, label="before alignment")
        ax.plot(layers, after, marker="x", markersize=4, linestyle="--", label="after alignment")
        ax.set_yscale("log")
        ax.set_title(f"target: {name}", fontsize=10)
        ax.set_xlabel("decoder layer")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("relative distance ||T - A|| / ||A||")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct: per-layer distance to the anchor; {label}", fontsize=10)
    return docs_pages.save_figure(fig, "layer_distances.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sibling", help="folder of a fine-tuned sibling (e.g. the demo's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not write docs/")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = smollm.load_smollm2(torch.float32)
    anchor = {k: v.clone() for k, v in model.state_dict().items()}
    if args.sibling:
        sib, _ = smollm.load_pretrained(args.sibling)
        sibling = sib.state_dict()
        label = f"sibling ({args.sibling})"
    else:
        sibling = perturbed(anchor, seed=0, scale=0.01)
        label = "sibling (anchor + 1 % noise)"
    spec = spec_for_config(model.config)
    targets = {
        "anchor, scrambled": scramble_state_dict(anchor, model.config, seed=1)[0],
        "sibling, unscrambled": sibling,
        "sibling, scrambled": scramble_state_dict(sibling, model.config, seed=2)[0],
    }
    a_layers = by_layer(anchor)
    header = (f"SmolLM2-135M-Instruct, {len(a_layers)} layers; {label}; torch threads "
              f"{torch.get_num_threads()}")
    lines = ["| target | distance before (mean / max over layers) | after (mean / max) | "
             "align time per layer (mean s) |",
             "|---|---|---|---|"]
    per_layer = {}
    for name, sd in targets.items():
        before, after, times = [], [], []
        for idx, layer in sorted(by_layer(sd).items()):
            t = time.perf_counter()
            transform = align_layer(spec, a_layers[idx], layer)
            times.append(time.perf_counter() - t)
            before.append(layer_distance(spec, a_layers[idx], layer))
            after.append(layer_distance(spec, a_layers[idx], transform.apply(layer)))
        per_layer[name] = (before, after)
        lines.append(f"| {name} | {statistics.mean(before):.4f} / {max(before):.4f} | "
                     f"{statistics.mean(after):.2e} / {max(after):.2e} | {statistics.mean(times):.3f} |")
    table = "\n".join(lines)
    print(header)
    print(table)
    print("\nper layer (before -> after):")
    for name, (before, after) in per_layer.items():
        print(f"  {name}: " + ", ".join(f"{i}:{b:.3f}->{a:.3g}" for i, (b, a) in enumerate(zip(before, after))))
    if args.no_docs:
        return
    image = distance_plot(per_layer, label)
    caption = (f"{header}. Distance: ||T − A|| / ||A|| over the tensors the symmetries move, "
               f"anchor A = SmolLM2-135M-Instruct; time: weight alignment of one layer on CPU "
               f"(indicative only; timings proper are in performance.md).")
    path = docs_pages.update_page(
        "layer-distances.md", "layer_distances",
        f"{caption}\n\n{table}\n\n![Per-layer distance to the anchor before and after alignment]({image})\n")
    print(f"\nwrote {path} and docs/{image}")


if __name__ == "__main__":
    main()

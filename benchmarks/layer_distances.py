"""Per-layer relative distance to the anchor, before and after alignment, on the real model.

    .venv/bin/python benchmarks/layer_distances.py [--sibling demo-output/models/sibling]

Anchor: SmolLM2-135M-Instruct. Targets: the anchor under a random exact symmetry, and a
fine-tuned sibling (the demo's, when given; otherwise a copy perturbed by 1 % noise) under
another one. Distance = ||T - A|| / ||A|| over the tensors the symmetries move; time = the
weight alignment of that layer (CPU, this process's threads).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mergekit_symalign import smollm
from mergekit_symalign.architectures import split_layer_name, ARCHITECTURES
from mergekit_symalign.spec import align_layer, layer_distance
from mergekit_symalign.statedict import scramble_state_dict, spec_for_config


def by_layer(sd):
    arch = ARCHITECTURES["llama"]
    layers = {}
    for name, t in sd.items():
        split = split_layer_name(arch, name)
        if split:
            layers.setdefault(split[1], {})[split[2]] = t
    return layers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sibling", help="folder of a fine-tuned sibling (e.g. the demo's)")
    args = parser.parse_args(argv)
    model, _ = smollm.load_smollm2(torch.float32)
    anchor = {k: v.clone() for k, v in model.state_dict().items()}
    if args.sibling:
        sib, _ = smollm.load_pretrained(args.sibling)
        sibling = sib.state_dict()
        label = f"sibling ({args.sibling})"
    else:
        g = torch.Generator().manual_seed(0)
        sibling = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g) for k, v in anchor.items()}
        label = "sibling (anchor + 1 % noise)"
    spec = spec_for_config(model.config)
    targets = {
        "anchor, scrambled": scramble_state_dict(anchor, model.config, seed=1)[0],
        "sibling, unscrambled": sibling,
        "sibling, scrambled": scramble_state_dict(sibling, model.config, seed=2)[0],
    }
    a_layers = by_layer(anchor)
    print(f"SmolLM2-135M-Instruct, {len(a_layers)} layers; {label}; torch threads "
          f"{torch.get_num_threads()}")
    print("| target | distance before (mean / max over layers) | after (mean / max) | "
          "align time per layer (mean s) |")
    print("|---|---|---|---|")
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
        print(f"| {name} | {statistics.mean(before):.4f} / {max(before):.4f} | "
              f"{statistics.mean(after):.2e} / {max(after):.2e} | {statistics.mean(times):.3f} |")
    print("\nper layer (before -> after):")
    for name, (before, after) in per_layer.items():
        print(f"  {name}: " + ", ".join(f"{i}:{b:.3f}->{a:.3g}" for i, (b, a) in enumerate(zip(before, after))))


if __name__ == "__main__":
    main()

"""Cost of aligning a mixture of experts: one Mixtral-8x7B-shaped MoE layer (8 experts, top-2,
hidden 4096, 32/8 heads of 128), aligned vs plain in the same run.

    .venv/bin/python -m benchmarks.bench_moe                      # expert width 3584 (1/4)
    .venv/bin/python -m benchmarks.bench_moe --expert-width 14336 # Mixtral-8x7B's own width

Mixtral-8x7B's experts (width 14336) are 1.4 billion parameters per layer, 2.8 GB in bfloat16
per model; a merge holds three models and the working copies, more than a shared 2-core
machine with 23 GB can spare, so the default is a quarter of the width (the alignment's cost
per expert grows with the width; the experts' matching and count do not change). Each model
is one layer, bfloat16, vocabulary 512, saved in the fused layout mergekit writes.

Two measurements, alternating plain and aligned run by run (median of --repeats):

* whole merges through an unmodified ``mergekit-yaml`` (start-up included): mergekit's plain
  ``task_arithmetic`` onto the target, and ``symmetry_aligned_task_arithmetic`` onto the same
  target (a sibling of the reference moved by a random element of the whole group: experts,
  each expert's neurons and scales, heads, V/O and Q/K);
* the layer alignment alone (``spec.align_layer``, in this process), per symmetry kind.

Writes docs/moe-benchmark.md (unless --no-docs) with the command, the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tests.support import (
    aligned_recipe,
    load_tensors,
    perturbed,
    plain_transfer_recipe,
    run_mergekit_yaml,
)

ROOT = Path(__file__).resolve().parent.parent

PAGE = ROOT / "docs" / "moe-benchmark.md"


def mixtral_config(expert_width: int):
    from transformers import MixtralConfig

    config = MixtralConfig(vocab_size=512, hidden_size=4096, intermediate_size=expert_width,
                           num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8,
                           head_dim=128, num_local_experts=8, num_experts_per_tok=2,
                           rope_theta=1e6, tie_word_embeddings=False)
    config.architectures = ["MixtralForCausalLM"]
    return config


def build(workdir: Path, expert_width: int):
    """reference, skill (reference + noise), target (reference + other noise, moved by a
    random element of the whole group); bfloat16, fused layout."""
    from safetensors.torch import save_file
    from transformers import MixtralForCausalLM

    from mergekit_symalign.statedict import scramble_state_dict

    root = workdir / f"mixtral_w{expert_width}"
    names = ("reference", "skill", "target")
    if all((root / n / ".complete").is_file() for n in names):
        return {n: str(root / n) for n in names}
    config = mixtral_config(expert_width)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MixtralForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    reference = {k: ((1.0 + 0.1 * torch.randn(s, generator=g)) if "norm" in k
                     else 0.02 * torch.randn(s, generator=g)).to(torch.bfloat16)
                 for k, s in shapes.items()}
    models = {"reference": reference, "skill": perturbed(reference, seed=1, scale=0.01)}
    sibling = perturbed(reference, seed=2, scale=0.01)
    models["target"], _ = scramble_state_dict(sibling, config, seed=3)
    del sibling
    for name in names:
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
        config.torch_dtype = torch.bfloat16
        config.save_pretrained(path)
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in models[name].items()},
                  str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / ".complete").write_text("")
    return {n: str(root / n) for n in names}


def merge_times(paths, workdir: Path, repeats: int):
    recipes = {
        "plain task_arithmetic": plain_transfer_recipe(paths["target"], paths["reference"],
                                                       paths["skill"], dtype="bfloat16"),
        "symmetry_aligned_task_arithmetic": aligned_recipe(
            "symmetry_aligned_task_arithmetic", paths["target"], paths["reference"],
            [paths["skill"]], dtype="bfloat16"),
    }
    times = {name: [] for name in recipes}
    for run in range(repeats):
        for name, recipe in recipes.items():  # alternating, so a slow minute hits both
            with tempfile.TemporaryDirectory(dir=workdir) as tmp:
                merge = run_mergekit_yaml(recipe, Path(tmp) / "recipe.yml", Path(tmp) / "out",
                                          "--no-copy-tokenizer")
                times[name].append(merge.wall_s)
            print(f"  run {run + 1}: {name} {times[name][-1]:.1f} s", flush=True)
    return times


def layer_times(paths, repeats: int, expert_width: int):
    """spec.align_layer on the layer's tensors (bfloat16), per symmetry kind (median)."""
    from mergekit_symalign.statedict import _by_layer, spec_for_config
    from mergekit_symalign.architectures import architecture_for
    from mergekit_symalign.spec import align_layer

    config = mixtral_config(expert_width)
    spec = spec_for_config(config)
    arch = architecture_for("mixtral")
    ref = _by_layer(arch, load_tensors(paths["reference"]))[0][1]
    target = _by_layer(arch, load_tensors(paths["target"]))[0][1]
    groups = {"experts (whole)": "moe.experts", "per-expert neurons": ".neurons",
              "per-expert scales": ".neuron_scale", "heads": "attn.", }
    totals, per_group = [], {g: [] for g in groups}
    for _ in range(repeats):
        timings = {}
        t = time.perf_counter()
        aligned = align_layer(spec, ref, target, timings=timings)
        totals.append(time.perf_counter() - t)
        for label, key in groups.items():
            per_group[label].append(sum(v for k, v in timings.items()
                                        if (k.startswith(key) if key.endswith(".") or key == "moe.experts"
                                            else k.endswith(key) and k.startswith("moe.expert"))))
    moved = aligned.apply(target)
    err = max(float((moved[k].float() - ref[k].float()).norm() / ref[k].float().norm()) for k in ref)
    return statistics.median(totals), {k: statistics.median(v) for k, v in per_group.items()}, err


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def main(argv=None):
    parser = argparse.ArgumentParser(description="aligned vs plain merge of one Mixtral-shaped MoE layer")
    parser.add_argument("--expert-width", type=int, default=3584,
                        help="each expert's intermediate size (Mixtral-8x7B: 14336; default 3584)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=str(ROOT / ".bench_moe"))
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    paths = build(workdir, args.expert_width)
    print(f"models ready in {time.perf_counter() - t:.0f} s", flush=True)
    times = merge_times(paths, workdir, args.repeats)
    plain = statistics.median(times["plain task_arithmetic"])
    aligned = statistics.median(times["symmetry_aligned_task_arithmetic"])
    ratios = [a / p for a, p in zip(times["symmetry_aligned_task_arithmetic"], times["plain task_arithmetic"])]
    total, groups, err = layer_times(paths, 1, args.expert_width)
    command = "-m benchmarks.bench_moe" + (f" --expert-width {args.expert_width}" if args.expert_width != 3584 else "") \
        + (f" --repeats {args.repeats}" if args.repeats != 3 else "")
    experts_b = 8 * 3 * 4096 * args.expert_width / 1e9
    lines = [
        "# Cost of aligning a mixture of experts",
        "",
        f"<!-- written by `.venv/bin/python {command}`; do not edit by hand -->",
        "",
        f"One Mixtral-8x7B-shaped MoE layer: 8 experts (top-2) of width {args.expert_width}"
        f"{' (Mixtral-8x7B: 14336)' if args.expert_width != 14336 else ''}, hidden 4096, 32/8 "
        f"heads of 128, vocabulary 512, bfloat16 ({experts_b:.2f} B expert parameters). "
        f"Target: a sibling of the reference moved by a random element of the whole group. "
        f"Machine: {machine()}. Median of {args.repeats} runs, plain and aligned alternating.",
        "",
        "| merge (`mergekit-yaml`, start-up included) | wall time |",
        "|---|---|",
        f"| plain `task_arithmetic` | {plain:.1f} s |",
        f"| `symmetry_aligned_task_arithmetic` | {aligned:.1f} s |",
        f"| ratio (of medians) | {aligned / plain:.2f}x |",
        f"| ratio, run by run | {', '.join(f'{r:.2f}x' for r in ratios)} |",
        "",
        f"The layer alignment alone (`spec.align_layer`, in one process, one run): {total:.1f} s, of "
        f"which " + ", ".join(f"{k} {v:.1f} s" for k, v in groups.items()) + f". After "
        f"alignment the target's layer is within {err:.3f} (relative Frobenius distance, "
        f"largest tensor) of the reference (the target is the reference plus Gaussian noise of 1 % "
        f"of each weight's standard deviation, then moved).",
        "",
    ]
    page = "\n".join(lines)
    print(page)
    if not args.no_docs:
        PAGE.write_text(page)
        print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()

"""Wall time and peak RSS: mergekit's plain task_arithmetic vs the aligned method, same run.

    .venv/bin/python benchmarks/bench_merge.py [--workdir bench-output] [--repeats 2]
    .venv/bin/python benchmarks/bench_merge.py --layer-only   # one Llama-3.1-8B-shaped layer

Models: the real SmolLM2-135M-Instruct (reference), a perturbed copy (skill) and the reference
under a random exact symmetry (target). Each merge runs `mergekit-yaml` in its own process
(peak RSS = that process's ru_maxrss); runs alternate plain/aligned to share machine noise.
`--layer-only` times the alignment of one layer at Llama-3.1-8B's shapes (hidden 4096,
32/8 heads, MLP 14336, random weights), per symmetry, on CPU (and CUDA when available).

Results go to docs/performance.md unless --no-docs: the whole-merge table and a bar chart to
region `merge_cost` (`merge_cost_cuda` with --cuda), the per-symmetry layer tables to regions
`layer_8b_cpu` and `layer_8b_cuda`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the benchmarks' modules, and the repo's examples/
import report  # noqa: E402
from examples.common import (  # noqa: E402
    ALIGNED_TASK_ARITHMETIC,
    aligned_recipe,
    perturbed,
    plain_transfer_recipe,
    run_mergekit_yaml,
)

PAGE = "performance.md"

CHILD = """
import resource, sys, time
sys.argv = ["mergekit-yaml"] + sys.argv[1:]
t = time.perf_counter()
from mergekit.scripts.run_yaml import main
try:
    main(standalone_mode=False)
finally:
    print("BENCH", time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
          file=sys.stderr)
"""


def build_models(workdir: Path):
    from examples import smollm
    from mergekit_symalign.statedict import scramble_state_dict

    paths = {n: workdir / n for n in ("reference", "skill", "target")}
    if all(smollm.is_saved(p) for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    model, tokenizer = smollm.load_smollm2(torch.float32)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    skill = perturbed(sd, seed=0, scale=0.01)
    target, _ = scramble_state_dict(sd, model.config, seed=1)
    for name, weights in (("reference", sd), ("skill", skill), ("target", target)):
        model.load_state_dict(weights)
        smollm.save_pretrained(model, tokenizer, paths[name])
    return {k: str(v) for k, v in paths.items()}


def recipes(paths, dtype):
    def aligned(**parameters):  # the skill model is the reference's fine-tune: not aligned
        return aligned_recipe(ALIGNED_TASK_ARITHMETIC, paths["target"], paths["reference"],
                              [(paths["skill"], {"align": False})], dtype=dtype, **parameters)

    return {"task_arithmetic (plain)": plain_transfer_recipe(paths["target"], paths["reference"],
                                                             paths["skill"], dtype),
            "symmetry_aligned (weights)": aligned(),
            "symmetry_aligned (activations)": aligned(alignment="activations")}


def run_one(recipe, workdir: Path, extra):
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        run = run_mergekit_yaml(recipe, Path(tmp) / "recipe.yml", Path(tmp) / "out",
                                "--no-copy-tokenizer", *extra,
                                command=[sys.executable, "-c", CHILD])
        line = [l for l in run.stderr.splitlines() if l.startswith("BENCH ")][-1]
        _, seconds, maxrss_kb = line.split()
        return float(seconds), int(maxrss_kb) / 1024


def layer_bytes(paths):
    from safetensors import safe_open

    with safe_open(f"{paths['reference']}/model.safetensors", "pt") as f:
        total = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if ".layers.0." in k)
    return total * 4 / 2**20


def merge_benchmark(args):
    workdir = Path(args.workdir).resolve()  # absolute: mergekit asks the Hub about "a/b" paths
    workdir.mkdir(parents=True, exist_ok=True)
    paths = build_models(workdir)
    extra = ["--cuda"] if args.cuda else []
    results = {name: [] for name in recipes(paths, args.dtype)}
    for _ in range(args.repeats):
        for name, recipe in recipes(paths, args.dtype).items():
            results[name].append(run_one(recipe, workdir, extra))
    rows = []
    for name, runs in results.items():
        rows.append((name, min(r[0] for r in runs), max(r[1] for r in runs)))
    _, t0, m0 = rows[0]
    lb = layer_bytes(paths)
    device = "cuda" if args.cuda else "cpu"
    header = (f"SmolLM2-135M-Instruct, dtype {args.dtype}, {os.cpu_count()} CPUs, torch "
              f"{torch.__version__}, {device}; best of {args.repeats}; one layer = {lb:.1f} MiB fp32")
    lines = ["| method | wall time (s) | peak RSS (MiB) | time vs plain | RSS vs plain |",
             "|---|---:|---:|---:|---|"]
    for name, t, m in rows:
        lines.append(f"| {name} | {t:.1f} | {m:.0f} | {t / t0:.2f}x | {m / m0:.2f}x "
                     f"({m - m0:+.0f} MiB = {(m - m0) / lb:+.1f} layers) |")
    table = "\n".join(lines)
    print(header)
    print(table)
    out = {"rows": rows, "layer_mib": lb}
    (workdir / "bench.json").write_text(json.dumps(out, indent=1))
    if args.no_docs:
        return
    suffix = "_cuda" if args.cuda else ""
    title = (f"Whole merge through mergekit-yaml, relative to plain task_arithmetic\n"
             f"(SmolLM2-135M-Instruct, {args.dtype}, {device}, best of {args.repeats})")
    image = cost_plot(rows, title, f"merge_cost{suffix}.png")
    path = report.update_page(PAGE, f"merge_cost{suffix}",
                              f"{header}:\n\n{table}\n\n![Merge cost relative to plain task_arithmetic]({image})\n")
    print(f"\nwrote {path} and docs/{image}")


def cost_plot(rows, title, name) -> str:
    """Two panels: wall time and peak RSS of each method relative to plain task_arithmetic."""
    plt = report.pyplot()
    _, t0, m0 = rows[0]
    methods = [r[0] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    panels = (("wall time vs plain (x)", [t / t0 for _, t, _ in rows], [f"{t:.1f} s" for _, t, _ in rows]),
              ("peak RSS vs plain (x)", [m / m0 for _, _, m in rows], [f"{m:.0f} MiB" for _, _, m in rows]))
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
    return report.save_figure(fig, name)


def layer_benchmark(args):
    from mergekit_symalign.architectures import Geometry, layer_spec
    from mergekit_symalign.groups import apply, solve
    from mergekit_symalign.spec import random_transform

    g = Geometry("llama", 4096, 32, 8, 128, 14336, 128, 32, 500000.0)
    spec = layer_spec("llama", g)
    gen = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj.weight": (4096, 4096), "self_attn.k_proj.weight": (1024, 4096),
              "self_attn.v_proj.weight": (1024, 4096), "self_attn.o_proj.weight": (4096, 4096),
              "mlp.gate_proj.weight": (14336, 4096), "mlp.up_proj.weight": (14336, 4096),
              "mlp.down_proj.weight": (4096, 14336)}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        anchor = {k: (0.02 * torch.randn(s, generator=gen)).to(device) for k, s in shapes.items()}
        target = random_transform(spec, gen).apply(anchor)
        where = (f"{device} ({torch.get_num_threads()} threads)" if device == "cpu"
                 else f"{device} ({torch.cuda.get_device_name()})")
        print(f"Llama-3.1-8B-shaped layer on {where}:")
        total = 0.0
        timings = []
        current = dict(target)
        for block in spec.blocks:
            for sym in block.symmetries():
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                kw = {"scale": block.scale} if sym is block.main else {}
                element = solve(sym, anchor, current, **kw)
                current = apply(sym, element, current)
                if device == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t
                total += dt
                timings.append((sym.name, dt))
                print(f"  {sym.name:28s} {dt:7.2f} s")
        err = max(float((current[k] - anchor[k]).abs().max()) for k in anchor)
        print(f"  {'total':28s} {total:7.2f} s   (max |aligned - anchor| = {err:.1e})")
        if not args.no_docs:
            path = report.update_page(PAGE, f"layer_8b_{device}", layer_table(where, timings, total, err))
            print(f"wrote region layer_8b_{device} of {path}")


def layer_table(where: str, timings, total: float, err: float) -> str:
    """Markdown for one device's per-symmetry alignment times of the 8B-shaped layer."""
    unit = "CPU" if where.startswith("cpu") else "CUDA"
    lines = [f"On {where}, torch {torch.__version__}; max |aligned − anchor| over the layer's "
             f"tensors after all symmetries: {err:.1e}.", "",
             f"| symmetry | {unit} time (s) |", "|---|---:|"]
    lines += [f"| {name} | {dt:.2f} |" for name, dt in timings]
    lines.append(f"| **total** | **{total:.2f}** |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bench-output")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--layer-only", action="store_true")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not write docs/")
    args = parser.parse_args(argv)
    if args.layer_only:
        layer_benchmark(args)
    else:
        merge_benchmark(args)


if __name__ == "__main__":
    main()

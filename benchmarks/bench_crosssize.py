"""Cost of a cross-size transfer (a pruned child as the base) against a plain merge.

    .venv/bin/python -m benchmarks.bench_crosssize [--repeats 3] [--workdir DIR]

Models: SmolLM2-135M-Instruct's shape (576 channels, 30 layers, 9 query heads in 3 KV groups
of head_dim 64, MLP 1536, vocabulary 49152, tied embeddings) with random float32 weights;
skill = the parent perturbed by 2 % of each tensor's standard deviation; child = the parent
pruned by :func:`mergekit_symalign.crosssize.prune_state_dict` to 432 channels, 2 KV groups,
1152 neurons, layers 9, 20, 21 dropped (27 layers), not retrained. Rows, each a fresh
``mergekit-yaml`` process (imports included), interleaved, median of ``--repeats``:

* plain ``task_arithmetic`` of the child with itself (the child-sized baseline);
* ``symmetry_aligned_task_arithmetic`` of the skill vector onto the child (the cross-size
  transfer: the solve from the weights at plan time, then the merge);
* plain ``task_arithmetic`` of the skill vector at the parent's size (for scale).

The solve alone, in this process (no mergekit; ``--threads`` torch threads, default 1):

    .venv/bin/python -m benchmarks.bench_crosssize --solve [--threads 1]

* ``--solve``: :func:`match_child` and :func:`explained_by_layer` on the same SmolLM2-shaped
  parent and child (state dicts in memory), median of ``--repeats``;
* ``--layer-8b``: one layer pair at Llama-3.1-8B's shape (hidden 4096, 32 query heads in 8 KV
  groups of head_dim 128, MLP 14336; random float32 weights) against a Minitron-4B-Width-shaped
  child of it (hidden 3072, the same heads, MLP 9216; kept indices random, then moved by noise
  of 10 % of each tensor's standard deviation, a stand-in for retraining), each stage of the
  solve timed once: the per-channel statistics, :func:`match_layer` (heads, then the
  ``[9216, 14336]`` neuron similarity and its assignment), the layer's refinement terms, the
  layer's share explained, and for comparison scipy's ``linear_sum_assignment`` on the same
  neuron similarity (what every assignment ran before the distinct-best shortcut).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_merge.child import run_one
from benchmarks.bench_merge.tables import machine
from examples.common import ALIGNED_TASK_ARITHMETIC, aligned_recipe, plain_transfer_recipe
from tests.support import perturbed

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                     max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                     rope_theta=100000.0)
CHILD = dict(hidden=432, kv_heads=2, intermediate=1152, drop_layers=(9, 20, 21))


def _save(state, config, path: Path) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=False)  # a tied model has no separate lm_head
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def build(workdir: Path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mergekit_symalign import crosssize as cs

    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_SHAPE)
    parent = AutoModelForCausalLM.from_config(config).state_dict()
    parent = {k: v for k, v in parent.items() if k != "lm_head.weight"}
    skill = perturbed(parent, seed=1)
    child, child_cfg, _ = cs.prune_state_dict(parent, config, **CHILD)
    return {"parent": _save(parent, config, workdir / "parent"),
            "skill": _save(skill, config, workdir / "skill"),
            "child": _save(child, child_cfg, workdir / "child")}


def recipes(paths):
    return {
        "plain task_arithmetic, child + (child - child)":
            plain_transfer_recipe(paths["child"], paths["child"], paths["child"]),
        "aligned cross-size transfer, child + restrict(skill - parent)":
            aligned_recipe(ALIGNED_TASK_ARITHMETIC, paths["child"], paths["parent"], [paths["skill"]]),
        "plain task_arithmetic at the parent's size, parent + (skill - parent)":
            plain_transfer_recipe(paths["parent"], paths["parent"], paths["skill"]),
    }


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def solve_only(repeats: int) -> None:
    """The solve on SmolLM2's shape in this process (state dicts in memory)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mergekit_symalign import crosssize as cs

    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_SHAPE)
    parent = AutoModelForCausalLM.from_config(config).state_dict()
    parent = {k: v for k, v in parent.items() if k != "lm_head.weight"}
    child, child_cfg, truth = cs.prune_state_dict(parent, config, **CHILD)
    times = {"match_child": [], "explained_by_layer": []}
    for _ in range(repeats):
        match, t = _timed(cs.match_child, parent, config, child, child_cfg)
        assert match.map == truth, "the solve must recover the pruning"
        times["match_child"].append(t)
        times["explained_by_layer"].append(_timed(cs.explained_by_layer, child, parent, config, match.map)[1])
    print(f"SmolLM2-135M shape (child {CHILD}); {machine()}; {torch.get_num_threads()} torch "
          f"thread(s); median of {repeats}")
    for name, ts in times.items():
        print(f"  {name}: {statistics.median(ts):.2f} s ({min(ts):.2f}-{max(ts):.2f})")


LLAMA_8B_LAYER = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      intermediate_size=14336)
MINITRON_4B_WIDTH_LAYER = dict(hidden_size=3072, intermediate_size=9216)


def layer_8b(drift: float = 0.1) -> None:
    """One Llama-3.1-8B-shaped layer pair against a Minitron-4B-Width-shaped child layer."""
    from scipy.optimize import linear_sum_assignment
    from transformers import LlamaConfig

    from mergekit_symalign import crosssize as cs

    shape = dict(vocab_size=8, num_hidden_layers=1, **LLAMA_8B_LAYER)
    parent_cfg = LlamaConfig(**shape)
    child_cfg = LlamaConfig(**{**shape, **MINITRON_4B_WIDTH_LAYER})
    pg, cg = cs.geometry_from_config(parent_cfg), cs.geometry_from_config(child_cfg)
    arch = cs.architecture_for("llama")
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    names = cs._layer_names(arch, pg)
    D, I, H = pg.hidden_size, pg.intermediate_size, pg.num_heads * pg.head_dim
    K = pg.num_kv_heads * pg.head_dim
    shapes = {"self_attn.q_proj.weight": (H, D), "self_attn.k_proj.weight": (K, D),
              "self_attn.v_proj.weight": (K, D), "self_attn.o_proj.weight": (D, H),
              "mlp.gate_proj.weight": (I, D), "mlp.up_proj.weight": (I, D),
              "mlp.down_proj.weight": (D, I)}
    parent = {n: torch.randn(shape, generator=gen) / shape[1] ** 0.5 for n, shape in shapes.items()}
    parent.update({n: 1 + 0.1 * torch.randn(D, generator=gen) for n, role in names.items()
                   if role == "residual" and n.endswith("norm.weight")})
    residual = torch.randperm(D, generator=gen)[:cg.hidden_size]
    truth = cs.LayerRestriction(torch.randperm(pg.num_kv_heads, generator=gen),
                                torch.stack([torch.randperm(pg.group_size, generator=gen)
                                             for _ in range(pg.num_kv_heads)]),
                                torch.randperm(I, generator=gen)[:cg.intermediate_size])
    index = cs.layer_indices(arch, pg, truth, residual)
    child = {}
    for n, t in parent.items():
        c = cs._take(t, *(index[n] if t.dim() == 2 else (index[n][0], None)))
        child[n] = c + drift * c.std() * torch.randn(c.shape, generator=gen)
    print(f"8B-shaped layer pair built in {time.perf_counter() - t0:.0f} s; {machine()}; "
          f"{torch.get_num_threads()} torch thread(s)", flush=True)
    rows = []
    _, t = _timed(lambda: (cs._layer_statistics(arch, pg, parent), cs._layer_statistics(arch, cg, child)))
    rows.append(("per-channel statistics (layer map), both layers", t))
    (found, _), t = _timed(cs.match_layer, arch, pg, cg, parent, child, residual)
    assert found == truth, "the layer's heads and neurons must be recovered"
    rows.append(("match_layer: KV groups, query heads, neurons (similarity + assignment)", t))
    total = torch.zeros(cg.hidden_size, D)
    _, t = _timed(cs._add_refinement, total, arch, pg, cg, parent, child, found)
    rows.append(("refinement terms of the layer (7 column-cosine products)", t))
    restricted = {n: cs._take(parent[n], *(index[n] if parent[n].dim() == 2 else (index[n][0], None)))
                  for n in parent}
    _, t = _timed(lambda: sum(float((child[n] - restricted[n]).pow(2).sum(dtype=torch.float64))
                              for n in child if child[n].dim() == 2))
    rows.append(("share explained (restriction and sums)", t))
    sim = None
    for which in ("gate", "up"):
        sim = cs._add_column_cosines(sim, cs._proj(arch, cg, child, which).T,
                                     cs._proj(arch, pg, parent, which)[:, residual].T)
    sim = cs._add_column_cosines(sim, cs._proj(arch, cg, child, "down"),
                                 cs._proj(arch, pg, parent, "down")[residual])
    _, t = _timed(cs.assign, sim)
    rows.append(("  of which: the neuron assignment, distinct-best shortcut", t))
    (_, cols), t = _timed(linear_sum_assignment, sim.double().numpy(), maximize=True)
    assert torch.equal(torch.as_tensor(cols), truth.neurons)
    rows.append(("  for comparison: scipy linear_sum_assignment on the same [9216, 14336]", t))
    print("| stage (one layer pair, CPU) | seconds |\n|---|---:|")
    for name, t in rows:
        print(f"| {name} | {t:.1f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--solve", action="store_true", help="time the solve alone, in this process")
    parser.add_argument("--layer-8b", action="store_true", help="time one 8B-shaped layer pair's solve")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of --solve / --layer-8b")
    args = parser.parse_args(argv)
    if args.solve or args.layer_8b:
        torch.set_num_threads(args.threads)
        if args.solve:
            solve_only(args.repeats)
        if args.layer_8b:
            layer_8b()
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp).resolve()
        t = time.perf_counter()
        paths = build(workdir)
        print(f"models ready in {time.perf_counter() - t:.0f} s", flush=True)
        runs = {name: [] for name in recipes(paths)}
        for _ in range(args.repeats):  # interleaved: drift in the machine's load hits every row
            for name, recipe in recipes(paths).items():
                runs[name].append(run_one(recipe, workdir, []))
    base = statistics.median(r.seconds for r in runs[next(iter(runs))])
    print(f"\nSmolLM2-135M shape, random float32 weights; {machine()}; median of {args.repeats}\n")
    print("| merge | wall s (min–max) | vs plain child merge | peak RSS MiB | peak anonymous MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, rs in runs.items():
        secs = [r.seconds for r in rs]
        med = statistics.median(secs)
        print(f"| {name} | {med:.1f} ({min(secs):.1f}–{max(secs):.1f}) | {med / base:.2f}x "
              f"| {statistics.median(r.rss_mib for r in rs):.0f} "
              f"| {statistics.median(r.anon_mib for r in rs):.0f} |")


if __name__ == "__main__":
    main()

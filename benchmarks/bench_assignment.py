"""MLP neuron matching and one whole layer at Llama-3.1-8B's shapes: dense vs sketch path.

    .venv/bin/python -m benchmarks.bench_assignment                 # everything (~3 min on 2 CPUs)
    .venv/bin/python -m benchmarks.bench_assignment --skip-dense    # new path only (~30 s)
    .venv/bin/python -m benchmarks.bench_assignment --lap           # + dense LAP solvers (scipy, lapx)
    .venv/bin/python -m benchmarks.bench_assignment --activations --skip-layer  # + activation matching

MLP: F = 14336 neurons, D = 4096, random weights (0.02 * N(0, 1)). Two targets:

* *planted*: the anchor under a random permutation and random signed neuron scales in
  [0.5, 2] (``random_element`` of the spec's ``mlp.neurons`` and ``mlp.neuron_scale``);
* *identity*: the anchor plus 5 % Gaussian noise (a same-base fine-tune: the answer is the
  identity).

For each: the former dense path (``match(..., dense_below=n)``: three 14336^2 x 4096
similarity matmuls and scipy's ``linear_sum_assignment``) and the new default path of
``solve_permutation``, their times and whether the recovered permutation is exact. Then one
whole layer through the spec (``align_layer``'s steps), solve and apply timed per symmetry.

Times are wall-clock seconds, best of ``--repeats``, with this process's CPU seconds in that
run and the CPU (in cores) other processes used meanwhile, since a shared machine skews wall
times (badly so for many short parallel regions: ``--threads 1`` gives steadier CPU figures
there). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from mergekit_symalign import assignment
from mergekit_symalign.architectures import Geometry, layer_spec
from mergekit_symalign.groups import apply, random_element, solve, solve_permutation
from mergekit_symalign.spec import align_layer, random_transform

GEOMETRY = Geometry("llama", 4096, 32, 8, 128, 14336, 128, 500000.0)
SHAPES = {"self_attn.q_proj.weight": (4096, 4096), "self_attn.k_proj.weight": (1024, 4096),
          "self_attn.v_proj.weight": (1024, 4096), "self_attn.o_proj.weight": (4096, 4096),
          "mlp.gate_proj.weight": (14336, 4096), "mlp.up_proj.weight": (14336, 4096),
          "mlp.down_proj.weight": (4096, 14336)}


def _cpu_ticks():
    """CPU ticks of every process but this one (Linux /proc; empty elsewhere)."""
    ticks = {}
    me = os.getpid()
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks[pid] = int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return ticks


class Timing:
    """Best-of-n wall seconds of a call, this process's CPU seconds in that run, and the CPU
    (in cores) other processes used meanwhile."""

    def __init__(self, wall, cpu, others):
        self.wall, self.cpu, self.others = wall, cpu, others

    def __str__(self):
        return f"{self.wall:6.2f} s (cpu {self.cpu:5.2f} s, others {self.others:.1f} cores)"


def timed(fn, repeats):
    """(result, :class:`Timing` of the fastest of ``repeats`` runs)."""
    best = None
    for _ in range(repeats):
        before = _cpu_ticks()
        cpu = time.process_time()
        start = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
        after = _cpu_ticks()
        others = sum(max(0, v - before.get(k, v)) for k, v in after.items())
        others = others / os.sysconf("SC_CLK_TCK") / wall
        if best is None or wall < best[1].wall:
            best = (out, Timing(wall, cpu, others))
    return best


def mlp_targets(spec, anchor, gen):
    mlp = next(b for b in spec.blocks if b.name == "mlp")
    perm = random_element(mlp.main, gen)
    scale = random_element(mlp.scale, gen)  # signed, |s| in [0.5, 2]
    planted = apply(mlp.scale, scale, apply(mlp.main, perm, anchor))
    noisy = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=gen) if k.startswith("mlp.") else v
             for k, v in anchor.items()}
    return mlp, {"planted": (planted, torch.argsort(perm)),
                 "identity": (noisy, torch.arange(mlp.main.slots))}


def mlp_benchmark(args, spec, anchor, gen):
    mlp, targets = mlp_targets(spec, anchor, gen)
    n = mlp.main.slots
    print(f"MLP neuron matching, n = {n}, D = 4096 ({torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}):")
    for case, (target, truth) in targets.items():
        info = {}

        def solved(**forced):
            """solve_permutation's own terms and matcher, ``forced`` options passed to
            ``assignment.match`` (its ``info`` filled for the report)."""
            info.clear()
            original = assignment.match

            def spy(*a, **kw):
                return original(*a, **{**kw, "info": info, **forced})

            assignment.match = spy
            try:
                return solve_permutation(mlp.main, anchor, target, scale=mlp.scale)
            finally:
                assignment.match = original

        def new_path():
            return solved()

        found, timing = timed(new_path, args.repeats)
        stages = ", ".join(f"{k} {v:.2f}" for k, v in info.get("seconds", {}).items())
        print(f"  {case:9s} new path   {timing}  exact={torch.equal(found, truth)}  "
              f"path={info.get('path')} exact_pairs={info.get('exact_pairs')} "
              f"uncertain_rows={info.get('uncertain_rows')}")
        print(f"            stages (s): {stages}")
        if args.skip_dense:
            continue
        found, timing = timed(lambda: solved(dense_below=n), 1)
        print(f"  {case:9s} dense path {timing}  exact={torch.equal(found, truth)}")


def activation_benchmark(args, gen):
    """``alignment: activations``' neuron matching (``activations.match_neurons``) at
    Llama-3.1-8B's 14336 neurons (``--activation-neurons``) over ``--activation-tokens`` tokens, sketched (the default
    path) against the dense cosines. Synthetic SwiGLU activations of a rank-256 token stream
    with a shared offset (so that distinct neurons correlate, as real ones do: cosines of
    about 0.5); the model's neurons are the reference's under a random permutation and
    signed scales in [0.5, 2], plus 5 % noise."""
    from mergekit_symalign.activations import match_neurons

    n, tokens, rank = args.activation_neurons, args.activation_tokens, 256
    stream = torch.randn(rank, tokens, generator=gen)
    stream[0] = 2.0  # the shared offset
    w_gate, w_up = (torch.randn(n, rank, generator=gen) / rank ** 0.5 for _ in range(2))
    gate = w_gate @ stream
    h = torch.nn.functional.silu(gate) * (w_up @ stream)
    perm = torch.randperm(n, generator=gen)
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    scale = signs * torch.empty(n).uniform_(0.5, 2.0, generator=gen)

    def noisy(x):
        return x + 0.05 * x.std() * torch.randn(x.shape, generator=gen)

    gate_t, h_t = noisy(gate[perm]), noisy(h[perm] * scale[:, None])
    truth = torch.argsort(perm)
    del stream
    print(f"Activation neuron matching, n = {n}, {tokens} tokens ({torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}):")
    info = {}

    def sketched():
        info.clear()
        return match_neurons(gate, gate_t, h, h_t, info=info)

    found, timing = timed(sketched, args.repeats)
    stages = ", ".join(f"{k} {v:.2f}" for k, v in info.get("seconds", {}).items())
    print(f"  sketched   {timing}  exact={torch.equal(found, truth)}  path={info.get('path')} "
          f"exact_pairs={info.get('exact_pairs')} uncertain_rows={info.get('uncertain_rows')}")
    print(f"             stages (s): {stages}")
    if not args.skip_dense:
        found, timing = timed(lambda: match_neurons(gate, gate_t, h, h_t, dense_below=n), 1)
        print(f"  dense      {timing}  exact={torch.equal(found, truth)}")


def layer_benchmark(args, spec, anchor, gen):
    target = random_transform(spec, gen).apply(anchor)
    print(f"\nWhole layer (random element of the layer's group), per symmetry, best of "
          f"{args.repeats} (load average {os.getloadavg()[0]:.1f}):")
    rows = []
    current = dict(target)
    for block in spec.blocks:
        for sym in block.symmetries():
            kw = {"scale": block.scale} if sym is block.main else {}
            element, t_solve = timed(lambda: solve(sym, anchor, current, **kw), args.repeats)
            current, t_apply = timed(lambda: apply(sym, element, current), args.repeats)
            rows.append((sym.name, t_solve, t_apply))
    for name, t_solve, t_apply in rows:
        print(f"  {name:24s} solve {t_solve}   apply {t_apply}")
    total = sum(r[1].wall + r[2].wall for r in rows)
    cpu = sum(r[1].cpu + r[2].cpu for r in rows)
    err = max(float((current[k] - anchor[k]).abs().max()) for k in anchor)
    print(f"  {'sum':24s} {total:6.2f} s (cpu {cpu:5.2f} s)   max |aligned - anchor| = {err:.1e}")
    _, timing = timed(lambda: align_layer(spec, anchor, target), args.repeats)
    print(f"  align_layer end to end: {timing}")


def lap_benchmark(args):
    """Dense solvers on a planted problem (the similarity of a noisy permuted copy, 256
    features) and on uniform random costs."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    try:
        import lap  # lapx
    except ImportError:
        lap = None
        print("\nlapx is not installed: only scipy is timed")
    n = args.lap_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 256, generator=gen)
    sigma = torch.randperm(n, generator=gen)
    planted = (x @ (x[sigma] + 0.3 * torch.randn(n, 256, generator=gen)).T).double().numpy()
    uniform = torch.rand(n, n, generator=gen, dtype=torch.float64).numpy()
    truth = torch.argsort(sigma).numpy()
    print(f"\nDense linear assignment, n = {n} (maximise):")
    for case, cost in (("planted", planted), ("uniform", uniform)):
        solvers = {"scipy linear_sum_assignment":
                   lambda: linear_sum_assignment(cost, maximize=True)[1]}
        if lap is not None:
            neg = -cost
            solvers["lapx lapjvx"] = lambda: np.asarray(lap.lapjvx(neg, return_cost=False)[1])
            solvers["lapx lapjvsa"] = lambda: np.asarray(lap.lapjvsa(neg, return_cost=False)[:, 1])
        for name, fn in solvers.items():
            cols, timing = timed(fn, 1)
            obj = cost[np.arange(n), cols].sum()
            extra = f" exact={np.array_equal(cols, truth)}" if case == "planted" else ""
            print(f"  {case:8s} {name:28s} {timing}  objective {obj:.6f}{extra}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-dense", action="store_true", help="do not time the dense path")
    parser.add_argument("--skip-layer", action="store_true")
    parser.add_argument("--lap", action="store_true", help="also time dense LAP solvers")
    parser.add_argument("--lap-size", type=int, default=14336, help="n of the --lap problems")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--activations", action="store_true",
                        help="also time alignment: activations' neuron matching")
    parser.add_argument("--activation-tokens", type=int, default=8192)
    parser.add_argument("--activation-neurons", type=int, default=14336)
    parser.add_argument("--skip-mlp", action="store_true", help="skip the weight MLP matching")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = layer_spec("llama", GEOMETRY)
    gen = torch.Generator().manual_seed(0)
    anchor = {k: 0.02 * torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    if not args.skip_mlp:
        mlp_benchmark(args, spec, anchor, gen)
    if args.activations:
        activation_benchmark(args, gen)
    if not args.skip_layer:
        layer_benchmark(args, spec, anchor, gen)
    if args.lap:
        lap_benchmark(args)


if __name__ == "__main__":
    main()

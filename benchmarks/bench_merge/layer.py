"""``--layer-only``: the alignment of one Llama-3.1-8B-shaped layer per symmetry through
``spec.align_layer``, in-process, float32 and bfloat16."""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks import docs_pages
from benchmarks.bench_merge.tables import PAGE, LayerResult, layer_table


def layer_benchmark(args):
    from mergekit_symalign.architectures import Geometry, layer_spec
    from mergekit_symalign.measure import distances_before_after
    from mergekit_symalign.spec import WorkingCopy, align_layer, random_transform

    g = Geometry("llama", 4096, 32, 8, 128, 14336, 128, 500000.0)
    spec = layer_spec("llama", g)
    shapes = {"self_attn.q_proj.weight": (4096, 4096), "self_attn.k_proj.weight": (1024, 4096),
              "self_attn.v_proj.weight": (1024, 4096), "self_attn.o_proj.weight": (4096, 4096),
              "mlp.gate_proj.weight": (14336, 4096), "mlp.up_proj.weight": (14336, 4096),
              "mlp.down_proj.weight": (4096, 14336)}
    # One device per run, so that a GPU machine's CPU figures never replace the 2-core ones.
    device = "cuda" if args.cuda else "cpu"
    dtypes = (torch.float32, torch.bfloat16)  # random weights; bf16 as real checkpoints ship
    where = (f"{device} ({torch.get_num_threads()} threads)" if device == "cpu"
             else f"{device} ({torch.cuda.get_device_name()})")
    results = []
    for dtype in dtypes:
        gen = torch.Generator().manual_seed(0)
        anchor = {k: (0.02 * torch.randn(s, generator=gen)).to(device=device, dtype=dtype)
                  for k, s in shapes.items()}
        target = random_transform(spec, gen).apply(anchor)
        print(f"Llama-3.1-8B-shaped layer, {str(dtype)[6:]}, on {where}:")
        runs, records, totals = [], [], []
        for _ in range(args.repeats):  # the merge's own code path, median of the repeats
            seconds = {}
            t = time.perf_counter()
            working = WorkingCopy()  # as the merge's record reads it (report.distances_before_after)
            aligned = align_layer(spec, anchor, target, timings=seconds, working=working)
            if device == "cuda":
                torch.cuda.synchronize()
            totals.append(time.perf_counter() - t)
            runs.append(seconds)
            # The model card's / report's per-layer record (distances before and after).
            t = time.perf_counter()
            distances_before_after(anchor, target, aligned, working)
            del working
            if device == "cuda":
                torch.cuda.synchronize()
            records.append(time.perf_counter() - t)
        current = aligned.apply(target)
        timings = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
        total, record = statistics.median(totals), statistics.median(records)
        for name, dt in timings.items():
            print(f"  {name:28s} {dt:7.2f} s")
        print(f"  {'(card/report record)':28s} {record:7.2f} s   ({100 * record / total:.0f} % of the solve)")
        # recovery, relative to the largest weight: float32 rounding, or for bf16 the rounding
        # of the scrambled copy itself (its rotated tensors were stored in bf16)
        err = max(float((current[k].double() - anchor[k].double()).abs().max()
                        / anchor[k].double().abs().max()) for k in anchor)
        print(f"  {'total':28s} {total:7.2f} s   (median of {len(totals)}: "
              f"{', '.join(f'{x:.2f}' for x in totals)}; max |aligned - anchor| / max |anchor| = {err:.1e})")
        results.append(LayerResult(str(dtype)[6:], timings, total, err, record, totals))
        del anchor, target, current
    if not args.no_docs:
        path = docs_pages.update_page(PAGE, f"layer_8b_{device}", layer_table(where, results))
        print(f"wrote region layer_8b_{device} of {path}")

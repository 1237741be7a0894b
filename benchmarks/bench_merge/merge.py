"""One suite's merge benchmark: its rows (recipes), the timed runs alternating between them,
and the summary written to docs/performance.md."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import docs_pages
from benchmarks.bench_merge.child import run_one
from benchmarks.bench_merge.models import build_models, layer_mib
from benchmarks.bench_merge.tables import PAGE, cost_plot, machine, merge_table
from examples.common import ALIGNED_TASK_ARITHMETIC, aligned_recipe, plain_transfer_recipe


def calibration_token_count(paths, samples: int) -> int:
    """The calibration tokens an activation alignment of these models runs on: the first
    ``samples`` prompts of the shipped set, or (0) the default budget; counted by the
    alignment task's own function."""
    from mergekit.common import ModelReference

    from mergekit_symalign.settings import BY_NAME
    from mergekit_symalign.calibration import calibration_tokens

    return calibration_tokens(ModelReference.parse(str(paths["reference"])), (), None, samples,
                              BY_NAME["calibration_max_tokens"].default).numel()


def recipes(paths, dtype, suite: str, cache: Path, calibration_samples=()):
    """name -> (recipe, untimed warm-up recipe or None). ``calibration_samples``: plain,
    weights and activations with the default calibration budget and with each of these
    numbers of prompts instead of the suite's rows."""
    def aligned(weight=1.0, target="target", **parameters):  # the skill: not aligned
        return aligned_recipe(ALIGNED_TASK_ARITHMETIC, paths[target], paths["reference"],
                              [(paths["skill"], {"align": False, "weight": weight})],
                              dtype=dtype, **parameters)

    out = {"task_arithmetic (plain)": (plain_transfer_recipe(paths["target"], paths["reference"],
                                                             paths["skill"], dtype), None),
           "aligned (weights)": (aligned(), None)}
    if calibration_samples:
        for samples in (0, *calibration_samples):
            what = (f"calibration_samples: {samples}" if samples else "the default budget")
            name = (f"aligned (activations), {what}: "
                    f"{calibration_token_count(paths, samples)} tokens")
            parameters = {"calibration_samples": samples} if samples else {}
            out[name] = (aligned(alignment="activations", **parameters), None)
    elif suite.startswith("smollm2"):
        # The common case (descendants of one base): same work for plain, which does not care
        # whether the target was moved.
        out["aligned (weights), target not moved: the alignment finds the identity"] = (
            aligned(target="sibling"), None)
        out["aligned (weights, residual: permutation)"] = (aligned(residual="permutation"), None)
        out["aligned (activations)"] = (aligned(alignment="activations"), None)
        out["aligned (weights), second merge reusing alignment_cache"] = (
            aligned(weight=0.5, alignment_cache=str(cache)),
            aligned(weight=1.0, alignment_cache=str(cache)))
    return out


#: What each suite's models are, for the table's header and the chart's title.
SUITE_MODELS = {
    "smollm2": "SmolLM2-135M-Instruct, float32",
    "8b-layer": "one layer with Llama-3.1-8B's shapes (vocabulary 512), bfloat16",
    "1b": "synthetic Llama-3.2-1B shapes (16 layers, vocabulary 2048), bfloat16",
    "smollm2-random": "SmolLM2-135M-Instruct's config and tokenizer, random weights, float32",
}


def merge_benchmark(args, suite: str):
    """One suite: build its models, time its rows (alternating, ``args.repeats`` rounds),
    print the table and write it (with its chart) to docs/performance.md."""
    workdir = Path(args.workdir).resolve()  # absolute: mergekit asks the Hub about "a/b" paths
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    paths = build_models(workdir, suite, args.smollm2_dir)
    print(f"[{suite}] models ready in {time.perf_counter() - t:.0f} s", flush=True)
    dtype = "float32" if suite.startswith("smollm2") else "bfloat16"
    extra = ["--cuda"] if args.cuda else []
    if args.mmap_threshold:  # read by each child's glibc at start-up (see --mmap-threshold)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    cache = Path(tempfile.mkdtemp(dir=workdir, prefix="alignment-cache-"))
    plan = recipes(paths, dtype, suite, cache, args.calibration_samples or ())
    try:
        if args.rows:  # plain always: every ratio is against it
            plan = selected_rows(plan, args.rows, suite)
        results = run_rounds(plan, workdir, extra, args.repeats, args.cuda)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    rows = summarize(results)
    lb = layer_mib(paths)
    device = f"cuda ({torch.cuda.get_device_name()})" if args.cuda else "cpu"
    header = _header(args, SUITE_MODELS[suite], device, lb)
    suffix = (("_cuda" if args.cuda else "") + ("_mmap" if args.mmap_threshold else "")
              + ("_calibration" if args.calibration_samples else ""))
    table = merge_table(rows, lb, gpu_columns=args.cuda,
                        distance_column=bool(args.calibration_samples))
    print(header)
    print(table, flush=True)
    (workdir / f"bench-{suite}{suffix}.json").write_text(json.dumps({"rows": rows, "layer_mib": lb},
                                                            indent=1))
    if args.no_docs or args.rows:  # a partial table never replaces the page's full one
        return
    title = (f"Whole merge through mergekit-yaml, relative to plain task_arithmetic\n"
             f"({SUITE_MODELS[suite]}, {device}, median of {args.repeats})")
    image = cost_plot([(r["name"], r["t"], r["anon"]) for r in rows], title,
                      f"merge_cost_{suite}{suffix}.png")
    path = docs_pages.update_page(PAGE, f"merge_cost_{suite}{suffix}",
                              f"{header}:\n\n{table}\n\n![Merge cost relative to plain "
                              f"task_arithmetic]({image})\n")
    print(f"wrote {path} and docs/{image}")


def selected_rows(every_row, words, suite: str):
    """Plain and the rows whose name contains one of ``words``; exits naming the suite's
    rows when none does."""
    plan = {name: r for i, (name, r) in enumerate(every_row.items())
            if i == 0 or any(word in name for word in words)}
    if len(plan) == 1:
        raise SystemExit(f"--rows {' '.join(words)}: no row of suite {suite} matches "
                         f"(rows: {'; '.join(every_row)})")
    return plan


def run_rounds(plan, workdir: Path, extra, repeats: int, cuda: bool):
    """name -> its runs: each row's warm-up first, then ``repeats`` rounds of every row in
    turn (so that the rows share the machine's noise)."""
    results = {name: [] for name in plan}
    for name, (_recipe, warm) in plan.items():
        if warm is not None:
            run_one(warm, workdir, extra)  # fills the cache
    for _ in range(repeats):
        for name, (recipe, _warm) in plan.items():
            results[name].append(run_one(recipe, workdir, extra))
            run = results[name][-1]
            print(f"  {name}: {run.seconds:.1f} s, peak RSS {run.rss_mib:.0f} MiB, peak "
                  f"anonymous {run.anon_mib:.0f} MiB"
                  + (f", peak GPU {run.gpu_mib:.0f} MiB" if cuda else ""), flush=True)
    return results


def summarize(results):
    """One row per name: medians and ranges of its runs, and its times against plain's
    (the first name's) run by run."""
    rows = []
    plain_times = [r.seconds for r in next(iter(results.values()))]
    for name, runs in results.items():
        times, rss, anon, gpu = ([getattr(r, field) for r in runs]
                                 for field in ("seconds", "rss_mib", "anon_mib", "gpu_mib"))
        after = [r.distance_after for r in runs if r.distance_after is not None]
        # Each run against the plain run of the same round (they ran minutes apart at most):
        # the machine's slow and fast spells cancel, which the ratio of the medians does not.
        paired = [t / p for t, p in zip(times, plain_times)]
        rows.append({"name": name, "t": statistics.median(times), "t_min": min(times),
                     "t_max": max(times), "rss": statistics.median(rss), "rss_min": min(rss),
                     "rss_max": max(rss), "anon": statistics.median(anon), "anon_min": min(anon),
                     "anon_max": max(anon), "times": times, "paired": statistics.median(paired),
                     "paired_min": min(paired), "paired_max": max(paired),
                     "gpu": statistics.median(gpu), "gpu_min": min(gpu), "gpu_max": max(gpu),
                     "distance_after": statistics.median(after) if after else None})
    return rows


def _header(args, what: str, device: str, lb: float) -> str:
    header = (f"{what}; {machine()}; {device}; median of {args.repeats} runs (range); "
              f"one layer = {lb:.1f} MiB; *time vs plain, run by run*: the median (range) of "
              f"each run's time over the plain run of the same round")
    if args.mmap_threshold:
        header += (f"; every merge with MALLOC_MMAP_THRESHOLD_={args.mmap_threshold} (each "
                   f"allocation above it returned to the system when freed: the anonymous peak "
                   f"is the live peak; the times are slower than by default and not compared)")
    if args.calibration_samples:
        header += ("; *distance after*: the model card's distance of the aligned target to the "
                   "reference after alignment, median over layers (the target is the skill's "
                   "sibling under a random exact symmetry: weights alignment undoes it exactly)")
    return header

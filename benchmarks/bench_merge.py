"""Wall time and peak memory: mergekit's plain task_arithmetic vs the aligned method, same run.

    .venv/bin/python -m benchmarks.bench_merge [--suites smollm2 8b-layer 1b] [--repeats 3]
    .venv/bin/python -m benchmarks.bench_merge --layer-only   # one Llama-3.1-8B-shaped layer
    python3 -m benchmarks.bench_merge --cuda --suites smollm2-random --rows activations \
        --smollm2-dir DIR --no-docs   # plain and the named rows only, printed
    .venv/bin/python -m benchmarks.bench_merge --suites smollm2 --calibration-samples 36 20 14
        # alignment: activations against its calibration budget

Every merge runs `mergekit-yaml` in its own process (peak RSS = that process's VmHWM;
peak anonymous memory = the largest RssAnon of /proc/self/status sampled every 5 ms, i.e.
without the memory-mapped input files' pages, see CHILD; with --cuda also the CUDA caching
allocator's peak, torch.cuda.max_memory_allocated); runs alternate between the methods so that they share the machine's noise; each figure is
the median over the repeats, with the range, and each row's time is also divided run by run
by the plain run of the same round (the median and range of those ratios), which cancels the
machine's slow and fast spells. Suites:

* ``smollm2``: the real SmolLM2-135M-Instruct (reference), a perturbed copy (skill) and a
  perturbed copy under a random exact symmetry of its layers (target): plain, aligned by
  weights, the same onto the perturbed copy not moved (sibling: the alignment finds the
  identity, as on descendants of one base), + ``residual: permutation``, by activations,
  and a second merge with other weights reusing a saved alignment (``alignment_cache``,
  filled by one untimed run first).
* ``8b-layer``: a one-layer model with Llama-3.1-8B's layer shapes (hidden 4096, 32/8 heads,
  MLP 14336, vocabulary 512), random bfloat16 weights, target = a perturbed sibling under a
  random exact symmetry (neurons, heads, V/O, Q/K planes and scales).
* ``1b``: a synthetic Llama-3.2-1B-shaped model (hidden 2048, 16 layers, MLP 8192, 32/8
  heads, vocabulary 2048), bfloat16, built the same way.
* ``smollm2-random``: the ``smollm2`` suite's models and rows with SmolLM2-135M-Instruct's
  config and tokenizer but random float32 weights, built the same way, for a machine without
  the GGUF (the GPU machine: the package is larger than what travels there); the config and
  tokenizer come from ``--smollm2-dir`` (default: the float32 SmolLM2 folder that
  examples/smollm.py caches). Its costs are the real model's except where the matchers'
  work depends on the values (how many neurons they must score exactly).

Synthetic models are generated here, never downloaded. `--layer-only` times the alignment of
one 8B-shaped layer per symmetry through `spec.align_layer` (median of --repeats; float32 and
bfloat16 weights), in-process, on CPU (on CUDA with --cuda).

Results go to docs/performance.md unless --no-docs: region ``merge_cost_<suite>`` (with a bar
chart), ``layer_8b_cpu`` / ``layer_8b_cuda`` for --layer-only; ``_cuda`` suffix with --cuda,
``_mmap`` with --mmap-threshold (memory figures without the allocator's retention),
``_calibration`` with --calibration-samples (plain, weights, and activations at the default
calibration budget and at N prompts each, with the model card's distance after alignment).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import torch

from benchmarks import docs_pages
from examples.common import (
    ALIGNED_TASK_ARITHMETIC,
    aligned_recipe,
    plain_transfer_recipe,
    run_mergekit_yaml,
)
from tests.support import perturbed

PAGE = "performance.md"
SUITES = ("smollm2", "8b-layer", "1b", "smollm2-random")

# The timed child: mergekit-yaml in-process, its wall time (imports included), peak RSS, and
# peak *anonymous* memory, sampled every 5 ms from /proc/self/status (Linux; 0 elsewhere).
# Peak RSS also counts the pages of the memory-mapped input files that the process touched,
# which the page cache moves by +-100 MiB (SmolLM2) to +-1 GiB (1B) from run to run; the
# anonymous memory is what the merge itself allocated (tensors, temporaries).
CHILD = """
import resource, sys, threading, time
sys.argv = ["mergekit-yaml"] + sys.argv[1:]

def status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0

def anon_kib():
    return status_kib("RssAnon:")

def peak_rss_kib():
    # VmHWM: this process image's own peak. ru_maxrss keeps the parent's peak across
    # fork + exec, so it read the benchmark's own size (e.g. 18.9 GiB for every 1B merge,
    # whose models the benchmark had just built) whenever that was the larger.
    return status_kib("VmHWM:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def gpu_peak_kib():
    # the CUDA caching allocator's peak (--cuda); 0 where the merge never used CUDA
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return torch.cuda.max_memory_allocated() // 1024
    except Exception:
        pass
    return 0

peak, done = [anon_kib()], threading.Event()

def sample():
    while not done.wait(0.005):
        peak[0] = max(peak[0], anon_kib())

threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
from mergekit.scripts.run_yaml import main
try:
    main(standalone_mode=False)
finally:
    done.set()
    print("BENCH", time.perf_counter() - t, peak_rss_kib(), max(peak[0], anon_kib()),
          gpu_peak_kib(), file=sys.stderr)
"""

SYNTHETIC = {  # LlamaConfig fields of the generated models
    "8b-layer": dict(hidden_size=4096, num_hidden_layers=1, intermediate_size=14336,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=512,
                     rope_theta=500000.0, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=2048,
               rope_theta=500000.0, tie_word_embeddings=True),
}


def _save(state, config, path: Path, dtype: torch.dtype, tokenizer=None) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:  # alignment: activations runs each model on calibration text
        tokenizer.save_pretrained(path)
    config.torch_dtype = dtype
    config.save_pretrained(path)
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / ".complete").write_text("")


def build_models(workdir: Path, suite: str, smollm2_dir=None):
    """reference, skill (perturbed reference), target (perturbed reference under a random
    exact symmetry) and, for SmolLM2, sibling (the same perturbed reference, not moved: the
    alignment finds the identity); cached in ``workdir/<suite>``."""
    from mergekit_symalign.statedict import scramble_state_dict

    root = workdir / suite
    names = ("reference", "skill", "target") + (("sibling",) if suite.startswith("smollm2") else ())
    paths = {n: root / n for n in names}
    if all((p / ".complete").is_file() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    if suite == "smollm2":
        from examples import smollm

        model, tokenizer = smollm.load_smollm2(torch.float32)
        config, dtype = model.config, torch.float32
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        del model
    else:
        from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        if suite == "smollm2-random":
            if smollm2_dir is None:
                from examples import smollm

                smollm2_dir = smollm.cached_smollm2_dir()
            config = AutoConfig.from_pretrained(smollm2_dir)
            dtype, tokenizer = torch.float32, AutoTokenizer.from_pretrained(smollm2_dir)
        else:
            config, dtype, tokenizer = LlamaConfig(**SYNTHETIC[suite]), torch.bfloat16, None
        config.architectures = ["LlamaForCausalLM"]
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
        g = torch.Generator().manual_seed(0)
        sd = {k: (1.0 + 0.1 * torch.randn(s, generator=g)) if "norm" in k
              else 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}
        if config.tie_word_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    skill = perturbed(sd, seed=0, scale=0.01)
    sibling = perturbed(sd, seed=2, scale=0.01)
    target, _ = scramble_state_dict(sibling, config, seed=1)
    models = {"reference": sd, "skill": skill, "target": target, "sibling": sibling}
    for name in paths:
        _save(models[name], config, paths[name], dtype, tokenizer)
    return {k: str(v) for k, v in paths.items()}


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


class MergeRun(NamedTuple):
    seconds: float
    rss_mib: float
    anon_mib: float
    gpu_mib: float
    distance_after: Optional[float]  # the model card's median over layers; None for plain


def card_distance_after(card: Path) -> Optional[float]:
    """The median distance to the reference after alignment, from the model card's "What
    alignment did" table (the first aligned model's row), or None where there is none."""
    if not card.is_file():
        return None
    match = re.search(r"\| \S+ → (\S+) \|$", card.read_text(), re.MULTILINE)
    return float(match.group(1)) if match else None


def run_one(recipe, workdir: Path, extra) -> MergeRun:
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        run = run_mergekit_yaml(recipe, Path(tmp) / "recipe.yml", Path(tmp) / "out",
                                "--no-copy-tokenizer", *extra,
                                command=[sys.executable, "-c", CHILD])
        line = [l for l in run.stderr.splitlines() if l.startswith("BENCH ")][-1]
        _, seconds, maxrss_kb, anon_kb, gpu_kb = line.split()
        return MergeRun(float(seconds), int(maxrss_kb) / 1024, int(anon_kb) / 1024,
                        int(gpu_kb) / 1024, card_distance_after(Path(tmp) / "out" / "README.md"))


def layer_mib(paths):
    from safetensors import safe_open

    with safe_open(f"{paths['reference']}/model.safetensors", "pt") as f:
        keys = [k for k in f.keys() if ".layers.0." in k]
        total = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
        itemsize = 4 if f.get_slice(keys[0]).get_dtype() == "F32" else 2
    return total * itemsize / 2**20


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}")


def merge_benchmark(args, suite: str):
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
    plan = every_row = recipes(paths, dtype, suite, cache, args.calibration_samples or ())
    if args.rows:  # plain always: every ratio is against it
        plan = {name: r for i, (name, r) in enumerate(every_row.items())
                if i == 0 or any(word in name for word in args.rows)}
        if len(plan) == 1:
            shutil.rmtree(cache, ignore_errors=True)
            raise SystemExit(f"--rows {' '.join(args.rows)}: no row of suite {suite} matches "
                             f"(rows: {'; '.join(every_row)})")
    results = {name: [] for name in plan}
    try:
        for name, (_recipe, warm) in plan.items():
            if warm is not None:
                run_one(warm, workdir, extra)  # fills the cache
        for _ in range(args.repeats):
            for name, (recipe, _warm) in plan.items():
                results[name].append(run_one(recipe, workdir, extra))
                run = results[name][-1]
                print(f"  {name}: {run.seconds:.1f} s, peak RSS {run.rss_mib:.0f} MiB, peak "
                      f"anonymous {run.anon_mib:.0f} MiB"
                      + (f", peak GPU {run.gpu_mib:.0f} MiB" if args.cuda else ""), flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
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
    lb = layer_mib(paths)
    device = f"cuda ({torch.cuda.get_device_name()})" if args.cuda else "cpu"
    what = {"smollm2": "SmolLM2-135M-Instruct, float32",
            "8b-layer": "one layer with Llama-3.1-8B's shapes (vocabulary 512), bfloat16",
            "1b": "synthetic Llama-3.2-1B shapes (16 layers, vocabulary 2048), bfloat16",
            "smollm2-random": "SmolLM2-135M-Instruct's config and tokenizer, random weights, "
                              "float32"}[suite]
    header = (f"{what}; {machine()}; {device}; median of {args.repeats} runs (range); "
              f"one layer = {lb:.1f} MiB; *time vs plain, run by run*: the median (range) of "
              f"each run's time over the plain run of the same round")
    suffix = (("_cuda" if args.cuda else "") + ("_mmap" if args.mmap_threshold else "")
              + ("_calibration" if args.calibration_samples else ""))
    if args.mmap_threshold:
        header += (f"; every merge with MALLOC_MMAP_THRESHOLD_={args.mmap_threshold} (each "
                   f"allocation above it returned to the system when freed: the anonymous peak "
                   f"is the live peak; the times are slower than by default and not compared)")
    if args.calibration_samples:
        header += ("; *distance after*: the model card's distance of the aligned target to the "
                   "reference after alignment, median over layers (the target is the skill's "
                   "sibling under a random exact symmetry: weights alignment undoes it exactly)")
    table = merge_table(rows, lb, gpu_columns=args.cuda,
                        distance_column=bool(args.calibration_samples))
    print(header)
    print(table, flush=True)
    (workdir / f"bench-{suite}{suffix}.json").write_text(json.dumps({"rows": rows, "layer_mib": lb},
                                                            indent=1))
    if args.no_docs or args.rows:  # a partial table never replaces the page's full one
        return
    title = (f"Whole merge through mergekit-yaml, relative to plain task_arithmetic\n"
             f"({what}, {device}, median of {args.repeats})")
    image = cost_plot([(r["name"], r["t"], r["anon"]) for r in rows], title,
                      f"merge_cost_{suite}{suffix}.png")
    path = docs_pages.update_page(PAGE, f"merge_cost_{suite}{suffix}",
                              f"{header}:\n\n{table}\n\n![Merge cost relative to plain "
                              f"task_arithmetic]({image})\n")
    print(f"wrote {path} and docs/{image}")


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


def layer_benchmark(args):
    from mergekit_symalign.architectures import Geometry, layer_spec
    from mergekit_symalign.report import distances_before_after
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bench-output")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES[:3]))
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--layer-only", action="store_true")
    parser.add_argument("--mmap-threshold", type=int, metavar="BYTES",
                        help="run every merge with glibc's MALLOC_MMAP_THRESHOLD_=BYTES, so that "
                             "freed tensors above it leave the process at once and the peak "
                             "anonymous memory measures live memory, not what the allocator "
                             "keeps (it moves by +-150 MiB from run to run on SmolLM2 by "
                             "default); region merge_cost_<suite>_mmap")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not write docs/")
    parser.add_argument("--rows", nargs="+", metavar="WORD",
                        help="only the rows whose name contains one of these words (and plain); "
                             "printed, not written to docs/")
    parser.add_argument("--calibration-samples", nargs="+", type=int, metavar="N",
                        help="smollm2 suites: time alignment: activations with the default "
                             "calibration budget and with each N prompts of the shipped set "
                             "(plain and weights beside them), with the model card's distance "
                             "after alignment; region merge_cost_<suite>_calibration")
    parser.add_argument("--smollm2-dir", metavar="DIR",
                        help="smollm2-random: a folder with SmolLM2's config.json and tokenizer "
                             "(default: the SmolLM2 folder cached by examples/smollm.py)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda: torch sees no CUDA GPU on this machine; run without --cuda for "
                     "the CPU figures")
    if args.calibration_samples and (args.layer_only or not all(
            s.startswith("smollm2") for s in args.suites)):
        parser.error("--calibration-samples: only the smollm2 suites align by activations")
    if args.layer_only:
        layer_benchmark(args)
    else:
        for suite in args.suites:
            merge_benchmark(args, suite)


if __name__ == "__main__":
    main()
